"""The demo's settings (`opd demo`, and the stages every `opd experiment` starts from) and their
presets: the default task, `--quick`, `--task two-paths`, and the tests' small ones."""

from __future__ import annotations

from dataclasses import dataclass, replace


@dataclass(frozen=True)
class Settings:
    digits: int = 4
    # False: the trace is the completion and the answer is read off it; True: the completion
    # ends with ";" and the answer copied from the column sums, a long-range copy the 2-layer
    # student had not learnt in 300 SFT steps and OPD did not fix: OPD stalled (docs/demo.md)
    answer_line: bool = False
    # "trace": the teacher learns the column trace alone; "trace+sums": every training problem
    # written two ways, the trace and the column sums alone (`Addition.sums`), and the teacher
    # samples between them (--task two-paths, docs/experiments/leads.md leads 6 and 7)
    paths: str = "trace"
    n_train: int = 20000
    n_test: int = 200
    n_valid: int = 200
    teacher_hidden: int = 128
    teacher_layers: int = 4
    teacher_steps: int = 1000
    teacher_lr: float = 3e-3
    teacher_batch: int = 64
    # 0: train all teacher_steps; else stop once validation accuracy reaches it (an imperfect
    # teacher, whose temperature-1 samples carry its mistakes)
    teacher_stop_at: float = 0.0
    student_hidden: int = 128
    student_layers: int = 2
    sft_steps: int = 800  # a cap: the stage stops once validation accuracy passes sft_stop_at
    sft_lr: float = 3e-3
    sft_batch: int = 64
    sft_stop_at: float = 0.3  # 0: no early stop, the stage runs all sft_steps (no checks)
    sft_eval_every: int = 10
    opd_steps: int = 100  # 50 left the SFT student still climbing on some random streams
    opd_lr: float = 3e-4
    # the full-vocabulary reverse KL (objective.loss): the blog's objective computed exactly at
    # each position; its one-sample estimate ("sampled") left 2 of 5 seeds below 90% of the
    # teacher after 100 steps on a second machine (docs/demo.md)
    opd_loss: str = "full"
    # objective.discount (the sampled loss only): 0 judges each token by its own reverse KL (the
    # blog's); 1 gives each token the reverse KL still to come, so the token that picks a path
    # carries what the student then does on it
    opd_discount: float = 0.0
    opd_prompts: int = 32
    opd_group: int = 4
    eval_every: int = 10


# The ways a teacher's training problem is written (Addition's methods), by Settings.paths
PATHS = {"trace": ("solution",), "trace+sums": ("solution", "sums")}
# The teacher's learning-rate schedule (benchmarks/two_paths.py trains its teachers with it too)
TEACHER_SCHEDULE = {"optim.warmup_steps": 50, "optim.schedule": "cosine", "optim.min_lr_ratio": 0.1}


def extractor(s: Settings) -> str:
    """The answer extractor for the task's completion format (one verifier for every method)."""
    if s.paths != "trace":
        return "opd.tasks.addition:extract_either_answer"
    name = "extract_answer" if s.answer_line else "extract_trace_answer"
    return f"opd.tasks.addition:{name}"


PRESETS = {
    "default": Settings(),
    "quick": replace(Settings(), opd_steps=20),  # shares the default's cached stages
    "test": Settings(
        digits=2,
        n_train=400,
        n_test=20,
        n_valid=20,
        teacher_hidden=32,
        teacher_layers=1,
        teacher_steps=40,
        teacher_batch=32,
        student_hidden=16,
        student_layers=1,
        sft_steps=5,
        sft_stop_at=0.0,
        sft_batch=8,
        opd_steps=8,
        opd_lr=3e-3,
        opd_prompts=4,
        opd_group=4,
        eval_every=4,
    ),
}

# `--task two-paths` on top of any preset: the teacher writes each sum two ways and samples
# between them; the 1-layer student executes the trace but not the sums, so SFT on the teacher's
# samples keeps taking the path it gets wrong, and OPD with sequence-level credit can leave it
# (docs/experiments/leads.md, lead 7)
# (opd_lr: what `opd experiment lr-sweep --task two-paths` picked on the first SFT stage below,
# where 3e-4 swung between 89% and 92.5%; on this stage 1e-4 and 3e-4 both pass 95% at the
# first check, 10 steps)
# (the SFT stage: a fixed 800 steps at 1e-3; the first, at 3e-3 until 30%, left two of four
# seeds misreading the operands and OPD could not start from them: leads.md, lead 7)
TWO_PATHS = {
    "paths": "trace+sums",
    "student_layers": 1,
    "opd_loss": "sampled",
    "opd_discount": 1.0,
    "opd_lr": 1e-4,
    "sft_lr": 1e-3,
    "sft_stop_at": 0.0,
}


def settings_for(preset: str, task: str) -> Settings:
    """The preset's settings, on the demo's task ("addition") or on the two-path task."""
    return replace(PRESETS[preset], **TWO_PATHS) if task == "two-paths" else PRESETS[preset]


def task_name(s: Settings) -> str:
    """The task in words, for reports."""
    if s.paths != "trace":
        return (
            f"{s.digits}-digit addition, two paths ({s.paths}), a {s.student_layers}-layer student"
        )
    return f"{s.digits}-digit addition, digit by digit" + (
        ", with an answer line" if s.answer_line else ""
    )
