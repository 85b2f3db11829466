"""The run and its step, top to bottom.

One step:   prompts -> sample -> score -> advantages -> loss -> optimizer step -> metrics
            samplers/  score.py  losses.py (the objective's table entry)   torch

`train_step` is that line. The objective (on-policy distillation with one of its losses, SFT
or RL) was looked up once in the table of losses.py; the step never branches on it. `distill`
is the run around the step: set-up (build.py), the out folder and resume (rundir.py), held-out
evaluation, checkpoints and the final model.
"""

from __future__ import annotations

import math
import sys
from dataclasses import replace
from pathlib import Path

import torch

from opd import rundir
from opd.build import Run, build_run, eval_tokens
from opd.config import Config
from opd.data import step_indices
from opd.distributed import DistContext, setup
from opd.errors import OpdError
from opd.evaluate import get_extractor, run_eval
from opd.flops import sampling_flops, step_phases
from opd.guard import nonfinite
from opd.logprobs import completion_logprobs
from opd.losses import LossStats, Trainer, for_stale_rows
from opd.memory import check_memory
from opd.metrics import MetricsLogger
from opd.objectives import lr_at
from opd.samplers import make_sampler
from opd.samplers.prefetch import Prefetch
from opd.stats import teacher_kl


def sampling_generator(seed: int, step: int, rank: int, device: torch.device) -> torch.Generator:
    """A fresh generator per (seed, step, rank): sampling never depends on what ran before."""
    return torch.Generator(device=device).manual_seed(seed * 1_000_003 + step * 7_919 + rank)


def step_inputs(step: int, run: Run) -> tuple[list, torch.Generator]:
    """The step's prompts on this rank, and its sampling generator."""
    cfg, ctx = run.cfg, run.ctx
    idx = step_indices(step, len(run.prompts), cfg.data.batch_prompts, cfg.run.seed,
                       cfg.data.shuffle, ctx.rank, ctx.world_size)  # fmt: skip
    return [run.prompts[i] for i in idx], sampling_generator(
        cfg.run.seed, step, ctx.rank, ctx.device
    )


def rollouts(step: int, run: Run, prompts: list, gen: torch.Generator):
    """(the step's batch, how many updates old the weights that sampled it are): sampled now,
    or taken from the request an engine sampler got a step earlier (samplers/prefetch.py)."""
    G = run.cfg.sampling.group_size
    if not isinstance(run.sampler, Prefetch):
        return run.sampler.sample(prompts, G, gen), 0
    batch, staleness = run.sampler.take(step, prompts, G, gen)
    if run.cfg.sampling.staleness == 1:
        ask_ahead(step + 1, run, 1)  # sampled by the engine while this step trains
    return batch, staleness


def policy_logprobs(run: Run, batch) -> torch.Tensor:
    """The trained student's log-prob of each sampled token, without gradient: k_t for rows an
    older policy sampled (the sampler's log-prob there is the old policy's; an advantage built
    on it pushes the student away from that policy, not toward the teacher)."""
    with torch.no_grad():
        return completion_logprobs(
            run.student, batch.tokens_BT, batch.attention_mask_BT, batch.prompt_len, run.vocab_size
        ).float()


def ask_ahead(step: int, run: Run, staleness: int) -> None:
    """Ask the engine for `step`'s rollouts now, unless the run ends first or `step` follows a
    checkpoint (a resumed run samples it from the weights it loads: so must this run)."""
    cfg = run.cfg
    if step < cfg.run.steps and step % cfg.run.save_every != 0:
        prompts, gen = step_inputs(step, run)
        run.sampler.ahead(step, prompts, cfg.sampling.group_size, gen, staleness)


