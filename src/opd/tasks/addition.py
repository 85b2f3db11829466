"""Multi-digit addition written out digit by digit, least significant digit first.

    prompt      "3471+5862:"
    completion  "1+2+0=03,7+6+0=13,4+8+1=13,3+5+1=09;09333"

Each step is "a_i+b_i+carry=ss" (two-digit column sum); the final answer follows ';' with
digits + 1 digits. With `answer_line=False` the completion stops after the last column and the
answer is read off the trace (`extract_trace_answer`: the last column's sum, then each earlier
column's ones digit from the most significant): no long-range copy of the column sums into an
answer line, which the demo's 2-layer student was slow to learn (docs/demo.md).

Every column depends on the carry from the one before, so an early mistake propagates: the long-horizon failure the blog's argument against off-policy training
is about. Train, validation and test splits are disjoint by construction (a seeded hash of the
pair decides its split).
"""

from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass

CHARS = "0123456789+=,;:"


@dataclass(frozen=True)
class Addition:
    digits: int = 4
    answer_line: bool = True  # False: the trace is the whole completion

    def prompt(self, a: int, b: int) -> str:
        return f"{a:0{self.digits}d}+{b:0{self.digits}d}:"

    def answer(self, a: int, b: int) -> str:
        return f"{a + b:0{self.digits + 1}d}"

    def solution(self, a: int, b: int) -> str:
        """The teacher's target: the column-by-column trace, then ';' and the answer."""
        steps, carry = [], 0
        for i in range(self.digits):
            da, db = (a // 10**i) % 10, (b // 10**i) % 10
            s = da + db + carry
            steps.append(f"{da}+{db}+{carry}={s:02d}")
            carry = s // 10
        trace = ",".join(steps)
        return trace + ";" + self.answer(a, b) if self.answer_line else trace

    def direct(self, a: int, b: int) -> str:
        """The other valid path: '=' and the sum at once, least significant digit first
        ("=33390" for 09333), no trace: each digit needs the carry from the column below."""
        return "=" + self.answer(a, b)[::-1]

    def sums(self, a: int, b: int) -> str:
        """A second path that keeps the carry in sight: the column sums alone, least significant
        first, each after a ',' (",03,13,13,09" for 3471+5862): the trace without its operands."""
        return "".join("," + c.split("=")[1] for c in self.solution(a, b).split(";")[0].split(","))

    def split_of(self, a: int, b: int, seed: int = 0) -> str:
        """'test' for about 1 pair in 10, 'valid' for another 1 in 10, else 'train'; fixed by seed."""
        h = hashlib.blake2b(f"{seed}:{a}:{b}".encode(), digest_size=2).digest()
        return {0: "test", 1: "valid"}.get(int.from_bytes(h, "big") % 10, "train")

    def pairs(self, n: int, split: str, seed: int = 0, rng_seed: int = 0) -> list[tuple[int, int]]:
        """n distinct pairs from one split ("train", "valid" or "test"), drawn with rng_seed."""
        rng = random.Random(f"{split}:{rng_seed}")
        hi = 10**self.digits
        out, seen = [], set()
        while len(out) < n:
            a, b = rng.randrange(hi), rng.randrange(hi)
            if (a, b) in seen or self.split_of(a, b, seed) != split:
                continue
            seen.add((a, b))
            out.append((a, b))
        return out

    def rows(self, n: int, split: str, seed: int = 0, rng_seed: int = 0) -> list[dict]:
        return [
            {"prompt": self.prompt(a, b), "answer": self.answer(a, b)}
            for a, b in self.pairs(n, split, seed, rng_seed)
        ]


def extract_either_answer(text: str) -> str:
    """Any path of the two-path task: '=' and digits (`Addition.direct`), ',' and column sums
    (`Addition.sums`), else a trace (`extract_trace_answer`)."""
    text = text.strip()
    if text.startswith("="):
        return text[1:][::-1] if text[1:].isdigit() else ""
    if not text.startswith(","):
        return extract_trace_answer(text)
    sums = text[1:].split(",")
    if not all(len(s) == 2 and s.isdigit() for s in sums):
        return ""
    return sums[-1] + "".join(s[1] for s in reversed(sums[:-1]))


def extract_answer(text: str) -> str:
    """The final answer: what follows the last ';' (empty when there is none)."""
    return text.rsplit(";", 1)[-1].strip() if ";" in text else ""


_COLUMN = re.compile(r"\d\+\d\+\d=(\d\d)")


def extract_trace_answer(text: str) -> str:
    """The answer a trace without an answer line gives: the last column's two-digit sum, then the
    ones digit of every earlier column, most significant first ("1+2+0=03,3+5+1=09" -> "093").
    Empty unless the text is nothing but comma-separated columns."""
    columns = text.strip().split(",")
    sums = [m.group(1) if (m := _COLUMN.fullmatch(c)) else None for c in columns]
    if not columns or None in sums:
        return ""
    return sums[-1] + "".join(s[1] for s in reversed(sums[:-1]))
