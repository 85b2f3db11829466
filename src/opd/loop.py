"""The on-policy distillation run: set-up, then the step, readable top to bottom.

One step:  prompts -> sampler.sample -> teacher.score -> kl_advantages -> policy_gradient_loss
           -> all-reduce -> clip -> AdamW step -> metrics.
Everything heavy lives in the components (samplers/, teachers/, objectives.py, checkpoint.py).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from opd import checkpoint
from opd import config as config_mod
from opd.config import Config
from opd.data import Prompt, load_prompts, step_indices
from opd.distributed import DistContext, setup
from opd.divergences import divergence_loss_chunked, gather_topk_fn, local_teacher_scores
from opd.errors import OpdError
from opd.evaluate import get_extractor, run_eval
from opd.flops import Ledger, forward_flops, model_shape, sampling_flops, train_flops
from opd.heads import fused_token_loss, plain_head
from opd.metrics import MetricsLogger
from opd.models import (
    add_lora,
    check_compatible,
    inner_model,
    load_model,
    load_tokenizer,
    output_vocab,
)
from opd.objectives import kl_advantages, lr_at, nll_loss, policy_gradient_loss, reverse_kl
from opd.prompt_sharing import shared_prompt_hidden
from opd.rewards import combined_advantages, group_centered, reward_advantages_BT, task_rewards
from opd.samplers import Sampler, make_sampler
from opd.samplers.autocast import AutocastSampler
from opd.samplers.dataset import DatasetSampler
from opd.scoring import completion_logprobs
from opd.teachers import DEFAULT, TeacherRouter, is_url, make_teacher, teacher_specs
from opd.teachers.served import ServedTeacher

# objective.loss -> the divergence computed over the vocabulary (opd.divergences)
DIVERGENCES = {"topk": "topk_reverse_kl", "full": "reverse_kl", "jsd": "jsd"}

# Fields that may change between a run and its resumption without making it a different run.
RESUMABLE_CHANGES = {
    "objective.chunk_tokens",  # a memory knob: the same maths chunk by chunk
    "run.steps",
    "run.save_every",
    "run.keep_checkpoints",
    "run.threads",
    "run.device",
    "eval.prompts",
    "eval.every",
    "eval.max_new_tokens",
    "eval.extractor",
    "eval.limit",
    "model.teacher_api_key",  # never saved
    "remote.timeout",
    "remote.retries",
    "remote.backoff",
    "remote.concurrency",
    "remote.batch_rows",
    "run.preflight",
}


@dataclass
class Parts:
    """What a step needs, built once by `setup_run`."""

    cfg: Config
    ctx: DistContext
    student: torch.nn.Module
    params: list[torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    sampler: Sampler
    teacher: TeacherRouter | None  # None when training with SFT
    prompts: list[Prompt]
    vocab_size: int
    tokenizer: object
    eval_prompts: list[Prompt]
    shapes: dict  # "student", "teacher:<name>", "teacher_sampler" -> flops.ModelShape
    ledger: Ledger
    # evaluation's own: its FLOPs are not training compute, so not in flops/step or flops/total
    eval_ledger: Ledger = field(default_factory=Ledger)


def sampling_generator(seed: int, step: int, rank: int, device: torch.device) -> torch.Generator:
    """A fresh generator per (seed, step, rank): sampling never depends on what ran before."""
    return torch.Generator(device=device).manual_seed(seed * 1_000_003 + step * 7_919 + rank)


def train_step(step: int, p: Parts) -> dict:
    cfg, ctx = p.cfg, p.ctx
    t0 = time.perf_counter()
    idx = step_indices(
        step,
        len(p.prompts),
        cfg.data.batch_prompts,
        cfg.run.seed,
        cfg.data.shuffle,
        ctx.rank,
        ctx.world_size,
    )
    gen = sampling_generator(cfg.run.seed, step, ctx.rank, ctx.device)
    step_prompts = [p.prompts[i] for i in idx]
    batch = p.sampler.sample(step_prompts, cfg.sampling.group_size, gen)
    t1 = time.perf_counter()
    scored = score_batch(p, batch, step_prompts)  # teacher log-probs, rewards, advantages
    t2 = time.perf_counter()

    # Normalise by the completion tokens of the whole step (every micro-batch, every rank).
    n_tokens, n_rows = ctx.sum([batch.num_completion_tokens, batch.num_rows])
    lr = lr_at(
        step,
        cfg.optim.lr,
        cfg.optim.warmup_steps,
        cfg.run.steps,
        cfg.optim.schedule,
        cfg.optim.min_lr_ratio,
    )
    for group in p.optimizer.param_groups:
        group["lr"] = lr
    p.optimizer.zero_grad(set_to_none=True)
    # Dropout stays off: the ratio needs the trainer to score the distribution the sampler drew from.
    p.student.eval()
    loss_sum, ratio_sum, ratio_max = backward(p, batch, scored, n_tokens)
    ctx.sum_gradients(p.params)
    grad_norm = torch.nn.utils.clip_grad_norm_(p.params, cfg.optim.grad_clip or math.inf).item()
    if not math.isfinite(grad_norm):
        raise OpdError(
            f"step {step + 1}: gradient norm is {grad_norm}; the step was not applied "
            "(try a lower optim.lr); the last checkpoint is intact"
        )
    p.optimizer.step()
    t3 = time.perf_counter()

    (loss_sum,), (ratio_max,) = ctx.sum([loss_sum]), ctx.max([ratio_max])
    metrics = {
        "step": step + 1,
        "loss": loss_sum,
        "optim/lr": lr,
        "optim/grad_norm": grad_norm,
        "tokens/completion": int(n_tokens),
        "tokens/mean_completion_len": n_tokens / max(n_rows, 1),
        "time/sample": t1 - t0,
        "time/teacher": t2 - t1,
        "time/train": t3 - t2,
        "time/step": t3 - t0,
        "throughput/tokens_per_s": n_tokens / max(t3 - t0, 1e-9),
    }
    metrics |= score_metrics(p, batch, scored, n_tokens, ratio_sum, ratio_max)
    metrics |= count_flops(p, batch, scored.get("names_B"), t1 - t0, t2 - t1, t3 - t2)
    return metrics


def score_batch(p: Parts, batch, step_prompts) -> dict:
    """Teacher log-probs (OPD), rewards (RL, reward + KL) and the per-token advantages."""
    cfg, o, mask_BT = p.cfg, p.cfg.objective, batch.completion_mask_BT
    scored = {"loss": o.loss if o.kind == "opd" else o.kind}  # sampled|topk|full|jsd, sft, rl
    if o.kind == "rl" or o.reward_coef > 0:
        scored["rewards_B"] = step_rewards(p, batch, step_prompts)
        reward_adv_B = group_centered(scored["rewards_B"], cfg.sampling.group_size, o.reward_std)
    if o.kind == "rl":
        batch.advantages_BT = reward_advantages_BT(reward_adv_B, mask_BT)
    if o.kind != "opd":
        return scored
    names_B = p.teacher.names(batch, [x.row.get("teacher", DEFAULT) for x in step_prompts])
    scored["names_B"] = names_B
    if o.loss in ("full", "jsd"):  # one teacher pass gives the loss's logits and the KL metric
        batch.teacher_lp_BT, scored["teacher_fns"] = local_teacher_logits(p, batch, names_B)
        return scored
    k = o.topk if o.loss == "topk" else 0
    batch.teacher_lp_BT, top_ids_BTK, top_lp_BTK = p.teacher.score_topk(batch, names_B, k)
    scored |= {"top_ids_BTK": top_ids_BTK, "top_lp_BTK": top_lp_BTK}
    if o.loss == "sampled":
        batch.advantages_BT = kl_advantages(
            batch.sampler_lp_BT, batch.teacher_lp_BT, mask_BT, o.kl_coef, o.discount
        )
        if o.reward_coef > 0:  # A_t = reward_coef * centred reward - kl_coef * k_t
            batch.advantages_BT = combined_advantages(
                o.reward_coef * reward_adv_B, batch.advantages_BT, mask_BT
            )
    return scored


def backward(p: Parts, batch, scored: dict, n_tokens) -> tuple[float, float, float]:
    """Accumulate the step's gradient micro-batch by micro-batch; (loss, ratio sum, ratio max)."""
    cfg, loss_kind = p.cfg, scored["loss"]
    loss_sum, ratio_sum, ratio_max = 0.0, 0.0, 0.0
    mbs = cfg.run.micro_batch_size or batch.num_rows
    for start in range(0, batch.num_rows, mbs):
        mb = batch.slice(start, start + mbs)
        if loss_kind in DIVERGENCES:  # backpropagates chunk by chunk itself
            fn = divergence_teacher(p, mb, scored, start)
            loss, _ = divergence_loss_chunked(
                p.student,
                mb,
                fn,
                DIVERGENCES[loss_kind],
                p.vocab_size,
                n_tokens,
                cfg.objective.chunk_tokens,
                cfg.objective.jsd_beta,
            )
            loss_sum += loss
            continue
        if plain_head(p.student) is not None:  # the LM head chunk by chunk, its gradient fused
            loss, stats = token_loss_fused(p, mb, loss_kind, n_tokens)
            ratio_sum += stats["ratio_sum"]
            ratio_max = max(ratio_max, stats["ratio_max"])
            loss.backward()
            loss_sum += loss.item()
            continue
        train_lp_BT = completion_logprobs(
            p.student, mb.tokens_BT, mb.attention_mask_BT, batch.prompt_len, p.vocab_size
        )
        if loss_kind in ("sampled", "rl"):
            loss, stats = policy_gradient_loss(
                train_lp_BT,
                mb.sampler_lp_BT,
                mb.advantages_BT,
                mb.completion_mask_BT,
                n_tokens,
                cfg.objective.clip_ratio,
            )
            ratio_sum += stats["ratio_sum"].item()
            ratio_max = max(ratio_max, stats["ratio_max"].item())
        else:
            loss = nll_loss(train_lp_BT, mb.completion_mask_BT, n_tokens)
        loss.backward()
        loss_sum += loss.item()
    return loss_sum, ratio_sum, ratio_max


