"""Settings are checked before anything heavy: a value the chosen objective would ignore, a
mistyped prompts path, and `opd check`'s device all fail (or apply) before a model loads."""

from __future__ import annotations

import pytest

from opd.cli import main
from opd.config import ObjectiveConfig
from opd.errors import OpdError
from opd.losses import OBJECTIVES, check_settings, objective_for


@pytest.mark.parametrize(
    "settings,message",
    [
        ({"loss": "topk", "kl_coef": 2.0}, "objective.kl_coef=2.0 has no effect"),
        ({"loss": "full", "discount": 0.5}, "objective.discount=0.5 has no effect"),
        ({"loss": "jsd", "clip_ratio": 0.2}, "objective.clip_ratio=0.2 has no effect"),
        ({"loss": "sampled", "topk": 5}, "objective.topk=5 has no effect"),
        ({"loss": "full", "jsd_beta": 0.1}, "objective.jsd_beta=0.1 has no effect"),
        ({"loss": "sampled", "reward_std": True}, "objective.reward_std=True has no effect"),
        ({"loss": "sampled", "extractor": "boxed"}, "objective.extractor='boxed' has no effect"),
        ({"kind": "sft", "kl_coef": 0.5}, "objective.kl_coef=0.5 has no effect"),
        ({"kind": "rl", "discount": 0.9}, "objective.discount=0.9 has no effect"),
        ({"kind": "rl", "loss": "full"}, "objective.loss='full' applies to objective.kind='opd'"),
        ({"loss": "topk", "reward_coef": 1.0}, "objective.reward_coef=1.0 has no effect"),
        ({"loss": "full", "kl_deadzone": 1e-4}, "objective.kl_deadzone=0.0001 has no effect"),
        ({"kind": "rl", "kl_deadzone": 1e-4}, "objective.kl_deadzone=0.0001 has no effect"),
    ],
)
def test_settings_the_objective_does_not_read_are_refused(settings, message):
    with pytest.raises(OpdError, match=message.replace("(", r"\(").replace(")", r"\)")):
        check_settings(ObjectiveConfig(**settings))


def test_settings_the_objective_reads_are_accepted():
    for settings in (
        {"loss": "sampled", "kl_coef": 2.0, "discount": 0.5, "clip_ratio": 0.2},
        {"loss": "sampled", "kl_deadzone": 1e-4},
        {"loss": "sampled", "reward_coef": 1.0, "reward_std": True, "extractor": "boxed"},
        {"loss": "topk", "topk": 5, "chunk_tokens": 64},
        {"loss": "jsd", "jsd_beta": 0.1},
        {"kind": "rl", "reward_std": True, "extractor": "boxed", "clip_ratio": 0.2},
        {"kind": "sft", "chunk_tokens": 64},
    ):
        cfg = ObjectiveConfig(**settings)
        assert objective_for(cfg) is OBJECTIVES[(cfg.kind, cfg.loss)]


def test_refused_settings_and_a_missing_prompts_file_fail_before_any_model_loads(tmp_path, capsys):
    """The model folders do not exist: an error about them would mean they were loaded first."""
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "ab="}\n')
    base = ["distill", "--student", str(tmp_path / "no-student"), "--teacher"]
    base += [str(tmp_path / "no-teacher"), "--out", str(tmp_path / "o")]
    for extra, needle in (
        (["--prompts", str(tmp_path / "typo.jsonl")], "data.prompts: prompts file not found"),
        (["--prompts", str(prompts), "--loss", "topk", "--kl-coef", "2"], "objective.kl_coef"),
        (
            ["--prompts", str(prompts), f"eval.prompts={tmp_path / 'no.jsonl'}"],
            "eval.prompts: prompts file not found",
        ),
    ):
        with pytest.raises(SystemExit) as exc:
            main(base + extra)
        err = capsys.readouterr().err.strip()
        assert exc.value.code == 2 and len(err.splitlines()) == 1 and needle in err, err
    assert not (tmp_path / "o").exists()


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="a CUDA device is present")
def test_opd_check_uses_run_device(models, prompts_file, capsys):
    """`opd check` sets up the run on run.device (it used to ignore it and use the CPU)."""
    with pytest.raises(SystemExit) as exc:
        main(["check", "--student", str(models["student"]), "--teacher", str(models["teacher"]),
              "--prompts", str(prompts_file), "run.device=cuda"])  # fmt: skip
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "run.device='cuda' but torch sees no CUDA device" in err, err


def test_an_unknown_head_map_is_refused_before_any_weights_load(models, prompts_file, tmp_path):
    """The config tells: a Llama folder whose config.json sets final_logit_softcapping (which
    Llama's forward does not apply) is refused for --loss full from its config alone; its
    weights file here is garbage, so loading it would have failed differently."""
    import json
    import shutil

    from opd.config import build_config
    from opd.train import distill

    odd = tmp_path / "odd"
    shutil.copytree(models["teacher"], odd)
    config = json.loads((odd / "config.json").read_text())
    (odd / "config.json").write_text(json.dumps(config | {"final_logit_softcapping": 30.0}))
    (odd / "model.safetensors").write_bytes(b"not safetensors")
    flags = {
        "model.student": str(models["student"]),
        "model.teacher": str(odd),
        "data.prompts": str(prompts_file),
        "run.out": str(tmp_path / "run"),
        "objective.loss": "full",
    }
    with pytest.raises(
        OpdError, match=r"model.teacher=.*final_logit_softcapping=30.0 on the config"
    ):
        distill(build_config(None, flags, []))
    assert not (tmp_path / "run").exists()


def test_a_folders_own_code_never_runs_and_pickle_weights_are_refused_unread(
    models, tmp_path, monkeypatch
):
    """opd never runs a model folder's Python (auto_map) and never unpickles weights. A folder
    whose type transformers ships loads with transformers' own class; one whose type it does not
    ship is a one-line error; the folder's module runs in neither case, even for a user who
    would answer "y" if transformers asked whether to run it."""
    import json
    import shutil

    from opd.models import load_model, load_tokenizer

    monkeypatch.setattr("builtins.input", lambda *args, **kwargs: "y")
    marker = tmp_path / "ran"
    code = tmp_path / "code"
    shutil.copytree(models["student"], code)
    (code / "modeling_evil.py").write_text(f"open({str(marker)!r}, 'w').write('x')\n")
    config = json.loads((code / "config.json").read_text())
    auto = {"AutoConfig": "modeling_evil.EvilConfig", "AutoModelForCausalLM": "modeling_evil.Evil"}
    (code / "config.json").write_text(json.dumps(config | {"auto_map": auto}))
    assert type(load_model(str(code), what="model.student")).__name__ == "LlamaForCausalLM"
    load_tokenizer(str(code), what="model.student")
    (code / "config.json").write_text(json.dumps(config | {"auto_map": auto, "model_type": "evil"}))
    with pytest.raises(OpdError, match=r"model.student: could not load a causal LM from .*code"):
        load_model(str(code), what="model.student")
    assert not marker.exists()

    pickled = tmp_path / "pickled"
    shutil.copytree(models["student"], pickled)
    (pickled / "model.safetensors").unlink()
    (pickled / "pytorch_model.bin").write_bytes(b"\x80\x04 not even a pickle")
    with pytest.raises(OpdError, match=r"only pickle weights \(pytorch_model.bin\)"):
        load_model(str(pickled), what="model.student")
