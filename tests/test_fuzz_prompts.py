"""Fuzzing the prompt loader: arbitrary bytes, any Unicode (lone surrogates included), deep
nesting, huge numbers and every JSON type in every field give valid rows or a one-line OpdError,
never another exception."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from opd import tiny
from opd.build import read_rows
from opd.data import load_prompts
from opd.errors import OpdError

TOK = tiny.char_tokenizer()
CHAT = tiny.char_tokenizer()
CHAT.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"

# any character, lone surrogates included (hypothesis leaves them out by default)
TEXT = st.text(st.characters(blacklist_categories=()), max_size=30)
SCALARS = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=True, allow_infinity=True)
    | TEXT
    | st.sampled_from(["ab=", "c d?", "", "   ", "<unk>", "\u20ac", "xyz"])
)
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(TEXT, inner, max_size=4),
    max_leaves=12,
)
MESSAGES = st.lists(
    st.fixed_dictionaries({}, optional={"role": VALUES | TEXT, "content": VALUES | TEXT}),
    max_size=3,
)
KEYS = ["prompt", "messages", "answer", "completion", "teacher"]
ROWS = st.fixed_dictionaries(
    {},
    optional={
        "prompt": TEXT | VALUES,
        "messages": MESSAGES | VALUES,
        "answer": VALUES,
        "completion": TEXT | VALUES,
        "teacher": TEXT | VALUES,
        "text": TEXT | VALUES,
        "meta": VALUES,
    },
)
# lines that json.dumps would never write: raw bytes, deep nesting, huge numbers, NaN literals
RAW = st.one_of(
    st.binary(max_size=60),
    st.integers(1, 3000).map(lambda d: b'{"prompt": "ab=", "x": ' + b"[" * d + b"]" * d + b"}"),
    st.integers(1, 3000).map(lambda d: b"[" * d),
    st.integers(4000, 6000).map(lambda n: b'{"prompt": "ab=", "answer": ' + b"9" * n + b"}"),
    st.sampled_from([b'{"prompt": NaN}', b'{"prompt": "a", "answer": -Infinity}', b"\xff\xfe"]),
)
LINES = st.lists(
    st.one_of(
        ROWS.map(lambda r: json.dumps(r).encode()),
        VALUES.map(lambda v: json.dumps(v).encode()),
        RAW,
    ),  # fmt: skip
    min_size=1,
    max_size=4,
)


def load(content: bytes, tokenizer, max_prompt: int | None, unknown: str, completions: bool):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "p.jsonl"
        path.write_bytes(content)
        try:
            rows = read_rows(str(path), "data.prompts")
            prompts, _ = load_prompts(
                str(path), tokenizer, max_prompt, "skip" if max_prompt == 3 else "error",
                max_completion_tokens=8 if completions else None, rows=rows, unknown=unknown,
            )  # fmt: skip
        except OpdError as e:
            assert "\n" not in str(e) and str(e).strip(), repr(str(e))
            return None
    for p in prompts:  # a valid row: ids to train on, and an answer that can be compared
        assert p.ids and all(isinstance(i, int) for i in p.ids)
        assert isinstance(p.row.get("answer", ""), (str, int, float))
        assert not completions or p.completion_ids[-1] == tokenizer.eos_token_id
    return prompts


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    LINES,
    st.sampled_from([TOK, CHAT]),
    st.sampled_from([None, 3, 64]),
    st.sampled_from(["error", "unk"]),
    st.booleans(),
)
def test_any_prompts_file_gives_rows_or_one_line(lines, tokenizer, max_prompt, unknown, sft):
    load(b"\n".join(lines) + b"\n", tokenizer, max_prompt, unknown, sft)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.text("abcdefghij=+ ", min_size=1, max_size=40), min_size=1, max_size=5))
def test_plain_rows_always_load(words):
    rows = [{"prompt": w, "answer": w[::-1]} for w in words if w.strip()]
    content = "".join(json.dumps(r) + "\n" for r in rows).encode()
    prompts = load(content or b"\n", TOK, None, "error", False)
    assert prompts is None if not rows else [p.row for p in prompts] == rows
