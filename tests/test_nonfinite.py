"""Non-finite values and exploding weights (guard.py): a NaN or an infinity skips the step,
counted; too many in a row stop the run naming the source and the last checkpoint; exploded
weights are never saved; preflight fails on a NaN with its own message; resume stays exact."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from opd import guard, score, tiny, train
from opd.cli import main
from opd.errors import OpdError
from opd.models import load_model, load_tokenizer
from opd.types import Rollouts

from .test_cli import call, distill_args


@pytest.fixture(scope="module")
def nan_teacher(models, tmp_path_factory):
    """The reversing teacher with every weight NaN."""
    model = load_model(str(models["teacher"]))
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(float("nan"))
    folder = tmp_path_factory.mktemp("nan") / "teacher"
    return tiny.save(model, load_tokenizer(str(models["teacher"])), folder)


@pytest.fixture()
def nan_at(monkeypatch):
    """nan_at({1, 2}): the teacher's log-probs are NaN at those (0-based) steps."""
    steps: set[int] = set()
    now = {}
    make_generator, scorer_call = train.sampling_generator, score.Scorer.__call__

    def generator(seed, step, rank, device):
        now["step"] = step
        return make_generator(seed, step, rank, device)

    def scored(self, batch, prompts):
        batch = scorer_call(self, batch, prompts)
        if now["step"] in steps:
            lp = torch.where(batch.completion_mask_BT, torch.nan, batch.teacher_lp_BT)
            batch = replace(batch, teacher_lp_BT=lp)
        return batch

    monkeypatch.setattr(train, "sampling_generator", generator)
    monkeypatch.setattr(score.Scorer, "__call__", scored)
    return steps.update


def assert_stopped_with(code, err, *needles):
    """A run that stopped mid-way: exit 2, no traceback, and one error line (its last line of
    stderr; the lines before it are its progress)."""
    assert code == 2, err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("opd: error:")]
    assert len(errors) == 1 and err.splitlines()[-1] == errors[0], err
    for needle in needles:
        assert needle in errors[0], (needle, errors[0])


def rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def ckpt(out: Path, step: int) -> Path:
    return out / "checkpoints" / f"step_{step:06d}"


def test_a_nan_teacher_skips_each_step_then_stops_naming_it(
    models, nan_teacher, prompts_file, tmp_path, capsys
):
    out = tmp_path / "run"
    args = distill_args(models, prompts_file, out, 8, "--save-every", "1")
    args[args.index("--teacher") + 1] = str(nan_teacher)
    code, err = call([*args, "run.preflight=false", "optim.max_skipped=2"], capsys)
    last = ckpt(out, 2)
    assert_stopped_with(
        code, err, "step 3: teacher log-probs not finite (NaN) in 3 steps in a row",
        "optim.max_skipped=2", f"the last checkpoint is {last}",
    )  # fmt: skip
    assert [r["optim/skipped_steps"] for r in rows(out)] == [1, 2]
    # nothing was applied: the checkpoint holds the starting weights and no optimizer state
    start = dict(load_model(str(models["student"])).named_parameters())
    saved = load_file(str(last / "trainable.safetensors"))
    assert all(torch.equal(saved[k], start[k].detach()) for k in saved)
    assert load_file(str(last / "optimizer.safetensors")) == {}
    assert json.loads((last / "state.json").read_text())["skips"] == {"total": 2, "in_a_row": 2}


def test_max_skipped_zero_stops_at_the_first_and_says_no_checkpoint(
    models, nan_teacher, prompts_file, tmp_path, capsys
):
    """opd sft samples from the NaN teacher: its sampler log-probs are the ones named."""
    out = tmp_path / "sft"
    args = ["sft", "--student", str(models["student"]), "--teacher", str(nan_teacher)]
    args += ["--prompts", str(prompts_file), "--out", str(out), "--batch-prompts", "4"]
    code, err = call([*args, "--max-new-tokens", "6", "optim.max_skipped=0"], capsys)
    assert_stopped_with(
        code, err, "step 1: sampler log-probs not finite (NaN), the step skipped",
        "no checkpoint written yet",
    )  # fmt: skip


def test_preflight_fails_on_a_nan_teacher_with_its_own_message(
    models, nan_teacher, prompts_file, tmp_path, capsys
):
    args = distill_args(models, prompts_file, tmp_path / "run", 2)
    args[args.index("--teacher") + 1] = str(nan_teacher)
    code, err = call(args, capsys)
    assert_stopped_with(code, err, "preflight failed: teacher self-KL", "not finite (nan)")
    assert "alignment" not in err


