"""Run configuration: frozen dataclasses, one per component, each field documented once.

Values come, lowest precedence first, from the defaults below, a TOML file (`--config`, with one
`[section]` table per dataclass), the command-line flags, and `section.field=value` overrides.
`opd distill --help` prints every field with the help text written here.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from opd.config_text import parse_kv, read_toml
from opd.errors import OpdError


def _f(default, help: str, **kw):
    return field(default=default, metadata={"help": help, **kw})


@dataclass(frozen=True)
class ModelConfig:
    student: str = _f("", "Student model: a local Hugging Face folder (weights + tokenizer).")
    teacher: str = _f(
        "",
        "Teacher: a local Hugging Face folder (another tokenizer than the student's is scored "
        "across tokenizers), or a server's URL (http://HOST:PORT/v1: vLLM, SGLang, opd's).",
    )
    teacher_tokenizer: str = _f(
        "", "A served teacher's tokenizer folder, when not the student's ('name=DIR,...')."
    )
    teacher_model: str = _f(
        "", "Served teacher's model name; empty asks the server (when it serves exactly one)."
    )
    teacher_api_key: str = _f(
        "", "Bearer key for served teachers; empty reads OPD_TEACHER_API_KEY (never saved)."
    )
    teachers: str = _f(
        "",
        "More teachers, 'name=FOLDER_OR_URL,...': a prompt row's 'teacher' field picks one; "
        "rows without it use model.teacher.",
    )
    lora_rank: int = _f(0, "LoRA rank; 0 trains every weight (full fine-tune).")
    lora_alpha: float = _f(32.0, "LoRA alpha (the update is scaled by alpha / rank).")
    lora_target_modules: str = _f(
        "all-linear", "Comma-separated module names for LoRA, or 'all-linear' (peft's default set)."
    )
    dtype: str = _f("float32", "Student weights dtype: float32 or bfloat16.")
    teacher_dtype: str = _f("float32", "Teacher weights dtype: float32 or bfloat16.")


@dataclass(frozen=True)
class DataConfig:
    prompts: str = _f(
        "",
        "Prompts JSONL: {'prompt': str} or {'messages': [...]} per line; sft without a teacher "
        "also takes {'text': str}, a document trained on every token (cut to the context).",
    )
    batch_prompts: int = _f(16, "Prompts per optimizer step (P).")
    shuffle: bool = _f(True, "Shuffle the prompts every epoch (seeded).")
    overlong: str = _f(
        "error", "A prompt longer than the context minus max_new_tokens: 'error' or 'skip'."
    )
    unknown_chars: str = _f(
        "error",
        "Text with no token but the unknown one: 'error' names file:line and the characters; "
        "'unk' encodes it as the unknown token, counted in metrics (data/unknown_tokens).",
    )
    mix: str = _f("", "sft without a teacher: a second JSONL of rows mixed into data.prompts.")
    mix_ratio: float = _f(0.0, "With data.mix: the fraction of training rows from it, in (0, 1).")


@dataclass(frozen=True)
class SamplingConfig:
    group_size: int = _f(4, "Completions sampled per prompt (G); a step trains on P*G rows.")
    max_new_tokens: int = _f(
        64,
        "Longest completion; sampling also stops at EOS. Not a cap on documents ('text' rows).",
    )
    temperature: float = _f(
        1.0, "Sampling temperature. 1 samples the student's own distribution (on-policy)."
    )
    top_p: float = _f(1.0, "Nucleus sampling; < 1 renormalises the sampler log-probs (warned).")
    top_k: int = _f(0, "Top-k sampling; > 0 renormalises the sampler log-probs (warned).")
    backend: str = _f(
        "auto",
        "In-process sampler: 'kv' (preallocated KV cache; Llama, Qwen2, Qwen3, Mistral), 'hf' "
        "(the model's own forward and cache, any model) or 'auto' (kv where supported, else hf); "
        "'vllm': a vLLM engine that follows the student's weights (opd starts it, or sampling.urls).",
    )
    urls: str = _f(
        "",
        "sampling.backend=vllm: running engines, 'http://HOST:PORT/v1,...' (empty: opd starts one).",
    )
    sync_every: int = _f(1, "sampling.backend=vllm: send the student's weights every N steps.")
    staleness: int = _f(
        0, "sampling.backend=vllm: 1 samples step k+1 while step k trains (one-step-off); 0 not."
    )
    engine_cpus: str = _f(
        "",
        "The engine opd starts (backend vllm): its CPU cores ('1', '8-15'); the learner the rest.",
    )
    engine_args: str = _f(
        "",
        "The engine opd starts: more `vllm serve` arguments ('--gpu-memory-utilization 0.3').",
    )


@dataclass(frozen=True)
class ObjectiveConfig:
    kind: str = _f(
        "opd",
        "'opd': on-policy distillation (the student samples, the teacher scores). 'sft': "
        "supervised fine-tuning on the teacher's samples (off-policy distillation), or on the "
        "rows' own 'completion' or 'text' when model.teacher is empty. 'rl': policy gradient on "
        "a 0/1 reward (the extracted answer equals the row's 'answer'), centred per prompt's "
        "group.",
    )
    reward_coef: float = _f(
        0.0,
        "opd only: add the task reward, A_t = reward_coef * centred_reward - kl_coef * k_t "
        "(rows need an 'answer'); 0 turns it off.",
    )
    extractor: str = _f(
        "exact",
        "Answer extractor for rewards: exact, last-number, boxed, hashes or module:function.",
    )
    reward_std: bool = _f(False, "Divide centred rewards by the group's std (GRPO); off: Dr. GRPO.")
    kl_coef: float = _f(1.0, "Advantage scale: A_t = -kl_coef * (logp_sampler_t - logp_teacher_t).")
    discount: float = _f(
        0.0, "Discount gamma: 0 judges each token alone; > 0 sums discounted future advantages."
    )
    kl_deadzone: float = _f(
        0.0,
        "Sampled loss: a token whose |k_t| is below this counts as k_t = 0 (e.g. 1e-4 when the "
        "teacher is the starting student itself, so float rounding is not trained on); 0 = off.",
    )
    loss: str = _f(
        "sampled",
        "'sampled': policy gradient on the sampled tokens' reverse KL (the blog's); 'topk': "
        "reverse KL over the teacher's top-k tokens plus a tail bucket; 'full': full-vocabulary "
        "reverse KL; 'jsd': generalized JSD (objective.jsd_beta). 'full'/'jsd' need "
        "in-process teachers or opd serve-teacher.",
    )
    topk: int = _f(20, "k for objective.loss='topk' (a served teacher must allow it).")
    jsd_beta: float = _f(
        0.5, "Generalized JSD beta: 0 = forward KL(teacher||student), 1 = reverse KL."
    )
    chunk_tokens: int = _f(
        512,
        "Completion positions per chunk of the LM head in every loss and in teacher scoring "
        "(bounds the logits in memory: chunk_tokens x vocabulary floats).",
    )
    clip_ratio: float = _f(
        0.0, "PPO-style clip of the importance ratio to [1-c, 1+c]; 0 turns clipping off."
    )
    tis_cap: float = _f(
        0.0, "Truncated importance sampling: each token's ratio weighs at most this; 0 = off."
    )
    stale_kl: str = _f(
        "trainer",
        "Rows sampled by an older policy (sampling.staleness=1): k_t = lp - lp_teacher with lp "
        "the trained policy's ('trainer', re-scored) or the sampler's ('sampler', biased).",
    )


@dataclass(frozen=True)
class OptimConfig:
    lr: float = _f(1e-4, "Peak learning rate (AdamW).")
    weight_decay: float = _f(0.0, "AdamW weight decay.")
    beta1: float = _f(0.9, "AdamW beta1.")
    beta2: float = _f(0.95, "AdamW beta2.")
    eps: float = _f(1e-8, "AdamW epsilon.")
    grad_clip: float = _f(1.0, "Clip the global gradient norm to this; 0 turns clipping off.")
    warmup_steps: int = _f(0, "Linear warm-up steps from 0 to lr.")
    schedule: str = _f("constant", "LR after warm-up: 'constant' or 'cosine'.")
    min_lr_ratio: float = _f(0.0, "Cosine schedule ends at lr * min_lr_ratio.")
    max_skipped: int = _f(
        3,
        "A step with a NaN/infinite loss, gradient or log-prob is skipped (no update); this "
        "many skips in a row are allowed, one more stops the run (0: stop at the first).",
    )


@dataclass(frozen=True)
class RemoteConfig:
    api: str = _f(
        "vllm",
        "Served teacher's API: 'vllm' (OpenAI /completions with prompt_logprobs; "
        "also opd serve-teacher) or 'sglang' (native /generate).",
    )
    timeout: float = _f(120.0, "Seconds to wait for one scoring request.")
    retries: int = _f(4, "Retries of a failed request (5xx, timeout, dropped, malformed).")
    backoff: float = _f(0.5, "First retry's wait in seconds; doubles each retry.")
    concurrency: int = _f(4, "Scoring requests in flight at once.")
    batch_rows: int = _f(16, "Sequences per scoring request.")
    trust_tokenizer: bool = _f(
        False,
        "Train with a served teacher whose tokenizer cannot be checked (no POST /tokenize and "
        "/detokenize), taking it to be the student's (or model.teacher_tokenizer's): one that "
        "reads those ids as other tokens then trains silently. A checked tokenizer that differs "
        "stops the run either way.",
    )


@dataclass(frozen=True)
class RunConfig:
    out: str = _f("", "Output folder: config, metrics, checkpoints, final model.")
    steps: int = _f(100, "Optimizer steps.")
    micro_batch_size: int = _f(
        0, "Rows per forward/backward (gradient accumulation); 0 does the whole step at once."
    )
    seed: int = _f(0, "Seed for LoRA init, data order and sampling (0 <= seed < 2**31).")
    save_every: int = _f(50, "Write a resumable checkpoint every N steps (and at the end).")
    keep_checkpoints: int = _f(2, "Checkpoints kept on disk (older ones are deleted).")
    device: str = _f("auto", "'auto' (cuda when present, else cpu), 'cpu' or 'cuda'.")
    threads: int = _f(0, "CPU threads for torch; 0 leaves torch's choice (divided among ranks).")
    autocast: str = _f(
        "none",
        "'bfloat16': student sampling and in-process teacher scoring run under torch.autocast "
        "(bf16 matrix multiplies where the CPU/GPU has them; log-probs move by ~1e-2); "
        "training keeps the weights' dtype. 'none': everything in the weights' dtype.",
    )
    fast_paths: bool = _f(
        True,
        "Use opd's speed paths (fast/: KV-cache decoding, each shared prompt once, the fused "
        "chunked LM head, packed linears, bf16 multiplied in float32 on a CPU without bf16 "
        "kernels); false runs the plain Hugging Face forward everywhere "
        "(sampler, teacher, trainer), to bisect a numerical difference.",
    )
    preflight: bool = _f(
        True, "Check the teacher before step 1: its KL on its own samples and the start KL."
    )


@dataclass(frozen=True)
class EvalConfig:
    prompts: str = _f("", "Held-out prompts JSONL with 'answer'; empty turns evaluation off.")
    every: int = _f(
        0, "Evaluate every N steps (also before the first and after the last); 0: ends only."
    )
    max_new_tokens: int = _f(0, "Longest evaluation completion; 0 uses sampling.max_new_tokens.")
    extractor: str = _f(
        "exact", "Answer extractor: exact, last-number, boxed, hashes or module:function."
    )
    limit: int = _f(0, "Evaluate on the first N rows only; 0 uses every row.")
    stop_at: float = _f(
        0.0, "Stop the run at the first evaluation whose accuracy is >= this; 0 never stops early."
    )


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    remote: RemoteConfig = field(default_factory=RemoteConfig)
    run: RunConfig = field(default_factory=RunConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


_SECTION_TYPES = {
    "model": ModelConfig,
    "data": DataConfig,
    "sampling": SamplingConfig,
    "objective": ObjectiveConfig,
    "optim": OptimConfig,
    "remote": RemoteConfig,
    "run": RunConfig,
    "eval": EvalConfig,
}


def _fields(section: str) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(_SECTION_TYPES[section])}


def _coerce(key: str, raw: Any, typ: Any) -> Any:
    """Turn a TOML or command-line value into the field's type, or say which key is wrong."""
    typ = {"int": int, "float": float, "bool": bool, "str": str}.get(typ, typ)
    if typ is bool:
        if isinstance(raw, bool):
            return raw
        if isinstance(raw, str) and raw.lower() in ("true", "1", "yes", "false", "0", "no"):
            return raw.lower() in ("true", "1", "yes")
        raise OpdError(f"{key}: expected true or false, got {raw!r}")
    if typ is int:
        if isinstance(raw, bool):
            raise OpdError(f"{key}: expected an integer, got {raw!r}")
        try:
            value = int(raw) if isinstance(raw, int) else int(str(raw), 10)
        except ValueError:
            raise OpdError(f"{key}: expected an integer, got {raw!r}") from None
        return value
    if typ is float:
        if isinstance(raw, bool):
            raise OpdError(f"{key}: expected a number, got {raw!r}")
        try:
            value = float(raw)
        except (TypeError, ValueError):
            raise OpdError(f"{key}: expected a number, got {raw!r}") from None
        if not math.isfinite(value):
            raise OpdError(f"{key}: expected a finite number, got {raw!r}")
        return value
    if not isinstance(raw, str):
        raise OpdError(f"{key}: expected a string, got {raw!r}")
    return raw


