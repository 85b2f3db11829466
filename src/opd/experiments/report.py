"""`opd report DIR...`: the blog's claims beside our measurements, from experiments' results.json.

Each experiment folder (written by `opd experiment NAME --out DIR`) holds a results.json; this
module renders one markdown section and its plots per experiment, plus the table "blog claim |
blog figure | ours". Nothing is recomputed: the report is the saved numbers.
"""

from __future__ import annotations

import json
import os
import statistics
from pathlib import Path

from opd.errors import OpdError
from opd.experiments.demo_report import pyplot
from opd.experiments.personal_report import (
    continual_section,
    personalization_section,
    sweep_section,
)

METHOD_LABEL = {
    "opd": "on-policy distillation (sampled-token, the blog's)",
    "opd-full": "on-policy distillation (full-vocabulary reverse KL)",
    "opd-jsd": "on-policy distillation (generalized JSD)",
    "rl": "RL (0/1 reward)",
    "sft": "continued SFT",
}


# results.json's ratios against each on-policy distillation loss, and the loss's short name
RATIOS = {"opd": "ratios", "opd-full": "ratios_opd_full", "opd-jsd": "ratios_opd_jsd"}
LOSS_NAME = {
    "opd": "sampled-token OPD",
    "opd-full": "full-vocabulary OPD",
    "opd-jsd": "generalized JSD",
}


def _label(method: str, r: dict, names: dict = METHOD_LABEL) -> str:
    """A method's name in a table; on the two-path task the sampled-token loss ran with
    sequence-level credit (objective.discount=1), and says so."""
    name = names.get(method, method)
    if method == "opd" and "two paths" in r.get("task", ""):
        return name.replace(", the blog's", "") + " with sequence-level credit"
    return name


def _pct(x) -> str:
    return "-" if x is None else f"{x:.1%}"


def _num(x, fmt="{:.0f}") -> str:
    return "not reached" if x is None else fmt.format(x)


def _flops(x) -> str:
    return "not reached" if x is None else f"{x:.3g}"


def _ratio(x) -> str:
    return "n/a" if x is None else f"{x:.1f}x"


def _at_least(methods: dict, num: str, den: str, field: str) -> float | None:
    """When `num` missed the target within its budget and `den` reached it: the ratio is at
    least (num's steps or FLOPs at the end of its budget) / (den's to the target)."""
    n, d = methods[num], methods[den]
    if n["steps_to_target"] is not None or d[field] is None:
        return None
    # the median over seeds of the step or cumulative FLOPs at each run's last evaluation
    spent = statistics.median(
        c[-1][0 if field == "steps_to_target" else 1] for c in n["curves"].values()
    )
    return spent / d[field] if d[field] else None


def _ratio_or_bound(r: dict, key: str, opd: str) -> str:
    """A ratio from results.json, or '> x' when only a lower bound is known."""
    ratios = r.get(RATIOS[opd])
    if ratios is None:  # results from before opd-full (or opd-jsd) was measured
        return "n/a"
    if ratios[key] is not None:
        return _ratio(ratios[key])
    num = "rl" if key.startswith("rl") else "sft"
    field = "steps_to_target" if key.endswith("steps") else "flops_to_target"
    bound = _at_least(r["methods"], num, opd, field)
    return "n/a" if bound is None else f"> {bound:.1f}x"


def _teacher_note(r: dict) -> str:
    if not r.get("teacher_stop_at"):
        return ""
    return (
        f" (an imperfect teacher: its training stopped at {_pct(r['teacher_stop_at'])} "
        f"validation accuracy, after {r['teacher_steps']} steps)"
    )


def _teacher_claim(r: dict) -> str:
    """The teacher and task of a claim row, where they are not addition's perfect teacher."""
    task = r.get("task", "")
    old = "; old task (answer line)" if "answer line" in task else ""
    old += "; two-path task" if "two paths" in task else ""
    imperfect = (
        f", imperfect teacher {_pct(r['teacher_accuracy'])}" if r.get("teacher_stop_at") else ""
    )
    return imperfect + old


def _sft_stop_at(r: dict) -> float:
    """The SFT stage's stop accuracy (results from before --sft-stop-at: the stages preset's)."""
    if "sft_stop_at" in r:
        return r["sft_stop_at"]
    from opd.experiments.demo_settings import PRESETS

    return PRESETS[r["settings"]["stages"]].sft_stop_at


