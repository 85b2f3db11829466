"""Loading student and teacher: local Hugging Face folders only, checked before any work starts."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from opd.errors import OpdError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def _check_folder(path: str, what: str) -> Path:
    p = Path(path)
    if not p.exists():
        raise OpdError(f"{what}: model folder not found: {path}")
    if not p.is_dir() or not (p / "config.json").is_file():
        raise OpdError(f"{what}: {path} is not a Hugging Face model folder (no config.json)")
    return p


def load_tokenizer(path: str, what: str = "model"):
    from transformers import AutoTokenizer

    p = _check_folder(path, what)
    try:
        tok = AutoTokenizer.from_pretrained(str(p), local_files_only=True)
    except Exception as e:  # transformers raises many types for a broken folder
        raise OpdError(
            f"{what}: could not load a tokenizer from {path}: {_first_line(e)}"
        ) from None
    if tok.pad_token_id is None:
        # Padding is never trained on (masks come from the sampler), so EOS is a safe pad.
        tok.pad_token = tok.eos_token
    if tok.eos_token_id is None:
        raise OpdError(f"{what}: the tokenizer in {path} has no EOS token")
    return tok


def load_model(path: str, dtype: str = "float32", device: str = "cpu", what: str = "model"):
    from transformers import AutoModelForCausalLM

    p = _check_folder(path, what)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(p), dtype=DTYPES[dtype], local_files_only=True
        )
    except Exception as e:
        raise OpdError(
            f"{what}: could not load a causal LM from {path}: {_first_line(e)}"
        ) from None
    return model.to(device)


def _first_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"


def output_vocab(model) -> int:
    return model.get_output_embeddings().weight.shape[0]


def check_compatible(student_tok, teacher_tok, student_model, teacher_model) -> int:
    """Teacher and student must share the tokenizer exactly; returns the vocabulary size to score.

    Embedding matrices may be padded beyond the tokenizer (Qwen pads 151936 -> 152064): logits
    are cut to the tokenizer's size everywhere, so padded rows never take probability mass.
    """
    check_tokenizers(student_tok, teacher_tok)
    vocab = len(student_tok)
    for what, model in (("student", student_model), ("teacher", teacher_model)):
        if output_vocab(model) < vocab:
            raise OpdError(
                f"{what} has {output_vocab(model)} output rows but the tokenizer has {vocab} tokens"
            )
    return vocab


def check_tokenizers(student_tok, teacher_tok) -> None:
    """The same vocabulary (token -> id) and the same BOS, EOS and UNK ids, or an OpdError."""
    sv, tv = student_tok.get_vocab(), teacher_tok.get_vocab()
    if len(sv) != len(tv):
        raise OpdError(f"tokenizers differ: student has {len(sv)} tokens, teacher has {len(tv)}")
    for token, idx in sv.items():
        if tv.get(token) != idx:
            raise OpdError(
                f"tokenizers differ: token {token!r} is id {idx} for the student, "
                f"{tv.get(token)} for the teacher"
            )
    for name in ("bos_token_id", "eos_token_id", "unk_token_id"):
        a, b = getattr(student_tok, name), getattr(teacher_tok, name)
        if a != b:
            raise OpdError(f"tokenizers differ: {name} is {a} for the student, {b} for the teacher")


def stop_token_ids(tokenizer, model) -> list[int]:
    """EOS ids: the tokenizer's, plus any the model's generation config lists (chat models)."""
    ids = {tokenizer.eos_token_id}
    gen = getattr(model, "generation_config", None)
    extra = getattr(gen, "eos_token_id", None) if gen is not None else None
    if isinstance(extra, int):
        ids.add(extra)
    elif isinstance(extra, (list, tuple)):
        ids.update(int(i) for i in extra)
    return sorted(i for i in ids if i is not None and i < len(tokenizer))


def add_lora(model, rank: int, alpha: float, target_modules: str):
    """Wrap `model` with peft LoRA adapters; returns the peft model (base weights frozen)."""
    from peft import LoraConfig, get_peft_model

    targets = (
        target_modules
        if target_modules == "all-linear"
        else [t.strip() for t in target_modules.split(",") if t.strip()]
    )
    cfg = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        lora_dropout=0.0,  # dropout is off while training (see loop.train_step)
        target_modules=targets,
        task_type="CAUSAL_LM",
    )
    try:
        return get_peft_model(model, cfg)
    except ValueError as e:
        raise OpdError(f"model.lora_target_modules={target_modules!r}: {_first_line(e)}") from None


def inner_model(model):
    """The transformers model to call: peft injects LoRA layers into it in place."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


POST_HEAD = ("final_logit_softcapping", "logit_scale", "logits_scaling")


def post_head_scaling(model) -> str | None:
    """The config field that changes logits after the LM head, if any ('name=value')."""
    cfg = model.config
    for name in POST_HEAD:
        value = getattr(cfg, name, None)
        if value not in (None, 1, 1.0):
            return f"{name}={value}"
    return None


def check_plain_head(model) -> None:
    """Refuse models whose logits are not lm_head(final hidden state)."""
    reason = post_head_scaling(model)
    if reason:
        raise OpdError(
            f"{model.config.model_type}: {reason} is applied after the LM head; "
            "divergence losses support plain linear heads only"
        )
