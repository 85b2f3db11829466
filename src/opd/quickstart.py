"""`opd quickstart`: a first end-to-end distillation on tiny models, in about a minute on a CPU.

Builds a character tokenizer, trains a tiny teacher to reverse short words ("abc=" -> "cba"),
gives a smaller student a brief warm-up on the same task, writes train/test prompt files, runs
`opd distill` from the warm student, and prints held-out accuracy before and after. `opd demo`
(the blog's math experiment in miniature) is the fuller version of this.
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

from opd import tiny
from opd.config import build_config
from opd.evaluate import evaluate
from opd.train import distill

LETTERS = "abcdefghij"


def _words(n: int, seed: int, exclude: set[str] = frozenset()) -> list[str]:
    rng = random.Random(seed)
    out: list[str] = []
    seen = set(exclude)
    while len(out) < n:
        w = "".join(rng.choice(LETTERS) for _ in range(rng.randint(3, 6)))
        if w not in seen:
            seen.add(w)
            out.append(w)
    return out


def _write_prompts(path: Path, words: list[str]) -> None:
    path.write_text(
        "".join(json.dumps({"prompt": w + "=", "answer": w[::-1]}) + "\n" for w in words)
    )


def quickstart(out: str = "runs/quickstart", steps: int = 100, seed: int = 0) -> dict:
    t0 = time.time()
    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    tok = tiny.char_tokenizer()
    train = _words(3000, seed)
    test = _words(200, seed + 1, exclude=set(train))
    _write_prompts(root / "train.jsonl", train)
    _write_prompts(root / "test.jsonl", test)
    pairs = [(w + "=", w[::-1]) for w in train]

    print("training a tiny teacher (Llama, hidden 64, 2 layers) to reverse words ...")
    teacher = tiny.tiny_model(tok, hidden=64, layers=2, seed=seed)
    tiny.fit(teacher, tok, pairs, steps=600, lr=3e-3, seed=seed)
    tiny.save(teacher, tok, root / "teacher")
    print("warming up a smaller student (hidden 32, 2 layers) for a few steps ...")
    student = tiny.tiny_model(tok, hidden=32, layers=2, heads=4, kv_heads=2, seed=seed + 1)
    tiny.fit(student, tok, pairs, steps=150, lr=3e-3, seed=seed + 1)
    tiny.save(student, tok, root / "student")

    def accuracy(model_dir: Path) -> float:
        return evaluate(str(model_dir), str(root / "test.jsonl"), max_new_tokens=8)["accuracy"]

    before = {"teacher": accuracy(root / "teacher"), "student": accuracy(root / "student")}
    cfg = build_config(
        None,
        {
            "model.student": str(root / "student"),
            "model.teacher": str(root / "teacher"),
            "data.prompts": str(root / "train.jsonl"),
            "run.out": str(root / "distill"),
            "run.steps": steps,
            "run.seed": seed,
            "data.batch_prompts": 16,
            "sampling.group_size": 4,
            "sampling.max_new_tokens": 8,
            "optim.lr": 1e-3,
            "run.save_every": steps,
        },
        [],
    )
    print(f"distilling on-policy for {steps} steps (16 prompts x 4 samples a step) ...")
    final = distill(cfg, force=True)
    after = accuracy(final)
    metrics = [
        json.loads(line) for line in (root / "distill" / "metrics.jsonl").read_text().splitlines()
    ]
    result = {
        "teacher_accuracy": before["teacher"],
        "student_accuracy_before": before["student"],
        "student_accuracy_after": after,
        "teacher_kl_first_5_steps": sum(m["teacher/kl"] for m in metrics[:5]) / len(metrics[:5]),
        "teacher_kl_last_5_steps": sum(m["teacher/kl"] for m in metrics[-5:]) / len(metrics[-5:]),
        "steps": steps,
        "wall_seconds": round(time.time() - t0, 1),
    }
    (root / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    print()
    print("| model | held-out accuracy (200 words, greedy) |")
    print("|---|---|")
    print(f"| teacher | {before['teacher']:.1%} |")
    print(f"| student before distillation | {before['student']:.1%} |")
    print(f"| student after {steps} steps of on-policy distillation | {after:.1%} |")
    print()
    print(
        f"teacher/kl per token, mean of 5 steps: {result['teacher_kl_first_5_steps']:.3f} at the "
        f"start -> {result['teacher_kl_last_5_steps']:.3f} at the end; wall time {result['wall_seconds']} s"
    )
    print(f"files: {root}/distill/ (metrics.jsonl, checkpoints/, final/), {root}/result.json")
    return result
