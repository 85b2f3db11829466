"""Aligning two tokenizations of one text, for a teacher whose tokenizer is not the student's.

The student's completion is decoded to text; the teacher's tokenizer encodes the same text.
Each token ends at a character offset of the text (`char_ends`). A *span* runs between two
consecutive offsets that both tokenizations have; it is the coarsest unit over which the two
sequences' log-probs can be compared exactly:

    sum over span of student lp  -  sum over span of teacher lp  =  k_span

and the sum of k_span over a completion is the sequence-level log-ratio log p_s(text) -
log p_t(text) (each side's probability of its own tokenization of the text), the quantity
whose expectation is the reverse KL. `spread` gives every student token of a span the span's
mean k (k_span / n), written as a teacher log-prob per student token so that the rest of the
step (advantages, the KL metric) reads it like a same-tokenizer teacher's: the per-token sums
are exact, and a span of one token on each side gives exactly the same-tokenizer value.
"""

from __future__ import annotations

import bisect
import itertools

import torch


def decode(tokenizer, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


def char_ends(tokenizer, ids: list[int], text: str) -> list[int | None]:
    """For each token, the length of the text its prefix ids[: i + 1] decodes to, or None where
    that prefix does not decode to a prefix of `text` (a token that ends inside a character,
    such as a byte-level token holding part of a UTF-8 sequence).

    When the tokens decoded one by one join to `text` (character and most byte-pair tokenizers
    away from split characters), the ends are the pieces' running lengths; otherwise each prefix
    is decoded (`prefix_ends`, quadratic in the length)."""
    pieces = tokenizer.batch_decode(
        [[i] for i in ids], skip_special_tokens=False, clean_up_tokenization_spaces=False
    )
    if "".join(pieces) == text:
        return list(itertools.accumulate(len(p) for p in pieces))
    return prefix_ends(tokenizer, ids, text)


def prefix_ends(tokenizer, ids: list[int], text: str) -> list[int | None]:
    """`char_ends` by decoding every prefix: right for any tokenizer."""
    ends: list[int | None] = []
    for i in range(len(ids)):
        prefix = decode(tokenizer, ids[: i + 1])
        ends.append(len(prefix) if text.startswith(prefix) else None)
    return ends


def span_index(ends: list[int | None], boundaries: list[int]) -> list[int]:
    """Each token's span: the index of the first boundary at or after the token's end. A token
    without an end belongs to the span of the next token that has one (or to the last span)."""
    out = [0] * len(ends)
    nxt = len(boundaries) - 1
    for i in range(len(ends) - 1, -1, -1):
        e = ends[i]
        if e is not None:
            nxt = min(bisect.bisect_left(boundaries, e), len(boundaries) - 1)
        out[i] = nxt
    return out


def align(
    s_ends: list[int | None], t_ends: list[int | None], text_len: int, agree: int
) -> tuple[list[int], list[int], int]:
    """(span of each student token, span of each teacher token, number of spans).

    Boundaries are the offsets both tokenizations end a token at, within the first `agree`
    characters (where the teacher's decoding of its tokens equals the student's text), plus the
    text's end. A span with no student token is merged into the next one (or the last one), so
    every teacher log-prob lands on some student token."""
    shared = {e for e in s_ends if e is not None and e <= agree}
    shared &= {e for e in t_ends if e is not None and e <= agree}
    boundaries = sorted(shared - {0} | {text_len})
    s_span = span_index(s_ends, boundaries)
    t_span = span_index(t_ends, boundaries)
    used = sorted(set(s_span))
    if not used:
        return s_span, [0] * len(t_span), 0
    # renumber: spans with student tokens 0..S-1; others fold into the next used one
    remap = {}
    for j in range(len(boundaries)):
        later = [u for u in used if u >= j]
        remap[j] = used.index(later[0]) if later else len(used) - 1
    return [remap[j] for j in s_span], [remap[j] for j in t_span], len(used)


def spread(
    sampler_lp_C: torch.Tensor, teacher_lp_D: torch.Tensor, s_span: list[int], t_span: list[int]
) -> torch.Tensor:
    """(C,) a teacher log-prob for each of the C student tokens from the teacher's D log-probs:
    sampler_lp_t - k_span / n_span, so that sampler_lp - result is the span's mean k on each of
    its n_span tokens (and sums to k_span)."""
    n_spans = max(s_span, default=-1) + 1
    s_idx = torch.tensor(s_span, dtype=torch.long)
    t_idx = torch.tensor(t_span, dtype=torch.long)
    s_sum = torch.zeros(n_spans, dtype=torch.float64).index_add_(0, s_idx, sampler_lp_C.double())
    t_sum = torch.zeros(n_spans, dtype=torch.float64)
    if len(t_span):
        t_sum.index_add_(0, t_idx, teacher_lp_D.double())
    count = torch.zeros(n_spans, dtype=torch.float64).index_add_(
        0, s_idx, torch.ones(len(s_span), dtype=torch.float64)
    )
    k = (s_sum - t_sum) / count
    return (sampler_lp_C.double() - k[s_idx]).float()


def common_prefix(a: str, b: str) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def alignment_summary(student_tokenizer, teacher_tokenizer, texts: list[str]) -> str:
    """How two tokenizations of `texts` line up, in words (`opd check`): the tokens on each
    side, the shared spans, and how many spans are one token on both sides (exact per token)."""
    n_s = n_t = n_spans = one_to_one = 0
    lost = 0  # characters past where the teacher's decoding stops matching the text
    for text in texts:
        s_ids = list(student_tokenizer(text, add_special_tokens=False)["input_ids"])
        s_text = decode(student_tokenizer, s_ids)
        t_ids = list(teacher_tokenizer(s_text, add_special_tokens=False)["input_ids"])
        t_text = decode(teacher_tokenizer, t_ids)
        agree = common_prefix(s_text, t_text)
        lost += len(s_text) - agree
        s_span, t_span, n = align(
            char_ends(student_tokenizer, s_ids, s_text),
            char_ends(teacher_tokenizer, t_ids, t_text),
            len(s_text),
            agree,
        )
        n_s, n_t, n_spans = n_s + len(s_ids), n_t + len(t_ids), n_spans + n
        one_to_one += sum(1 for j in range(n) if s_span.count(j) == 1 and t_span.count(j) == 1)
    out = (
        f"{n_s} student and {n_t} teacher tokens in {n_spans} shared spans "
        f"({n_s / max(n_spans, 1):.2f} student tokens per span; {one_to_one} spans one token "
        "on each side)"
    )
    if lost:
        out += f"; {lost} characters the teacher's tokenizer does not give back (one span)"
    return out