def train_step(step: int, run: Run) -> dict:
    cfg, ctx, objective = run.cfg, run.ctx, run.objective
    t0 = ctx.clock()
    prompts, gen = step_inputs(step, run)
    G = cfg.sampling.group_size
    batch, staleness = rollouts(step, run, prompts, gen)  # sampled now, or a step ahead
    batch = batch.to(ctx.device)
    t1 = ctx.clock()
    if staleness and objective.policy_kl and cfg.objective.stale_kl == "trainer":
        batch = for_stale_rows(batch, cfg.objective, lambda b: policy_logprobs(run, b))  # k_t now
    batch = run.score(batch, prompts)  # teacher log-probs (or top-k, logits), rewards
    batch = replace(batch, advantages_BT=objective.advantages(batch, cfg.objective, G))
    t2 = ctx.clock()

    # Normalise by the completion tokens of the whole step (every micro-batch, every rank).
    n_tokens, n_rows, n_unknown = ctx.sum(
        [batch.num_completion_tokens, batch.num_rows, sum(p.unknown for p in prompts)]
    )
    run.optimizer.zero_grad(set_to_none=True)
    # Dropout stays off: the ratio needs the trainer to score the distribution the sampler drew from.
    run.student.eval()
    trainer = Trainer(run.student, run.vocab_size, cfg.objective, cfg.run.fast_paths)
    stats = LossStats()
    rows = cfg.run.micro_batch_size or batch.num_rows
    for start in range(0, batch.num_rows, rows):
        stats = stats.add(objective.backward(trainer, batch.slice(start, start + rows), n_tokens))
    ctx.sum_gradients(run.params)
    grad_norm = torch.nn.utils.clip_grad_norm_(run.params, cfg.optim.grad_clip or math.inf).item()
    (loss,), (ratio_max, neg_ratio_min) = (
        ctx.sum([stats.loss]),
        ctx.max([stats.ratio_max, -stats.ratio_min]),
    )

    # A NaN or infinity in the log-probs, the loss or the gradient skips the step (guard.py):
    # no update, the same verdict on every rank; too many in a row stop the run.
    lr = lr_at(step, cfg.optim.lr, cfg.optim.warmup_steps, cfg.run.steps, cfg.optim.schedule,
               cfg.optim.min_lr_ratio)  # fmt: skip
    fault = nonfinite(batch, loss, grad_norm, ctx)
    if fault:
        run.optimizer.zero_grad(set_to_none=True)
    else:
        for group in run.optimizer.param_groups:
            group["lr"] = lr
        run.optimizer.step()
    skipped = run.skips.record(step, fault, cfg.optim.max_skipped, cfg.run.out)
    t3 = ctx.clock()
    # an engine sampler (vLLM) is brought to the new weights before it samples again
    sync = getattr(run.sampler, "sync", None)
    synced = sync() if sync and not fault and (step + 1) % cfg.sampling.sync_every == 0 else {}
    if isinstance(run.sampler, Prefetch) and cfg.sampling.staleness == 0:
        ask_ahead(step + 1, run, 0)  # from the weights just sent: the synchronous rollouts
    t4 = ctx.clock()

    metrics = {
        "step": step + 1,
        "loss": loss,
        "optim/lr": lr,
        "optim/grad_norm": grad_norm,
        "optim/skipped_steps": skipped,
        "data/unknown_tokens": int(n_unknown),
        "tokens/completion": int(n_tokens),
        "tokens/mean_completion_len": n_tokens / max(n_rows, 1),
        "time/sample": t1 - t0,
        "time/teacher": t2 - t1,
        "time/train": t3 - t2,
        "time/step": t4 - t0,
        "throughput/tokens_per_s": n_tokens / max(t4 - t0, 1e-9),
    } | synced
    if isinstance(run.sampler, Prefetch):
        metrics["sampler/staleness"] = staleness
    if objective.importance_ratio:
        ratio_sum, gap_sum = ctx.sum([stats.ratio_sum, stats.gap_sum])
        metrics |= {
            "ratio/mean": ratio_sum / max(n_tokens, 1), "ratio/max": ratio_max,
            "ratio/min": -neg_ratio_min, "sampler/trainer_logprob_gap": gap_sum / max(n_tokens, 1),
        }  # fmt: skip
    if batch.rewards_B is not None:
        total, count = ctx.sum([batch.rewards_B.sum().item(), batch.rewards_B.numel()])
        metrics["reward/mean"] = total / max(count, 1)
    if batch.teacher_lp_BT is not None:
        metrics |= teacher_kl(batch, ctx, n_tokens, sorted(run.teacher.teachers))
    seconds = {"sample": t1 - t0, "score": t2 - t1, "train": t3 - t2}
    phases = step_phases(batch, run.student_shape, run.sampling_shape, run.teacher_shapes, seconds)
    names = sorted(phases)
    for name, flops in zip(names, ctx.sum([float(phases[n][0]) for n in names]), strict=True):
        run.ledger.add(name, flops, phases[name][1])
    return metrics | run.ledger.step_metrics()


