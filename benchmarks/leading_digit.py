"""The probability a demo checkpoint gives the second operand's leading digit, on the gold trace.

    python benchmarks/leading_digit.py --prompts ~/.cache/opd/demo/data-XXXX/test.jsonl \
        --digit 1 --model DIR [DIR ...]

Over the held-out problems whose second operand starts with --digit ("8730+1913:" for 1), feeds
each model the prompt and the gold trace up to the last column's "a+" and prints the median,
min and max probability it gives --digit as the next character. This is how the low-start
plateau in docs/experiments/leads.md was traced to one token.
"""

from __future__ import annotations

import argparse
import json

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from opd.tasks.addition import Addition


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", required=True, help="JSONL rows with a 'prompt' like 1234+5678:")
    ap.add_argument("--digit", default="1")
    ap.add_argument("--model", nargs="+", required=True)
    args = ap.parse_args()
    torch.set_num_threads(1)
    rows = [json.loads(line) for line in open(args.prompts)]
    pairs = [tuple(int(x) for x in r["prompt"].rstrip(":").split("+")) for r in rows]
    digits = len(rows[0]["prompt"].split("+")[0])
    pairs = [(a, b) for a, b in pairs if f"{b:0{digits}d}"[0] == args.digit]
    task = Addition(digits, answer_line=False)
    print(f"{len(pairs)} problems whose second operand starts with {args.digit}")
    for path in args.model:
        tok = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, use_safetensors=True).eval()
        target = tok.convert_tokens_to_ids(args.digit)
        probs = []
        for a, b in pairs:
            trace = task.solution(a, b)
            text = task.prompt(a, b) + trace[: trace.rfind(",") + 3]  # up to the last "a+"
            with torch.no_grad():
                logits = model(tok(text, return_tensors="pt").input_ids).logits[0, -1]
            probs.append(logits.softmax(-1)[target].item())
        probs.sort()
        print(
            f"{path}: median {probs[len(probs) // 2]:.2e} (min {probs[0]:.2e}, max {probs[-1]:.2e})"
        )


if __name__ == "__main__":
    main()
