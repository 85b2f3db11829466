"""The instruction verifiers (tasks/instruct.py) on hand-written and generated responses, and
the knowledge world (tasks/facts.py)."""

import random
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from opd.tasks import facts, instruct
from opd.tasks.instruct import CONSTRAINTS, Instruction

PHRASE = "Red foxes, tall trees."

# (constraint, word, count) -> (passing responses, failing responses), written by hand
HAND = {
    ("capital", "", 0): (["RED FOXES, TALL TREES."], ["Red foxes, tall trees.", "RED FOXES, tall"]),
    ("lowercase", "", 0): (["red foxes, tall trees."], ["Red foxes, tall trees.", "red FOXES"]),
    ("quotation", "", 0): (
        ['"Red foxes, tall trees."', '  "red foxes, tall trees"  '],
        ["Red foxes, tall trees.", '"Red foxes, tall trees.', '"'],
    ),
    ("brackets", "", 0): (
        ["[Red foxes, tall trees.]"],
        ["(Red foxes, tall trees.)", "[Red foxes, tall trees."],
    ),
    ("end_word", "done", 0): (
        ["Red foxes, tall trees. done", "Red foxes, tall trees. DONE"],
        ["Red foxes, tall trees.", "done Red foxes, tall trees."],
    ),
    ("first_word", "sure", 0): (
        ["Sure, red foxes, tall trees.", "sure red foxes tall trees"],
        ["Red foxes, tall trees. sure", "Surely red foxes, tall trees."],
    ),
    ("no_comma", "", 0): (["Red foxes tall trees."], ["Red foxes, tall trees.", "Red, foxes tall trees"]),
    ("bullets", "", 4): (
        ["* Red\n* foxes\n* tall\n* trees", "- Red\n- foxes\n- tall\n- trees"],
        ["* Red\n* foxes\n* tall trees", "* Red\n* foxes\n* tall\n* trees\n* ok", "Red foxes tall trees"],
    ),
    ("keyword", "yes", 2): (
        ["Red foxes, tall trees. yes yes", "Yes, red foxes, tall trees. yes"],
        ["Red foxes, tall trees. yes", "Red foxes, tall trees. yes yes yes", "yesyes red foxes tall trees"],
    ),
    ("postscript", "okay", 0): (
        ["Red foxes, tall trees.\nP.S. okay", "Red foxes, tall trees. p.s. fine"],
        ["Red foxes, tall trees.", "Red foxes, tall trees. PS okay"],
    ),
}  # fmt: skip


def test_every_constraint_has_hand_written_cases():
    assert {k[0] for k in HAND} == set(CONSTRAINTS)
    assert len(CONSTRAINTS) >= 8


@pytest.mark.parametrize("key", sorted(HAND))
def test_hand_written_responses(key):
    ins = Instruction(PHRASE, *key)
    good, bad = HAND[key]
    for response in good:
        assert ins.passes(response), (key, response)
    for response in bad:
        assert not ins.passes(response), (key, response)


def test_the_phrase_must_be_said():
    """IFEval's no_comma passes an empty answer; here the phrase's words must be there too."""
    ins = Instruction(PHRASE, "no_comma")
    assert ins.follows("") and not ins.passes("")
    assert not ins.passes("Red foxes tall.")  # a word missing
    assert not ins.passes("Tall trees red foxes.")  # out of order
    assert ins.passes("Well red foxes and tall trees.")  # words between are fine


@settings(max_examples=200, deadline=None)
@given(seed=st.integers(0, 10**9), kind=st.sampled_from(CONSTRAINTS))
def test_generated_responses_pass_and_broken_ones_fail(seed, kind):
    ins = instruct.make_instruction(random.Random(seed), kind)
    good = ins.response()
    assert ins.passes(good)
    assert ins.prompt().startswith("User: Say: ") and ins.prompt().endswith("\nBot: ")
    assert set(ins.prompt() + good) <= set(instruct.CHARS)
    broken = {
        "capital": good.capitalize(),
        "lowercase": good.upper(),
        "quotation": good.strip('"'),
        "brackets": good[1:-1],
        "end_word": good.rsplit(" ", 1)[0],
        "first_word": good.split(" ", 1)[1],
        "no_comma": ins.phrase,
        "bullets": good.rsplit("\n", 1)[0],
        "keyword": good + " " + ins.word,
        "postscript": good.split("\n")[0],
    }[kind]
    assert not ins.passes(broken), (kind, broken)
    last = list(re.finditer(rf"\b{instruct.words_of(ins.phrase)[-1]}\b", good, re.IGNORECASE))[-1]
    assert not ins.passes(good[: last.start()] + good[last.end() :])  # the phrase's last word gone


def test_held_out_instructions_share_no_phrase():
    train = instruct.instructions(500, seed=0)
    test = instruct.instructions(50, seed=1, exclude={i.phrase for i in train})
    assert not {i.phrase for i in train} & {i.phrase for i in test}
    assert {i.kind for i in test} == set(CONSTRAINTS)  # every constraint type is evaluated
    rows = [i.row() for i in test]
    assert instruct.pass_rate(rows, [i.response() for i in test]) == 1.0
    assert instruct.pass_rate(rows, ["" for _ in test]) == 0.0
    assert instruct.from_row(rows[3]) == test[3]


def test_people_sets_are_disjoint_and_questions_answer_from_documents():
    base, new = facts.people([30, 10], seed=0)
    assert not {p.name for p in base} & {p.name for p in new}
    assert len({p.name for p in base}) == 30
    docs = facts.documents(new, copies=3, seed=0)
    assert len(docs) == 30 and len({d["text"] for d in docs}) > 10  # orders differ
    for row in facts.questions(new):
        name = row["prompt"].split()[-2].rstrip("?") if "job" in row["prompt"] else None
        assert facts.extract_answer(row["completion"]) == row["answer"]
        assert any(row["completion"] in d["text"] for d in docs)  # the documents' sentence
        assert name is None or name in row["completion"]
    assert facts.extract_answer(" Bralo lives in Tesk.\nmore") == "Tesk"
    assert facts.extract_answer("") == ""
