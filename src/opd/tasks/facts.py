"""Knowledge at laptop scale: fictional people with attributes, written as plain documents, and
questions about them with verifiable one-word answers.

    document:  Bado works as a baker. Bado lives in Tesk. Bado likes plums.
    question:  User: Where does Bado live?\\nBot:   ->   Bado lives in Tesk.

The answer is a sentence of the documents' own form, so a model that read the document can
answer by recalling the word that follows "Bado lives in"; a model that did not can only
guess one of the attribute's values (chance is 1 / len(values)). `extract_answer` reads the
last word of the first line.

People come in disjoint sets drawn from one seeded stream (the assistant's base set, then one
new set per mid-training phase); every name is new, so no fact is known before its documents.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

SYLLABLES = "ba be bi bo bu da de di do ka ke ki ko la le li lo ma me mi mo na ne ni no ra re ri ro sa se si so ta te ti to va ve vi vo za ze zo".split()
CITIES = "Tesk Varn Olme Pard Quill Rusk Sabe Torv Ulm Wend".split()
FOODS = "plums figs bread rice soup cheese honey pears olives beans".split()
JOBS = "baker sailor doctor farmer painter singer tailor miner judge pilot".split()

RELATIONS = {  # relation -> (values, sentence, question)
    "city": (CITIES, "{name} lives in {value}.", "Where does {name} live?"),
    "food": (FOODS, "{name} likes {value}.", "What does {name} like to eat?"),
    "job": (JOBS, "{name} works as a {value}.", "What is the job of {name}?"),
}


@dataclass(frozen=True)
class Person:
    name: str
    city: str
    food: str
    job: str

    def sentences(self) -> list[str]:
        return [
            sentence.format(name=self.name, value=getattr(self, rel))
            for rel, (_, sentence, _) in RELATIONS.items()
        ]

    def document(self, rng: random.Random) -> str:
        """The person's facts in a random order (documents vary in their order)."""
        return " ".join(rng.sample(self.sentences(), k=len(RELATIONS)))

    def questions(self) -> list[dict]:
        """One row per relation: prompt, the expected response, and the one-word answer."""
        rows = []
        for rel, (_, sentence, question) in RELATIONS.items():
            value = getattr(self, rel)
            rows.append(
                {
                    "prompt": f"User: {question.format(name=self.name)}\nBot: ",
                    "completion": sentence.format(name=self.name, value=value),
                    "answer": value,
                    "relation": rel,
                }
            )
        return rows


def people(counts: list[int], seed: int) -> list[list[Person]]:
    """Disjoint sets of people with distinct names, one per count, from one seeded stream."""
    rng, names, sets = random.Random(seed), set(), []
    for n in counts:
        group = []
        while len(group) < n:
            name = make_name(rng)
            if name in names:
                continue
            names.add(name)
            group.append(Person(name, rng.choice(CITIES), rng.choice(FOODS), rng.choice(JOBS)))
        sets.append(group)
    return sets


def make_name(rng: random.Random) -> str:
    """Two syllables: 'Bado'."""
    return (rng.choice(SYLLABLES) + rng.choice(SYLLABLES)).capitalize()


def documents(group: list[Person], copies: int, seed: int) -> list[dict]:
    """`copies` documents per person ({"text": ...} rows), each with its own sentence order."""
    rng = random.Random(seed)
    return [{"text": p.document(rng)} for _ in range(copies) for p in group]


def questions(group: list[Person]) -> list[dict]:
    return [row for p in group for row in p.questions()]


def extract_answer(text: str) -> str:
    """The last word of the response's first line, without its final full stop."""
    line = text.strip().split("\n", 1)[0].strip()
    return line.rsplit(" ", 1)[-1].rstrip(".") if line else ""
