"""Prompts: JSONL reading with line-numbered errors, chat templates, encoding, a seeded stream.

A row is `{"prompt": str}` or `{"messages": [{"role": ..., "content": ...}, ...]}`, optionally
with `"answer"` (a string or a number) and what only the teacher reads (`"teacher_prompt"`, a
string, or `"teacher_messages"`, teachers/view.py); every other field is kept as metadata. For
`opd sft` on data a row is also `{"text": str}`, a document trained on every token (documents.py).
Blank lines are skipped. Each field opd reads is checked for its type and for valid Unicode as
the line is read.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from opd.documents import is_document, special_prefix, split_document
from opd.errors import OpdError


@dataclass
class Prompt:
    ids: list[int]
    row: dict[str, Any]  # the JSONL object (answer, metadata)
    where: str  # "file:line", for error messages
    # SFT on data: the row's "completion" + EOS, or a document's chunk (EOS on its last one)
    completion_ids: list[int] | None = None
    unknown: int = 0  # tokens that are the unknown token for text outside the vocabulary


# A prompts file's line is refused unread past this many bytes: no prompt for any model's context
# comes near it (a million tokens of a few bytes each), and json.loads of a line this size is
# still quick. Prompts are held to the model's context before tokenising (`load_prompts`).
MAX_LINE_BYTES = 16 << 20


def read_jsonl(path: str) -> list[tuple[int, dict[str, Any]]]:
    """(line number, object) for every non-blank line; any malformed line is an error naming it."""
    p = Path(path)
    if p.is_dir():
        raise OpdError(f"{path} is a folder, not a prompts file")
    if not p.is_file():
        raise OpdError(f"prompts file not found: {path}")
    rows = []
    try:
        with p.open("rb") as f:
            lineno = 0
            while raw := f.readline(MAX_LINE_BYTES + 1):
                lineno += 1
                if len(raw) > MAX_LINE_BYTES:
                    raise OpdError(
                        f"{path}:{lineno}: line is longer than {MAX_LINE_BYTES >> 20} MiB; "
                        "no prompt is that long"
                    )
                obj = parse_line(raw, f"{path}:{lineno}")
                if obj is not None:
                    rows.append((lineno, obj))
    except OSError as e:
        raise OpdError(f"cannot read prompts file {path} ({e.strerror or e})") from None
    if not rows:
        raise OpdError(f"{path}: no prompts (the file is empty)")
    return rows


def parse_line(raw: bytes, where: str) -> dict[str, Any] | None:
    """One JSONL line as a checked row (None for a blank line), or an OpdError naming it."""
    try:
        line = raw.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise OpdError(f"{where}: not valid UTF-8") from None
    if not line:
        return None
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise OpdError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from None
    except RecursionError:
        raise OpdError(f"{where}: JSON nested too deeply") from None
    except ValueError:  # an integer past Python's digit limit for int(str)
        raise OpdError(
            f"{where}: a number has more digits than JSON numbers may have here "
            f"({sys.get_int_max_str_digits()}); write it as a string"
        ) from None
    if not isinstance(obj, dict):
        raise OpdError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    check_row(obj, where)
    return obj


def check_row(row: dict[str, Any], where: str) -> None:
    """The fields opd reads have the types it reads them as, and their text is valid Unicode."""
    texts = []  # (field, value) of every string opd encodes or compares
    for name in ("prompt", "completion", "teacher", "teacher_prompt"):
        if name in row:
            if not isinstance(row[name], str):
                raise OpdError(
                    f"{where}: '{name}' must be a string, got {type(row[name]).__name__}"
                )
            texts.append((name, row[name]))
    if is_document(row):
        text = row["text"]
        if not isinstance(text, str):
            raise OpdError(f"{where}: 'text' must be a string, got {type(text).__name__}")
        if not text.strip():
            raise OpdError(f"{where}: empty 'text' (a document row needs some text)")
        if "completion" in row:
            raise OpdError(
                f"{where}: a 'text' row is a document, trained on every token; "
                "'completion' belongs with a 'prompt' or 'messages'"
            )
        texts.append(("text", text))
    for key in ("messages", "teacher_messages"):
        if key not in row:
            continue
        messages = row[key]
        ok = (
            isinstance(messages, list)
            and messages
            and all(
                isinstance(m, dict) and all(isinstance(m.get(k), str) for k in ("role", "content"))
                for m in messages
            )
        )
        if not ok:
            raise OpdError(
                f"{where}: '{key}' must be a non-empty list of {{'role': str, 'content': str}}"
            )
        for i, m in enumerate(messages):
            texts += [(f"{key}[{i}].role", m["role"]), (f"{key}[{i}].content", m["content"])]
    if "answer" in row:
        answer = row["answer"]
        number = isinstance(answer, (int, float)) and not isinstance(answer, bool)
        if not (isinstance(answer, str) or number):
            raise OpdError(
                f"{where}: 'answer' must be a string or a number, got {type(answer).__name__} "
                f"{_short(answer)}"
            )
        if isinstance(answer, float) and not math.isfinite(answer):
            raise OpdError(f"{where}: 'answer' is {answer}, not a finite number")
        if isinstance(answer, str):
            texts.append(("answer", answer))
    for name, text in texts:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            raise OpdError(
                f"{where}: '{name}' holds a lone surrogate {text[e.start]!r} at character "
                f"{e.start}: not valid Unicode text"
            ) from None


def _short(value: Any) -> str:
    try:
        text = json.dumps(value)
    except (ValueError, RecursionError):
        text = "..."
    return text if len(text) <= 40 else text[:37] + "..."


def prompt_text(row: dict[str, Any], tokenizer, where: str) -> tuple[str, bool]:
    """The text to encode and whether the tokenizer should add its special tokens (BOS)."""
    check_row(row, where)  # the types (rows from read_jsonl have been checked already)
    if "messages" in row:
        messages = row["messages"]
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
        if not row["prompt"].strip():
            raise OpdError(f"{where}: empty prompt")
        return row["prompt"], True
    if is_document(row):
        raise OpdError(
            f"{where}: a 'text' row (a document) trains only with `opd sft` without a teacher"
        )
    raise OpdError(f"{where}: row has neither 'prompt' nor 'messages'")


def encode_row(row: dict[str, Any], tokenizer, where: str) -> list[int]:
    text, add_special = prompt_text(row, tokenizer, where)
    return Encoder(tokenizer).prompt(text, add_special, where)[0]


class Encoder:
    """Text to token ids for one tokenizer, with the checks that come before and after it:
    a text too many bytes long for a token budget is refused before it is tokenised, and text
    the vocabulary has no token for (the unknown token) is an error unless `unknown` is 'unk'."""

    # A text of n bytes needs at least n / (longest token's bytes) tokens, or a third of that
    # where a normaliser composes characters (NFC: three 3-byte jamo make one syllable); 4 x
    # leaves room for that, so `too_long` never refuses a text that would fit.
    SLACK = 4

    def __init__(self, tokenizer, unknown: str = "error"):
        self.tokenizer, self.unknown = tokenizer, unknown
        vocab = tokenizer.get_vocab()
        self.token_bytes = max((len(t.encode("utf-8", "replace")) for t in vocab), default=1)

    def too_long(self, text: str, max_tokens: int | None) -> int:
        """The text's size in bytes when no tokenisation of it fits max_tokens, else 0."""
        if max_tokens is None or len(text) <= max_tokens:  # a character is at least a byte
            return 0
        n = len(text.encode("utf-8"))
        return n if n > self.SLACK * max_tokens * self.token_bytes else 0

    def prompt(self, text: str, add_special: bool, where: str) -> tuple[list[int], int]:
        """(ids, how many are the unknown token for text outside the vocabulary)."""
        ids = list(self.tokenizer(text, add_special_tokens=add_special)["input_ids"])
        if not ids:
            raise OpdError(f"{where}: prompt encodes to no tokens")
        return ids, self.unknown_tokens(text, ids, where, "prompt")

    def completion(self, row: dict[str, Any], where: str, max_tokens: int) -> tuple[list[int], int]:
        text = row.get("completion")
        if not isinstance(text, str) or not text:
            raise OpdError(f"{where}: SFT without a teacher needs a non-empty 'completion' string")
        if n := self.too_long(text, max_tokens):
            raise OpdError(
                f"{where}: completion is {n} bytes, far more than "
                f"sampling.max_new_tokens={max_tokens} tokens can hold"
            )
        ids = list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        unknown = self.unknown_tokens(text, ids, where, "completion")
        ids.append(self.tokenizer.eos_token_id)
        if len(ids) > max_tokens:
            raise OpdError(
                f"{where}: completion is {len(ids)} tokens with EOS, more than "
                f"sampling.max_new_tokens={max_tokens}"
            )
        return ids, unknown

    def document(self, row: dict[str, Any], where: str) -> tuple[list[int], int]:
        """A document's ids (no special tokens, no EOS) and how many are the unknown token."""
        ids = list(self.tokenizer(row["text"], add_special_tokens=False)["input_ids"])
        return ids, self.unknown_tokens(row["text"], ids, where, "text")

    def unknown_tokens(self, text: str, ids: list[int], where: str, what: str) -> int:
        """How many of ids stand for text outside the vocabulary; an error unless 'unk'."""
        tok, unk = self.tokenizer, self.tokenizer.unk_token_id
        if unk is None or unk not in ids:
            return 0
        if getattr(tok, "is_fast", False):  # the text each unknown token stands for
            enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
            pairs = zip(enc["input_ids"], enc["offset_mapping"], strict=True)
            found = [text[a:b] for i, (a, b) in pairs if i == unk and text[a:b] != tok.unk_token]
        else:
            chars = dict.fromkeys(text)
            found = [c for c in chars if unk in tok(c, add_special_tokens=False)["input_ids"]]
        if not found:  # only the unknown token's own text, written out
            return 0
        if self.unknown == "error":
            shown = ", ".join(
                f"{c!r} (U+{ord(c):04X})" if len(c) == 1 else repr(c)
                for c in list(dict.fromkeys(found))[:3]
            )
            raise OpdError(
                f"{where}: the {what} has text the tokenizer has no token for: {shown}; it would "
                f"become the unknown token {tok.unk_token!r}: fix the data, or set "
                "data.unknown_chars=unk to encode it so (counted in metrics)"
            )
        return ids.count(unk)


