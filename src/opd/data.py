"""Prompts: JSONL reading with line-numbered errors, chat templates, encoding, a seeded stream.

A row is `{"prompt": str}` or `{"messages": [{"role": ..., "content": ...}, ...]}`, optionally
with `"answer"`; every other field is kept as metadata. Blank lines are skipped.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from opd.errors import OpdError


@dataclass
class Prompt:
    ids: list[int]
    row: dict[str, Any]  # the JSONL object (answer, metadata)
    where: str  # "file:line", for error messages
    completion_ids: list[int] | None = None  # the row's "completion" + EOS, for SFT on data


def read_jsonl(path: str) -> list[tuple[int, dict[str, Any]]]:
    """(line number, object) for every non-blank line; any malformed line is an error naming it."""
    p = Path(path)
    if not p.is_file():
        raise OpdError(f"prompts file not found: {path}")
    rows = []
    with p.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8").strip()
            except UnicodeDecodeError:
                raise OpdError(f"{path}:{lineno}: not valid UTF-8") from None
            if not line:
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise OpdError(
                    f"{path}:{lineno}: invalid JSON ({e.msg} at column {e.colno})"
                ) from None
            if not isinstance(obj, dict):
                raise OpdError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
            rows.append((lineno, obj))
    if not rows:
        raise OpdError(f"{path}: no prompts (the file is empty)")
    return rows


def prompt_text(row: dict[str, Any], tokenizer, where: str) -> tuple[str, bool]:
    """The text to encode and whether the tokenizer should add its special tokens (BOS)."""
    if "messages" in row:
        messages = row["messages"]
        ok = (
            isinstance(messages, list)
            and messages
            and all(
                isinstance(m, dict)
                and isinstance(m.get("role"), str)
                and isinstance(m.get("content"), str)
                for m in messages
            )
        )
        if not ok:
            raise OpdError(
                f"{where}: 'messages' must be a non-empty list of {{'role': str, 'content': str}}"
            )
        if not getattr(tokenizer, "chat_template", None):
            raise OpdError(
                f"{where}: row has 'messages' but the tokenizer has no chat template; "
                "use {'prompt': str} instead"
            )
        try:
            text = tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=True
            )
        except Exception as e:  # jinja2 raises TemplateError (and the template may raise anything)
            raise OpdError(f"{where}: the chat template rejected these messages: {e}") from None
        return text, False  # chat templates write their own BOS
    if "prompt" in row:
        if not isinstance(row["prompt"], str):
            raise OpdError(
                f"{where}: 'prompt' must be a string, got {type(row['prompt']).__name__}"
            )
        if not row["prompt"].strip():
            raise OpdError(f"{where}: empty prompt")
        return row["prompt"], True
    raise OpdError(f"{where}: row has neither 'prompt' nor 'messages'")


def encode_row(row: dict[str, Any], tokenizer, where: str) -> list[int]:
    text, add_special = prompt_text(row, tokenizer, where)
    ids = tokenizer(text, add_special_tokens=add_special)["input_ids"]
    if not ids:
        raise OpdError(f"{where}: prompt encodes to no tokens")
    return list(ids)


def encode_completion(row: dict[str, Any], tokenizer, where: str, max_tokens: int) -> list[int]:
    text = row.get("completion")
    if not isinstance(text, str) or not text:
        raise OpdError(f"{where}: SFT without a teacher needs a non-empty 'completion' string")
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"]) + [tokenizer.eos_token_id]
    if len(ids) > max_tokens:
        raise OpdError(
            f"{where}: completion is {len(ids)} tokens with EOS, more than "
            f"sampling.max_new_tokens={max_tokens}"
        )
    return ids


def load_prompts(
    path: str,
    tokenizer,
    max_prompt_tokens: int | None = None,
    overlong: str = "error",
    context_note: str = "",
    max_completion_tokens: int | None = None,
    rows: list[tuple[int, dict[str, Any]]] | None = None,
) -> tuple[list[Prompt], int]:
    """Read and encode every row; returns (prompts, number skipped as overlong).

    With max_completion_tokens set, every row must also have a "completion" string (SFT on
    data); it is encoded without special tokens and EOS is appended. rows: what
    `read_jsonl(path)` returned, when the caller has read the file already.
    """
    prompts, skipped = [], 0
    for lineno, row in rows if rows is not None else read_jsonl(path):
        where = f"{path}:{lineno}"
        ids = encode_row(row, tokenizer, where)
        completion = None
        if max_completion_tokens is not None:
            completion = encode_completion(row, tokenizer, where, max_completion_tokens)
        if max_prompt_tokens is not None and len(ids) > max_prompt_tokens:
            if overlong == "skip":
                skipped += 1
                continue
            raise OpdError(
                f"{where}: prompt is {len(ids)} tokens, longer than the {max_prompt_tokens} "
                f"allowed{context_note}; shorten it or set data.overlong=skip"
            )
        prompts.append(Prompt(ids=ids, row=row, where=where, completion_ids=completion))
    if not prompts:
        raise OpdError(f"{path}: every prompt was skipped as overlong ({skipped} rows)")
    return prompts, skipped


def step_indices(
    step: int,
    n_prompts: int,
    batch_prompts: int,
    seed: int,
    shuffle: bool,
    rank: int = 0,
    world_size: int = 1,
) -> list[int]:
    """Prompt indices for this rank at `step`: a pure function of the step (exact resume).

    The stream is the concatenation of per-epoch permutations; step s takes positions
    [s*P, (s+1)*P) of it, split into contiguous equal shards, one per rank.
    """
    per_rank = batch_prompts // world_size
    start = step * batch_prompts + rank * per_rank
    out, cache = [], {}
    for pos in range(start, start + per_rank):
        epoch, i = divmod(pos, n_prompts)
        if epoch not in cache:
            if shuffle:
                g = torch.Generator().manual_seed(seed * 100_003 + epoch)
                cache[epoch] = torch.randperm(n_prompts, generator=g).tolist()
            else:
                cache[epoch] = list(range(n_prompts))
        out.append(cache[epoch][i])
    return out


def left_pad(rows: list[list[int]], pad_id: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens_BL, attention_BL): rows right-aligned to the longest, pad_id on the left.

    The one place prompts are laid out: every sampler and `pack` use it, so the prompt columns of
    a batch never depend on where it came from.
    """
    L = max(len(r) for r in rows)
    tokens_BL = torch.full((len(rows), L), pad_id, dtype=torch.long)
    attention_BL = torch.zeros((len(rows), L), dtype=torch.long)
    for b, row in enumerate(rows):
        tokens_BL[b, L - len(row) :] = torch.tensor(row, dtype=torch.long)
        attention_BL[b, L - len(row) :] = 1
    return tokens_BL.to(device), attention_BL.to(device)


def pack(prompts: list[list[int]], completions: list[list[int]], pad_id: int):
    """Rows of (prompt, completion) in the Rollouts layout: left-padded prompts, then completions.

    Returns (tokens_BT, attention_mask_BT, completion_mask_BT, prompt_len).
    """
    prompt_BL, attention_BL = left_pad(prompts, pad_id)
    B, C = len(completions), max(len(c) for c in completions)
    completion_BC = torch.zeros((B, C), dtype=torch.bool)
    tokens_BC = torch.full((B, C), pad_id, dtype=torch.long)
    for b, c in enumerate(completions):
        tokens_BC[b, : len(c)] = torch.tensor(c, dtype=torch.long)
        completion_BC[b, : len(c)] = True
    return (
        torch.cat([prompt_BL, tokens_BC], 1),
        torch.cat([attention_BL, completion_BC.long()], 1),
        torch.cat([torch.zeros_like(attention_BL, dtype=torch.bool), completion_BC], 1),
        prompt_BL.shape[1],
    )