def test_a_skipped_step_changes_nothing_and_resume_is_bit_identical(
    models, prompts_file, tmp_path, capsys, nan_at
):
    nan_at({1})
    extra = ["--save-every", "1", "run.keep_checkpoints=4"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    for out, steps in ((straight, 4), (resumed, 2), (resumed, 4)):
        with pytest.raises(SystemExit) as exc:
            main(distill_args(models, prompts_file, out, steps, *extra))
        assert exc.value.code == 0, capsys.readouterr().err
    a, b = rows(straight), rows(resumed)
    assert [r["optim/skipped_steps"] for r in a] == [0, 1, 1, 1]
    for key in ("loss", "teacher/kl", "optim/grad_norm", "optim/skipped_steps"):
        assert [json.dumps(r[key]) for r in a] == [json.dumps(r[key]) for r in b], key
    # step 2 was skipped: weights, AdamW moments and step count as after step 1
    for name in ("trainable", "optimizer"):
        one, two = (load_file(str(ckpt(straight, s) / f"{name}.safetensors")) for s in (1, 2))
        assert one.keys() == two.keys() and all(torch.equal(one[k], two[k]) for k in one)
    assert not torch.equal(*(load_file(str(ckpt(straight, s) / "trainable.safetensors"))[
        "model.embed_tokens.weight"] for s in (2, 3)))  # fmt: skip
    fa, fb = (load_file(str(o / "final" / "model.safetensors")) for o in (straight, resumed))
    assert all(torch.equal(fa[k], fb[k]) for k in fa)


def test_the_skips_in_a_row_survive_a_resume(models, prompts_file, tmp_path, capsys, nan_at):
    """Steps 2 and 3 are NaN and one skip in a row is allowed: the run stops at step 3 whether
    or not it was resumed between them (the count is in the checkpoint)."""
    nan_at({1, 2})
    extra = ["--save-every", "1", "optim.max_skipped=1"]
    code, err = call(distill_args(models, prompts_file, tmp_path / "straight", 4, *extra), capsys)
    assert_stopped_with(code, err, "step 3: teacher log-probs not finite (NaN) in 2 steps")
    out = tmp_path / "resumed"
    with pytest.raises(SystemExit) as exc:
        main(distill_args(models, prompts_file, out, 2, *extra))
    assert exc.value.code == 0
    capsys.readouterr()
    code, err = call(distill_args(models, prompts_file, out, 4, *extra), capsys)
    assert_stopped_with(code, err, "step 3: teacher log-probs not finite (NaN) in 2 steps")


def test_exploded_weights_are_never_saved(models, prompts_file, tmp_path, capsys):
    out = tmp_path / "run"
    code, err = call(
        distill_args(models, prompts_file, out, 3, "--save-every", "1", "--lr", "1e6"), capsys
    )
    assert_stopped_with(code, err, "step 1: the trained weights have exploded", "not saved")
    assert "no checkpoint written yet" in err
    assert not list(out.glob("checkpoints/step_*")) and not (out / "final").exists()


def test_weight_checks_and_the_bound_of_a_model_that_starts_large(tmp_path):
    w = torch.nn.Parameter(torch.full((3,), 2.0))
    guard.check_weights([w], guard.WEIGHT_BOUND, "step 1", str(tmp_path))
    with torch.no_grad():
        w[1] = float("nan")
    with pytest.raises(OpdError, match="step 1: the trained weights are not finite"):
        guard.check_weights([w], guard.WEIGHT_BOUND, "step 1", str(tmp_path))
    small, big = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.full((2,), -3e4))
    assert guard.weight_bound([small]) == 1e4 and guard.weight_bound([small, big]) == 3e5
    guard.check_weights([big], guard.weight_bound([small, big]), "step 1", str(tmp_path))


class OtherRankSaw:
    """A DistContext whose max() also holds what another rank sent."""

    def __init__(self, other: list[float]):
        self.other = other

    def max(self, values):
        return [max(a, b) for a, b in zip(values, self.other, strict=True)]


def test_the_verdict_is_the_same_on_every_rank():
    mask = torch.tensor([[False, True, True]])
    batch = Rollouts(
        tokens_BT=torch.zeros(1, 3, dtype=torch.long),
        attention_mask_BT=torch.ones(1, 3, dtype=torch.long),
        completion_mask_BT=mask,
        prompt_len=1,
        sampler_lp_BT=torch.tensor([[float("nan"), -1.0, -2.0]]),  # NaN off the mask: fine
        prompt_index_B=torch.zeros(1, dtype=torch.long),
        teacher_lp_BT=torch.tensor([[0.0, -1.0, -float("inf")]]),
    )
    assert guard.nonfinite(batch, 0.5, 1.0, OtherRankSaw([0.0, 0.0])) == "teacher log-probs (inf)"
    finite = replace(batch, teacher_lp_BT=torch.zeros(1, 3))
    assert guard.nonfinite(finite, 0.5, 1.0, OtherRankSaw([0.0, 0.0])) == ""
    # another rank's sampler made a NaN: this rank skips too, and says so
    assert guard.nonfinite(finite, 0.5, 1.0, OtherRankSaw([2.0, 0.0])) == "sampler log-probs (NaN)"
    assert guard.nonfinite(finite, float("nan"), 1.0, OtherRankSaw([0, 0])) == "loss (nan)"
    assert guard.nonfinite(finite, 0.5, float("inf"), OtherRankSaw([0, 0])) == "gradient (norm inf)"