def apply_overrides(cfg: Config, values: dict[str, Any]) -> Config:
    """Set `section.field` keys on a config; unknown keys are an error naming the key."""
    sections = {name: dataclasses.asdict(getattr(cfg, name)) for name in _SECTION_TYPES}
    for key, raw in values.items():
        section, _, name = key.partition(".")
        if section not in _SECTION_TYPES or name not in _fields(section):
            raise OpdError(f"unknown config key {key!r} (see `opd distill --help` for the keys)")
        sections[section][name] = _coerce(key, raw, _fields(section)[name].type)
    return Config(**{name: _SECTION_TYPES[name](**vals) for name, vals in sections.items()})


def build_config(toml_path: str | None, flags: dict[str, Any], overrides: list[str]) -> Config:
    cfg = Config()
    if toml_path:
        cfg = apply_overrides(cfg, read_toml(toml_path))
    cfg = apply_overrides(cfg, {k: v for k, v in flags.items() if v is not None})
    cfg = apply_overrides(cfg, parse_kv(overrides))
    validate(cfg)
    return cfg


def to_dict(cfg: Config) -> dict[str, dict[str, Any]]:
    return dataclasses.asdict(cfg)


def from_dict(d: dict[str, dict[str, Any]]) -> Config:
    flat = {f"{s}.{k}": v for s, table in d.items() for k, v in table.items()}
    return apply_overrides(Config(), flat)


