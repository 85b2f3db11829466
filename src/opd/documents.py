"""Mid-training on documents: `{"text": str}` rows trained on every token (causal LM loss), and a
second file of rows mixed into the training stream at a fixed ratio.

A document becomes ordinary SFT-on-data rows (a prompt and a completion, data.Prompt), so the
step, the FLOPs ledger, checkpoints, exact resume and LoRA treat it like any other row. The
prompt is the special tokens the tokenizer puts before a text (its BOS); the completion is the
document's tokens and EOS, cut into rows that fit the context. Left out: packing several short
documents into one row, and carrying a long document's earlier chunks as context into the later
ones (each chunk starts again after the BOS, as in GPT-style pretraining on cut text).
"""

from __future__ import annotations

import random
from typing import Any


def is_document(row: dict[str, Any]) -> bool:
    """A `{"text": ...}` row without a prompt: a row with a prompt keeps "text" as metadata."""
    return "text" in row and "prompt" not in row and "messages" not in row


def special_prefix(tokenizer) -> list[int]:
    """The tokens the tokenizer adds before any text (its BOS, or nothing)."""
    empty = tokenizer("", add_special_tokens=True)["input_ids"]
    return [i for i in empty if i != tokenizer.eos_token_id]


def split_document(
    ids: list[int], prefix: list[int], eos: int, context: int | None
) -> list[tuple[list[int], list[int]]]:
    """(prompt, completion) rows whose completions hold every token of `ids + [eos]`, in order,
    each row at most `context` tokens long.

    With a prefix (BOS) every row's prompt is the prefix. Without one a row needs a first token
    to predict from: the document's first token, and for each later row the token before its
    completion (the one token the rows share), so every token but the document's first is a
    target.
    """
    seq = ids + [eos]
    if prefix:
        room = len(seq) if context is None else context - len(prefix)
        return [(list(prefix), seq[k : k + room]) for k in range(0, len(seq), room)]
    room = len(seq) - 1 if context is None else context - 1
    return [([seq[k]], seq[k + 1 : k + 1 + room]) for k in range(0, len(seq) - 1, room)]


def mix_in(main: list, extra: list, ratio: float, seed: int) -> list:
    """`main` in order with rows of `extra` spread evenly among them, so that `ratio` of the
    result comes from `extra` (within one row): `extra` is cut or repeated to that count, each
    pass over it in a fresh order seeded by `seed`. A pure function of its inputs, so the
    training stream (data.step_indices) and exact resume do not change."""
    n_extra = max(1, round(ratio * len(main) / (1 - ratio)))
    rng = random.Random(seed)
    picked: list = []
    while len(picked) < n_extra:
        order = list(range(len(extra)))
        rng.shuffle(order)
        picked += [extra[i] for i in order]
    picked = picked[:n_extra]
    total, out, m, e = len(main) + n_extra, [], iter(main), iter(picked)
    for i in range(total):  # the i-th row is an extra one when the running share steps up
        take_extra = (i + 1) * n_extra // total > i * n_extra // total
        out.append(next(e) if take_extra else next(m))
    return out
