"""Instruction following with programmatic verifiers, IFEval-style, at laptop scale.

A prompt asks the assistant to say a short phrase under one constraint:

    User: Say: Red foxes, tall trees.
    Rule: use capital letters
    Bot: RED FOXES, TALL TREES.

Each constraint has a rule text, the response that follows it (what the assistant is trained
on) and a verifier. Where a constraint is also in IFEval (Zhou et al. 2023, "Instruction-Following
Evaluation for Large Language Models"; lm-eval's `ifeval` task), the verifier follows that
instruction's semantics and the registry id is named (`IFEVAL_ID`). Custom ones are marked.

A response passes when its constraint holds **and** it says the phrase: the phrase's words
appear in it in order (case and punctuation aside). IFEval checks the constraint alone, so an
empty answer passes "no commas" there; here it does not (`passes`). `follows` is the constraint
alone, for comparison.

Deliberately left out: IFEval's language detection (every text here is English), its loose
mode (responses with the first/last line removed), and multi-constraint prompts.
lm-eval's checkers are not imported: its IFEval module downloads NLTK data at import.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from opd.tasks.facts import make_name

# The characters every prompt and response here is written with (a character tokenizer's set).
CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 \n.,:;!?'\"[]*-()"

ADJECTIVES = "red tall small old green quiet bright cold dark soft warm wild".split()
NOUNS = "foxes trees birds boats hills rivers lamps stones clouds roads cats bells".split()
WORDS = "yes done sure okay thanks hello maybe indeed".split()  # for first/last/keyword rules

# constraint -> lm-eval IFEval instruction id with the same semantics ("" for custom ones)
IFEVAL_ID = {
    "capital": "change_case:english_capital",
    "lowercase": "change_case:english_lowercase",
    "quotation": "startend:quotation",
    "brackets": "",  # custom: wrapped in [ ]
    "end_word": "startend:end_checker",
    "first_word": "",  # custom: IFEval's first_word is per paragraph
    "no_comma": "punctuation:no_comma",
    "bullets": "detectable_format:number_bullet_lists",
    "keyword": "",  # custom: IFEval's keywords:frequency says "at least"; here exactly k times
    "postscript": "detectable_content:postscript",
}
CONSTRAINTS = tuple(IFEVAL_ID)


@dataclass(frozen=True)
class Instruction:
    phrase: str  # what to say
    kind: str  # one of CONSTRAINTS
    word: str = ""  # first_word, end_word, keyword, postscript
    count: int = 0  # bullets (one word each), keyword (times)

    def rule(self) -> str:
        return {
            "capital": "use capital letters",
            "lowercase": "use lowercase only",
            "quotation": "wrap it in double quotes",
            "brackets": "wrap it in square brackets",
            "end_word": f"end with the word {self.word}",
            "first_word": f"start with the word {self.word}",
            "no_comma": "use no commas",
            "bullets": f"{self.count} bullet points, one word each",
            "keyword": f"add the word {self.word} {self.count} times",
            "postscript": f"add a postscript P.S. {self.word}",
        }[self.kind]

    def prompt(self) -> str:
        return f"User: Say: {self.phrase}\nRule: {self.rule()}\nBot: "

    def response(self) -> str:
        """The response that follows the rule (the assistant's training target)."""
        p, w = self.phrase, self.word
        if self.kind == "capital":
            return p.upper()
        if self.kind == "lowercase":
            return p.lower()
        if self.kind == "quotation":
            return f'"{p}"'
        if self.kind == "brackets":
            return f"[{p}]"
        if self.kind == "end_word":
            return f"{p} {w}"
        if self.kind == "first_word":
            return f"{w.capitalize()}, {p[0].lower()}{p[1:]}"
        if self.kind == "no_comma":
            return p.replace(",", "")
        if self.kind == "bullets":
            return "\n".join(f"* {x}" for x in words_of(p))
        if self.kind == "keyword":
            return f"{p} {' '.join([w] * self.count)}"
        if self.kind == "postscript":
            return f"{p}\nP.S. {w}"
        raise ValueError(f"unknown constraint {self.kind!r}")

    def follows(self, response: str) -> bool:
        """The constraint alone (IFEval's strict check where the id is IFEval's)."""
        r, w = response.strip(), self.word.lower()
        if self.kind == "capital":  # IFEval: value.isupper()
            return r.isupper()
        if self.kind == "lowercase":  # IFEval: value.islower()
            return r.islower()
        if self.kind == "quotation":  # IFEval: len > 1, starts and ends with '"'
            return len(r) > 1 and r[0] == '"' and r[-1] == '"'
        if self.kind == "brackets":
            return len(r) > 1 and r[0] == "[" and r[-1] == "]"
        if self.kind == "end_word":  # IFEval end_checker: lower-cased, stripped endswith
            return r.lower().endswith(w)
        if self.kind == "first_word":
            first = re.match(r"[A-Za-z]+", r)
            return bool(first) and first.group(0).lower() == w
        if self.kind == "no_comma":  # IFEval: not re.search(r"\,", value)
            return "," not in r
        if self.kind == "bullets":  # IFEval: lines "* x" plus lines "- x" == N
            stars = re.findall(r"^\s*\*[^\*].*$", r, flags=re.MULTILINE)
            dashes = re.findall(r"^\s*-.*$", r, flags=re.MULTILINE)
            return len(stars) + len(dashes) == self.count
        if self.kind == "keyword":  # whole words, case-insensitive (as IFEval counts)
            return len(re.findall(rf"\b{re.escape(w)}\b", r, flags=re.IGNORECASE)) == self.count
        if self.kind == "postscript":  # IFEval: r"\s*p\.\s?s\..*$" on the lower-cased text
            return bool(re.findall(r"\s*p\.\s?s\..*$", r.lower(), flags=re.MULTILINE))
        raise ValueError(f"unknown constraint {self.kind!r}")

    def passes(self, response: str) -> bool:
        """The constraint holds and the phrase is said (its words in order)."""
        return self.follows(response) and says(response, self.phrase)

    def row(self) -> dict:
        return {
            "prompt": self.prompt(),
            "completion": self.response(),
            "constraint": {"kind": self.kind, "word": self.word, "count": self.count},
            "phrase": self.phrase,
        }


def words_of(text: str) -> list[str]:
    return re.findall(r"[A-Za-z0-9']+", text)


def says(response: str, phrase: str) -> bool:
    """The phrase's words appear in the response in this order (lower-cased; others between)."""
    said = iter(w.lower() for w in words_of(response))
    return all(any(w == x for x in said) for w in (w.lower() for w in words_of(phrase)))


def from_row(row: dict) -> Instruction:
    c = row["constraint"]
    return Instruction(row["phrase"], c["kind"], c.get("word", ""), c.get("count", 0))


def make_phrase(rng: random.Random) -> str:
    """Two noun groups with a comma between them, the second one a name half the time: 'Red
    foxes, tall trees.', 'Red foxes, Bado.' (copying a name the assistant never saw is what
    answering a question about a person needs too, tasks/facts.py)."""
    a, b = (f"{rng.choice(ADJECTIVES)} {rng.choice(NOUNS)}" for _ in range(2))
    if rng.random() < 0.5:
        b = make_name(rng)
    return f"{a[0].upper()}{a[1:]}, {b}."


def make_instruction(rng: random.Random, kind: str | None = None) -> Instruction:
    kind = kind or rng.choice(CONSTRAINTS)
    phrase = make_phrase(rng)
    word = rng.choice(WORDS) if kind in ("end_word", "first_word", "keyword", "postscript") else ""
    count = {"bullets": len(words_of(phrase)), "keyword": rng.choice((2, 3))}.get(kind, 0)
    return Instruction(phrase, kind, word, count)


def instructions(n: int, seed: int, exclude: set[str] = frozenset()) -> list[Instruction]:
    """n distinct instructions (by prompt), constraint kinds in turn, none with a phrase in
    `exclude` (held-out splits share no phrase with training ones)."""
    rng, out, seen = random.Random(seed), [], set()
    while len(out) < n:
        ins = make_instruction(rng, CONSTRAINTS[len(out) % len(CONSTRAINTS)])
        if ins.phrase in exclude or ins.prompt() in seen:
            continue
        seen.add(ins.prompt())
        out.append(ins)
    return out


def pass_rate(rows: list[dict], responses: list[str]) -> float:
    """Fraction of instruction rows whose response `passes`."""
    if len(rows) != len(responses) or not rows:
        raise ValueError(f"{len(rows)} rows but {len(responses)} responses")
    return sum(from_row(r).passes(t) for r, t in zip(rows, responses, strict=True)) / len(rows)
