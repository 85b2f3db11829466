"""Preflight: is this teacher usable for this student? Run by `opd check` and before step 1.

Checks, each reported as ok / FAIL / skipped with the numbers:
- tokenizers: the same vocabulary and special tokens (a local teacher's files; a served one is
  asked by teachers/tokenizer_check.py when the run is set up, whatever run.preflight says);
- chat templates: equal, when the prompts use messages;
- embeddings: both output layers cover the tokenizer (padded rows beyond it are fine);
- teacher self-KL: the teacher's own samples, scored by the same teacher backend, give
  mean |logp_sampler - logp_teacher| ~ 0. This catches off-by-one alignment, a BOS the server
  adds or drops, and a scorer that applies a temperature. A served teacher is asked to sample
  (vLLM can; `opd serve-teacher` and SGLang here cannot, so it is skipped there, saying so);
- start KL: the student's samples scored by each teacher, the reverse KL the run starts from.
"""

from __future__ import annotations

import math
from dataclasses import replace

import httpx
import torch

from opd.distributed import DistContext
from opd.errors import OpdError
from opd.samplers import make_sampler
from opd.samplers.vllm import VLLMSampler
from opd.stats import per_teacher_kl
from opd.teachers import TeacherRouter
from opd.teachers.local import LocalTeacher
from opd.teachers.served import ServedTeacher, _detail
from opd.teachers.served_vocab import ServedVocab
from opd.teachers.tokenizer_check import LEFT_OPEN, TokenizerCheckFailed
from opd.teachers.view import TeacherView

SELF_KL_LIMIT = {"float32": 1e-3, "bfloat16": 5e-2}
SELF_KL_OPEN = (
    "so not checked: that the server scores its own samples at KL ~ 0, which leaves open an "
    "off-by-one alignment, a BOS it adds or drops and a temperature in its scorer (the start "
    "KL below is measured all the same, with nothing to compare it with)"
)


def own_sample_gaps(
    model, tokenizer, vocab_size: int, prompts, max_new_tokens: int, scorer, group: int
) -> torch.Tensor:
    """logp_sampler - logp_scorer of every token `model` samples (temperature 1) for `prompts`,
    `scorer` an in-process model: their mean is the reverse KL from `model` to `scorer`."""
    sampler = make_sampler(model, tokenizer, vocab_size, max_new_tokens)
    batch = sampler.sample(prompts, group, torch.Generator(device=model.device).manual_seed(0))
    scored = LocalTeacher(scorer, vocab_size).score(batch)
    return (batch.sampler_lp_BT - scored)[batch.completion_mask_BT]


def self_kl_local(model, tokenizer, vocab_size: int, prompts, max_new_tokens: int) -> float:
    """Mean |sampler - scorer| log-prob of the teacher's own temperature-1 samples."""
    gaps = own_sample_gaps(model, tokenizer, vocab_size, prompts, max_new_tokens, model, 2)
    return float(gaps.abs().mean())


def self_kl_served(
    teacher: ServedTeacher, prompts, max_new_tokens: int
) -> tuple[float | None, str]:
    """The same check through the server: (value, "") or (None, why the server did not sample)."""
    if teacher.api != "vllm":
        return None, f"remote.api={teacher.api}: opd samples only through /v1/completions"
    payload = {
        "model": teacher.model,
        "prompt": [p.ids for p in prompts],
        "max_tokens": max_new_tokens,
        "temperature": 1.0,
        "logprobs": 0,
        "return_token_ids": True,
        "seed": 0,
    }
    try:
        response = teacher.client.post(f"{teacher.url}/completions", json=payload)
    except httpx.HTTPError as e:
        return None, f"the sampling request failed ({type(e).__name__}: {e})"
    if response.status_code != 200:
        return (
            None,
            f"the server does not sample (HTTP {response.status_code}: {_detail(response)})",
        )
    try:
        choices = sorted(response.json()["choices"], key=lambda c: c["index"])
        samples = [(c["token_ids"], c["logprobs"]["token_logprobs"]) for c in choices]
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        return None, f"its samples lack token ids or log-probs ({type(e).__name__}: {e})"
    rows = [p.ids + list(ids) for p, (ids, _) in zip(prompts, samples, strict=True)]
    keep = [i for i, (ids, _) in enumerate(samples) if ids]
    scored = teacher._request([rows[i] for i in keep], 0)
    diffs = []
    for i, (lps, _) in zip(keep, scored, strict=True):
        n_prompt = len(prompts[i].ids)
        diffs += [abs(a - b) for a, b in zip(samples[i][1], lps[n_prompt:], strict=True)]
    return sum(diffs) / max(len(diffs), 1), ""