def _check(ok: bool, key: str, value: Any, must: str) -> None:
    if not ok:
        raise OpdError(f"{key}={value!r}: must be {must}")


# The fields that take one of a few words, with those words.
CHOICES: dict[str, tuple[str, ...]] = {
    "model.dtype": ("float32", "bfloat16"),
    "model.teacher_dtype": ("float32", "bfloat16"),
    "data.overlong": ("error", "skip"),
    "data.unknown_chars": ("error", "unk"),
    "sampling.backend": ("auto", "kv", "hf", "vllm"),
    "objective.stale_kl": ("trainer", "sampler"),
    "objective.kind": ("opd", "sft", "rl"),
    "objective.loss": ("sampled", "topk", "full", "jsd"),
    "optim.schedule": ("constant", "cosine"),
    "remote.api": ("vllm", "sglang"),
    "run.device": ("auto", "cpu", "cuda"),
    "run.autocast": ("none", "bfloat16"),
}


def validate(cfg: Config) -> None:
    """Reject values that cannot work, naming the field and the value."""
    m, d, s, o, op, r = cfg.model, cfg.data, cfg.sampling, cfg.objective, cfg.optim, cfg.run
    for key, options in CHOICES.items():
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        quoted = [o if key.endswith("dtype") else repr(o) for o in options]
        _check(value in options, key, value, f"{', '.join(quoted[:-1])} or {quoted[-1]}")
    _check(m.lora_rank >= 0, "model.lora_rank", m.lora_rank, ">= 0")
    _check(m.lora_alpha > 0, "model.lora_alpha", m.lora_alpha, "> 0")
    _check(d.batch_prompts >= 1, "data.batch_prompts", d.batch_prompts, ">= 1")
    if d.mix:
        _check(0 < d.mix_ratio < 1, "data.mix_ratio", d.mix_ratio, "in (0, 1) with data.mix")
        own = "empty unless objective.kind=sft without model.teacher (rows' own targets)"
        _check(o.kind == "sft" and not m.teacher, "data.mix", d.mix, own)
    _check(bool(d.mix) or d.mix_ratio == 0, "data.mix_ratio", d.mix_ratio, "0 without data.mix")
    _check(s.group_size >= 1, "sampling.group_size", s.group_size, ">= 1")
    _check(s.max_new_tokens >= 1, "sampling.max_new_tokens", s.max_new_tokens, ">= 1")
    _check(s.temperature > 0, "sampling.temperature", s.temperature, "> 0")
    _check(0 < s.top_p <= 1, "sampling.top_p", s.top_p, "in (0, 1]")
    _check(s.top_k >= 0, "sampling.top_k", s.top_k, ">= 0")
    _check(s.sync_every >= 1, "sampling.sync_every", s.sync_every, ">= 1")
    _check(s.staleness in (0, 1), "sampling.staleness", s.staleness, "0 or 1")
    vllm = "0 unless sampling.backend=vllm (an engine samples while the learner trains)"
    _check(s.staleness == 0 or s.backend == "vllm", "sampling.staleness", s.staleness, vllm)
    cores = "empty unless sampling.backend=vllm starts its own engine (no sampling.urls)"
    for key, value in (("engine_cpus", s.engine_cpus), ("engine_args", s.engine_args)):
        _check(not value or (s.backend == "vllm" and not s.urls), f"sampling.{key}", value, cores)
    _check(o.kl_coef >= 0, "objective.kl_coef", o.kl_coef, ">= 0")
    _check(0 <= o.discount <= 1, "objective.discount", o.discount, "in [0, 1]")
    _check(o.kl_deadzone >= 0, "objective.kl_deadzone", o.kl_deadzone, ">= 0")
    _check(0 <= o.clip_ratio < 1, "objective.clip_ratio", o.clip_ratio, "in [0, 1)")
    _check(o.tis_cap == 0 or o.tis_cap >= 1, "objective.tis_cap", o.tis_cap, "0 (off) or >= 1")
    _check(op.lr > 0, "optim.lr", op.lr, "> 0")
    _check(op.weight_decay >= 0, "optim.weight_decay", op.weight_decay, ">= 0")
    _check(0 <= op.beta1 < 1, "optim.beta1", op.beta1, "in [0, 1)")
    _check(0 <= op.beta2 < 1, "optim.beta2", op.beta2, "in [0, 1)")
    _check(op.eps > 0, "optim.eps", op.eps, "> 0")
    _check(op.grad_clip >= 0, "optim.grad_clip", op.grad_clip, ">= 0")
    _check(op.warmup_steps >= 0, "optim.warmup_steps", op.warmup_steps, ">= 0")
    _check(0 <= op.min_lr_ratio <= 1, "optim.min_lr_ratio", op.min_lr_ratio, "in [0, 1]")
    _check(op.max_skipped >= 0, "optim.max_skipped", op.max_skipped, ">= 0")
    _check(r.steps >= 1, "run.steps", r.steps, ">= 1")
    _check(r.micro_batch_size >= 0, "run.micro_batch_size", r.micro_batch_size, ">= 0")
    _check(r.save_every >= 1, "run.save_every", r.save_every, ">= 1")
    _check(r.keep_checkpoints >= 1, "run.keep_checkpoints", r.keep_checkpoints, ">= 1")
    _check(r.threads >= 0, "run.threads", r.threads, ">= 0")
    _check(0 <= r.seed < 2**31, "run.seed", r.seed, "in [0, 2**31)")
    _check(o.reward_coef >= 0, "objective.reward_coef", o.reward_coef, ">= 0")
    only_opd = "0 unless objective.kind=opd"
    _check(o.reward_coef == 0 or o.kind == "opd", "objective.reward_coef", o.reward_coef, only_opd)
    rl_group = ">= 2 for objective.kind=rl (rewards are centred within each prompt's group)"
    _check(o.kind != "rl" or s.group_size >= 2, "sampling.group_size", s.group_size, rl_group)
    _check(o.topk >= 1, "objective.topk", o.topk, ">= 1")
    _check(0 <= o.jsd_beta <= 1, "objective.jsd_beta", o.jsd_beta, "in [0, 1]")
    _check(o.chunk_tokens >= 1, "objective.chunk_tokens", o.chunk_tokens, ">= 1")
    rm = cfg.remote
    _check(rm.timeout > 0, "remote.timeout", rm.timeout, "> 0")
    _check(rm.retries >= 0, "remote.retries", rm.retries, ">= 0")
    _check(rm.backoff >= 0, "remote.backoff", rm.backoff, ">= 0")
    _check(rm.concurrency >= 1, "remote.concurrency", rm.concurrency, ">= 1")
    _check(rm.batch_rows >= 1, "remote.batch_rows", rm.batch_rows, ">= 1")
    ev = cfg.eval
    _check(ev.every >= 0, "eval.every", ev.every, ">= 0")
    _check(ev.max_new_tokens >= 0, "eval.max_new_tokens", ev.max_new_tokens, ">= 0")
    _check(ev.limit >= 0, "eval.limit", ev.limit, ">= 0")
    _check(0 <= ev.stop_at <= 1, "eval.stop_at", ev.stop_at, "in [0, 1]")
    if not ev.prompts:
        _check(ev.every == 0, "eval.every", ev.every, "0 when eval.prompts is not set")
        _check(ev.stop_at == 0, "eval.stop_at", ev.stop_at, "0 when eval.prompts is not set")
    for key, kinds in REQUIRED_KEYS.items():
        if o.kind in kinds:
            section, name = key.split(".")
            value = getattr(getattr(cfg, section), name)
            _check(bool(value), key, value, "set (it has no default)")


# Keys with no default, and the objective kinds that need them set (validate, fields_help).
REQUIRED_KEYS: dict[str, tuple[str, ...]] = {
    "model.student": ("opd", "sft", "rl"),
    "data.prompts": ("opd", "sft", "rl"),
    "run.out": ("opd", "sft", "rl"),
    "model.teacher": ("opd",),  # sft without a teacher trains on the rows' 'completion' fields
}
