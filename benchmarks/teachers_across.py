"""Teachers the student does not share everything with: another tokenizer, and a served
teacher for the whole-vocabulary losses.

    python benchmarks/teachers_across.py [--steps 50] [--out /tmp/opd-across]

1. Across tokenizers: a character-level student (hidden 32, 2 layers) distils from a
   word-reversing teacher (hidden 64, 2 layers, 150 steps of fitting) whose tokenizer is a
   byte-pair one trained here (96 tokens, merges across '='), and, for comparison, from the same
   teacher built with the student's own tokenizer. Prints the alignment of the two
   tokenizations, the first step's KL, the mean of the last five, and the teacher's scoring time
   per step (median, min-max) of each run.
2. A served teacher for objective.loss=full: the character-level teacher in-process and behind
   `opd serve-teacher` (uvicorn in this process, loopback): time/teacher and time/train per step
   and the bytes each step's whole-vocabulary answers take on the wire (zlib-compressed float32)
   against their raw size.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
from pathlib import Path

import torch

from opd import tiny
from opd.config import build_config
from opd.train import distill

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the tests' loopback server
from tests.test_served import serving  # noqa: E402


def words(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return ["".join(rng.choice("abcdefghij") for _ in range(rng.randint(2, 7))) for _ in range(n)]


def run(student, teacher, prompts, out, steps, loss="sampled") -> list[dict]:
    flags = {
        "model.student": str(student), "model.teacher": str(teacher),
        "data.prompts": str(prompts), "run.out": str(out), "run.steps": steps,
        "data.batch_prompts": 8, "sampling.group_size": 4, "sampling.max_new_tokens": 8,
        "optim.lr": 3e-3, "objective.loss": loss, "run.save_every": 10_000,
        "run.preflight": False,
    }  # fmt: skip
    distill(build_config(None, flags, []), force=True)
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").open()]


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):.4f} s ({min(values):.4f}-{max(values):.4f})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--out", default="/tmp/opd-across")
    args = ap.parse_args()
    torch.set_num_threads(2)
    root = Path(args.out)
    root.mkdir(parents=True, exist_ok=True)
    ws = words(300)
    pairs = [(w + "=", w[::-1]) for w in ws]
    char = tiny.char_tokenizer()
    bpe = tiny.bpe_tokenizer([a + b for a, b in pairs], vocab_size=96)
    folders = {}
    for name, tok in (("char", char), ("bpe", bpe)):
        model = tiny.tiny_model(tok, hidden=64, layers=2, seed=0)
        tiny.fit(model, tok, pairs, steps=150, lr=3e-3)
        folders[name] = tiny.save(model, tok, root / f"teacher-{name}")
    student = tiny.save(tiny.tiny_model(char, hidden=32, layers=2, seed=1), char, root / "student")
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": a}) + "\n" for a, _ in pairs[:64]))

    from opd.teachers.align import alignment_summary

    print("1. across tokenizers (student: characters, 55 tokens; teacher: byte pairs, 96)")
    print(
        "   alignment over the prompts and answers:",
        alignment_summary(char, bpe, [a + b for a, b in pairs[:64]]),
    )
    print(
        f"   | teacher's tokenizer | first-step KL | mean KL, last 5 of {args.steps} | time/teacher per step |"
    )
    print("   |---|---|---|---|")
    for name in ("bpe", "char"):
        rows = run(student, folders[name], prompts, root / f"run-{name}", args.steps)
        kl = [r["teacher/kl"] for r in rows]
        label = "byte pairs (another)" if name == "bpe" else "characters (the student's)"
        print(
            f"   | {label} | {kl[0]:.3f} | {sum(kl[-5:]) / 5:.3f} | {spread([r['time/teacher'] for r in rows])} |"
        )

    from opd.models import load_model
    from opd.serve import TeacherScorer, create_app
    from opd.teachers import served_vocab

    received = []
    plain_decode = served_vocab.decode

    def counting(response):
        out = plain_decode(response)
        received.append((len(response.content), out.numel() * 4))
        return out

    served_vocab.decode = counting
    scorer = TeacherScorer(load_model(str(folders["char"])), char)
    steps = min(args.steps, 20)
    print(
        f"\n2. objective.loss=full, {steps} steps, 32 rows x up to 8 tokens, vocabulary {len(char)}"
    )
    print(
        "   | teacher | time/teacher per step | time/train per step | bytes per step on the wire (raw) |"
    )
    print("   |---|---|---|---|")
    with serving(create_app(scorer, max_rows=64)) as url:
        for label, teacher in (("in-process", folders["char"]), ("opd serve-teacher", url)):
            received.clear()
            rows = run(student, teacher, prompts, root / f"full-{label[:3]}", steps, "full")
            wire = sum(a for a, _ in received) / steps
            raw = sum(b for _, b in received) / steps
            bytes_ = f"{wire:,.0f} ({raw:,.0f})" if received else "-"
            print(
                f"   | {label} | {spread([r['time/teacher'] for r in rows])} | {spread([r['time/train'] for r in rows])} | {bytes_} |"
            )


if __name__ == "__main__":
    main()
