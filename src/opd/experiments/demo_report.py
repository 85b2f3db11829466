"""The demo's outputs: the results table, the accuracy and KL plots, and report.md."""

from __future__ import annotations

from pathlib import Path


def param_count(model_dir: Path) -> int:
    from safetensors.torch import load_file

    return sum(t.numel() for t in load_file(str(model_dir / "model.safetensors")).values())


def demo_table(r: dict) -> str:
    t = r["teacher"]["accuracy"]
    rows = [
        ("teacher (trained from scratch)", r["teacher"], r["teacher"]["steps"]),
        ("student after SFT on teacher samples", r["sft"], r["sft"]["steps"]),
        ("student after on-policy distillation", r["opd"], r["opd"]["steps"]),
    ]
    lines = [
        f"| model | params | held-out accuracy ({r['n_test']} problems) | of teacher | "
        "steps | wall time |",
        "|---|---|---|---|---|---|",
    ]
    for name, stage, steps in rows:
        params = stage.get("params") or r["sft"]["params"]
        share = stage["accuracy"] / t if t else 0.0
        wall = "cached" if stage.get("cached") else f"{stage['seconds']:.0f} s"
        lines.append(
            f"| {name} | {params / 1e6:.2f}M | {stage['accuracy']:.1%} | {share:.0%} | "
            f"{steps} | {wall} |"
        )
    lines.append(
        f"\ntotal wall time {r['wall_seconds']:.0f} s (seed {r['seed']}, preset {r['preset']})"
    )
    return "\n".join(lines)


def pyplot():
    """matplotlib.pyplot drawing to files only (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plots(root: Path, curve, kl, teacher_acc: float, sft_acc: float) -> None:
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([c[0] for c in curve], [c[1] for c in curve], marker="o", label="student (OPD)")
    ax.axhline(teacher_acc, color="k", linestyle="--", label="teacher")
    ax.axhline(sft_acc, color="gray", linestyle=":", label="student after SFT")
    ax.set_xlabel("on-policy distillation step")
    ax.set_ylabel("held-out accuracy (greedy)")
    ax.set_ylim(0, 1.02)
    ax.legend(loc="lower right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(root / "accuracy.png", dpi=110)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([k[0] for k in kl], [k[1] for k in kl])
    ax.set_xlabel("on-policy distillation step")
    ax.set_ylabel("reverse KL to the teacher (per token)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(root / "teacher_kl.png", dpi=110)
    plt.close(fig)


def _loss(st: dict) -> str:
    """What the OPD stage's loss (objective.loss) trains on, in one sentence."""
    if st.get("opd_loss", "sampled") == "sampled" and st.get("opd_discount"):
        return (
            "every sampled token's advantage is the negative reverse KL to the teacher still to "
            f"come in its sample (objective.discount={st['opd_discount']:g}: sequence-level "
            "credit, so the token that picks a path carries what the student then does on it)."
        )
    if st.get("opd_loss", "sampled") == "sampled":  # results from before opd_loss existed
        return (
            "every sampled token's advantage is the negative reverse KL to the teacher (the "
            "blog's one-sample estimate)."
        )
    if st["opd_loss"] == "full":
        return (
            "the reverse KL to the teacher over the whole vocabulary at every position of the "
            "student's samples (objective.loss=full; the blog samples it one token at a time)."
        )
    return f"objective.loss={st['opd_loss']} on the student's samples."


def _sft_budget(r: dict) -> str:
    """How long the SFT stage ran: to a validation accuracy, or a fixed number of steps."""
    st = r["settings"]
    if not st["sft_stop_at"]:
        return (
            f"lr {st['sft_lr']:g}, for a fixed {r['sft']['steps']} steps (the time includes the "
            "teacher's sampling)"
        )
    return (
        f"until its accuracy on a separate validation split first reached {st['sft_stop_at']:.0%} "
        f"({r['sft']['steps']} steps; checked every {st['sft_eval_every']}; the time includes the "
        "teacher's sampling and those checks)"
    )


def _paths(st: dict) -> str:
    if st.get("paths", "trace") == "trace":
        return "traces"
    return (
        "problems, each written two ways: the column trace and the column sums alone, so the "
        "teacher samples between them"
    )


def report_md(r: dict, table: str) -> str:
    st = r["settings"]
    return f"""# opd demo: on-policy distillation on {r["task"]}

{table}

![held-out accuracy during on-policy distillation](accuracy.png)
![reverse KL to the teacher during on-policy distillation](teacher_kl.png)

What ran, mirroring the blog's math experiment (a large teacher; a smaller student first
fine-tuned off-policy on teacher-written reasoning, then distilled on-policy from that checkpoint):

1. **teacher**: Llama h{st["teacher_hidden"]}/L{st["teacher_layers"]} trained from scratch on
   {st["n_train"]} gold {_paths(st)} (`opd sft` on the rows' completions, {st["teacher_steps"]} steps).
2. **SFT** (off-policy distillation): a smaller Llama h{st["student_hidden"]}/L{st["student_layers"]}
   trained from scratch on the teacher's temperature-1 samples, {st["sft_batch"]} samples a step,
   {_sft_budget(r)}.
3. **OPD**: `opd distill` from the SFT checkpoint, {st["opd_steps"]} steps of
   {st["opd_prompts"]} prompts x {st["opd_group"]} student samples, lr {st["opd_lr"]}; {_loss(st)}

Accuracy is greedy exact match of the final answer on {r["n_test"]} held-out problems that no stage
trains on. The SFT budget is deliberately short of convergence, as the blog's SFT checkpoint was
a starting point, not an end point: with enough clean traces this small student also learns the
task by SFT alone. Whether OPD reaches a target in fewer steps or FLOPs than continued SFT or RL
is the job of `opd experiment` (not this demo).
"""
