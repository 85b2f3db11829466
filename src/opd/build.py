"""Set-up: a config becomes the Run that the step reads (models, teachers, sampler, prompts).

Every input is checked before anything heavy happens: the objective's settings and the prompt
files before any model loads, the models and prompts against each other before the out folder
is touched.
"""

from __future__ import annotations

import functools
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from opd.config import Config
from opd.data import Prompt, load_prompts, read_jsonl
from opd.distributed import DistContext
from opd.documents import is_document, mix_in
from opd.errors import OpdError
from opd.evaluate import get_extractor
from opd.fast.decode import KVCacheSampler
from opd.fast.llama import kv_supported
from opd.fast.upcast import slow_half
from opd.flops import Ledger, ModelShape, model_shape
from opd.guard import WEIGHT_BOUND, SkipCount, weight_bound
from opd.losses import Objective, objective_for, uses_rewards
from opd.models import add_lora, check_head_config, load_model, load_tokenizer, stop_token_ids
from opd.rewards import answer_rewards
from opd.samplers import Sampler, make_sampler
from opd.samplers.autocast import AutocastSampler
from opd.samplers.dataset import DatasetSampler
from opd.samplers.prefetch import Prefetch
from opd.samplers.vllm import engine_urls, start_vllm_sampler
from opd.score import Scorer
from opd.setup_teachers import context_length, load_teachers, teacher_backend
from opd.teachers import DEFAULT, TeacherRouter, is_url, teacher_specs
from opd.teachers.view import CONTEXT_FIELDS