def load_prompts(
    path: str,
    tokenizer,
    max_prompt_tokens: int | None = None,
    overlong: str = "error",
    context_note: str = "",
    max_completion_tokens: int | None = None,
    rows: list[tuple[int, dict[str, Any]]] | None = None,
    unknown: str = "error",
    context: int | None = None,
) -> tuple[list[Prompt], int]:
    """Read and encode every row; returns (prompts, number skipped as overlong).

    With max_completion_tokens set (SFT on data), every row must also have a "completion"
    string, encoded without special tokens and with EOS appended, or be a `{"text"}` document,
    which becomes one row or more, each at most `context` tokens (`document_prompts`). rows:
    what `read_jsonl(path)` returned, when the caller has read the file already. unknown: what
    text outside the vocabulary does, 'error' or 'unk' (`Encoder`).
    """
    prompts, skipped, prefix = [], 0, None
    encoder = Encoder(tokenizer, unknown)
    for lineno, row in rows if rows is not None else read_jsonl(path):
        where = f"{path}:{lineno}"
        if is_document(row) and max_completion_tokens is not None:
            prefix = special_prefix(tokenizer) if prefix is None else prefix
            prompts += document_prompts(row, where, encoder, prefix, context)
            continue
        text, add_special = prompt_text(row, tokenizer, where)
        if n_bytes := encoder.too_long(text, max_prompt_tokens):  # before tokenising it
            length = f"{n_bytes} bytes, far more than {max_prompt_tokens} tokens can hold"
        else:
            ids, n_unknown = encoder.prompt(text, add_special, where)
            length = f"{len(ids)} tokens, longer than the {max_prompt_tokens} allowed"
        if n_bytes or (max_prompt_tokens is not None and len(ids) > max_prompt_tokens):
            if overlong == "skip":
                skipped += 1
                continue
            raise OpdError(
                f"{where}: prompt is {length}{context_note}; shorten it or set data.overlong=skip"
            )
        completion = None
        if max_completion_tokens is not None:
            completion, more = encoder.completion(row, where, max_completion_tokens)
            n_unknown += more
        prompts.append(Prompt(ids, row, where, completion, n_unknown))
    if not prompts:
        raise OpdError(f"{path}: every prompt was skipped as overlong ({skipped} rows)")
    return prompts, skipped


def document_prompts(
    row: dict[str, Any], where: str, encoder: Encoder, prefix: list[int], context: int | None
) -> list[Prompt]:
    """A document's rows, in order (documents.split_document); `where` names the part when
    the document is cut into several."""
    ids, unknown = encoder.document(row, where)
    if not ids:
        raise OpdError(f"{where}: 'text' encodes to no tokens")
    if context is not None and context <= max(len(prefix), 1):
        raise OpdError(f"{where}: the models' {context}-token context leaves no room for text")
    tok = encoder.tokenizer
    chunks = split_document(ids, prefix, tok.eos_token_id, context)
    n = len(chunks)
    return [
        Prompt(
            prompt,
            row,
            where if n == 1 else f"{where} (part {i}/{n})",
            completion,
            completion.count(tok.unk_token_id) if unknown else 0,
        )
        for i, (prompt, completion) in enumerate(chunks, 1)
    ]


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