def token_loss_fused(p: Parts, mb, loss_kind: str, n_tokens) -> tuple[torch.Tensor, dict]:
    """The policy-gradient (sampled, rl) or NLL (sft) loss of a micro-batch through heads.py's
    fused LM head: the same pure loss functions, applied to chunks of completion tokens."""
    mask_BT = mb.completion_mask_BT
    sampler_lp_N, adv_N = mb.sampler_lp_BT[mask_BT], None
    if loss_kind != "sft":
        adv_N = mb.advantages_BT[mask_BT]

    def chunk_loss(lp_n: torch.Tensor, sl: slice) -> torch.Tensor:
        ones_n = torch.ones_like(lp_n, dtype=torch.bool)
        if adv_N is None:
            return nll_loss(lp_n, ones_n, n_tokens)
        clip = p.cfg.objective.clip_ratio
        return policy_gradient_loss(lp_n, sampler_lp_N[sl], adv_N[sl], ones_n, n_tokens, clip)[0]

    # each distinct prompt once, when rows share prompts (prompt_sharing.py); None: plain forward
    hidden = shared_prompt_hidden(
        p.student, mb.tokens_BT, mb.attention_mask_BT, mask_BT, mb.prompt_len
    )
    loss, lp_N, _ = fused_token_loss(
        p.student,
        mb.tokens_BT,
        mb.attention_mask_BT,
        mask_BT,
        p.vocab_size,
        chunk_loss,
        p.cfg.objective.chunk_tokens,
        hidden,
    )
    ratio_N = torch.exp(lp_N - sampler_lp_N)
    stats = {"ratio_sum": 0.0, "ratio_max": 0.0}
    if adv_N is not None and ratio_N.numel():
        stats = {"ratio_sum": ratio_N.sum().item(), "ratio_max": ratio_N.max().item()}
    return loss, stats