@dataclass
class Run:
    """What the step needs, built once by `build_run`."""

    cfg: Config
    ctx: DistContext
    objective: Objective  # from the table in losses.py
    student: torch.nn.Module
    tokenizer: object
    vocab_size: int  # every log-prob is over the first vocab_size ids
    params: list[torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    sampler: Sampler  # the student (on-policy), the teacher (SFT on its samples) or the rows
    sampler_said: str  # which sampler backend runs, and why (printed at the start of a run)
    score: Scorer  # teacher log-probs and rewards onto the batch
    prompts: list[Prompt]
    eval_prompts: list[Prompt]
    # model shapes for the FLOPs ledger: the student's, the sampler's (with its phase name;
    # None when rows are replayed from data), and each in-process teacher's
    student_shape: ModelShape
    sampling_shape: tuple[str, ModelShape] | None
    teacher_shapes: dict[str, ModelShape]
    ledger: Ledger = field(default_factory=Ledger)
    # evaluation's own: its FLOPs are not training compute, so not in flops/step or flops/total
    eval_ledger: Ledger = field(default_factory=Ledger)
    skips: SkipCount = field(default_factory=SkipCount)  # steps skipped for a NaN or inf
    weight_bound: float = WEIGHT_BOUND  # larger trained weights are never saved (guard.py)

    @property
    def teacher(self) -> TeacherRouter | None:
        return self.score.teacher


def build_run(cfg: Config, ctx: DistContext) -> Run:
    m, s, o = cfg.model, cfg.sampling, cfg.objective
    objective = objective_for(o)  # a combination or setting the run would ignore fails here
    if cfg.data.batch_prompts % ctx.world_size:
        raise OpdError(
            f"data.batch_prompts={cfg.data.batch_prompts} must be divisible by the "
            f"number of processes ({ctx.world_size})"
        )
    on_policy = objective.samples == "student"
    # the prompt files are read (and a mistyped path reported) before any model loads; a
    # document ({"text"} row) is its own target, so only SFT without a teacher takes one
    no_documents = ""
    if on_policy:
        no_documents = f"objective.kind={o.kind} samples completions of prompts"
    elif m.teacher:
        no_documents = "with model.teacher, sft samples the teacher's completions of prompts"
    rows = read_rows(cfg.data.prompts, "data.prompts", no_documents)
    mix_rows = read_rows(cfg.data.mix, "data.mix", no_documents) if cfg.data.mix else []
    eval_rows = []
    if cfg.eval.prompts:
        eval_rows = read_rows(cfg.eval.prompts, "eval.prompts", "evaluation answers prompts")
    if uses_rewards(o):
        get_extractor(o.extractor)
    if cfg.eval.prompts:
        get_extractor(cfg.eval.extractor)  # fail now on a bad name, not at the first eval
    if on_policy and (s.temperature != 1.0 or s.top_p < 1.0 or s.top_k > 0) and ctx.is_main:
        print(
            "opd: warning: sampling.temperature/top_p/top_k change the sampling distribution: "
            "sampler log-probs are those of the adjusted, renormalised distribution, so the "
            "importance ratio exp(logp_train - logp_sampler) starts away from 1 and the "
            "update is off-policy by that much",
            file=sys.stderr,
        )
    if ctx.device.type == "cpu" and ctx.is_main:
        warn_slow_half(cfg)
    if objective.teacher in ("topk", "logits"):  # the student's head runs chunk by chunk
        check_head_config(m.student, "model.student")
    if objective.teacher == "logits":  # and so do the teachers'
        for name, spec in teacher_specs(m.teacher, m.teachers).items():
            if not is_url(spec):
                check_head_config(
                    spec, "model.teacher" if name == DEFAULT else f"model.teachers[{name}]"
                )
    torch.manual_seed(cfg.run.seed)
    tokenizer = load_tokenizer(m.student, "model.student")
    student = load_model(m.student, m.dtype, ctx.device, "model.student")
    teachers, vocab_size, cross = load_teachers(cfg, objective, tokenizer, student, ctx)
    local = {name: t for name, t in teachers.items() if isinstance(t, torch.nn.Module)}
    sft_teacher = None if on_policy else local.get(DEFAULT)  # SFT on the teacher's samples
    if not on_policy and m.teacher and sft_teacher is None:
        raise OpdError(
            f"model.teacher={m.teacher!r}: objective.kind=sft samples from the teacher, "
            "which needs a local model folder"
        )
    limits = [n for n in map(context_length, [student, *local.values()]) if n]
    # a served teacher must also fit the whole row plus the one token vLLM insists on making
    limits += [t.max_len - 1 for t in teachers.values() if getattr(t, "max_len", None)]
    from_data = not on_policy and sft_teacher is None
    prompts = read_prompts(
        cfg.data.prompts, rows, tokenizer, limits, s.max_new_tokens, cfg.data.overlong,
        "data.prompts", from_data, ctx, cfg.data.unknown_chars,
    )  # fmt: skip
    if cfg.data.mix:
        n_main = len(prompts)
        extra = read_prompts(
            cfg.data.mix, mix_rows, tokenizer, limits, s.max_new_tokens, cfg.data.overlong,
            "data.mix", True, ctx, cfg.data.unknown_chars,
        )  # fmt: skip
        prompts = mix_in(prompts, extra, cfg.data.mix_ratio, cfg.run.seed)
        if ctx.is_main:
            n = len(prompts) - n_main
            print(
                f"opd: note: data.mix: {n} of the {len(prompts)} rows come from {cfg.data.mix} "
                f"(data.mix_ratio={cfg.data.mix_ratio})",
                file=sys.stderr,
            )
    cfg = clamp_batch(cfg, len(prompts), ctx)
    eval_prompts = []
    if cfg.eval.prompts:
        eval_prompts = read_prompts(
            cfg.eval.prompts, eval_rows, tokenizer, limits, eval_tokens(cfg), "error",
            "eval.prompts", False, ctx, cfg.data.unknown_chars,
        )[: cfg.eval.limit or None]  # fmt: skip
        if not any("answer" in p.row for p in eval_prompts):
            raise OpdError(f"eval.prompts={cfg.eval.prompts!r}: no row has an 'answer' to score")
    check_prompts(prompts, objective, teachers, o)
    if m.lora_rank > 0:
        student = add_lora(student, m.lora_rank, m.lora_alpha, m.lora_target_modules)
    params = [p for p in student.parameters() if p.requires_grad]
    optimizer = make_optimizer(params, cfg)
    router = None
    if objective.teacher:
        context = any(f in p.row for p in prompts for f in CONTEXT_FIELDS)
        router = TeacherRouter(
            {name: teacher_backend(cfg, name, t, local, cross, tokenizer, vocab_size, context,
                                   prompts) for name, t in teachers.items()}
        )  # fmt: skip
    reward = None
    if uses_rewards(o):
        extract = get_extractor(o.extractor)
        reward = functools.partial(answer_rewards, tokenizer=tokenizer, extract=extract)
    # last: a vLLM engine takes tens of seconds to start, and every check above comes first
    sampler, sampler_said = make_token_source(
        cfg, ctx, tokenizer, vocab_size, student, sft_teacher, from_data, prompts
    )
    student_shape = model_shape(student)
    sampling_shape = None
    if sft_teacher is not None:
        sampling_shape = ("teacher_sampling", model_shape(sft_teacher))
    elif not from_data:
        sampling_shape = ("student_sampling", student_shape)
    return Run(
        cfg=cfg,
        ctx=ctx,
        objective=objective,
        student=student,
        tokenizer=tokenizer,
        vocab_size=vocab_size,
        params=params,
        optimizer=optimizer,
        sampler=sampler,
        sampler_said=sampler_said,
        score=Scorer(router, objective.teacher, o.topk, reward),
        prompts=prompts,
        eval_prompts=eval_prompts,
        student_shape=student_shape,
        sampling_shape=sampling_shape,
        teacher_shapes={n: model_shape(t) for n, t in local.items()} if router else {},
        weight_bound=weight_bound(params),
    )


def make_optimizer(params, cfg: Config) -> torch.optim.Optimizer:
    return torch.optim.AdamW(
        params,
        lr=cfg.optim.lr,
        betas=(cfg.optim.beta1, cfg.optim.beta2),
        eps=cfg.optim.eps,
        weight_decay=cfg.optim.weight_decay,
        # one kernel over all parameters (CPU and CUDA) instead of a loop over tensors
        fused=all(p.device.type in ("cpu", "cuda") for p in params),
    )


def make_token_source(cfg, ctx, tokenizer, vocab_size, student, sft_teacher, from_data, prompts):
    """The student itself (on-policy, rl), the teacher (SFT on its samples) or the rows' own
    completions (SFT on data), every batch on the run's device; and which sampler it is, in
    words (`sampler_choice`)."""
    s = cfg.sampling
    if from_data and s.backend == "vllm":
        raise OpdError(
            "sampling.backend=vllm: SFT on the rows' own completions samples nothing (give "
            "model.teacher to sample the teacher on the engine)"
        )
    if from_data:
        if s.group_size != 1 and ctx.is_main:
            print(
                "opd: note: training on the rows' completions uses each row once per step "
                "(sampling.group_size is ignored)",
                file=sys.stderr,
            )
        return DatasetSampler(tokenizer.pad_token_id, ctx.device), "the rows' own completions"
    model = sft_teacher if sft_teacher is not None else student
    if s.backend == "vllm":
        check_vllm(cfg, ctx)
        longest = max(len(p.ids) for p in prompts) + s.max_new_tokens + 1
        engine = start_vllm_sampler(
            cfg, model, tokenizer, vocab_size, stop_token_ids(tokenizer, model), longest,
            teacher=sft_teacher is not None, rank=ctx.rank, world=ctx.world_size,
        )  # fmt: skip
        where = "sampling.urls" if s.urls else "started by opd"
        follows = (
            f"weights every {s.sync_every} step(s), staleness <= {s.staleness}"
            if sft_teacher is None
            else "serving the teacher"
        )
        said = f"vllm ({len(engine.urls)} engine(s), {where}; {follows})"
        return Prefetch(engine), said
    sampler = make_sampler(
        model, tokenizer, vocab_size, s.max_new_tokens, s.temperature, s.top_p, s.top_k,
        backend=s.backend, fast=cfg.run.fast_paths,
    )  # fmt: skip
    choice = sampler_choice(sampler, model, cfg)
    if cfg.run.autocast != "none":
        sampler = AutocastSampler(sampler, ctx.device, cfg.run.autocast)
    return sampler, choice


def warn_slow_half(cfg: Config) -> None:
    """bf16 on a CPU without bf16 matrix kernels: torch multiplies it at a few GFLOP/s. The
    fast paths multiply bf16 weights in float32 there (fast/upcast.py); autocast and the plain
    path do not."""
    if not slow_half(torch.bfloat16):
        return
    half = "bfloat16" in (cfg.model.dtype, cfg.model.teacher_dtype)
    why = ""
    if cfg.run.autocast == "bfloat16":
        why = "run.autocast=bfloat16 multiplies in bf16"
    elif half and not cfg.run.fast_paths:
        why = "bf16 weights with run.fast_paths=false multiply in bf16"
    if why:
        print(
            f"opd: warning: {why} on this CPU, which has no bf16 matrix kernels (a few GFLOP/s): "
            "float32, or bf16 weights with run.fast_paths=true, run several times faster",
            file=sys.stderr,
        )


def check_vllm(cfg, ctx) -> None:
    """Under torchrun every rank samples on engines of its own (the ranks' weights are equal
    after each step, and each rank syncs its engines): what that needs, each a one-line error."""
    s, world = cfg.sampling, ctx.world_size
    urls = engine_urls(s.urls)
    if world > 1 and s.engine_cpus:
        raise OpdError(
            f"sampling.engine_cpus={s.engine_cpus!r} places one engine: under torchrun start one "
            "per rank yourself and give them as sampling.urls"
        )
    if world > 1 and urls and len(urls) < world:
        raise OpdError(
            f"sampling.urls: {len(urls)} engine(s) for {world} ranks: each rank samples on "
            "engines of its own (rank r takes URLs r, r + ranks, ...)"
        )


def sampler_choice(sampler, model, cfg: Config) -> str:
    """Which sampler backend runs and why, in a few words."""
    if isinstance(sampler, KVCacheSampler):
        return "kv (opd's KV-cache decode loop)"
    if not cfg.run.fast_paths:
        return "hf (the model's own forward: run.fast_paths=false)"
    if cfg.sampling.backend == "hf":
        return "hf (the model's own forward: sampling.backend=hf)"
    return f"hf (the model's own forward; the KV-cache loop does not support {kv_supported(model)})"


def check_prompts(prompts: list[Prompt], objective: Objective, teachers: dict, settings) -> None:
    """Every row's teacher is configured; every row has an answer when rewards are used."""
    for prompt in prompts:
        name = prompt.row.get("teacher", DEFAULT)
        if objective.teacher and name not in teachers:
            known = ", ".join(sorted(teachers))
            raise OpdError(
                f"{prompt.where}: teacher {name!r} is not configured (teachers: {known}; "
                "add it to model.teachers as name=FOLDER_OR_URL)"
            )
        if uses_rewards(settings) and "answer" not in prompt.row:
            raise OpdError(
                f"{prompt.where}: no 'answer' to reward (objective.kind={settings.kind!r}, "
                f"objective.reward_coef={settings.reward_coef})"
            )


def eval_tokens(cfg: Config) -> int:
    return cfg.eval.max_new_tokens or cfg.sampling.max_new_tokens


def clamp_batch(cfg: Config, n_prompts: int, ctx: DistContext) -> Config:
    """A step's prompts are distinct: data.batch_prompts beyond the file is cut to the file (to
    a multiple of the processes), saying so; more would repeat prompts within a step, and a step's
    memory grows with them (a million on 50 rows once ran the machine out of memory)."""
    P, G = cfg.data.batch_prompts, cfg.sampling.group_size
    if P <= n_prompts:
        return cfg
    fit = n_prompts - n_prompts % ctx.world_size
    if fit < 1:
        raise OpdError(
            f"data.prompts={cfg.data.prompts!r} has {n_prompts} prompts, fewer than the "
            f"{ctx.world_size} processes"
        )
    if ctx.is_main:
        print(
            f"opd: note: data.batch_prompts={P} is more than the {n_prompts} prompts of "
            f"data.prompts: each step takes {fit} of them (x sampling.group_size={G} samples)",
            file=sys.stderr,
        )
    return replace(cfg, data=replace(cfg.data, batch_prompts=fit))


def read_rows(path: str, key: str, no_documents: str = ""):
    """The JSONL rows of a prompts file, read before any model loads (errors name the key).
    no_documents: why `{"text"}` rows (documents) cannot be trained on here; empty if they can."""
    if Path(path).is_dir():
        raise OpdError(f"{key}: {path} is a folder, not a prompts file")
    if not Path(path).is_file():
        raise OpdError(f"{key}: prompts file not found: {path}")
    rows = read_jsonl(path)
    for lineno, row in rows:
        if is_document(row) and no_documents:
            raise OpdError(
                f"{path}:{lineno}: a 'text' row (a document) trains only with objective.kind=sft "
                f"without model.teacher ({no_documents}); give it a 'prompt' or 'messages'"
            )
        if "prompt" not in row and "messages" not in row and not is_document(row):
            raise OpdError(
                f"{path}:{lineno}: row has neither 'prompt' nor 'messages' (nor 'text', a document)"
            )
    return rows


def read_prompts(
    path, rows, tokenizer, limits, max_new_tokens, overlong, key, with_completions, ctx, unknown
):
    """Encode a prompts file's rows, checking each prompt against the context left for the
    completion; a document (SFT on data) is cut into rows of the whole context."""
    max_prompt = min(limits) - max_new_tokens if limits else None
    documents = with_completions and all(is_document(row) for _, row in rows)  # not capped by it
    if max_prompt is not None and max_prompt < 1 and not documents:
        tokens_key = "eval.max_new_tokens" if key == "eval.prompts" else "sampling.max_new_tokens"
        raise OpdError(
            f"{tokens_key}={max_new_tokens} leaves no room for a prompt in the models' "
            f"{min(limits)}-token context; use at most {min(limits) - 1}"
        )
    note = f" (context {min(limits)} - max_new_tokens {max_new_tokens})" if limits else ""
    prompts, skipped = load_prompts(
        path,
        tokenizer,
        max_prompt,
        overlong,
        note,
        max_completion_tokens=max_new_tokens if with_completions else None,
        rows=rows,
        unknown=unknown,
        context=min(limits) if limits else None,  # a document's rows are cut to the context
    )
    if skipped and ctx.is_main:
        print(f"skipped {skipped} overlong prompts (data.overlong=skip); {len(prompts)} remain")
    unknown_tokens = sum(p.unknown for p in prompts)
    if unknown_tokens and ctx.is_main:
        print(
            f"opd: note: {key}: {unknown_tokens} tokens are the unknown token "
            f"{tokenizer.unk_token!r}, for text outside the vocabulary (data.unknown_chars=unk)",
            file=sys.stderr,
        )
    return prompts
