"""Loading student and teacher: local Hugging Face folders only, checked before any work starts."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from opd.errors import OpdError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


# Weight files that only pickle can read: opd never unpickles (a pickle can run any code).
PICKLE_WEIGHTS = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")


def _check_folder(path: str, what: str) -> Path:
    """A local Hugging Face model folder. Its own Python (a config's `auto_map`) never runs:
    every load passes trust_remote_code=False, so transformers uses its own class for the
    model type, or refuses a type it does not ship, and never asks."""
    p = Path(path)
    if not p.exists():
        raise OpdError(f"{what}: model folder not found: {path}")
    if not p.is_dir() or not (p / "config.json").is_file():
        raise OpdError(f"{what}: {path} is not a Hugging Face model folder (no config.json)")
    return p


def _check_weights(p: Path, what: str) -> None:
    """safetensors weights only: a folder with pickle weights alone is refused unread. Each
    safetensors file must be readable and start with a valid header (read here, so a file that
    cannot be read is not reported as missing)."""
    from safetensors import SafetensorError, safe_open

    found = sorted(p.glob("*.safetensors"))
    for f in found:
        try:
            with open(f, "rb") as fh:  # safetensors reports an unreadable file as missing
                fh.read(8)
            with safe_open(str(f), framework="pt") as st:
                st.keys()
        except OSError as e:
            raise OpdError(f"{what}: cannot read {f} ({e.strerror or e})") from None
        except SafetensorError as e:
            raise OpdError(f"{what}: {f} is not a valid safetensors file ({e})") from None
    if found:
        return
    pickled = sorted(f.name for pattern in PICKLE_WEIGHTS for f in p.glob(pattern))
    if pickled:
        raise OpdError(
            f"{what}: {p} has only pickle weights ({', '.join(pickled)}); opd loads safetensors "
            "only, since unpickling can run any code: convert them once, where you trust the "
            "file, with AutoModelForCausalLM.from_pretrained(DIR).save_pretrained(NEW_DIR)"
        )
    raise OpdError(f"{what}: {p} has no weights (no *.safetensors file)")


def check_device(device: str, what: str) -> None:
    """A CUDA device is there to be used (a CPU-only torch build has none)."""
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        build = "a CPU-only build" if torch.version.cuda is None else "built with CUDA"
        raise OpdError(
            f"{what}={device}: torch sees no CUDA device (torch {torch.__version__} is {build}); "
            "use cpu, or install a CUDA build of torch"
        )


def load_tokenizer(path: str, what: str = "model"):
    from transformers import AutoTokenizer

    p = _check_folder(path, what)
    try:
        tok = AutoTokenizer.from_pretrained(str(p), local_files_only=True, trust_remote_code=False)
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
    _check_weights(p, what)
    check_device(str(device), what)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(p),
            dtype=DTYPES[dtype],
            local_files_only=True,
            trust_remote_code=False,  # never a prompt, never the folder's own Python
            use_safetensors=True,  # never unpickle
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


# The config fields that change a causal LM's logits after its LM head, in some model families.
POST_HEAD = ("final_logit_softcapping", "logit_scale", "logits_scaling")
# model_type -> (field, op): what that family's *ForCausalLM.forward does to lm_head's output,
# read from transformers' modeling_<type>.py; op names the PostHead field the value goes to.
# "cap": cap * tanh(logits / cap), unless the field is None (Gemma); "mul": logits * field
# (Cohere's logit_scale); "div": logits / field (Granite's logits_scaling). Keyed by family, not
# by field: HyperCLOVAX multiplies by the field Granite divides by, and a model whose forward
# ignores a field (MPT's logit_scale, a stray key in a Llama config.json) must not get it
# applied. No family reads more than one of these fields.
POST_HEAD_OPS = {
    "gemma2": ("final_logit_softcapping", "cap"),
    "gemma3_text": ("final_logit_softcapping", "cap"),
    "vaultgemma": ("final_logit_softcapping", "cap"),
    "nanochat": ("final_logit_softcapping", "cap"),
    "cohere": ("logit_scale", "mul"),
    "cohere2": ("logit_scale", "mul"),
    "granite": ("logits_scaling", "div"),
    "granitemoe": ("logits_scaling", "div"),
    "granitemoeshared": ("logits_scaling", "div"),
    "granitemoehybrid": ("logits_scaling", "div"),
    "hyperclovax": ("logits_scaling", "mul"),
}


@dataclass(frozen=True)
class PostHead:
    """The elementwise map from lm_head's output to the model's logits: x -> x * mul / div,
    then cap * tanh(. / cap) when cap is set. The identity by default.

    `__call__` is out of place (autograd through it); `apply_` writes over a float32 buffer.
    The derivative is `slope` * (1 - tanh(.)**2) with a cap, `slope` without (fast/heads.py
    uses it in the fused head's hand-written backward).
    """

    mul: float = 1.0
    div: float = 1.0
    cap: float | None = None

    @property
    def identity(self) -> bool:
        return self.mul == 1.0 and self.div == 1.0 and self.cap is None

    @property
    def slope(self) -> float:
        """d(x * mul / div) / dx."""
        return self.mul / self.div

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        # the operations of the models' forwards, in their order, so float32 results match
        if self.mul != 1.0:
            logits = logits * self.mul
        if self.div != 1.0:
            logits = logits / self.div
        if self.cap is not None:
            logits = torch.tanh(logits / self.cap) * self.cap
        return logits

    def scale_(self, logits: torch.Tensor) -> torch.Tensor:
        """x * mul / div in place (the part before the cap)."""
        if self.mul != 1.0:
            logits.mul_(self.mul)
        if self.div != 1.0:
            logits.div_(self.div)
        return logits

    def apply_(self, logits: torch.Tensor) -> torch.Tensor:
        """`self(logits)` written over logits."""
        self.scale_(logits)
        if self.cap is not None:
            logits.div_(self.cap).tanh_().mul_(self.cap)
        return logits


IDENTITY = PostHead()


def _post_head(config) -> tuple[PostHead | None, str | None]:
    """(the transform, None), or (None, why opd cannot tell what the forward does)."""
    model_type = getattr(config, "model_type", None)
    known = POST_HEAD_OPS.get(model_type)
    set_fields = {}
    for name in POST_HEAD:
        value = getattr(config, name, None)
        neutral = value is None or (name != "final_logit_softcapping" and value == 1)
        if not neutral:
            set_fields[name] = value
    post = IDENTITY
    if known is not None and known[0] in set_fields:
        name, op = known
        value = float(set_fields.pop(name))
        post = PostHead(**{op: value})
    if set_fields:
        fields = ", ".join(f"{k}={v}" for k, v in set_fields.items())
        return None, (
            f"{model_type}: {fields} on the config, and opd does not know whether or how this "
            f"model type applies it after the LM head (known: {', '.join(POST_HEAD_OPS)})"
        )
    return post, None


def post_head(config) -> PostHead | None:
    """The elementwise map the model with this config applies to its LM head's output
    (IDENTITY when none), or None when a field that could be one is set on a model type whose
    use of it opd does not know (then only the model's own forward gives its logits)."""
    return _post_head(config)[0]


def check_plain_head(model) -> None:
    """Refuse models whose logits are not a known elementwise map of lm_head(final hidden)."""
    reason = _post_head(model.config)[1]
    if reason:
        raise OpdError(
            f"{reason}; the divergence losses compute the logits from the LM head themselves"
        )


def check_head_config(path: str, what: str) -> None:
    """`check_plain_head` from a model folder's config.json alone, before its weights load. A
    folder whose config cannot be read is left to `load_model`, which says why."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True, trust_remote_code=False)
    except Exception:  # transformers raises many types for a broken folder
        return
    reason = _post_head(config)[1]
    if reason:
        raise OpdError(
            f"{what}={path!r}: {reason}; the divergence losses compute the logits from the LM "
            "head themselves"
        )
