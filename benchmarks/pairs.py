"""The benchmarks' model pairs, built here with random weights (speed does not depend on what
the weights learned), and the opd run the benchmarks build on one.

  small  ~20-token character vocabulary; student 0.4M (Llama h128 L2), teacher 3.2M (h256 L4);
         16 prompts of "ddd+ddd=" per step
  large  32k byte-level BPE built here with `tokenizers` from this Python's standard library
         source; student h256 L2 (4x the small student's body), teacher h256 L4, untied; the LM
         heads dominate. 16 prompts of 8-24 tokens (lines of the standard library) per step
  real   the shapes of a real small model: a SmolLM2-135M-shaped teacher (Llama, hidden 576,
         30 layers, 9 heads and 3 KV heads of 64, intermediate 1536, tied embeddings, a
         49152-token BPE, 8192 positions) and an 11-layer student of the same shape (67M);
         4 prompts of 37 tokens per step
  qwen   two Qwen3-0.6B-shaped models (hidden 1024, 28 layers, 16 heads and 8 KV heads of 128,
         intermediate 3072, tied embeddings; a 151669-token BPE, 151936 embedding rows as
         Qwen pads them), student and teacher alike (a 1.7B teacher would not leave room in
         24 GB for TRL's full-vocabulary logits); the real pair's prompts
Every pair samples GROUP completions per prompt. Built once into CACHE/pair-NAME.
"""

from __future__ import annotations

import json
import os
import random
import sysconfig
import tempfile
from pathlib import Path

CACHE = Path(os.environ.get("OPD_CACHE", Path.home() / ".cache" / "opd")) / "bench"
_REAL = dict(hidden=576, layers=30, heads=9, kv_heads=3, intermediate=1536)
_QWEN = dict(  # Qwen3-0.6B: 151669 tokens, 151936 embedding rows
    arch="qwen3", hidden=1024, layers=28, heads=16, kv_heads=8, head_dim=128,
    intermediate=3072, tied=True, max_positions=40960, vocab_pad=151_936 - 151_669,
)  # fmt: skip
PAIRS = {
    "small": dict(
        student=dict(hidden=128, layers=2, heads=4, kv_heads=4, intermediate=352),
        teacher=dict(hidden=256, layers=4, heads=8, kv_heads=8, intermediate=704),
        batch_prompts=16,
    ),
    "large": dict(
        student=dict(hidden=256, layers=2, heads=4, kv_heads=4, intermediate=704),
        teacher=dict(hidden=256, layers=4, heads=8, kv_heads=8, intermediate=704),
        batch_prompts=16,
        vocab=32_000,
    ),
    "real": dict(
        student=dict(_REAL, layers=11, tied=True, max_positions=8192),
        teacher=dict(_REAL, tied=True, max_positions=8192),
        batch_prompts=4,
        vocab=49_152,
    ),
    "qwen": dict(student=_QWEN, teacher=_QWEN, batch_prompts=4, vocab=151_669),
}
GROUP = 4
REAL_PROMPT_TOKENS = 37


def bpe_tokenizer(vocab_size: int = 32_000):
    """Byte-level BPE trained on the standard library's top-level .py files, or on its whole
    tree above 32k tokens (the top level has too few merges for 49k); cached after ~10-60 s.
    Above 100k, placeholder tokens fill what the text has no merges for (Qwen's size)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    path = CACHE / f"bpe{vocab_size}"
    if (path / "tokenizer.json").exists():
        return PreTrainedTokenizerFast.from_pretrained(str(path))
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    found = stdlib.glob("*.py") if vocab_size <= 32_000 else stdlib.rglob("*.py")
    files = sorted(str(p) for p in found if "site-packages" not in p.parts and _utf8(p))
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train(files, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )
    if vocab_size > 100_000:  # merges run out at ~122k here: the rest are placeholder tokens
        fast.add_tokens([f"<|extra_{i}|>" for i in range(vocab_size - len(fast))])
    if len(fast) != vocab_size:
        raise SystemExit(f"the BPE reached {len(fast)} tokens, not {vocab_size}: too little text")
    fast.save_pretrained(str(path))
    return fast


def _utf8(path: Path) -> bool:
    try:
        path.read_text(encoding="utf-8")
        return True
    except UnicodeDecodeError:
        return False


def _stdlib_files(n: int) -> list[Path]:
    return sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))[:n]


def prompts(pair: str, tokenizer, n: int = 256) -> list[str]:
    rng = random.Random(0)
    if pair == "small":
        return [f"{rng.randint(100, 999)}+{rng.randint(100, 999)}=" for _ in range(n)]
    if pair in ("real", "qwen"):  # 64 prompts of exactly REAL_PROMPT_TOKENS tokens, BOS included
        text = " ".join(
            line.strip()
            for path in _stdlib_files(20)
            for line in path.read_text(errors="ignore").splitlines()
        )
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        k = REAL_PROMPT_TOKENS - 1
        return [tokenizer.decode(ids[i * k : (i + 1) * k]) for i in range(64)]
    lines = []
    for path in _stdlib_files(40):
        lines += [ln.strip() for ln in path.read_text(errors="ignore").splitlines()]
    lines = [ln for ln in lines if 8 <= len(tokenizer(ln)["input_ids"]) <= 24]
    return rng.sample(lines, n)


def build_pair(pair: str) -> Path:
    """The pair's folder (student/, teacher/, prompts.jsonl), built on first use."""
    from opd import tiny

    root = CACHE / f"pair-{pair}"
    if (root / "prompts.jsonl").exists():
        return root
    spec = PAIRS[pair]
    tok = (
        bpe_tokenizer(spec["vocab"]) if "vocab" in spec else tiny.char_tokenizer("0123456789+=,;:.")
    )
    for i, role in enumerate(("student", "teacher")):
        tiny.save(tiny.tiny_model(tok, seed=i, **spec[role]), tok, root / role)
    rows = prompts(pair, tok)
    (root / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in rows))
    return root


def mask_eos(model, eos_id: int) -> None:
    """A transformers model that never generates EOS: a forward hook on its LM head (a loss
    that reads the head's weight directly, as TRL's does, does not see it)."""

    def hook(module, inputs, logits):
        logits[..., eos_id] = float("-inf")
        return logits

    model.get_output_embeddings().register_forward_hook(hook)


def build_opd(root: Path, dtype: str, threads: int, prefix: str, flags: dict):
    """An opd run (opd.build.Run) on the pair in `root`: both models in `dtype`, its prompts,
    this CPU, no preflight, no checkpoints; `flags` sets the batch, the loss and the rest."""
    import contextlib
    import io

    from opd.build import build_run
    from opd.config import build_config
    from opd.distributed import setup

    cfg = build_config(
        None,
        {
            "model.student": str(root / "student"),
            "model.teacher": str(root / "teacher"),
            "model.dtype": dtype,
            "model.teacher_dtype": dtype,
            "data.prompts": str(root / "prompts.jsonl"),
            "run.out": str(Path(tempfile.mkdtemp(prefix=prefix)) / "run"),
            "run.save_every": 10_000,
            "run.threads": threads,
            "run.device": "cpu",
            "run.preflight": False,
            **flags,
        },
        [],
    )
    ctx = setup("cpu", threads)
    with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
        return build_run(cfg, ctx)