def score_metrics(p: Parts, batch, scored: dict, n_tokens, ratio_sum, ratio_max) -> dict:
    """Importance ratios, rewards, and the KL to the teacher(s), reduced over ranks."""
    ctx, mask_BT, denom = p.ctx, batch.completion_mask_BT, max(n_tokens, 1)
    metrics = {}
    if scored["loss"] in ("sampled", "rl"):
        (ratio_sum,) = ctx.sum([ratio_sum])
        metrics |= {"ratio/mean": ratio_sum / denom, "ratio/max": ratio_max}
    if "rewards_B" in scored:
        total, rows = ctx.sum([scored["rewards_B"].sum().item(), scored["rewards_B"].numel()])
        metrics["reward/mean"] = total / max(rows, 1)
    if "names_B" not in scored:
        return metrics
    kl_sum = reverse_kl(batch.sampler_lp_BT, batch.teacher_lp_BT, mask_BT).sum().item()
    sums = ctx.sum(
        [
            kl_sum,
            batch.teacher_lp_BT[mask_BT].sum().item(),
            batch.sampler_lp_BT[mask_BT].sum().item(),
        ]
    )
    metrics |= {
        "teacher/kl": sums[0] / denom,
        "teacher/logprob": sums[1] / denom,
        "sampler/logprob": sums[2] / denom,
    }
    if len(p.teacher.teachers) > 1:
        metrics |= per_teacher_kl(batch, scored["names_B"], sorted(p.teacher.teachers), ctx)
    return metrics


