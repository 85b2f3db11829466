"""`opd experiment personalization` and `opd experiment continual`: the blog's second experiment
in miniature ("On-Policy Distillation", Thinking Machines Lab, 2025, "Personalization").

personalization, per seed (each seed reads another set of new people's documents):
1. mid-train the assistant on the new documents (`opd sft` on `{"text"}` rows), three ways:
   documents only; documents with chat rows mixed in (data.mix); LoRA;
2. from the documents-only model, on-policy distillation with the assistant as the teacher, on
   instruction prompts that need none of the new facts (`opd distill`);
3. the blog's control from the same model: SFT on the assistant's own samples of those prompts
   (`opd sft --teacher`), same prompts, samples and steps.
Instruction following ("if", constraint and phrase, tasks/instruct.py) and questions on the new
people ("qa_new") are measured greedily after every stage; results are medians over seeds.

continual (the first seed): K phases, each mid-training on a new document set, then OPD from
the previous phase's model ("previous") or from the original assistant ("original"), against
mid-training alone; IF and the questions of every phase so far after every stage.

personalization-sweep: the learning rates of the runs above (LoRA mid-training; OPD, OPD full,
SFT on the assistant's samples) on a new set and seed that no reported seed uses; the defaults
in Settings are its picks.

Left out: the blog's real models and IF-eval itself, and OPD from the mixed or LoRA variants.
The assistant is trained once per settings (cached); seeds vary the new documents and the runs.
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import asdict, replace
from pathlib import Path

from opd.experiments.demo import _stage
from opd.experiments.personal_world import Settings, World, build_world, measure, train_assistant

PRESETS = {
    "default": Settings(),
    "quick": replace(Settings(), seeds=(0,), variants=("documents",)),  # the same assistant
    "test": Settings(
        n_base=12,
        n_base_qa=8,
        n_new=4,
        doc_copies=2,
        qa_repeat=1,
        n_if_train=40,
        n_eval=10,
        hidden=32,
        layers=1,
        assistant_steps=20,
        batch=8,
        mid_steps=6,
        opd_steps=3,
        opd_lr=1e-3,  # 3 steps: a rate that moves the student visibly
        opd_full_lr=1e-3,
        opd_prompts=4,
        opd_group=2,
        seeds=(0, 1),
        phases=2,
        lora_rank=2,
        sweep_lrs=(1e-3, 1e-4),
        sweep_lora_lrs=(1e-2,),
    ),  # fmt: skip
}


def _run(out: Path, flags: dict, quiet: bool) -> tuple[Path, float]:
    """One opd run into `out` (started afresh); returns its final model and its FLOPs."""
    final = _stage({"run.out": str(out), **flags}, quiet, force=True)
    last = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    return final, last.get("flops/total", 0.0)


def midtrain(w: World, student: Path, docs: Path, variant: str, seed: int, out: Path, quiet):
    s = w.settings
    flags = {
        "objective.kind": "sft", "model.student": str(student), "data.prompts": str(docs),
        "run.steps": s.mid_steps, "optim.lr": s.mid_lr, "data.batch_prompts": s.batch,
        "sampling.group_size": 1, "sampling.max_new_tokens": s.max_new, "run.seed": seed,
    }  # fmt: skip
    if variant == "mixed":
        flags |= {"data.mix": str(w.chat), "data.mix_ratio": s.mix_ratio}
    elif variant == "lora":
        flags |= {"model.lora_rank": s.lora_rank, "optim.lr": s.lora_lr}
    return _run(out, flags, quiet)


def restore(
    w: World, student: Path, teacher: Path, kind: str, seed: int, out: Path, quiet, loss=""
):
    """OPD (kind "opd", objective.loss `loss`) or SFT on the teacher's samples ("sft") on the
    instruction prompts."""
    s = w.settings
    return _run(
        out,
        {
            "objective.kind": kind,
            "model.student": str(student),
            "model.teacher": str(teacher),
            "data.prompts": str(w.if_prompts),
            "run.steps": s.opd_steps,
            "optim.lr": _rate(s, kind, loss),
            **({"objective.loss": loss} if kind == "opd" else {}),
            "data.batch_prompts": s.opd_prompts,
            "sampling.group_size": s.opd_group,
            "sampling.max_new_tokens": s.max_new,
            "run.seed": seed,
        },  # fmt: skip
        quiet,
    )


def _rate(s: Settings, kind: str, loss: str) -> float:
    if kind == "sft":
        return s.sft_lr
    return s.opd_full_lr if loss == "full" else s.opd_lr


# the runs that restore behaviour from the documents-only model: OPD with the blog's sampled-token
# estimator, OPD with the full-vocabulary reverse KL, and the blog's control
RESTORE = (("opd", "sampled", "opd"), ("opd", "full", "opd_full"), ("sft", "", "sft_self"))


def _median(rows: list[dict]) -> dict:
    return {k: statistics.median(r[k] for r in rows) for k in rows[0]}


def _scores(m: dict) -> dict:
    return {"if": m["if"], "qa_new": m["qa"][0], "qa_base": m["qa_base"]}


def run_personalization(w: World, root: Path, quiet: bool, log) -> dict:
    s = w.settings
    per_seed = {}
    for i, seed in enumerate(s.seeds):
        runs, res = root / f"seed{seed}", {}
        mids = {}
        for variant in s.variants:
            mids[variant], flops = midtrain(w, w.assistant, w.docs_new[i], variant, seed,
                                            runs / f"midtrain-{variant}", quiet)  # fmt: skip
            res[f"midtrain/{variant}"] = _scores(measure(mids[variant], w, [i])) | {"flops": flops}
            log(f"seed {seed}: mid-trained ({variant}): {_fmt(res[f'midtrain/{variant}'])}")
        for kind, loss, name in RESTORE:
            run = runs / name
            model, flops = restore(w, mids["documents"], w.assistant, kind, seed, run, quiet, loss)
            res[name] = _scores(measure(model, w, [i])) | {"flops": flops}
            log(f"seed {seed}: {name}: {_fmt(res[name])}")
        per_seed[seed] = res
    med = {key: _median([per_seed[x][key] for x in s.seeds]) for key in per_seed[s.seeds[0]]}
    return {
        "midtrain": {v: med[f"midtrain/{v}"] for v in s.variants},
        **{name: med[name] for _, _, name in RESTORE},
        "per_seed": {str(k): v for k, v in per_seed.items()},
    }


def run_continual(w: World, root: Path, quiet: bool, log) -> dict:
    """Phases k = 0..K-1 (seed s.seeds[0]): mid-train on set k, then OPD from the previous
    phase's model or the original assistant; mid-training alone alongside. A run two tracks
    share (every track's first mid-training, the first OPD) runs once."""
    s, seed = w.settings, w.settings.seeds[0]
    tracks = {"previous": [], "original": [], "midtrain_only": []}
    last = {name: w.assistant for name in tracks}
    done: dict = {}  # (what, start, teacher) -> (model, measurement)
    for k in range(s.phases):
        seen = list(range(k + 1))
        for name in tracks:
            start = last[name]
            if ("mid", start) not in done:
                mid, _ = midtrain(w, start, w.docs_new[k], "documents", seed,
                                  root / f"phase{k + 1}-{name}" / "midtrain", quiet)  # fmt: skip
                done["mid", start] = (mid, measure(mid, w, seen, base=False))
            mid, m = done["mid", start]
            row = {"if_midtrain": m["if"], "qa_midtrain": m["qa"]}
            last[name] = mid
            if name != "midtrain_only":
                teacher = w.assistant if name == "original" else start
                if ("opd", mid, teacher) not in done:
                    run = root / f"phase{k + 1}-{name}" / "opd"
                    end, _ = restore(w, mid, teacher, "opd", seed, run, quiet, s.continual_loss)
                    done["opd", mid, teacher] = (end, measure(end, w, seen, base=False))
                last[name], m = done["opd", mid, teacher]
                row |= {"if_opd": m["if"]}
            row |= {"qa": m["qa"]}
            tracks[name].append(row)
            log(f"phase {k + 1}, {name}: " + ", ".join(f"{a} {_fmt1(b)}" for a, b in row.items()))
    return {"phases": tracks["previous"], "phases_original_teacher": tracks["original"],
            "midtrain_only": tracks["midtrain_only"]}  # fmt: skip


def _balance(m: dict, assistant_if: float, mid_qa: float) -> float:
    """How much of both a restoring run keeps: the lesser of IF over the assistant's and QA
    on the new people over the mid-trained model's (the issue's two targets, both >= 0.95)."""
    return min(m["if"] / max(assistant_if, 1e-9), m["qa_new"] / max(mid_qa, 1e-9))


def run_sweep(w: World, root: Path, quiet: bool, log, assistant_if: float) -> dict:
    """Learning rates on new set k = len(s.seeds) with seed k, which no reported seed reads:
    LoRA mid-training, and each restoring run (RESTORE) from the documents-only model."""
    s = w.settings
    k = len(s.seeds)
    mid, _ = midtrain(w, w.assistant, w.docs_new[k], "documents", k, root / "midtrain", quiet)
    res = {"set": k, "midtrain": _scores(measure(mid, w, [k]))}
    log(f"set {k}: mid-trained (documents): {_fmt(res['midtrain'])}")
    res["lora"] = {}
    for lr in s.sweep_lora_lrs:
        w_lr = replace(w, settings=replace(s, lora_lr=lr))
        model, _ = midtrain(
            w_lr, w.assistant, w.docs_new[k], "lora", k, root / f"lora-{lr:g}", quiet
        )
        res["lora"][f"{lr:g}"] = m = _scores(measure(model, w, [k]))
        log(f"set {k}: mid-trained (lora, lr {lr:g}): {_fmt(m)}")
    for kind, loss, name in RESTORE:
        res[name] = {}
        for lr in s.sweep_lrs:
            w_lr = replace(w, settings=replace(s, opd_lr=lr, opd_full_lr=lr, sft_lr=lr))
            model, _ = restore(
                w_lr, mid, w.assistant, kind, k, root / f"{name}-{lr:g}", quiet, loss
            )
            m = _scores(measure(model, w, [k]))
            m["balance"] = _balance(m, assistant_if, res["midtrain"]["qa_new"])
            res[name][f"{lr:g}"] = m
            log(f"set {k}: {name}, lr {lr:g}: {_fmt(m)}")
    res["best"] = {name: max(res[name], key=lambda lr: res[name][lr]["balance"])
                   for _, _, name in RESTORE}  # fmt: skip
    res["best"]["lora"] = max(res["lora"], key=lambda lr: res["lora"][lr]["qa_new"])
    return res


def _fmt1(x) -> str:
    return f"[{', '.join(f'{v:.0%}' for v in x)}]" if isinstance(x, list) else f"{x:.0%}"


def _fmt(scores: dict) -> str:
    return ", ".join(
        f"{k} {v:.2f}" if k == "balance" else f"{k} {v:.0%}"
        for k, v in scores.items()
        if k != "flops"
    )


def run(name: str, out: str, preset: str = "default", cache_dir: str | None = None,
        quiet: bool = True) -> dict:  # fmt: skip
    t0 = time.time()
    s = PRESETS[preset]
    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)

    def log(msg: str) -> None:
        print(f"[{time.time() - t0:6.1f} s] {msg}", flush=True)

    n_sets = {"personalization": len(s.seeds), "continual": s.phases}.get(name, len(s.seeds) + 1)
    w = train_assistant(build_world(s, cache_dir, max(n_sets, len(s.seeds), s.phases)), quiet, log)
    base = measure(w.assistant, w, list(range(n_sets)))
    assistant = {"if": base["if"], "qa_base": base["qa_base"], "qa_new": base["qa"]}
    log(f"assistant: if {base['if']:.0%}, qa_base {base['qa_base']:.0%}, questions on the new "
        f"people (not read yet) {_fmt1(base['qa'])}")  # fmt: skip
    result = {"experiment": name, "seeds": list(s.seeds), "assistant": assistant}
    if name == "personalization-sweep":
        result |= run_sweep(w, root, quiet, log, base["if"])
    else:
        runner = run_personalization if name == "personalization" else run_continual
        result |= runner(w, root, quiet, log)
    result |= {
        "preset": preset,
        "settings": asdict(s),
        "assistant_seconds": round(w.assistant_seconds, 1),
        "assistant_cached": w.assistant_cached,
        "wall_seconds": round(time.time() - t0, 1),
    }
    from opd.experiments.report import save_results

    return save_results(result, root)
