"""One training step in-process: micro-batching does not change the update; bf16 teacher runs."""

import pytest
import torch

from opd.build import build_run as setup_run
from opd.config import build_config
from opd.distributed import DistContext
from opd.logprobs import completion_logprobs
from opd.train import train_step


def make_parts(models, prompts_file, tmp_path, **overrides):
    flags = {
        "model.student": str(models["student"]),
        "model.teacher": str(models["teacher"]),
        "data.prompts": str(prompts_file),
        "run.out": str(tmp_path / "unused"),
        "data.batch_prompts": 4,
        "sampling.group_size": 3,
        "sampling.max_new_tokens": 8,
        "optim.lr": 1e-2,
        "optim.grad_clip": 0.0,
        **overrides,
    }
    return setup_run(build_config(None, flags, []), DistContext())


def test_gradient_accumulation_gives_the_same_update(models, prompts_file, tmp_path):
    whole = make_parts(models, prompts_file, tmp_path)
    split = make_parts(
        models, prompts_file, tmp_path, **{"run.micro_batch_size": 5}
    )  # 12 rows: 5+5+2
    m_whole, m_split = train_step(0, whole), train_step(0, split)
    assert m_whole["teacher/kl"] == pytest.approx(m_split["teacher/kl"], rel=1e-6)
    assert m_whole["loss"] == pytest.approx(m_split["loss"], rel=1e-5)
    assert m_whole["optim/grad_norm"] == pytest.approx(m_split["optim/grad_norm"], rel=1e-4)
    # Compare gradients, not weights: Adam's first update is ~lr*sign(g), which amplifies
    # float noise on near-zero gradient entries.
    a, b = dict(whole.student.named_parameters()), dict(split.student.named_parameters())
    assert all(a[k].grad is not None and a[k].grad.abs().sum() > 0 for k in a)
    for k in a:
        assert torch.allclose(a[k].grad, b[k].grad, rtol=1e-4, atol=1e-7), k


@pytest.mark.parametrize("loss", ["full", "jsd"])
def test_the_teacher_backbone_runs_once_per_step(models, prompts_file, tmp_path, loss):
    """full/jsd take the KL metric's log-probs and the loss's logits from one teacher pass over
    the step's rows, and every micro-batch reads that pass."""
    parts = make_parts(
        models, prompts_file, tmp_path, **{"objective.loss": loss, "run.micro_batch_size": 5}
    )
    teacher = parts.teacher.teachers["default"].model
    calls = []
    teacher.get_decoder().register_forward_pre_hook(lambda *_: calls.append(1))
    metrics = train_step(0, parts)
    assert len(calls) == 3  # 12 rows in micro-batches of 5: one teacher pass each, not two
    assert metrics["teacher/kl"] > 0.1 and metrics["optim/grad_norm"] > 0
    # the same batch scored the default way gives the same sampled-token log-probs
    whole = make_parts(models, prompts_file, tmp_path)
    assert metrics["teacher/kl"] == pytest.approx(train_step(0, whole)["teacher/kl"], rel=1e-5)


def test_a_hook_on_the_student_head_reaches_sampler_and_trainer(models, prompts_file, tmp_path):
    """A forward hook on the LM head (here: EOS banned) changes the logits; the chunked head
    paths never call the head's forward, so the trainer must take the plain path and see it.
    The importance ratio of the first step is then 1."""
    parts = make_parts(models, prompts_file, tmp_path)
    eos = parts.tokenizer.eos_token_id

    def ban_eos(module, inputs, logits):
        logits[..., eos] = float("-inf")
        return logits

    parts.student.get_output_embeddings().register_forward_hook(ban_eos)
    metrics = train_step(0, parts)
    assert metrics["ratio/mean"] == pytest.approx(1.0, abs=1e-5)
    assert metrics["ratio/max"] == pytest.approx(1.0, abs=1e-4)


def test_bf16_teacher_scores_close_to_fp32(models, prompts_file, tmp_path):
    fp32 = make_parts(models, prompts_file, tmp_path)
    bf16 = make_parts(models, prompts_file, tmp_path, **{"model.teacher_dtype": "bfloat16"})
    batch = fp32.sampler.sample(fp32.prompts[:4], 2, torch.Generator().manual_seed(0))
    a, b = fp32.teacher.score(batch), bf16.teacher.score(batch)
    m = batch.completion_mask_BT
    assert b.dtype == torch.float32 and torch.isfinite(b[m]).all()
    assert (a[m] - b[m]).abs().max() < 0.1  # bf16 has ~3 significant digits