def step_rewards(p: Parts, batch, step_prompts) -> torch.Tensor:
    """(B,) 1.0 where the completion's extracted answer equals its prompt's 'answer', else 0."""
    texts = [
        p.tokenizer.decode(
            batch.tokens_BT[b][batch.completion_mask_BT[b]].tolist(), skip_special_tokens=True
        )
        for b in range(batch.num_rows)
    ]
    answers = [step_prompts[i].row.get("answer") for i in batch.prompt_index_B.tolist()]
    return task_rewards(texts, answers, get_extractor(p.cfg.objective.extractor)).to(
        batch.tokens_BT.device
    )


def count_flops(p: Parts, batch, names_B, t_sample: float, t_teacher: float, t_train: float):
    """Model FLOPs of this step's phases (summed over ranks) into the run's ledger."""
    cfg, ctx = p.cfg, p.ctx
    prompt_B = batch.attention_mask_BT[:, : batch.prompt_len].sum(1).cpu()
    completion_B = batch.completion_mask_BT.sum(1).cpu()
    seq_B = prompt_B + completion_B
    phases = {}
    if cfg.objective.kind in ("opd", "rl"):
        phases["student_sampling"] = (
            sampling_flops(p.shapes["student"], prompt_B, completion_B),
            t_sample,
        )
    elif "teacher_sampler" in p.shapes:  # SFT on the teacher's samples
        phases["teacher_sampling"] = (
            sampling_flops(p.shapes["teacher_sampler"], prompt_B, completion_B),
            t_sample,
        )
    if names_B is not None:
        flops = 0
        for name, rows in p.teacher.groups(names_B).items():
            shape = p.shapes.get(f"teacher:{name}")
            if shape is not None:  # a served teacher's size is not known here: not counted
                flops += forward_flops(shape, torch.zeros_like(seq_B[rows]), seq_B[rows])
        phases["teacher_scoring"] = (flops, t_teacher)
    phases["train"] = (train_flops(p.shapes["student"], seq_B), t_train)
    names = sorted(phases)
    sums = ctx.sum([float(phases[n][0]) for n in names])
    for name, flops in zip(names, sums, strict=True):
        p.ledger.add(name, flops, phases[name][1])
    return p.ledger.step_metrics()


def local_teacher_logits(p: Parts, batch, names_B: list[str]):
    """For full/jsd: each in-process teacher's backbone runs once over its rows. Returns the
    (B, T) sampled-token log-probs and {name: (TeacherFn, batch row -> the teacher's row)}."""
    lp_BT = torch.zeros(batch.tokens_BT.shape, dtype=torch.float32)
    fns = {}
    for name, rows in p.teacher.groups(names_B).items():
        fn, lp_rows_BT = local_teacher_scores(
            p.teacher.teachers[name].model,
            batch.select(rows),
            p.vocab_size,
            p.cfg.objective.chunk_tokens,
            p.cfg.run.micro_batch_size,
            p.cfg.run.autocast,
        )
        lp_BT[rows] = lp_rows_BT.to(lp_BT.device)
        where_B = torch.full((batch.num_rows,), -1, dtype=torch.long)
        where_B[rows] = torch.arange(len(rows))
        fns[name] = (fn, where_B)
    return lp_BT.to(batch.sampler_lp_BT.device), fns


def divergence_teacher(p: Parts, mb, scored: dict, start: int):
    """The teacher side of a topk/full/jsd loss for micro-batch `mb` (rows from `start`)."""
    end = start + mb.num_rows
    if scored.get("top_ids_BTK") is not None:  # top-k, already scored (served or in-process)
        return gather_topk_fn(scored["top_ids_BTK"][start:end], scored["top_lp_BTK"][start:end])
    names_mb = scored["names_B"][start:end]
    fns = scored["teacher_fns"]
    if len(fns) == 1:
        ((fn, where_B),) = fns.values()
        return lambda rows_N, cols_N: fn(where_B[rows_N.cpu() + start], cols_N)

    def routed(rows_N: torch.Tensor, cols_N: torch.Tensor) -> torch.Tensor:
        out = None
        for name, (fn, where_B) in fns.items():
            sel = torch.tensor([names_mb[r] == name for r in rows_N.tolist()], dtype=torch.bool)
            if not sel.any():
                continue
            part = fn(where_B[rows_N[sel].cpu() + start], cols_N[sel])
            if out is None:
                out = part.new_zeros(len(rows_N), part.shape[1])
            out[sel.to(part.device)] = part
        return out

    return routed