def start_kl(student_sampler, router: TeacherRouter, prompts, names: list[str]) -> dict[str, float]:
    """Per teacher: reverse KL per token of the student's samples (what step 1 starts from);
    "student" (NaN) when the student's own log-probs of its samples are not finite."""
    device = next(student_sampler.model.parameters()).device
    batch = student_sampler.sample(prompts, 2, torch.Generator(device=device).manual_seed(0))
    if not torch.isfinite(batch.sampler_lp_BT[batch.completion_mask_BT]).all():
        return {"student": math.nan}
    prompts_B = [prompts[i] for i in batch.prompt_index_B.tolist()]
    batch = replace(
        batch, **router.fields(batch, router.names(batch, names), "sampled", 0, prompts_B)
    )
    kl = per_teacher_kl(batch, sorted(router.teachers), DistContext())
    return {key.removeprefix("teacher/kl/"): value for key, value in kl.items()}


# A check whose value is NaN or infinite fails with this detail, and the run's message says so
# (not alignment, BOS or temperature: the numbers themselves are broken).
NONFINITE = "not finite"


def nonfinite_detail(value: float, whose: str) -> str:
    return (
        f"{NONFINITE} ({value}): {whose} log-probs hold NaN or infinity; check its weights "
        "and dtype"
    )


def run_preflight(run, n_prompts: int = 4) -> list[tuple[str, str, str]]:
    """(check, ok | FAIL | skipped, detail) rows for a set-up run (build.Run); before step 1."""
    cfg = run.cfg
    prompts = run.prompts[:n_prompts]
    names = [p.row.get("teacher", "default") for p in prompts]
    max_new = min(cfg.sampling.max_new_tokens, 32)
    rows = []
    for name, teacher in run.teacher.teachers.items():
        label = f"teacher self-KL [{name}]"
        # a TeacherView's teacher samples after its own prompt, in its own tokens
        view = teacher if isinstance(teacher, TeacherView) else None
        own = [replace(p, ids=view.prompt_ids(p)) for p in prompts] if view else prompts
        teacher = backend_of(teacher)
        if isinstance(teacher, ServedTeacher):
            value, why = self_kl_served(teacher, own, max_new)
            if value is None:
                rows.append((label, "skipped", f"{why}; {SELF_KL_OPEN}"))
                continue
            limit = SELF_KL_LIMIT["bfloat16"]  # servers often run reduced precision
        else:
            tokenizer = view.tokenizer if view else run.tokenizer
            value = self_kl_local(teacher.model, tokenizer, teacher.vocab_size, own, max_new)
            limit = SELF_KL_LIMIT[cfg.model.teacher_dtype]
        if not math.isfinite(value):
            rows.append((label, "FAIL", nonfinite_detail(value, f"teacher [{name}]'s")))
            continue
        status = "ok" if value <= limit else "FAIL"
        rows.append(
            (label, status, f"mean |logp_sampler - logp_teacher| = {value:.2e} (limit {limit:g})")
        )
    student_sampler = make_sampler(
        run.student, run.tokenizer, run.vocab_size, max_new, backend=cfg.sampling.backend,
        fast=cfg.run.fast_paths,
    )  # fmt: skip
    for name, kl in start_kl(student_sampler, run.teacher, prompts, names).items():
        whose = "the student's" if name == "student" else f"teacher [{name}]'s"
        if not math.isfinite(kl):
            rows.append((f"start KL [{name}]", "FAIL", nonfinite_detail(kl, whose)))
            continue
        rows.append(
            (f"start KL [{name}]", "ok", f"student -> teacher reverse KL {kl:.4f} per token")
        )
    engine = getattr(run.sampler, "sampler", None)  # sampling.backend=vllm: Prefetch(VLLMSampler)
    if isinstance(engine, VLLMSampler):
        rows.append(engine_row(engine, run, prompts))
    return rows