def _math(r: dict, root: Path) -> tuple[str, list[tuple[str, str, str]]]:
    plt = pyplot()
    for axis, name, xlabel in (
        (0, "math_steps.png", "optimizer step"),
        (1, "math_flops.png", "training FLOPs"),
    ):
        fig, ax = plt.subplots(figsize=(6, 4))
        for i, (method, m) in enumerate(r["methods"].items()):
            for j, curve in enumerate(m["curves"].values()):
                ax.plot(
                    [c[axis] for c in curve],
                    [c[2] for c in curve],
                    color=f"C{i}",
                    alpha=0.8,
                    label=_label(method, r) if j == 0 else None,
                )
        ax.axhline(r["target_accuracy"], color="k", linestyle=":", label="target (95% of teacher)")
        if axis == 1:
            ax.set_xscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("held-out accuracy (greedy)")
        ax.set_ylim(0, 1.02)
        ax.legend(loc="lower right")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(root / name, dpi=110)
        plt.close(fig)
    lines = [
        f"## math: OPD vs RL vs continued SFT from one SFT checkpoint at "
        f"{_pct(r['sft_start_accuracy'])} ({len(r['seeds'])} seeds{_teacher_claim(r)})",
        "",
        f"Teacher {_pct(r['teacher_accuracy'])}{_teacher_note(r)}, "
        f"SFT start {_pct(r['sft_start_accuracy'])} "
        + (
            f"(an SFT stage that stops early at {_pct(_sft_stop_at(r))} validation accuracy"
            + (f"; it ran {r['sft_steps']} steps" if "sft_steps" in r else "")
            if _sft_stop_at(r)
            else f"(an SFT stage of a fixed {r['sft_steps']} steps"
        )
        + "), "
        f"target {_pct(r['target_accuracy'])}; {r['sequences_per_step']} sampled sequences a "
        "step for every method, each at its own learning rate ("
        + (
            f"picked by the `opd experiment lr-sweep` saved in {r['lr_from']}, on this checkpoint"
            if r.get("lr_from")
            else "the defaults come from `opd experiment lr-sweep` on the demo's SFT checkpoint"
        )
        + "); medians "
        "over seeds, a seed that missed the target counting as infinitely late, so a method "
        "that most seeds took past its budget is not reached. Accuracy is checked every few "
        "steps, so steps to target are rounded up to the next check.",
        "",
        "| method | lr | steps to target | FLOPs to target | final accuracy | seeds reaching | "
        "step budget |",
        "|---|---|---|---|---|---|---|",
    ]
    for method, m in r["methods"].items():
        lines.append(
            f"| {_label(method, r)} | {m.get('lr', r.get('lr')):g} | "
            f"{_num(m['steps_to_target'])} | "
            f"{_flops(m['flops_to_target'])} | {_pct(m['final_accuracy'])} | "
            f"{m['reached']}/{len(m['per_seed'])} | {m['step_budget']} |"
        )
    keys = ("rl_over_opd_steps", "rl_over_opd_flops", "sft_over_opd_steps", "sft_over_opd_flops")
    # each OPD loss's ratios; generalized JSD only in results that ran it
    losses = [m for m in RATIOS if m != "opd-jsd" or m in r["methods"]]
    ratios = {m: {k: _ratio_or_bound(r, k, m) for k in keys} for m in losses}
    lines += [
        "",
        "| against | RL / OPD steps | RL / OPD FLOPs | SFT / OPD steps | SFT / OPD FLOPs |",
        "|---|---|---|---|---|",
    ]
    for m in losses:
        name = _label(m, r, LOSS_NAME)
        if m == "opd-jsd":
            name = f"OPD with generalized JSD (beta {r['settings']['jsd_beta']:g})"
        lines.append(f"| {name} | " + " | ".join(ratios[m][k] for k in keys) + " |")
    lines += [
        "",
        "'> x': the numerator method missed the target within its budget, so only a lower "
        "bound (its budget over OPD's steps or FLOPs to the target) is known.",
        "",
        "![accuracy vs step](math_steps.png) ![accuracy vs FLOPs](math_flops.png)",
        "",
    ]

    def each_loss(key: str) -> str:
        return ", ".join(f"{ratios[m][key]} ({_label(m, r, LOSS_NAME)})" for m in losses)

    start = f"SFT start {_pct(r['sft_start_accuracy'])}{_teacher_claim(r)}"
    claims = [
        (
            "OPD reaches the target in far fewer optimizer steps than RL",
            "7-10x fewer steps",
            f"RL / OPD steps {each_loss('rl_over_opd_steps')}; {start}",
        ),
        (
            "OPD is cheaper per FLOP than SFT (off-policy distillation)",
            "9-30x fewer FLOPs",
            f"continued SFT / OPD FLOPs {each_loss('sft_over_opd_flops')}; {start}",
        ),
    ]
    return "\n".join(lines), claims