def per_teacher_kl(batch, names_B: list[str], names: list[str], ctx: DistContext) -> dict:
    """teacher/kl/<name>: the per-token reverse KL of the rows each teacher scored."""
    mask_BT = batch.completion_mask_BT
    kl_B = reverse_kl(batch.sampler_lp_BT, batch.teacher_lp_BT, mask_BT).sum(-1)
    tokens_B = mask_BT.sum(-1)
    sums = []
    for name in names:
        rows = torch.tensor([n == name for n in names_B], device=kl_B.device)
        sums += [kl_B[rows].sum().item(), tokens_B[rows].sum().item()]
    sums = ctx.sum(sums)
    return {
        f"teacher/kl/{name}": sums[2 * i] / sums[2 * i + 1]
        for i, name in enumerate(names)
        if sums[2 * i + 1] > 0
    }


def distill(cfg: Config, force: bool = False) -> Path:
    """Run (or resume) a distillation; returns the folder of the final model."""
    ctx = setup(cfg.run.device, cfg.run.threads)
    parts = None
    try:
        out = Path(cfg.run.out)
        ckpt_root = out / "checkpoints"
        parts = setup_run(cfg, ctx)  # every input is checked before anything is written
        if parts.teacher is not None and cfg.run.preflight:
            from opd.preflight import check_before_run

            problem = ""
            if ctx.is_main:
                try:
                    check_before_run(parts)
                except OpdError as e:
                    problem = str(e)
            # every rank stops together (a lone rank would wait at the next barrier)
            if ctx.max([float(bool(problem))])[0] > 0:
                raise OpdError(problem or "preflight failed on rank 0")
        if ctx.is_main:
            check_out(out, cfg, force)
            checkpoint.clean_partial(ckpt_root)
        ctx.barrier()
        found = checkpoint.list_checkpoints(ckpt_root)
        if found and checkpoint.step_of(found[-1]) > cfg.run.steps:
            raise OpdError(
                f"{found[-1]} is past run.steps={cfg.run.steps}; raise --steps or use --force"
            )
        if ctx.is_main:
            write_config(out, cfg)
        ctx.barrier()
        start, stopped = resume(found, parts)
        final_dir = out / "final"
        if (start >= cfg.run.steps or stopped) and final_dir.is_dir():
            if ctx.is_main:
                print(
                    f"run in {out} is already complete ({start} steps); final model in {final_dir}"
                )
            return final_dir
        logger = MetricsLogger(out / "metrics.jsonl", start, cfg.run.steps, enabled=ctx.is_main)
        evaluating = bool(parts.eval_prompts)
        if evaluating and start == 0:
            row = {"step": 0, **run_evaluation(parts)} if ctx.is_main else {}
            stopped = should_stop(row, cfg, ctx)
            logger.log(row | ({"eval/stopped": True} if stopped else {}), progress=False)
            if stopped and ctx.is_main:
                checkpoint.save(
                    ckpt_root,
                    0,
                    parts.student,
                    parts.optimizer,
                    {
                        "data_cursor": 0,
                        "stopped": True,
                        "flops": parts.ledger.state_dict(),
                        "eval_flops": parts.eval_ledger.state_dict(),
                    },
                    cfg.run.keep_checkpoints,
                )
            ctx.barrier()
        for step in range(start, cfg.run.steps if not stopped else start):
            metrics = train_step(step, parts)
            done = step + 1
            eval_now = evaluating and (
                done == cfg.run.steps or (cfg.eval.every and done % cfg.eval.every == 0)
            )
            if eval_now and ctx.is_main:
                metrics |= run_evaluation(parts)
            if eval_now:
                stopped = should_stop(metrics, cfg, ctx)
            logger.log(metrics | ({"eval/stopped": True} if stopped else {}))
            if stopped or done % cfg.run.save_every == 0 or done == cfg.run.steps:
                ctx.check_in_sync(parts.params, done)
                if ctx.is_main:
                    checkpoint.save(
                        ckpt_root,
                        done,
                        parts.student,
                        parts.optimizer,
                        {
                            "data_cursor": done * cfg.data.batch_prompts,
                            "stopped": stopped,
                            "flops": parts.ledger.state_dict(),
                            "eval_flops": parts.eval_ledger.state_dict(),
                        },
                        cfg.run.keep_checkpoints,
                    )
                ctx.barrier()
            if stopped:
                if ctx.is_main:
                    print(
                        f"stopping at step {done}: eval/accuracy reached eval.stop_at={cfg.eval.stop_at}"
                    )
                break
        logger.close()
        if ctx.is_main:
            save_final(parts.student, parts.tokenizer, final_dir)
            print(f"final model written to {final_dir}")
        ctx.barrier()
        return final_dir
    finally:
        if parts is not None and parts.teacher is not None:
            parts.teacher.close()
        ctx.close()