def engine_row(engine: VLLMSampler, run, prompts) -> tuple[str, str, str]:
    """The engine's own samples scored in process by the model it serves (the student, or the
    teacher for SFT): mean |lp_engine - lp_trainer| ~ 0 (its first call brings the engine to the
    student's weights, or checks it serves the teacher's, by the probe)."""
    try:
        batch = engine.sample(prompts, 2, torch.Generator().manual_seed(0))
    except OpdError as e:
        return "sampler [vllm]", "FAIL", str(e)
    lp = LocalTeacher(engine.model, run.vocab_size).score(batch)
    m = batch.completion_mask_BT
    gap = float((batch.sampler_lp_BT.to(lp.device) - lp)[m.to(lp.device)].abs().mean())
    cfg = run.cfg
    limit = SELF_KL_LIMIT[cfg.model.dtype if engine.follow else cfg.model.teacher_dtype]
    status = "ok" if gap <= limit else "FAIL"
    who = "trainer" if engine.follow else "teacher"
    detail = f"mean |logp_engine - logp_{who}| = {gap:.2e} on its samples (limit {limit:g})"
    return "sampler [vllm]", status, detail


def backend_of(teacher):
    """The LocalTeacher or ServedTeacher inside a TeacherView or a ServedVocab."""
    teacher = teacher.inner if isinstance(teacher, TeacherView) else teacher
    return teacher.served if isinstance(teacher, ServedVocab) else teacher


def served_tokenizer_rows(run) -> list[tuple[str, str, str]]:
    """What the set-up found when it asked each served teacher about its tokenizer."""
    rows = []
    for name, teacher in run.teacher.teachers.items():
        teacher = backend_of(teacher)
        if isinstance(teacher, ServedTeacher) and teacher.tokenizer_check:
            status, detail = teacher.tokenizer_check
            if status == "skipped":
                detail += f"; remote.trust_tokenizer=true, so not checked: {LEFT_OPEN}"
            rows.append((f"tokenizers [{name}]", status, detail))
    return rows


def format_report(rows: list[tuple[str, str, str]]) -> str:
    width = max(len(r[0]) for r in rows)
    return "\n".join(f"  {name:<{width}}  {status:<7}  {detail}" for name, status, detail in rows)


def check_before_run(run) -> None:
    """Preflight at the start of a run: print the report; stop on a failed check."""
    rows = run_preflight(run)
    print("preflight (run.preflight=false skips it):\n" + format_report(rows), flush=True)
    failed = [r for r in rows if r[1] == "FAIL"]
    if failed:
        name, _, detail = failed[0]
        why = "" if detail.startswith(NONFINITE) else (
            "; the teacher backend does not score what it samples (alignment, BOS or temperature)"
        )  # fmt: skip
        raise OpdError(f"preflight failed: {name}: {detail}{why}; see `opd check`")


