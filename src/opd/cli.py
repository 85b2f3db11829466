"""The `opd` command line: distill, sft, eval, demo, quickstart.

Bad input ends with one line `opd: error: <cause>` on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import warnings

from opd import config as config_mod
from opd.errors import OpdError

# flag -> config key; each field's help text is written once, in config.py
FLAGS = {
    "--student": "model.student",
    "--teacher": "model.teacher",
    "--teacher-model": "model.teacher_model",
    "--teacher-api-key": "model.teacher_api_key",
    "--loss": "objective.loss",
    "--prompts": "data.prompts",
    "--out": "run.out",
    "--steps": "run.steps",
    "--batch-prompts": "data.batch_prompts",
    "--group-size": "sampling.group_size",
    "--max-new-tokens": "sampling.max_new_tokens",
    "--lr": "optim.lr",
    "--lora-rank": "model.lora_rank",
    "--kl-coef": "objective.kl_coef",
    "--discount": "objective.discount",
    "--seed": "run.seed",
    "--save-every": "run.save_every",
    "--overlong": "data.overlong",
}


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage block
        self.exit(2, f"{self.prog}: error: {message}\n")


def _field(key: str) -> dataclasses.Field:
    section, name = key.split(".")
    cls = type(getattr(config_mod.Config(), section))
    return {f.name: f for f in dataclasses.fields(cls)}[name]


def fields_help(kind: str | None = None) -> str:
    """Every config key with its type, default and help, for `--help`.

    A key in config_mod.REQUIRED_KEYS shows as required (for `kind`'s runs only, when given); every other
    key shows its default, '' included (an empty string is a value: the help says what it does).
    """
    lines = [
        "config keys (set in --config FILE.toml as [section] tables, or as section.field=value):"
    ]
    for section, cls in config_mod._SECTION_TYPES.items():
        lines.append(f"  [{section}]")
        for f in dataclasses.fields(cls):
            need = config_mod.REQUIRED_KEYS.get(f"{section}.{f.name}", ())
            if kind is None and need and set(need) != {"opd", "sft", "rl"}:
                default = f"(required for objective.kind={' or '.join(need)})"
            elif kind in need or (kind is None and need):
                default = "(required)"
            else:  # TOML spelling: true/false, quoted strings
                default = str(f.default).lower() if isinstance(f.default, bool) else repr(f.default)
            lines.append(f"    {section}.{f.name} = {default}  ({f.type})  {f.metadata['help']}")
    return "\n".join(lines)


# subcommand -> the objective.kind it runs (which decides the keys it requires)
KINDS = {"distill": "opd", "sft": "sft", "rl": "rl"}


def _distill_epilog(kind: str) -> str:
    flagged = set(FLAGS.values())
    lines = ["other config keys (as section.field=value, or [section] tables in --config):"]
    for line in fields_help(kind).splitlines()[1:]:
        key = line.strip().split(" ", 1)[0]
        if key.startswith("[") or key not in flagged:
            lines.append(line)
    return "\n".join(lines)


# --task of `opd demo` (default: two-paths, where continued SFT hits a wall) and `opd experiment`
# (default: addition, the task of docs/experiments.md's comparisons)
TASK = {
    "choices": ["addition", "two-paths"],
    "help": "addition: the column trace; two-paths: a teacher that writes each sum two ways and "
    "samples between them, a 1-layer student that executes only one, OPD with sequence-level "
    "credit (docs/experiments/leads.md)",
}


def _seed_list(text: str) -> list[int]:
    """`--seeds 0,1,2`: distinct integers, at least one."""
    try:
        seeds = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"not a comma-separated list of integers: {text!r}"
        ) from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"need distinct seeds, got {text!r}")
    return seeds


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="opd", description="On-policy distillation of language models.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    for name, text in (
        ("distill", "distil a teacher into a student, on the student's samples"),
        (
            "sft",
            "fine-tune on the teacher's samples (off-policy distillation), or on the rows' own "
            "'completion' or 'text' (documents, every token: mid-training)",
        ),
        ("rl", "reinforcement learning on a 0/1 answer reward (the baseline OPD is compared to)"),
    ):
        d = sub.add_parser(
            name,
            help=text,
            description=text,
            formatter_class=argparse.RawDescriptionHelpFormatter,
            epilog=_distill_epilog(KINDS[name]),
        )
        d.add_argument("--config", metavar="FILE.toml", help="TOML file with [section] tables")
        for flag, key in FLAGS.items():
            f = _field(key)
            required = KINDS[name] in config_mod.REQUIRED_KEYS.get(key, ())
            default = "required" if required else f"default {f.default!r}"
            if name == "sft" and key == "model.teacher":
                default = "optional: without it, rows' 'completion' or 'text' are the targets"
            if name == "rl" and key.startswith("model.teacher"):
                default = "not used by rl"
            d.add_argument(
                flag,
                dest=key,
                metavar=f.type.upper(),
                help=f"{f.metadata['help']} ({key}; {default})",
            )
        d.add_argument(
            "--force",
            action="store_true",
            help="replace a different run already in --out (its checkpoints and metrics)",
        )
        d.add_argument(
            "overrides", nargs="*", metavar="section.field=value", help="config overrides"
        )

    e = sub.add_parser("eval", help="greedy completions and exact-match accuracy on a prompts file")
    e.add_argument("--model", required=True, help="model folder (weights + tokenizer)")
    e.add_argument("--prompts", required=True, help="prompts JSONL; rows with 'answer' are scored")
    e.add_argument("--out", help="write per-row results here (JSONL)")
    e.add_argument("--max-new-tokens", type=int, default=64)
    e.add_argument("--batch-size", type=int, default=64)
    e.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    e.add_argument(
        "--extractor",
        default="exact",
        help="answer extractor: exact, last-number, boxed, hashes, or module:function",
    )
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--device", default="cpu", choices=["cpu", "cuda"])

    dm = sub.add_parser(
        "demo", help="the blog's math experiment in miniature: teacher, SFT student, then OPD"
    )
    dm.add_argument("--out", default="runs/demo", help="output folder (report, results, plots)")
    dm.add_argument("--quick", action="store_true", help="fewer OPD steps (reuses cached stages)")
    seeds = dm.add_mutually_exclusive_group()
    seeds.add_argument("--seed", type=int, default=0)
    seeds.add_argument(
        "--seeds",
        type=_seed_list,
        help="comma-separated seeds (e.g. 0,1,2,3,4): the demo once per seed under OUT/seed-N, "
        "then the spread over seeds (OUT/seeds.md, seeds.json)",
    )
    dm.add_argument("--cache-dir", help="stage cache (default $OPD_CACHE or ~/.cache/opd)")
    dm.add_argument("--task", **TASK, default="two-paths")
    dm.add_argument("--preset", choices=["default", "quick", "test"], help=argparse.SUPPRESS)
    dm.add_argument("--verbose", action="store_true", help="show every step of every stage")

    ex = sub.add_parser(
        "experiment",
        help="the blog's comparisons on addition or --task two-paths (math, lr-sweep, "
        "single-prompt, self-distill); personalization and continual: mid-training on new "
        "documents, then OPD (personalization-sweep: their learning rates)",
    )
    ex.add_argument(
        "name",
        choices=[
            "math",
            "lr-sweep",
            "single-prompt",
            "self-distill",
            "personalization",
            "continual",
            "personalization-sweep",
        ],
    )
    ex.add_argument(
        "--out", required=True, help="output folder (results.json, report.md, plots, runs)"
    )
    ex.add_argument("--quick", action="store_true", help="one seed and smaller budgets")
    ex.add_argument(
        "--sft-stop-at",
        type=float,
        help="start from an SFT checkpoint stopped at this validation accuracy (default: 0.3 on "
        "addition; two-paths runs a fixed 800 steps); a lower start makes the RL reward sparser",
    )
    ex.add_argument(
        "--teacher-stop-at",
        type=float,
        help="stop the teacher's training at this validation accuracy (default: train it fully, "
        "to 100%%); an imperfect teacher's samples, SFT's data, carry its mistakes",
    )
    ex.add_argument(
        "--rl-steps",
        type=int,
        help="math: RL's step budget (default 600, 100 with --quick; RL stops early at the "
        "target); a low start needs more",
    )
    ex.add_argument(
        "--opd-steps",
        type=int,
        help="math: the step budget of each on-policy distillation loss (default 150, 30 with "
        "--quick; runs stop early at the target)",
    )
    ex.add_argument(
        "--sft-steps",
        type=int,
        help="math: continued SFT's step budget (default 300, 100 with --quick; SFT stops early "
        "at the target)",
    )
    ex.add_argument(
        "--lr-from",
        metavar="DIR",
        help="math: each method's learning rate from DIR's `opd experiment lr-sweep` (made with "
        "the same --sft-stop-at/--teacher-stop-at) instead of the built-in ones",
    )
    ex.add_argument("--cache-dir", help="stage cache (default $OPD_CACHE or ~/.cache/opd)")
    ex.add_argument("--task", **TASK, default="addition")
    ex.add_argument("--preset", choices=["default", "quick", "test"], help=argparse.SUPPRESS)
    ex.add_argument("--verbose", action="store_true", help="show every step of every run")

    rp = sub.add_parser("report", help="markdown: the blog's claims beside experiments' results")
    rp.add_argument("dirs", nargs="+", metavar="DIR", help="folders with a results.json")
    rp.add_argument("--out", help="report file (default DIR/report.md of the first DIR)")

    st = sub.add_parser(
        "serve-teacher",
        help="serve a teacher's prompt log-probs over vLLM's /v1/completions API",
        description="Serve MODEL_DIR's log-probs of given token ids (vLLM's prompt_logprobs "
        "API): for `opd distill --teacher http://HOST:PORT/v1` or any trainer.",
    )
    st.add_argument("model_dir", metavar="MODEL_DIR", help="teacher model folder")
    st.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback only)")
    st.add_argument("--port", type=int, default=8000)
    st.add_argument("--name", default="teacher", help="served model name (default 'teacher')")
    st.add_argument(
        "--api-key",
        default=None,
        help="require 'Authorization: Bearer KEY' (default $OPD_TEACHER_API_KEY)",
    )
    st.add_argument("--max-logprobs", type=int, default=20, help="largest prompt_logprobs k")
    st.add_argument("--max-rows", type=int, default=256, help="most sequences in one request")
    st.add_argument(
        "--max-body",
        type=int,
        default=None,
        help="largest request body in bytes, else 413 (default: what --max-rows rows of the "
        "model's context need)",
    )
    st.add_argument(
        "--max-queue",
        type=int,
        default=64,
        help="scoring requests waiting at once, else 429 with Retry-After (default 64)",
    )
    st.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    st.add_argument("--device", default="cpu", choices=["cpu", "cuda"])

    ck = sub.add_parser(
        "check",
        help="preflight: is this teacher usable for this student? (tokenizers, KLs)",
    )
    ck.add_argument("--student", required=True, help="student model folder")
    ck.add_argument("--teacher", required=True, help="teacher folder or server URL")
    ck.add_argument("--prompts", help="prompts JSONL to sample from (default: a few built-in)")
    ck.add_argument("overrides", nargs="*", metavar="section.field=value", help="config overrides")

    q = sub.add_parser("quickstart", help="build tiny models, distil one into the other, report")
    q.add_argument("--out", default="runs/quickstart", help="output folder")
    q.add_argument("--steps", type=int, default=100)
    q.add_argument("--seed", type=int, default=0)
    return parser


def run(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command in ("distill", "sft", "rl"):
        from opd.train import distill

        flags = {key: getattr(args, key) for key in FLAGS.values()}
        flags["objective.kind"] = {"sft": "sft", "rl": "rl"}.get(args.command)
        cfg = config_mod.build_config(args.config, flags, args.overrides)
        distill(cfg, force=args.force)
    elif args.command == "eval":
        from opd.evaluate import evaluate

        summary = evaluate(
            args.model,
            args.prompts,
            args.out,
            args.max_new_tokens,
            args.batch_size,
            args.extractor,
            args.temperature,
            args.seed,
            args.device,
        )
        print(json.dumps(summary))
    elif args.command == "demo":
        from opd.experiments.demo import run_demo

        preset = args.preset or ("quick" if args.quick else "default")
        if args.seeds:
            from opd.experiments.demo_seeds import run_seeds

            run_seeds(args.out, preset, args.seeds, args.cache_dir, not args.verbose, args.task)
        else:
            run_demo(args.out, preset, args.seed, args.cache_dir, not args.verbose, task=args.task)
    elif args.command == "experiment" and args.name.startswith(("personalization", "continual")):
        from opd.experiments.personalization import run as run_personal

        for flag in ("sft_stop_at", "teacher_stop_at", "rl_steps", "opd_steps", "sft_steps",
                     "lr_from"):  # fmt: skip
            if getattr(args, flag) is not None:
                raise OpdError(f"--{flag.replace('_', '-')} is for the math experiments")
        if args.task != "addition":
            raise OpdError(f"--task {args.task} is for the demo and the math experiments")
        preset = args.preset or ("quick" if args.quick else "default")
        run_personal(args.name, args.out, preset, args.cache_dir, quiet=not args.verbose)
    elif args.command == "experiment":
        from opd.experiments.blog import run_experiment

        preset = args.preset or ("quick" if args.quick else "default")
        run_experiment(
            args.name,
            args.out,
            preset,
            args.cache_dir,
            quiet=not args.verbose,
            sft_stop_at=args.sft_stop_at,
            teacher_stop_at=args.teacher_stop_at,
            rl_steps=args.rl_steps,
            opd_steps=args.opd_steps,
            sft_steps=args.sft_steps,
            lr_from=args.lr_from,
            task=args.task,
        )
    elif args.command == "report":
        from opd.experiments.report import write_report

        print(f"wrote {write_report(args.dirs, args.out)}")
    elif args.command == "serve-teacher":
        from opd.serve import serve

        if not 0 < args.port < 65536:
            raise OpdError(f"--port={args.port}: must be in 1..65535")
        if args.max_logprobs < 0 or args.max_rows < 1:
            raise OpdError("--max-logprobs must be >= 0 and --max-rows >= 1")
        if (args.max_body is not None and args.max_body < 1) or args.max_queue < 1:
            raise OpdError("--max-body and --max-queue must be >= 1")
        api_key = (
            args.api_key if args.api_key is not None else os.environ.get("OPD_TEACHER_API_KEY", "")
        )
        if args.host not in ("127.0.0.1", "localhost", "::1") and not api_key:
            print(
                f"opd: warning: serving on {args.host} without --api-key: anyone who can reach "
                "this port can use the teacher",
                file=sys.stderr,
            )
        serve(
            args.model_dir,
            args.host,
            args.port,
            args.name,
            api_key,
            args.max_logprobs,
            args.max_rows,
            args.dtype,
            args.device,
            max_body=args.max_body,
            max_queue=args.max_queue,
        )
    elif args.command == "check":
        from opd.preflight import check_command

        return check_command(args.student, args.teacher, args.prompts, args.overrides)
    elif args.command == "quickstart":
        from opd.quickstart import quickstart

        quickstart(args.out, args.steps, args.seed)
    return 0


def main(argv: list[str] | None = None) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore", message=".*TRANSFORMERS_CACHE.*")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        sys.exit(run(argv))
    except OpdError as e:
        print(f"opd: error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("opd: interrupted; resume by running the same command again", file=sys.stderr)
        sys.exit(130)