def should_stop(metrics: dict, cfg: Config, ctx: DistContext) -> bool:
    """eval.stop_at reached? Rank 0 evaluates; every rank learns its verdict."""
    if cfg.eval.stop_at <= 0:
        return False
    passed = ctx.is_main and metrics["eval/accuracy"] >= cfg.eval.stop_at
    return ctx.max([float(passed)])[0] > 0


def check_out(out: Path, cfg: Config, force: bool) -> None:
    """Refuse an --out that holds a different run; with --force, clear that run's files."""
    cfg_path = out / "config.json"
    if out.exists() and not out.is_dir():
        raise OpdError(f"run.out={str(out)!r} exists and is not a folder")
    if force:
        for name in ("checkpoints", "final", "final.tmp"):
            shutil.rmtree(out / name, ignore_errors=True)
        (out / "metrics.jsonl").unlink(missing_ok=True)
        return
    if not cfg_path.exists():
        return
    try:
        old = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, OSError):
        old = None
    if not isinstance(old, dict):
        raise OpdError(
            f"{cfg_path} is not a run config; use another --out, or --force to replace it"
        )
    new = config_mod.to_dict(cfg)
    defaults = config_mod.to_dict(Config())  # a key an older opd did not write had its default
    free = RESUMABLE_CHANGES - ({"run.steps"} if cfg.optim.schedule == "cosine" else set())
    diff = [
        f"{s}.{k}"
        for s, table in new.items()
        for k, v in table.items()
        if f"{s}.{k}" not in free and (old.get(s) or {}).get(k, defaults[s][k]) != v
    ]
    if diff:
        raise OpdError(
            f"{out} holds a different run ({', '.join(diff)} differ); "
            "use another --out, or --force to replace it"
        )


