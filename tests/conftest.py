"""Tiny models and prompt files built once per test session (no downloads)."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(2)

from opd import tiny  # noqa: E402

WORDS_SEED = 1234


def words(n: int, seed: int = WORDS_SEED) -> list[str]:
    rng = random.Random(seed)
    return ["".join(rng.choice("abcdefghij") for _ in range(rng.randint(2, 7))) for _ in range(n)]


def assert_same_topk(batch, a, b, atol: float) -> None:
    """Two backends' (lp, ids, lp_k) top-k of every completion position hold the same entries."""
    _, ids_a, lpk_a = a
    _, ids_b, lpk_b = b
    for r, c in batch.completion_mask_BT.nonzero().tolist():
        got = dict(zip(ids_a[r, c].tolist(), lpk_a[r, c].tolist(), strict=True))
        want = dict(zip(ids_b[r, c].tolist(), lpk_b[r, c].tolist(), strict=True))
        got.pop(-1, None), want.pop(-1, None)  # padding
        assert got.keys() == want.keys()
        assert all(abs(got[i] - want[i]) <= atol for i in got)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="session")
def tok():
    return tiny.char_tokenizer()


@pytest.fixture(scope="session")
def models(tmp_path_factory, tok):
    """Folders: a teacher that reverses words, one that always answers "xyz", a random student, Qwen3 and padded-vocab variants."""
    root = tmp_path_factory.mktemp("models")
    pairs = [(w + "=", w[::-1]) for w in words(500)]
    teacher = tiny.tiny_model(tok, hidden=64, layers=2, seed=0)
    tiny.fit(teacher, tok, pairs, steps=150, lr=3e-3)
    pattern = tiny.tiny_model(tok, hidden=64, layers=2, seed=4)
    tiny.fit(pattern, tok, [(w + "=", "xyz") for w in words(200)], steps=60, lr=3e-3)
    out = {
        "pattern": tiny.save(pattern, tok, root / "pattern"),
        "teacher": tiny.save(teacher, tok, root / "teacher"),
        "student": tiny.save(
            tiny.tiny_model(tok, hidden=32, layers=2, seed=1), tok, root / "student"
        ),
        "qwen3": tiny.save(
            tiny.tiny_model(tok, arch="qwen3", hidden=32, layers=2, seed=2), tok, root / "qwen3"
        ),
        "padded": tiny.save(
            tiny.tiny_model(tok, hidden=32, layers=1, vocab_pad=13, seed=3), tok, root / "padded"
        ),
    }
    return out


@pytest.fixture(scope="session")
def prompts_file(tmp_path_factory):
    root = tmp_path_factory.mktemp("prompts")
    return write_jsonl(
        root / "train.jsonl", [{"prompt": w + "=", "answer": w[::-1]} for w in words(64)]
    )
