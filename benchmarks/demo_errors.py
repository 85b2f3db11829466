"""Where a demo checkpoint's greedy completions first leave the gold trace.

    python benchmarks/demo_errors.py --model ~/.cache/opd/demo/sft-XXXX/final \
        --prompts ~/.cache/opd/demo/data-XXXX/test.jsonl [--answer-line]

Prints, over the held-out problems, how many completions are exactly the gold trace and, for the
others, where the first wrong character is: in a column (which one, and which part of it: the
operand digits, the carry or the two-digit sum) or in the answer line after ';' (the copy of the
column sums). This is what showed that the stalled OPD runs of the old demo were stuck on the
answer line, not on the arithmetic (docs/demo.md).
"""

from __future__ import annotations

import argparse
import json
from collections import Counter

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from opd.tasks.addition import Addition


def first_error(gold: str, text: str) -> str | None:
    """None when text starts with the whole gold trace, else where the first difference is."""
    i = next((k for k in range(len(gold)) if k >= len(text) or text[k] != gold[k]), None)
    if i is None:
        return None
    if ";" in gold and i > gold.index(";"):
        return "answer line"
    column = gold[:i].count(",")
    offset = i - (gold.rfind(",", 0, i) + 1)  # "a+b+c=ss,": 0,2 operands, 4 carry, 6-7 sum
    part = {0: "operands", 2: "operands", 4: "carry"}.get(offset, "sum" if offset >= 6 else "sign")
    return f"column {column + 1} {part}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--prompts", required=True, help="JSONL rows with a 'prompt' like 1234+5678:")
    ap.add_argument("--answer-line", action="store_true", help="the old format, with ';answer'")
    args = ap.parse_args()
    torch.set_num_threads(1)
    tok = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, use_safetensors=True).eval()
    rows = [json.loads(line) for line in open(args.prompts)]
    digits = len(rows[0]["prompt"].split("+")[0])
    task = Addition(digits, answer_line=args.answer_line)
    where: Counter[str] = Counter()
    for row in rows:
        a, b = (int(x) for x in row["prompt"].rstrip(":").split("+"))
        gold = task.solution(a, b)
        ids = tok(row["prompt"], return_tensors="pt").input_ids
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=len(gold) + 1, do_sample=False)
        text = tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
        where[first_error(gold, text) or "exact"] += 1
    print(f"{len(rows)} problems; first wrong character:")
    for name, n in where.most_common():
        print(f"  {name:24s} {n:4d}  ({n / len(rows):.1%})")


if __name__ == "__main__":
    main()