def write_config(out: Path, cfg: Config) -> None:
    """config.json, replaced atomically (a kill mid-write never leaves a torn file)."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        tmp = out / ".config.json.tmp"
        saved = config_mod.to_dict(cfg)
        saved["model"]["teacher_api_key"] = ""  # a secret stays out of the run folder
        tmp.write_text(json.dumps(saved, indent=2) + "\n")
        os.replace(tmp, out / "config.json")
    except OSError as e:
        raise OpdError(f"run.out={str(out)!r}: cannot write there ({e.strerror})") from None


def context_length(model) -> int | None:
    return getattr(model.config, "max_position_embeddings", None)


def setup_run(cfg: Config, ctx: DistContext) -> Parts:
    m, s, on_policy = cfg.model, cfg.sampling, cfg.objective.kind == "opd"
    if cfg.data.batch_prompts % ctx.world_size:
        raise OpdError(
            f"data.batch_prompts={cfg.data.batch_prompts} must be divisible by the "
            f"number of processes ({ctx.world_size})"
        )
    if on_policy and (s.temperature != 1.0 or s.top_p < 1.0 or s.top_k > 0) and ctx.is_main:
        print(
            "opd: warning: sampling.temperature/top_p/top_k change the sampling distribution: "
            "sampler log-probs are those of the adjusted, renormalised distribution, so the "
            "importance ratio exp(logp_train - logp_sampler) starts away from 1 and the "
            "update is off-policy by that much",
            file=sys.stderr,
        )
    torch.manual_seed(cfg.run.seed)
    tokenizer = load_tokenizer(m.student, "model.student")
    student = load_model(m.student, m.dtype, ctx.device, "model.student")
    teachers, vocab_size = load_teachers(cfg, tokenizer, student, ctx)
    teacher_model = teachers.get(DEFAULT)
    if not on_policy and m.teacher and not isinstance(teacher_model, torch.nn.Module):
        raise OpdError(
            f"model.teacher={m.teacher!r}: objective.kind=sft samples from the teacher, "
            "which needs a local model folder"
        )
    local = [t for t in teachers.values() if isinstance(t, torch.nn.Module)]
    if on_policy and cfg.objective.reward_coef > 0 and cfg.objective.loss != "sampled":
        raise OpdError(
            f"objective.reward_coef={cfg.objective.reward_coef} adds the reward to the sampled-token "
            f"advantage; objective.loss={cfg.objective.loss!r} has none (use loss 'sampled')"
        )
    if on_policy and cfg.objective.loss in ("full", "jsd") and len(local) < len(teachers):
        raise OpdError(
            f"objective.loss={cfg.objective.loss!r} needs every teacher in-process (full "
            "logits); served teachers support 'sampled' and 'topk'"
        )
    models = [student, *local]
    limits = [n for n in map(context_length, models) if n]
    # a served teacher must also fit the whole row plus the one token vLLM insists on making
    limits += [t.max_len - 1 for t in teachers.values() if getattr(t, "max_len", None)]
    from_data = cfg.objective.kind == "sft" and teacher_model is None
    prompts = read_prompts(
        cfg.data.prompts,
        tokenizer,
        limits,
        s.max_new_tokens,
        cfg.data.overlong,
        "data.prompts",
        from_data,
        ctx,
    )
    eval_prompts = []
    if cfg.eval.prompts:
        eval_prompts = read_prompts(
            cfg.eval.prompts,
            tokenizer,
            limits,
            eval_tokens(cfg),
            "error",
            "eval.prompts",
            False,
            ctx,
        )
        eval_prompts = eval_prompts[: cfg.eval.limit or None]
        if not any("answer" in p.row for p in eval_prompts):
            raise OpdError(f"eval.prompts={cfg.eval.prompts!r}: no row has an 'answer' to score")
        get_extractor(cfg.eval.extractor)  # fail now on a bad name, not at the first eval
    if m.lora_rank > 0:
        student = add_lora(student, m.lora_rank, m.lora_alpha, m.lora_target_modules)
    params = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        params,
        lr=cfg.optim.lr,
        betas=(cfg.optim.beta1, cfg.optim.beta2),
        eps=cfg.optim.eps,
        weight_decay=cfg.optim.weight_decay,
        # one kernel over all parameters (CPU and CUDA): ~10x faster than the per-tensor loop
        fused=all(p.device.type in ("cpu", "cuda") for p in params),
    )
    # The token source: the student itself (on-policy), the teacher (SFT on its samples), or data.
    if from_data:
        if s.group_size != 1 and ctx.is_main:
            print(
                "opd: note: training on the rows' completions uses each row once per step "
                "(sampling.group_size is ignored)",
                file=sys.stderr,
            )
        sampler = DatasetSampler(tokenizer.pad_token_id)
    else:
        source = teacher_model if cfg.objective.kind == "sft" else student
        sampler = make_sampler(
            source,
            tokenizer,
            vocab_size,
            s.max_new_tokens,
            s.temperature,
            s.top_p,
            s.top_k,
            backend=s.backend,
        )
        if cfg.run.autocast != "none":
            sampler = AutocastSampler(sampler, ctx.device, cfg.run.autocast)
    if on_policy:
        for prompt in prompts:
            name = prompt.row.get("teacher", DEFAULT)
            if name not in teachers:
                known = ", ".join(sorted(teachers))
                raise OpdError(
                    f"{prompt.where}: teacher {name!r} is not configured (teachers: {known}; "
                    "add it to model.teachers as name=FOLDER_OR_URL)"
                )
    teacher = None
    if on_policy:
        teacher = TeacherRouter(
            {
                name: make_teacher(
                    t,
                    vocab_size,
                    cfg.run.micro_batch_size,
                    cfg.objective.chunk_tokens,
                    cfg.run.autocast,
                )
                if isinstance(t, torch.nn.Module)
                else t
                for name, t in teachers.items()
            }
        )
    if cfg.objective.kind == "rl" or cfg.objective.reward_coef > 0:
        for prompt in prompts:
            if "answer" not in prompt.row:
                raise OpdError(
                    f"{prompt.where}: no 'answer' to reward (objective.kind={cfg.objective.kind!r}, "
                    f"objective.reward_coef={cfg.objective.reward_coef})"
                )
        get_extractor(cfg.objective.extractor)
    shapes = {"student": model_shape(student)}
    for name, t in teachers.items():
        if isinstance(t, torch.nn.Module):
            shapes[f"teacher:{name}"] = model_shape(t)
    if cfg.objective.kind == "sft" and teacher_model is not None:
        shapes["teacher_sampler"] = shapes[f"teacher:{DEFAULT}"]
    return Parts(
        cfg,
        ctx,
        student,
        params,
        optimizer,
        sampler,
        teacher,
        prompts,
        vocab_size,
        tokenizer,
        eval_prompts,
        shapes,
        Ledger(),
    )


def load_teachers(cfg: Config, tokenizer, student, ctx: DistContext):
    """{name: local model or ServedTeacher} and the vocabulary size every log-prob is cut to."""
    m, r = cfg.model, cfg.remote
    vocab_size = min(len(tokenizer), output_vocab(student))
    api_key = m.teacher_api_key or os.environ.get("OPD_TEACHER_API_KEY", "")
    teachers = {}
    specs = teacher_specs(m.teacher, m.teachers)
    if cfg.objective.kind != "opd":  # rl uses no teacher; sft samples from the default one
        specs = {DEFAULT: m.teacher} if cfg.objective.kind == "sft" and m.teacher else {}
    for name, spec in specs.items():
        what = "model.teacher" if name == DEFAULT else f"model.teachers[{name}]"
        if is_url(spec):
            teachers[name] = ServedTeacher(
                spec,
                m.teacher_model if name == DEFAULT else "",
                api_key,
                r.api,
                r.timeout,
                r.retries,
                r.backoff,
                r.concurrency,
                r.batch_rows,
            )
            continue
        teacher_tok = load_tokenizer(spec, what)
        model = load_model(spec, m.teacher_dtype, ctx.device, what)
        vocab_size = min(vocab_size, check_compatible(tokenizer, teacher_tok, student, model))
        teachers[name] = model
    return teachers, vocab_size


def eval_tokens(cfg: Config) -> int:
    return cfg.eval.max_new_tokens or cfg.sampling.max_new_tokens


def read_prompts(path, tokenizer, limits, max_new_tokens, overlong, key, with_completions, ctx):
    """Load a prompts file, checking each prompt against the context left for the completion."""
    if not Path(path).is_file():
        raise OpdError(f"{key}: prompts file not found: {path}")
    max_prompt = min(limits) - max_new_tokens if limits else None
    if max_prompt is not None and max_prompt < 1:
        raise OpdError(
            f"{key}: max_new_tokens={max_new_tokens} leaves no room for a prompt in the "
            f"{min(limits)}-token context"
        )
    note = f" (context {min(limits)} - max_new_tokens {max_new_tokens})" if limits else ""
    prompts, skipped = load_prompts(
        path,
        tokenizer,
        max_prompt,
        overlong,
        note,
        max_completion_tokens=max_new_tokens if with_completions else None,
    )
    if skipped and ctx.is_main:
        print(f"skipped {skipped} overlong prompts (data.overlong=skip); {len(prompts)} remain")
    return prompts


def run_evaluation(p: Parts) -> dict:
    """Greedy held-out accuracy of the student as it is now (rank 0 only)."""
    cfg = p.cfg
    sampler = make_sampler(
        p.student,
        p.tokenizer,
        p.vocab_size,
        eval_tokens(cfg),
        temperature=0.0,
        backend=cfg.sampling.backend,
    )
    t0 = time.perf_counter()
    summary, rows = run_eval(
        sampler,
        p.tokenizer,
        p.eval_prompts,
        get_extractor(cfg.eval.extractor),
        64,
        torch.Generator(device=p.ctx.device).manual_seed(0),
        cfg.eval.extractor,
    )
    seconds = time.perf_counter() - t0
    eval_flops = sampling_flops(
        p.shapes["student"],
        [len(x.ids) for x in p.eval_prompts],
        [r["completion_tokens"] for r in rows],
    )
    p.eval_ledger.add("eval", float(eval_flops), seconds)
    return p.eval_ledger.step_metrics(totals=False) | {  # flops/eval, _total, _per_s
        "eval/accuracy": summary["accuracy"],
        "eval/mean_completion_tokens": summary["mean_completion_tokens"],
        "time/eval": seconds,
    }


def resume(found: list[Path], parts: Parts) -> tuple[int, bool]:
    """Load the newest complete checkpoint, if any; returns (step to start from, stopped early)."""
    if not found:
        return 0, False
    state = checkpoint.load(found[-1], parts.student, parts.optimizer)
    parts.ledger.load_state_dict(state.get("flops", {}))
    parts.eval_ledger.load_state_dict(state.get("eval_flops", {}))
    if parts.ctx.is_main:
        print(f"resuming from {found[-1]} (step {state['step']})")
    return int(state["step"]), bool(state.get("stopped", False))


def save_final(student, tokenizer, final_dir: Path) -> None:
    """Write the student in save_pretrained format (LoRA merged), atomically."""
    tmp = final_dir.with_name(final_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model = student.merge_and_unload() if hasattr(student, "merge_and_unload") else student
    inner_model(model).save_pretrained(str(tmp))
    tokenizer.save_pretrained(str(tmp))
    shutil.rmtree(final_dir, ignore_errors=True)
    tmp.rename(final_dir)