def _task(r: dict) -> str:
    """A heading's note naming the two-path task (`opd experiment`'s default is addition)."""
    return f" ({r['task']})" if "two paths" in r.get("task", "") else ""


def _single(r: dict, root: Path) -> tuple[str, list[tuple[str, str, str]]]:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([c[0] for c in r["curve"]], [c[2] for c in r["curve"]], marker="o", label="student")
    ax.axhline(r["teacher_accuracy"], color="k", linestyle="--", label="teacher")
    ax.set_xlabel("step (one prompt)")
    ax.set_ylabel("held-out accuracy (greedy)")
    ax.set_ylim(0, 1.02)
    ax.legend(loc="lower right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(root / "single_prompt.png", dpi=110)
    plt.close(fig)
    text = "\n".join(
        [
            "## single-prompt: on-policy distillation on one training prompt" + _task(r),
            "",
            f"Prompt `{r['prompt']}`, {r['steps']} steps x {r['rollouts_per_step']} rollouts, lr "
            f"{r.get('lr')}"
            + (f", objective.discount={r['discount']:g}" if r.get("discount") else "")
            + ": "
            f"held-out accuracy {_pct(r['before'])} -> {_pct(r['after'])} "
            f"(teacher {_pct(r['teacher_accuracy'])}).",
            "",
            "![single prompt](single_prompt.png)",
            "",
        ]
    )
    claims = [
        (
            "OPD can learn from a single prompt (dense per-token signal)",
            "20 steps x 256 rollouts of one prompt move the student toward the teacher",
            f"{_pct(r['before'])} -> {_pct(r['after'])} held-out (teacher {_pct(r['teacher_accuracy'])}), "
            f"{r['steps']} x {r['rollouts_per_step']}" + _teacher_claim(r),
        )
    ]
    return text, claims


def _self(r: dict, root: Path) -> tuple[str, list[tuple[str, str, str]]]:
    plt = pyplot()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    for i, (method, m) in enumerate(r["methods"].items()):
        label = {
            "sft": "SFT on its own samples",
            "opd": "OPD against itself",
            "opd-deadzone": f"OPD against itself, |k_t| < {r.get('deadzone', 0):g} as 0",
        }[method]
        a1.plot([c[0] for c in m["curve"]], [c[1] for c in m["curve"]], f"C{i}o-", label=label)
        a2.plot([c[0] for c in m["curve"]], [c[2] for c in m["curve"]], f"C{i}o-", label=label)
    a1.set_ylabel("held-out accuracy (greedy)")
    a2.set_ylabel("reverse KL to the starting model (per token)")
    for ax in (a1, a2):
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(root / "self_distill.png", dpi=110)
    plt.close(fig)
    sft, opd = r["methods"]["sft"], r["methods"]["opd"]
    dz = r["methods"].get("opd-deadzone")
    if dz:  # one phrase for the text and the claims table
        dz_note = (
            f"OPD with objective.kl_deadzone={r['deadzone']:g}: -> {_pct(dz['final_accuracy'])}, "
            f"KL {dz['final_kl']:.4f}"
        )
    text = "\n".join(
        [
            "## self-distill: the starting model as its own teacher" + _task(r),
            "",
            f"Start {_pct(r['start_accuracy'])}; {r['steps']} steps at lr {r['lr']}: SFT on its "
            f"own samples ends at {_pct(sft['final_accuracy'])} with KL {sft['final_kl']:.4f} to "
            f"the start; OPD against itself ends at {_pct(opd['final_accuracy'])} with KL "
            f"{opd['final_kl']:.4f}." + (f" {dz_note}." if dz else ""),
            "",
            "![self-distillation](self_distill.png)",
            "",
        ]
    )
    claims = [
        (
            "SFT on a model's own samples drifts; OPD against the earlier model stays anchored",
            "SFT on its own samples degrades the model; OPD against the earlier model does not",
            f"SFT: {_pct(r['start_accuracy'])} -> {_pct(sft['final_accuracy'])}, KL "
            f"{sft['final_kl']:.4f}; OPD: -> {_pct(opd['final_accuracy'])}, KL {opd['final_kl']:.4f}"
            + (f"; {dz_note}" if dz else "")
            + _teacher_claim(r),
        )
    ]
    return text, claims


def _sweep(r: dict, root: Path) -> tuple[str, list[tuple[str, str, str]]]:
    grid = r["lrs"]
    # every rate some method ran: the grid, and the rates past its edge a pick asked for
    lrs = sorted({run["lr"] for m in r["methods"].values() for run in m["runs"]} | set(grid))
    extended = (
        f" A method whose pick was the lowest or highest rate it had run also ran the next rate "
        f"past it (at most {r['extend']} more); '-' marks a rate a method did not run."
        if len(lrs) > len(grid)
        else ""
    )
    lines = [
        f"## lr-sweep: each method at {len(grid)} learning rates from an SFT checkpoint at "
        f"{_pct(r['sft_start_accuracy'])} (seed {r['seed']}{_teacher_claim(r)})",
        "",
        f"From the SFT checkpoint ({_pct(r['sft_start_accuracy'])}), target "
        f"{_pct(r['target_accuracy'])}, {r['sequences_per_step']} sampled sequences a step; "
        "accuracy on the validation split, not the test split math reports (the target is "
        "still 95% of the teacher's test accuracy). "
        "Each cell: steps to target (final accuracy). The picked learning rate (fewest steps "
        "to target, then the higher final accuracy, then the first in the grid; if none "
        "reached it, the highest final accuracy) is in bold." + extended,
        "",
        "| method | " + " | ".join(f"lr {lr:g}" for lr in lrs) + " | step budget |",
        "|---|" + "---|" * len(lrs) + "---|",
    ]
    for method, m in r["methods"].items():
        by_lr = {run["lr"]: run for run in m["runs"]}
        cells = []
        for lr in lrs:
            if lr not in by_lr:
                cells.append("-")
                continue
            run = by_lr[lr]
            cell = f"{_num(run['steps_to_target'])} ({_pct(run['final_accuracy'])})"
            cells.append(f"**{cell}**" if lr == m["best_lr"] else cell)
        lines.append(f"| {_label(method, r)} | " + " | ".join(cells) + f" | {m['step_budget']} |")
    return "\n".join(lines + [""]), []


SECTIONS = {
    "math": _math,
    "lr-sweep": _sweep,
    "single-prompt": _single,
    "self-distill": _self,
    "personalization": personalization_section,
    "continual": continual_section,
    "personalization-sweep": sweep_section,
}


def experiment_section(result: dict, root: Path) -> tuple[str, list[tuple[str, str, str]]]:
    kind = result.get("experiment")
    if kind not in SECTIONS:
        raise OpdError(f"{root}/results.json: unknown experiment {kind!r}")
    return SECTIONS[kind](result, root)


def save_results(result: dict, root: Path) -> dict:
    """An experiment's end: results.json and report.md in `root`, the report printed."""
    (root / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    text, _ = experiment_section(result, root)
    (root / "report.md").write_text(text)
    print(text)
    return result


def write_report(dirs: list[str], out: str | None = None) -> Path:
    """One markdown file: the claims table, then each experiment's section (plots linked)."""
    sections, claims = [], []
    for d in dirs:
        path = Path(d) / "results.json"
        if not path.is_file():
            raise OpdError(f"{d}: no results.json (run `opd experiment NAME --out {d}` first)")
        try:
            result = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise OpdError(f"{path}: invalid JSON ({e.msg} at line {e.lineno})") from None
        if not isinstance(result, dict):
            raise OpdError(f"{path}: not an experiment's results (a JSON object)")
        try:
            text, rows = experiment_section(result, Path(d))
        except (KeyError, TypeError, IndexError, ValueError, AttributeError) as e:
            raise OpdError(
                f"{path}: missing or malformed field ({type(e).__name__}: {e})"
            ) from None
        base = Path(out).parent if out else Path(dirs[0])
        rel = os.path.relpath(Path(d).resolve(), base.resolve())
        sections.append(text.replace("](", f"]({rel}/") if rel != "." else text)
        claims += rows
    table = ["| blog claim | blog figure | ours |", "|---|---|---|"]
    table += [f"| {a} | {b} | {c} |" for a, b, c in claims]
    doc = "# opd: the blog's claims beside our measurements\n\n" + "\n".join(table) + "\n\n"
    doc += "\n".join(sections)
    dest = Path(out) if out else Path(dirs[0]) / "report.md"
    try:
        dest.write_text(doc)
    except OSError as e:
        raise OpdError(f"--out {dest}: cannot write there ({e.strerror})") from None
    return dest
