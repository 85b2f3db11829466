"""`opd experiment self-distill`: the teacher is the starting student itself; SFT on its own
samples vs OPD against itself (with and without objective.kl_deadzone), held-out accuracy and
reverse KL to the starting model over steps."""

from __future__ import annotations

from pathlib import Path

from opd.experiments.demo import Stages, _stage
from opd.experiments.settings import ExperimentSettings


def run_self_distill(st: Stages, x: ExperimentSettings, out: Path, quiet: bool, log) -> dict:
    """Both runs use the starting student as the teacher; KL to it is measured the same way."""
    results = {}
    for name, kind, extra in (
        ("sft", "sft", {}),
        ("opd", "opd", {}),
        ("opd-deadzone", "opd", {"objective.kl_deadzone": x.self_deadzone}),
    ):
        log(f"self-distill: {name} against the starting model, {x.self_steps} steps ...")
        run_dir, curve = out / name, []
        for steps in range(0, x.self_steps + 1, x.self_every):
            model = st.sft
            if steps:
                model = _stage(
                    {
                        **st.common,
                        "objective.kind": kind,
                        **extra,
                        "model.student": str(st.sft),
                        "model.teacher": str(st.sft),
                        "data.prompts": str(st.prompts),
                        "run.out": str(run_dir),
                        "run.steps": steps,  # grows chunk by chunk; each call resumes
                        "run.save_every": x.self_every,
                        "data.batch_prompts": x.prompts,
                        "sampling.group_size": x.group,
                        "optim.lr": x.self_lr,
                        "eval.prompts": "",
                        "run.preflight": False,
                    },
                    quiet,
                    force=steps == x.self_every,
                )
            acc, kl = _accuracy_and_kl(model, st)
            curve.append([steps, acc, kl])
        results[name] = {"curve": curve, "final_accuracy": curve[-1][1], "final_kl": curve[-1][2]}
    return {
        "experiment": "self-distill",
        "start_accuracy": results["sft"]["curve"][0][1],
        "lr": x.self_lr,
        "steps": x.self_steps,
        "deadzone": x.self_deadzone,
        "methods": results,
    }


def _accuracy_and_kl(model_dir: Path, st: Stages) -> tuple[float, float]:
    """Greedy held-out accuracy, and the reverse KL per token to the starting model on the
    model's own temperature-1 samples of the held-out prompts."""
    from opd.data import load_prompts
    from opd.evaluate import evaluate
    from opd.models import load_model, load_tokenizer
    from opd.preflight import own_sample_gaps

    acc = evaluate(
        str(model_dir),
        str(st.test),
        max_new_tokens=st.max_new,
        extractor=st.common["eval.extractor"],
    )
    tok = load_tokenizer(str(model_dir))
    model, start = load_model(str(model_dir)).eval(), load_model(str(st.sft)).eval()
    prompts, _ = load_prompts(str(st.test), tok)
    gaps = own_sample_gaps(model, tok, len(tok), prompts, st.max_new, start, 1)
    kl = float(gaps.mean())
    return acc["accuracy"], kl