def test_bf16_autocast_bounds_the_log_prob_error(models, prompts_file, tmp_path):
    """run.autocast=bfloat16: teacher scores and sampler log-probs stay within 0.1 nats of the
    float32 values on the same tokens, and a step still trains."""
    fp32 = make_parts(models, prompts_file, tmp_path)
    amp = make_parts(models, prompts_file, tmp_path, **{"run.autocast": "bfloat16"})
    batch = amp.sampler.sample(amp.prompts[:4], 4, torch.Generator().manual_seed(0))
    m = batch.completion_mask_BT
    a, b = fp32.teacher.score(batch), amp.teacher.score(batch)
    assert b.dtype == torch.float32 and torch.isfinite(b[m]).all()
    err = (a[m] - b[m]).abs()
    assert 0 < err.max() < 0.1  # not bit-equal: bf16 really ran
    with torch.no_grad():
        trainer_lp = completion_logprobs(
            amp.student, batch.tokens_BT, batch.attention_mask_BT, batch.prompt_len, amp.vocab_size
        )
    sampler_err = (trainer_lp[m] - batch.sampler_lp_BT[m]).abs()
    assert 0 < sampler_err.max() < 0.1
    metrics = train_step(0, amp)
    assert metrics["optim/grad_norm"] > 0 and abs(metrics["ratio/mean"] - 1) < 0.05


def test_resume_drops_metrics_past_the_checkpoint_and_torn_lines(tmp_path):
    from opd.metrics import MetricsLogger

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2}\n{"step": 3}\n{"step": 4, "lo')
    MetricsLogger(path, start_step=2, total_steps=5)
    assert path.read_text() == '{"step": 1}\n{"step": 2}\n'


def test_student_dropout_does_not_break_the_importance_ratio(tok, prompts_file, models, tmp_path):
    from transformers import AutoModelForCausalLM

    from opd import tiny

    config = AutoModelForCausalLM.from_pretrained(models["student"]).config
    config.attention_dropout = 0.3
    student = tiny.save(AutoModelForCausalLM.from_config(config), tok, tmp_path / "dropout")
    parts = make_parts(models, prompts_file, tmp_path, **{"model.student": str(student)})
    metrics = train_step(0, parts)
    assert metrics["ratio/mean"] == pytest.approx(1.0, abs=1e-5)
    assert metrics["ratio/max"] == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("fast", [True, False], ids=["fast", "plain"])
def test_stale_rows_corrected_in_the_loss_give_the_rescored_gradient(
    models, prompts_file, tmp_path, fast
):
    """Rows an older policy sampled (one-step-off): k_t from the trained policy, computed in the
    loss from its own forward (discount 0), gives the gradient of re-scoring the rows first;
    k_t from the sampler gives another."""
    import copy
    from dataclasses import replace

    from opd.losses import Trainer, for_stale_rows
    from opd.samplers import make_sampler
    from opd.train import step_inputs

    run = make_parts(models, prompts_file, tmp_path, **{"run.fast_paths": fast})
    old = copy.deepcopy(run.student)  # the policy one update ago
    with torch.no_grad():
        for p in old.parameters():
            p.add_(0.02 * torch.randn_like(p))
    prompts, gen = step_inputs(0, run)
    batch = make_sampler(old, run.tokenizer, run.vocab_size, 8).sample(prompts, 3, gen)
    batch = run.score(batch, prompts)
    settings = run.cfg.objective

    def grads(b):
        b = replace(b, advantages_BT=run.objective.advantages(b, settings, 3))
        run.student.zero_grad()
        trainer = Trainer(run.student, run.vocab_size, settings, fast)
        run.objective.backward(trainer, b, b.num_completion_tokens)
        return [p.grad.clone() for p in run.student.parameters()]

    with torch.no_grad():
        lp = completion_logprobs(run.student, batch.tokens_BT, batch.attention_mask_BT,
                                 batch.prompt_len, run.vocab_size)  # fmt: skip
    rescored = grads(replace(batch, policy_lp_BT=lp))
    in_loss = for_stale_rows(batch, settings, rescore=None)  # per token: no second forward
    assert in_loss.policy_lp_BT is None and in_loss.stale_kl_coef == settings.kl_coef
    for a, b in zip(rescored, grads(in_loss), strict=True):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-7)
    naive = grads(batch)  # k_t from the sampler
    pairs = zip(rescored, naive, strict=True)
    assert any(not torch.allclose(a, c, rtol=1e-2, atol=1e-5) for a, c in pairs)
    discounted = for_stale_rows(batch, replace(settings, discount=0.5), rescore=lambda b: lp)
    assert discounted.policy_lp_BT is lp and discounted.stale_kl_coef == 0  # re-scored first
