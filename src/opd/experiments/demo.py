"""`opd demo`: the blog's math experiment in miniature, on a laptop CPU, with teachers opd trains.

The blog ("On-Policy Distillation", Thinking Machines Lab, 2025) takes a student that was
fine-tuned off-policy on a strong teacher's samples (SFT) and continues with on-policy
distillation from that checkpoint, reaching the teacher's level at a fraction of the cost.
Here, with no model hub:

1. teacher: a small Llama trained from scratch on 4-digit addition written out digit by digit
   (`opd sft` on the gold traces);
2. sft: a smaller student trained from scratch on the teacher's temperature-1 samples
   (`opd sft --teacher`, off-policy distillation; teacher sampling counts as cost);
3. opd: `opd distill` from the SFT checkpoint, with held-out accuracy measured along the way.

`--task two-paths` (demo_settings.TWO_PATHS): the teacher learns every problem written two ways
and samples between them, the student has one layer and executes only one of them.

Teacher and SFT stages are cached under the cache folder, keyed by their settings, so a second
`opd demo` reuses them. Deliberately left out: the blog's RL and continued-SFT comparisons and
the FLOPs ledger (`opd experiment`), and real chat models.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from opd import tiny
from opd.config import build_config
from opd.errors import OpdError
from opd.evaluate import evaluate
from opd.experiments.demo_report import demo_table, param_count, plots, report_md
from opd.experiments.demo_settings import (
    PATHS,
    TEACHER_SCHEDULE,
    Settings,
    extractor,
    settings_for,
    task_name,
)
from opd.tasks.addition import CHARS, Addition
from opd.train import distill


def _key(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:12]


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    os.replace(tmp, path)
    return path


def _stage(flags: dict, quiet: bool, force: bool = False) -> Path:
    """Run one `opd distill`/`opd sft` stage in-process; resumes or reuses a finished one."""
    cfg = build_config(None, {"run.save_every": 10_000, **flags}, [])
    sink = io.StringIO()
    with contextlib.redirect_stderr(sink) if quiet else contextlib.nullcontext():
        with contextlib.redirect_stdout(sink) if quiet else contextlib.nullcontext():
            return distill(cfg, force=force)


def _train_from_scratch(
    stage_dir: Path,
    tok,
    hidden: int,
    layers: int,
    seed: int,
    quiet: bool,
    flags: dict,
    log,
    name: str,
    plan: str,
    max_positions: int = 128,
) -> bool:
    """`opd sft` of a fresh tiny Llama into stage_dir/final; returns True when it was cached."""
    if (stage_dir / "final").is_dir():
        log(f"{name}: reusing {stage_dir}")
        return True
    log(plan)
    model = tiny.tiny_model(
        tok,
        hidden=hidden,
        layers=layers,
        heads=4,
        kv_heads=4,
        max_positions=max_positions,
        seed=seed,
    )
    init = tiny.save(model, tok, stage_dir / "init")
    _stage(
        {
            **flags,
            "objective.kind": "sft",
            "model.student": str(init),
            "run.out": str(stage_dir / "run"),
            "sampling.group_size": 1,
        },
        quiet,
    )
    (stage_dir / "run" / "final").rename(stage_dir / "final")
    return False


def _last_step(stage_dir: Path) -> int:
    """The steps a stage ran (fewer than its budget when eval.stop_at ended it)."""
    return json.loads((stage_dir / "run" / "metrics.jsonl").read_text().splitlines()[-1])["step"]


def _accuracy(model_dir: Path, test: Path, max_new: int, extract: str) -> float:
    return evaluate(str(model_dir), str(test), max_new_tokens=max_new, extractor=extract)[
        "accuracy"
    ]


@dataclass
class Stages:
    """The cached stages every experiment starts from: data, the teacher, the SFT student."""

    settings: Settings
    max_new: int
    train: Path  # rows with prompt, completion (gold trace) and answer
    prompts: Path  # the same prompts with answers, no completions
    test: Path
    valid: Path
    teacher: Path
    sft: Path
    teacher_acc: float
    sft_acc: float
    sft_steps: int
    teacher_steps: int  # fewer than Settings.teacher_steps when teacher_stop_at stopped it
    teacher_seconds: float
    sft_seconds: float
    teacher_cached: bool
    sft_cached: bool
    common: dict  # flags every stage shares (max_new_tokens, seed, eval prompts, extractor)


def prepare(s: Settings, seed: int, cache_dir: str | None, quiet: bool, log) -> Stages:
    """Data, teacher and SFT student, each reused from the cache when its settings match."""
    cache = Path(cache_dir or os.environ.get("OPD_CACHE", Path.home() / ".cache" / "opd")) / "demo"
    cache.mkdir(parents=True, exist_ok=True)
    task = Addition(s.digits, answer_line=s.answer_line)
    max_new = len(task.solution(0, 0)) + 2  # the trace length is fixed by the digit count
    tok = tiny.char_tokenizer(chars=CHARS)

    # Data: disjoint train / held-out test splits, written where every stage can read them.
    data_key = _key(
        "data",
        s.digits,
        s.n_train,
        s.n_test,
        s.n_valid,
        seed,
        *([] if s.answer_line else ["trace"]),  # old keys stay valid
    )
    data = cache / f"data-{data_key}"
    data.mkdir(exist_ok=True)
    pairs = task.pairs(s.n_train, "train", seed, seed)
    train_rows = [
        {
            "prompt": task.prompt(a, b),
            "completion": task.solution(a, b),
            "answer": task.answer(a, b),
        }
        for a, b in pairs
    ]
    train = _write_jsonl(data / "train.jsonl", train_rows)
    if s.paths not in PATHS or (s.paths != "trace" and s.answer_line):
        raise OpdError(f"Settings.paths={s.paths!r}: one of {list(PATHS)}, without answer_line")
    ways = [getattr(task, way) for way in PATHS[s.paths]]
    teacher_rows = train if s.paths == "trace" else _write_jsonl(data / f"train-{s.paths}.jsonl", [
        {"prompt": task.prompt(a, b), "completion": way(a, b)}
        for a, b in pairs for way in ways
    ])  # fmt: skip
    test = _write_jsonl(data / "test.jsonl", task.rows(s.n_test, "test", seed, seed))
    valid = _write_jsonl(data / "valid.jsonl", task.rows(s.n_valid, "valid", seed, seed))
    prompt_only = _write_jsonl(
        data / "prompts.jsonl", [{"prompt": r["prompt"], "answer": r["answer"]} for r in train_rows]
    )
    common = {
        "sampling.max_new_tokens": max_new,
        "run.seed": seed,
        "eval.prompts": str(test),
        "eval.extractor": extractor(s),
    }

    # 1. Teacher, trained from scratch on the gold traces.
    t_key = _key(
        "teacher",
        data_key,
        s.teacher_hidden,
        s.teacher_layers,
        s.teacher_steps,
        s.teacher_lr,
        s.teacher_batch,
        *([s.teacher_stop_at] if s.teacher_stop_at else []),  # old keys stay valid
        *([s.paths] if s.paths != "trace" else []),
    )
    t_dir = cache / f"teacher-{t_key}"
    t0 = time.time()
    teacher_cached = _train_from_scratch(
        t_dir,
        tok,
        s.teacher_hidden,
        s.teacher_layers,
        seed,
        quiet,
        {
            **common,
            "data.prompts": str(teacher_rows),
            "run.steps": s.teacher_steps,
            "data.batch_prompts": s.teacher_batch,
            "optim.lr": s.teacher_lr,
            **TEACHER_SCHEDULE,
            **(
                {"eval.prompts": str(valid), "eval.every": 25, "eval.stop_at": s.teacher_stop_at}
                if s.teacher_stop_at
                else {"eval.prompts": ""}  # the teacher is evaluated once, below
            ),
        },
        log,
        "teacher",
        f"training the teacher (Llama h{s.teacher_hidden}/L{s.teacher_layers}) on "
        f"{s.digits}-digit addition"
        + (f" written two ways ({s.paths})" if s.paths != "trace" else "")
        + f", {s.teacher_steps} steps"
        + (f" or until {s.teacher_stop_at:.0%} validation accuracy" if s.teacher_stop_at else "")
        + " ...",
    )
    teacher = t_dir / "final"
    teacher_seconds = time.time() - t0
    teacher_steps = _last_step(t_dir)
    teacher_acc = _accuracy(teacher, test, max_new, extractor(s))
    log(f"teacher held-out accuracy {teacher_acc:.1%}")

    # 2. Student: off-policy distillation (SFT on the teacher's samples) from scratch.
    s_key = _key(
        "sft",
        t_key,
        s.student_hidden,
        s.student_layers,
        s.sft_steps,
        s.sft_lr,
        s.sft_batch,
        s.sft_stop_at,
        s.sft_eval_every,
    )
    s_dir = cache / f"sft-{s_key}"
    t0 = time.time()
    sft_cached = _train_from_scratch(
        s_dir,
        tok,
        s.student_hidden,
        s.student_layers,
        seed + 1,
        quiet,
        {
            **common,
            "model.teacher": str(teacher),
            "data.prompts": str(prompt_only),
            "run.steps": s.sft_steps,
            "data.batch_prompts": s.sft_batch,
            "optim.lr": s.sft_lr,
            # the budget: stop once the student passes sft_stop_at on the validation split
            **(
                {
                    "eval.prompts": str(valid),
                    "eval.every": s.sft_eval_every,
                    "eval.stop_at": s.sft_stop_at,
                }
                if s.sft_stop_at
                else {"eval.prompts": ""}  # all sft_steps; evaluated once, below
            ),  # fmt: skip
        },
        log,
        "SFT student",
        f"SFT: student (Llama h{s.student_hidden}/L{s.student_layers}) on the teacher's samples, "
        + (
            f"until {s.sft_stop_at:.0%} validation accuracy (at most {s.sft_steps} steps) ..."
            if s.sft_stop_at
            else f"{s.sft_steps} steps ..."
        ),
    )
    sft = s_dir / "final"
    sft_seconds = time.time() - t0
    sft_steps = _last_step(s_dir)
    sft_acc = _accuracy(sft, test, max_new, extractor(s))
    log(f"student after SFT held-out accuracy {sft_acc:.1%}")

    return Stages(
        s,
        max_new,
        train,
        prompt_only,
        test,
        valid,
        teacher,
        sft,
        teacher_acc,
        sft_acc,
        sft_steps,
        teacher_steps,
        teacher_seconds,
        sft_seconds,
        teacher_cached,
        sft_cached,
        common,
    )


def opd_flags(st: Stages, out: Path, steps: int) -> dict:
    """The demo's OPD stage from st's SFT checkpoint, as flags for `opd distill` (held-out
    accuracy every eval_every steps)."""
    s = st.settings
    return {
        **st.common,
        "model.student": str(st.sft),
        "model.teacher": str(st.teacher),
        "data.prompts": str(st.prompts),
        "run.out": str(out),
        "run.steps": steps,
        "data.batch_prompts": s.opd_prompts,
        "sampling.group_size": s.opd_group,
        "optim.lr": s.opd_lr,
        "objective.loss": s.opd_loss,
        **({"objective.discount": s.opd_discount} if s.opd_discount else {}),
        "eval.every": s.eval_every,
        "run.save_every": steps,
    }


def run_demo(
    out: str,
    preset: str = "default",
    seed: int = 0,
    cache_dir: str | None = None,
    quiet: bool = True,
    settings: Settings | None = None,
    task: str = "two-paths",
) -> dict:
    """task: "two-paths" (demo_settings.TWO_PATHS) or "addition" (the trace alone)."""
    t_start = time.time()
    s = settings or settings_for(preset, task)
    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)

    def log(msg: str) -> None:
        print(f"[{time.time() - t_start:6.1f} s] {msg}", flush=True)

    st = prepare(s, seed, cache_dir, quiet, log)

    # 3. On-policy distillation from the SFT checkpoint (always run: it is the demonstration).
    log(
        f"on-policy distillation (objective.loss={s.opd_loss}): {s.opd_steps} steps of "
        f"{s.opd_prompts} prompts x {s.opd_group} samples ..."
    )
    t0 = time.time()
    opd_out = root / "opd"
    _stage(opd_flags(st, opd_out, s.opd_steps), quiet, force=True)
    opd_seconds = time.time() - t0
    metrics = [json.loads(x) for x in (opd_out / "metrics.jsonl").read_text().splitlines()]
    curve = [[m["step"], m["eval/accuracy"]] for m in metrics if "eval/accuracy" in m]
    kl = [[m["step"], m["teacher/kl"]] for m in metrics if "teacher/kl" in m]
    opd_acc = curve[-1][1]
    log(f"student after OPD held-out accuracy {opd_acc:.1%}")

    result = {
        "teacher": {
            "accuracy": st.teacher_acc,
            "params": param_count(st.teacher),
            "steps": st.teacher_steps,
            "seconds": round(st.teacher_seconds, 1),
            "cached": st.teacher_cached,
            "path": str(st.teacher),
        },
        "sft": {
            "accuracy": st.sft_acc,
            "steps": st.sft_steps,
            "params": param_count(st.sft),
            "seconds": round(st.sft_seconds, 1),
            "cached": st.sft_cached,
            "path": str(st.sft),
        },
        "opd": {
            "accuracy": opd_acc,
            "steps": s.opd_steps,
            "curve": curve,
            "teacher_kl": kl,
            "seconds": round(opd_seconds, 1),
            "path": str(opd_out / "final"),
        },
        "task": task_name(s),
        "n_test": s.n_test,
        "preset": preset,
        "settings": asdict(s),
        "wall_seconds": round(time.time() - t_start, 1),
        "seed": seed,
    }
    (root / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    plots(root, curve, kl, st.teacher_acc, st.sft_acc)
    table = demo_table(result)
    (root / "report.md").write_text(report_md(result, table))
    print()
    print(table)
    print(f"\nwrote {root}/report.md, results.json, accuracy.png, teacher_kl.png")
    return result
