"""Teachers for a run: each one loaded (a local folder or a server's URL), its tokenizer
compared with the student's, and the backend the score step calls built around it: in-process
(`LocalTeacher`) or served (`ServedTeacher`), seen through a `TeacherView` when it has another
tokenizer or the rows give it a prompt of its own (teacher_prompt, teacher_messages)."""

from __future__ import annotations

import os

from opd.config import Config
from opd.distributed import DistContext
from opd.errors import OpdError
from opd.losses import Objective
from opd.models import check_compatible, check_tokenizers, load_model, load_tokenizer, output_vocab
from opd.teachers import DEFAULT, is_url, teacher_specs
from opd.teachers.local import LocalTeacher
from opd.teachers.served import ServedTeacher
from opd.teachers.served_vocab import ServedVocab, require_vocab_logprobs
from opd.teachers.tokenizer_check import require_same_tokenizer
from opd.teachers.view import TeacherView, notice


def context_length(model) -> int | None:
    return getattr(model.config, "max_position_embeddings", None)


def teacher_backend(cfg, name, teacher, local, cross, tokenizer, vocab_size, context, prompts):
    """The backend that scores for teacher `name`: in-process or served, seen through a
    TeacherView when it has another tokenizer or the rows give it its own prompt (view.py)."""
    r, o = cfg.run, cfg.objective
    if name in local:
        own_vocab = vocab_size
        if name in cross:  # its log-probs are over its own vocabulary
            own_vocab = min(len(cross[name]), output_vocab(teacher))
        backend = LocalTeacher(
            teacher, own_vocab, r.micro_batch_size, o.chunk_tokens, r.autocast, r.fast_paths
        )
        limit = context_length(teacher)
    else:
        backend, limit = teacher, (teacher.max_len - 1 if teacher.max_len else None)
        if o.loss in ("full", "jsd"):  # opd serve-teacher's whole-vocabulary log-probs
            require_vocab_logprobs(teacher, o.loss)
            backend = ServedVocab(teacher)
    if name not in cross and not context:
        return backend
    view = TeacherView(backend, name, tokenizer, cross.get(name), limit)
    view.prepare(prompts, cfg.sampling.max_new_tokens)
    return view


def teacher_tokenizers(value: str) -> dict[str, str]:
    """model.teacher_tokenizer: a folder (the default teacher's) or 'name=FOLDER,...'."""
    if "=" not in value:
        return {DEFAULT: value} if value else {}
    out = {}
    for item in filter(None, (x.strip() for x in value.split(","))):
        name, sep, path = (x.strip() for x in item.partition("="))
        if not sep or not name or not path:
            raise OpdError(f"model.teacher_tokenizer: {item!r} is not name=FOLDER")
        out[name] = path
    return out


def load_teachers(cfg: Config, objective: Objective, tokenizer, student, ctx: DistContext):
    """{name: local model or ServedTeacher}, the vocabulary size every student log-prob is cut
    to, and {name: tokenizer} of the teachers whose tokenizer is not the student's. Loaded:
    every teacher when the objective scores with one, the default one when it samples from it
    (SFT), none otherwise (RL)."""
    m, r = cfg.model, cfg.remote
    vocab_size = min(len(tokenizer), output_vocab(student))
    api_key = m.teacher_api_key or os.environ.get("OPD_TEACHER_API_KEY", "")
    teachers = {}
    specs = teacher_specs(m.teacher, m.teachers)
    if not objective.teacher:
        specs = {DEFAULT: m.teacher} if objective.samples == "teacher" and m.teacher else {}
    own_tokenizers = teacher_tokenizers(m.teacher_tokenizer)
    for name in own_tokenizers:
        if name not in specs or not is_url(specs[name]):
            raise OpdError(
                f"model.teacher_tokenizer: teacher {name!r} is not a served teacher (an "
                "in-process teacher's tokenizer is read from its folder)"
            )
    cross = {}
    for name, spec in specs.items():
        what = "model.teacher" if name == DEFAULT else f"model.teachers[{name}]"
        if is_url(spec):
            served_tok = tokenizer
            if name in own_tokenizers:
                served_tok = load_tokenizer(own_tokenizers[name], "model.teacher_tokenizer")
                if across(tokenizer, served_tok, name, objective, cfg, ctx):
                    cross[name] = served_tok
            teachers[name] = ServedTeacher(
                spec,
                m.teacher_model if name == DEFAULT else "",
                api_key,
                r.api,
                r.timeout,
                r.retries,
                r.backoff,
                r.concurrency,
                r.batch_rows,
            )
            # before step 1 whatever run.preflight says: does it read these ids alike?
            require_same_tokenizer(teachers[name], served_tok, r.trust_tokenizer, ctx.is_main)
            continue
        teacher_tok = load_tokenizer(spec, what)
        if across(tokenizer, teacher_tok, name, objective, cfg, ctx):
            cross[name] = teacher_tok
        model = load_model(spec, m.teacher_dtype, ctx.device, what)
        if name not in cross:
            vocab_size = min(vocab_size, check_compatible(tokenizer, teacher_tok, student, model))
        teachers[name] = model
    return teachers, vocab_size, cross


def across(student_tok, teacher_tok, name: str, objective: Objective, cfg, ctx) -> bool:
    """Whether teacher `name` is scored across tokenizers (its tokenizer is another than the
    student's; said once, on rank 0), or an OpdError when the objective compares vocabularies."""
    try:
        check_tokenizers(student_tok, teacher_tok)
    except OpdError as e:
        why = str(e).removeprefix("tokenizers differ: ")
        if objective.teacher != "sampled":
            o = cfg.objective
            what = "samples from the teacher" if objective.samples == "teacher" else "compares"
            what = f"objective.kind={o.kind!r} {what}" if o.kind != "opd" else (
                f"objective.loss={o.loss!r} compares vocabularies")  # fmt: skip
            raise OpdError(
                f"teacher [{name}] has another tokenizer than the student's ({why}), and {what}; "
                "across tokenizers only objective.kind=opd with objective.loss=sampled is defined"
            ) from None
        if ctx.is_main:
            notice(name, why)
        return True
    return False