def distill(cfg: Config, force: bool = False) -> Path:
    """Run (or resume) a distillation; returns the folder of the final model."""
    ctx = setup(cfg.run.device, cfg.run.threads)
    run = None
    try:
        out = Path(cfg.run.out)
        run = build_run(cfg, ctx)  # every input is checked before anything is written
        memory = check_memory(run)  # about how much a step needs; refused if it cannot fit
        if run.teacher is not None and cfg.run.preflight:
            preflight(run)
        found = rundir.prepare(out, cfg, force, ctx)
        if ctx.is_main:
            print(f"opd: sampler: {run.sampler_said}", file=sys.stderr)
            print(f"opd: memory: {memory}", file=sys.stderr)
        start, stopped = rundir.resume(found, run)
        final_dir = out / "final"
        if (start >= cfg.run.steps or stopped) and final_dir.is_dir():
            if ctx.is_main:
                print(
                    f"run in {out} is already complete ({start} steps); final model in {final_dir}"
                )
            return final_dir
        logger = MetricsLogger(out / "metrics.jsonl", start, cfg.run.steps, enabled=ctx.is_main)
        evaluating = bool(run.eval_prompts)
        if evaluating and start == 0:
            row = {"step": 0, **evaluation(run)} if ctx.is_main else {}
            stopped = should_stop(row, cfg, ctx)
            logger.log(row | ({"eval/stopped": True} if stopped else {}), progress=False)
            if stopped:
                rundir.save_checkpoint(out, 0, run, stopped)
        for step in range(start, cfg.run.steps if not stopped else start):
            metrics = train_step(step, run)
            done = step + 1
            every = cfg.eval.every and done % cfg.eval.every == 0
            if evaluating and (done == cfg.run.steps or every):
                metrics |= evaluation(run) if ctx.is_main else {}
                stopped = should_stop(metrics, cfg, ctx)
            logger.log(metrics | ({"eval/stopped": True} if stopped else {}))
            if stopped or done % cfg.run.save_every == 0 or done == cfg.run.steps:
                rundir.save_checkpoint(out, done, run, stopped)
            if stopped:
                if ctx.is_main:
                    print(
                        f"stopping at step {done}: eval/accuracy reached eval.stop_at={cfg.eval.stop_at}"
                    )
                break
        logger.close()
        rundir.save_final(run, final_dir)
        return final_dir
    finally:
        if run is not None:
            run.score.close()
            if hasattr(run.sampler, "close"):  # an engine opd started is stopped here
                run.sampler.close()
        ctx.close()


def preflight(run: Run) -> None:
    """The teacher checks before step 1 (rank 0); every rank stops together on a failure (a
    lone rank would wait at the next barrier)."""
    from opd.preflight import check_before_run

    problem = ""
    if run.ctx.is_main:
        try:
            check_before_run(run)
        except OpdError as e:
            problem = str(e)
    if run.ctx.max([float(bool(problem))])[0] > 0:
        raise OpdError(problem or "preflight failed on rank 0")


def should_stop(metrics: dict, cfg: Config, ctx: DistContext) -> bool:
    """eval.stop_at reached? Rank 0 evaluates; every rank learns its verdict."""
    if cfg.eval.stop_at <= 0:
        return False
    passed = ctx.is_main and metrics["eval/accuracy"] >= cfg.eval.stop_at
    return ctx.max([float(passed)])[0] > 0


def evaluation(run: Run) -> dict:
    """Greedy held-out accuracy of the student as it is now (rank 0 only)."""
    cfg = run.cfg
    sampler = make_sampler(
        run.student, run.tokenizer, run.vocab_size, eval_tokens(cfg), temperature=0.0,
        backend=cfg.sampling.backend, fast=cfg.run.fast_paths,
    )  # fmt: skip
    t0 = run.ctx.clock()
    gen = torch.Generator(device=run.ctx.device).manual_seed(0)
    extract = get_extractor(cfg.eval.extractor)
    summary, rows = run_eval(
        sampler, run.tokenizer, run.eval_prompts, extract, 64, gen, cfg.eval.extractor
    )
    seconds = run.ctx.clock() - t0
    eval_flops = sampling_flops(
        run.student_shape,
        [len(x.ids) for x in run.eval_prompts],
        [r["completion_tokens"] for r in rows],
    )
    run.eval_ledger.add("eval", float(eval_flops), seconds)
    return run.eval_ledger.step_metrics(totals=False) | {  # flops/eval, _total, _per_s
        "eval/accuracy": summary["accuracy"],
        "eval/mean_completion_tokens": summary["mean_completion_tokens"],
        "time/eval": seconds,
    }
