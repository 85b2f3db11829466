"""`opd eval`: sample completions (greedy by default) and score extracted answers.

An extractor maps a completion's text to its final answer. Built-ins are listed in EXTRACTORS;
any task can plug its own as "package.module:function".
"""

from __future__ import annotations

import importlib
import json
import re
import time
from collections.abc import Callable
from pathlib import Path

import torch

from opd.data import load_prompts, read_jsonl
from opd.errors import OpdError
from opd.models import check_device, load_model, load_tokenizer, output_vocab
from opd.rewards import completion_texts, extracted, is_correct
from opd.samplers import make_sampler


def _last_number(text: str) -> str:
    found = re.findall(r"-?\d+(?:\.\d+)?", text)
    return found[-1] if found else ""


def _boxed(text: str) -> str:
    found = re.findall(r"\\boxed\{([^{}]*)\}", text)
    return found[-1].strip() if found else ""


def _after_hashes(text: str) -> str:
    return text.rsplit("####", 1)[-1].strip() if "####" in text else ""


EXTRACTORS: dict[str, Callable[[str], str]] = {
    "exact": lambda text: text.strip(),  # the whole completion
    "last-number": _last_number,  # the last integer or decimal in the text
    "boxed": _boxed,  # the content of the last \boxed{...}
    "hashes": _after_hashes,  # what follows the last "####" (GSM8K style)
}


def get_extractor(name: str) -> Callable[[str], str]:
    if name in EXTRACTORS:
        return EXTRACTORS[name]
    module, sep, attr = name.partition(":")
    if not sep:
        raise OpdError(
            f"unknown extractor {name!r}: use one of {', '.join(EXTRACTORS)} "
            "or 'package.module:function'"
        )
    try:
        fn = getattr(importlib.import_module(module), attr)
    except Exception as e:  # ImportError, AttributeError, ValueError/TypeError for odd names
        raise OpdError(f"extractor {name!r} could not be imported: {e}") from None
    if not callable(fn):
        raise OpdError(f"extractor {name!r} is not a function")
    return fn


@torch.inference_mode()
def evaluate(
    model_dir: str,
    prompts_path: str,
    out: str | None = None,
    max_new_tokens: int = 64,
    batch_size: int = 64,
    extractor: str = "exact",
    temperature: float = 0.0,
    seed: int = 0,
    device: str = "cpu",
) -> dict:
    """Complete every prompt once; returns a summary (accuracy over rows with an "answer")."""
    for name, value, ok in (
        ("--max-new-tokens", max_new_tokens, max_new_tokens >= 1),
        ("--batch-size", batch_size, batch_size >= 1),
        ("--temperature", temperature, temperature >= 0),
    ):
        if not ok:
            raise OpdError(
                f"{name}={value}: must be {'>= 0' if name == '--temperature' else '>= 1'}"
            )
    extract = get_extractor(extractor)
    check_device(device, "--device")
    if out:  # fail on an unwritable --out now, not after all the generation
        if Path(out).is_dir():
            raise OpdError(f"--out {out} is a folder: name the JSONL file to write")
        try:
            Path(out).parent.mkdir(parents=True, exist_ok=True)
            Path(out).touch()
        except OSError as e:
            raise OpdError(f"--out {out}: cannot write there ({e.strerror})") from None
    rows = read_jsonl(prompts_path)  # a bad row fails before the model loads
    tokenizer = load_tokenizer(model_dir, "--model")
    model = load_model(model_dir, "float32", device, "--model").eval()
    context = getattr(model.config, "max_position_embeddings", None)
    if context and max_new_tokens >= context:
        raise OpdError(
            f"--max-new-tokens={max_new_tokens} leaves no room for a prompt in the model's "
            f"{context}-token context; use at most {context - 1}"
        )
    max_prompt = context - max_new_tokens if context else None
    prompts, skipped = load_prompts(prompts_path, tokenizer, max_prompt, "error", rows=rows)
    vocab = min(len(tokenizer), output_vocab(model))
    sampler = make_sampler(model, tokenizer, vocab, max_new_tokens, temperature=temperature)
    gen = torch.Generator(device=device).manual_seed(seed)
    t0 = time.perf_counter()
    summary, results = run_eval(sampler, tokenizer, prompts, extract, batch_size, gen, extractor)
    from opd.flops import model_shape, sampling_flops

    # the ledger's keys, as in a training run's metrics.jsonl
    summary["flops/eval"] = float(
        sampling_flops(
            model_shape(model),
            [len(p.ids) for p in prompts],
            [r["completion_tokens"] for r in results],
        )
    )
    summary["time/eval"] = time.perf_counter() - t0
    if out:
        try:
            with open(out, "w") as f:
                for r in results:
                    f.write(json.dumps(r) + "\n")
        except OSError as e:
            raise OpdError(f"--out {out}: cannot write the results ({e.strerror})") from None
    return summary


def run_eval(
    sampler, tokenizer, prompts, extract, batch_size: int, generator, extractor_name: str = ""
):
    """Complete each prompt once with `sampler`; returns (summary, per-row results)."""
    results = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        batch = sampler.sample(chunk, 1, generator)
        texts = completion_texts(batch, tokenizer)
        lengths = batch.completion_mask_BT.sum(1).tolist()
        for prompt, text, n in zip(chunk, texts, lengths, strict=True):
            row = {"where": prompt.where, "completion": text, "completion_tokens": n}
            if "answer" in prompt.row:
                predicted = extracted(text, extract, prompt.where, extractor_name)
                answer = prompt.row["answer"]
                row.update(
                    extracted=predicted, answer=answer, correct=is_correct(predicted, answer)
                )
            results.append(row)
    scored = [r for r in results if "correct" in r]
    summary = {
        "rows": len(results),
        "scored": len(scored),
        "correct": sum(r["correct"] for r in scored),
        "accuracy": sum(r["correct"] for r in scored) / len(scored) if scored else None,
        "mean_completion_tokens": sum(r["completion_tokens"] for r in results) / len(results),
    }
    return summary, results
