"""The world of `opd experiment personalization|continual`: an assistant that knows some people
and follows instructions, documents about new people, and the measurements of both.

Data (tasks/facts.py, tasks/instruct.py), written once per settings under the cache:
- chat rows: instruction-following examples (10 constraint types) and questions about the
  assistant's base people, with their answers as completions;
- documents (`{"text"}` rows): the base people's (read by the assistant) and one new set per
  seed or phase (read only in mid-training);
- held-out evaluation: instructions whose phrases no training row has, questions about base
  people the assistant only read documents about (`qa_base`), and each new set's questions.

The assistant is a small Llama trained from scratch by `opd sft` on the chat rows with the base
documents mixed in (data.mix), once per settings, and cached like the demo's stages.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from opd import tiny
from opd.evaluate import evaluate
from opd.experiments.demo import _key, _train_from_scratch, _write_jsonl
from opd.tasks import facts, instruct

EXTRACT = "opd.tasks.facts:extract_answer"


@dataclass(frozen=True)
class Settings:
    n_base: int = 150  # people the assistant read documents about
    n_base_qa: int = 100  # of them, those whose questions it trained on (the rest: qa_base)
    n_new: int = 40  # people per new document set (one set per seed, or per phase)
    doc_copies: int = 8  # documents per person (each with its own sentence order)
    qa_repeat: int = 7  # copies of each training question among the chat rows
    n_if_train: int = 3000
    n_eval: int = 90  # held-out rows per evaluation set
    hidden: int = 128
    layers: int = 4
    assistant_steps: int = 1000
    assistant_lr: float = 3e-3
    assistant_docs: float = 0.3  # share of documents in the assistant's stream
    batch: int = 32
    mid_steps: int = 100
    mid_lr: float = 1e-3
    mix_ratio: float = 0.3  # the mixed variant: share of chat rows among the documents
    lora_rank: int = 16
    # lora_lr, opd_lr and sft_lr: what `opd experiment personalization-sweep` picks
    lora_lr: float = 3e-3
    opd_steps: int = 60
    opd_lr: float = 1e-4  # the sampled-token estimator
    opd_full_lr: float = 1e-4  # the full-vocabulary reverse KL (and continual's OPD)
    continual_loss: str = "full"  # objective.loss of continual's OPD runs
    sft_lr: float = 3e-4  # SFT on the assistant's own samples (the blog's control)
    opd_prompts: int = 16
    opd_group: int = 4
    max_new: int = 56  # the longest response (a keyword rule) is 48 characters and EOS
    seeds: tuple[int, ...] = (0, 1, 2)
    phases: int = 3  # continual
    variants: tuple[str, ...] = ("documents", "mixed", "lora")
    sweep_lrs: tuple[float, ...] = (1e-3, 3e-4, 1e-4)  # personalization-sweep: OPD and SFT
    sweep_lora_lrs: tuple[float, ...] = (1e-2, 3e-3, 1e-3, 3e-4)


@dataclass
class World:
    settings: Settings
    dir: Path  # the data files
    cache: Path
    chat: Path  # instruction and base-question rows with completions
    if_prompts: Path  # training instructions (OPD's and SFT-on-samples' prompts)
    if_test: Path
    qa_base: Path
    docs_base: Path
    docs_new: list[Path]  # new set k's documents (k = 0, 1, ...)
    qa_new: list[Path]
    assistant: Path | None = None
    assistant_seconds: float = 0.0
    assistant_cached: bool = False


def build_world(s: Settings, cache_dir: str | None, n_sets: int) -> World:
    """The data files for `n_sets` new document sets, written once per settings."""
    cache = Path(cache_dir or os.environ.get("OPD_CACHE", Path.home() / ".cache" / "opd"))
    cache = cache / "personalization"
    key = _key("world", s.n_base, s.n_base_qa, s.n_new, s.doc_copies, s.qa_repeat,
               s.n_if_train, s.n_eval, n_sets)  # fmt: skip
    d = cache / f"world-{key}"
    d.mkdir(parents=True, exist_ok=True)
    base, *new = facts.people([s.n_base] + [s.n_new] * n_sets, seed=0)
    train_if = instruct.instructions(s.n_if_train, seed=0)
    phrases = {i.phrase for i in train_if}
    test_if = instruct.instructions(s.n_eval, seed=1, exclude=phrases)
    qa_train = facts.questions(base[: s.n_base_qa])
    chat = [i.row() for i in train_if] + qa_train * s.qa_repeat
    return World(
        settings=s,
        dir=d,
        cache=cache,
        chat=_write_jsonl(d / "chat.jsonl", chat),
        if_prompts=_write_jsonl(d / "if_prompts.jsonl", [i.row() for i in train_if]),
        if_test=_write_jsonl(d / "if_test.jsonl", [i.row() for i in test_if]),
        qa_base=_write_jsonl(d / "qa_base.jsonl", facts.questions(base[s.n_base_qa :])[: s.n_eval]),
        docs_base=_write_jsonl(d / "docs_base.jsonl", facts.documents(base, s.doc_copies, 0)),
        docs_new=[
            _write_jsonl(d / f"docs_new{k}.jsonl", facts.documents(g, s.doc_copies, k + 1))
            for k, g in enumerate(new)
        ],
        qa_new=[
            _write_jsonl(d / f"qa_new{k}.jsonl", facts.questions(g)[: s.n_eval])
            for k, g in enumerate(new)
        ],
    )


def train_assistant(w: World, quiet: bool, log) -> World:
    """The assistant: `opd sft` from scratch on the chat rows with the base documents mixed in."""
    s = w.settings
    data = [hashlib.sha256(f.read_bytes()).hexdigest() for f in (w.chat, w.docs_base)]
    key = _key("assistant", data, s.hidden, s.layers, s.assistant_steps, s.assistant_lr,
               s.assistant_docs, s.batch)  # fmt: skip
    stage = w.cache / f"assistant-{key}"
    t0 = time.time()
    tok = tiny.char_tokenizer(chars=instruct.CHARS)
    w.assistant_cached = _train_from_scratch(
        stage, tok, s.hidden, s.layers, 0, quiet,
        {
            "data.prompts": str(w.chat),
            "data.mix": str(w.docs_base),
            "data.mix_ratio": s.assistant_docs,
            "run.steps": s.assistant_steps,
            "data.batch_prompts": s.batch,
            "optim.lr": s.assistant_lr,
            "optim.warmup_steps": 50,
            "sampling.max_new_tokens": s.max_new,
        },
        log, "assistant",
        f"training the assistant (Llama h{s.hidden}/L{s.layers}) on instructions, questions "
        f"and documents about {s.n_base} people, {s.assistant_steps} steps ...",
        max_positions=160,  # the longest prompt (83 tokens) and response (49)
    )  # fmt: skip
    w.assistant = stage / "final"
    w.assistant_seconds = time.time() - t0
    return w


def measure(model: Path, w: World, sets: list[int], base: bool = True) -> dict:
    """Greedy held-out scores in [0, 1]: "if" (instructions passed), "qa_base" (questions on
    base people the assistant only read about) and "qa" (one per new set in `sets`)."""
    s = w.settings
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "if.jsonl"
        evaluate(str(model), str(w.if_test), str(out), max_new_tokens=s.max_new)
        rows = [json.loads(line) for line in w.if_test.read_text().splitlines()]
        said = [json.loads(line)["completion"] for line in out.read_text().splitlines()]
    result = {"if": instruct.pass_rate(rows, said)}
    if base:
        result["qa_base"] = _qa(model, w.qa_base, s.max_new)
    result["qa"] = [_qa(model, w.qa_new[k], s.max_new) for k in sets]
    return result


def _qa(model: Path, path: Path, max_new: int) -> float:
    return evaluate(str(model), str(path), max_new_tokens=max_new, extractor=EXTRACT)["accuracy"]