def check_command(student: str, teacher: str, prompts: str | None, overrides: list[str]) -> int:
    """`opd check`: every check, a readable report, exit 1 on any failure."""
    import tempfile
    from pathlib import Path

    from opd.build import build_run
    from opd.config import build_config
    from opd.distributed import setup
    from opd.models import load_tokenizer
    from opd.teachers import is_url

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        if not prompts:
            prompts = str(Path(tmp) / "prompts.jsonl")
            Path(prompts).write_text(
                '{"prompt": "Hello"}\n{"prompt": "1 + 1 ="}\n{"prompt": "a"}\n'
            )
        # tokenizers and configs only: the models are loaded once, by build_run below
        if not is_url(teacher):
            s_tok = load_tokenizer(student, "--student")
            t_tok = load_tokenizer(teacher, "--teacher")
            rows += _static_checks(s_tok, t_tok, student, teacher, prompts)
        if any(r[1] == "FAIL" for r in rows):
            print("opd check:\n" + format_report(rows))
            return 1
        flags = {
            "model.student": student,
            "model.teacher": teacher,
            "data.prompts": prompts,
            "run.out": str(Path(tmp) / "run"),
            "data.overlong": "skip",
        }
        cfg = build_config(None, flags, overrides)
        if cfg.objective.kind != "opd":
            raise OpdError("opd check checks a distillation set-up: drop objective.kind")
        ctx = setup(cfg.run.device, cfg.run.threads)  # run.device, as a run would use it
        try:
            run = build_run(cfg, ctx)  # asks each served teacher about its tokenizer
        except TokenizerCheckFailed as e:
            ctx.close()
            print("opd check:\n" + format_report(rows + [("tokenizers", "FAIL", str(e))]))
            return 1
        try:
            rows += served_tokenizer_rows(run)
            rows += run_preflight(run)
        finally:
            run.score.close()
            ctx.close()
    print("opd check:\n" + format_report(rows))
    return 1 if any(r[1] == "FAIL" for r in rows) else 0


def _output_rows(path: str, what: str) -> int:
    """Rows of the model's output layer, from its config.json (no weights are loaded)."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True, trust_remote_code=False)
        return int(config.get_text_config().vocab_size)
    except Exception as e:  # transformers raises many types for a broken config
        raise OpdError(
            f"{what}: cannot read the vocabulary size from {path}/config.json ({e})"
        ) from None


def _static_checks(s_tok, t_tok, student: str, teacher: str, prompts: str):
    from opd.data import prompt_text, read_jsonl
    from opd.models import check_tokenizers
    from opd.teachers.align import alignment_summary

    rows = []
    try:
        check_tokenizers(s_tok, t_tok)
        rows.append(("tokenizers", "ok", f"{len(s_tok)} tokens, same ids and special tokens"))
    except OpdError as e:  # another tokenizer: scored across tokenizers (teachers/view.py)
        why = str(e).removeprefix("tokenizers differ: ")
        rows.append(("tokenizers", "ok", f"another tokenizer ({why}): scored across tokenizers"))
        rows_ = read_jsonl(prompts)[:64]
        texts = [prompt_text(row, s_tok, f"{prompts}:{n}")[0] for n, row in rows_]
        rows.append(("alignment", "ok", alignment_summary(s_tok, t_tok, texts)))
        return rows  # each side renders its own prompts and reads only its own vocabulary
    if any("messages" in row for _, row in read_jsonl(prompts)):
        same = getattr(s_tok, "chat_template", None) == getattr(t_tok, "chat_template", None)
        rows.append(
            (
                "chat templates",
                "ok" if same else "FAIL",
                "equal" if same else "differ: prompts with messages render differently",
            )
        )
    else:
        rows.append(("chat templates", "skipped", "the prompts use no messages"))
    sv, tv = _output_rows(student, "--student"), _output_rows(teacher, "--teacher")
    n = len(s_tok)
    ok = sv >= n and tv >= n
    rows.append(
        (
            "embeddings",
            "ok" if ok else "FAIL",
            f"tokenizer {n}, student rows {sv}, teacher rows {tv}"
            + (
                " (rows beyond the tokenizer are padding, cut from every softmax)"
                if ok and max(sv, tv) > n
                else ""
            ),
        )
    )
    return rows
