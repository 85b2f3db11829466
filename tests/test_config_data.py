"""Config precedence and validation; prompt encoding (BOS, chat templates); the prompt stream."""

import os
import subprocess
import sys

import pytest
from hypothesis import given
from hypothesis import strategies as st

from opd import tiny
from opd.cli import fields_help
from opd.config import Config, build_config, from_dict, to_dict
from opd.data import encode_row, load_prompts, step_indices
from opd.errors import OpdError

REQUIRED = {"model.student": "s", "model.teacher": "t", "data.prompts": "p", "run.out": "o"}


def test_precedence_defaults_toml_flags_overrides(tmp_path):
    toml = tmp_path / "c.toml"
    toml.write_text('[optim]\nlr = 0.5\nschedule = "cosine"\n[run]\nsteps = 7\n')
    cfg = build_config(
        str(toml), {**REQUIRED, "run.steps": "9"}, ["optim.lr=0.25", "data.shuffle=false"]
    )
    assert cfg.optim.lr == 0.25 and cfg.optim.schedule == "cosine"
    assert cfg.run.steps == 9 and cfg.data.shuffle is False
    assert cfg.sampling.group_size == Config().sampling.group_size
    assert from_dict(to_dict(cfg)) == cfg


def test_bad_toml_and_types_name_the_key(tmp_path):
    toml = tmp_path / "c.toml"
    toml.write_text("[optim]\nlr = \n")
    with pytest.raises(OpdError, match="c.toml: invalid TOML"):
        build_config(str(toml), REQUIRED, [])
    toml.write_text('[optim]\nlr = "fast"\n')
    with pytest.raises(OpdError, match="optim.lr: expected a number, got 'fast'"):
        build_config(str(toml), REQUIRED, [])
    with pytest.raises(OpdError, match="model.student=''"):
        build_config(None, {**REQUIRED, "model.student": ""}, [])


def test_help_lists_every_field_once():
    text = fields_help()
    for section, table in to_dict(Config()).items():
        for name in table:
            starts = [
                ln for ln in text.splitlines() if ln.strip().startswith(f"{section}.{name} =")
            ]
            assert len(starts) == 1, (section, name)


def test_plain_prompt_respects_the_tokenizers_bos_convention():
    with_bos, without = tiny.char_tokenizer(), tiny.char_tokenizer(add_bos=False)
    assert encode_row({"prompt": "ab="}, with_bos, "x:1")[0] == with_bos.bos_token_id
    assert encode_row({"prompt": "ab="}, without, "x:1") == without("ab=")["input_ids"]
    assert without.bos_token_id not in encode_row({"prompt": "ab="}, without, "x:1")


def test_messages_use_the_chat_template_without_a_double_bos(tmp_path):
    tok = tiny.char_tokenizer()
    tok.chat_template = (
        "{{ bos_token }}{% for m in messages %}{{ m['role'][0] }}:{{ m['content'] }}\n"
        "{% endfor %}{% if add_generation_prompt %}a:{% endif %}"
    )
    ids = encode_row({"messages": [{"role": "user", "content": "hi"}]}, tok, "x:1")
    assert ids.count(tok.bos_token_id) == 1 and ids[0] == tok.bos_token_id
    assert tok.decode(ids, skip_special_tokens=True) == "u:hi\na:"
    with pytest.raises(OpdError, match="x:1: 'messages' must be"):
        encode_row({"messages": [{"role": "user"}]}, tok, "x:1")


def test_metadata_and_answers_are_kept_and_blank_lines_skipped(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "ab=", "answer": "ba", "id": 3}\n\n   \n{"prompt": "c="}\n')
    prompts, skipped = load_prompts(str(path), tiny.char_tokenizer())
    assert skipped == 0 and len(prompts) == 2
    assert prompts[0].row["id"] == 3 and prompts[0].row["answer"] == "ba"
    assert prompts[1].where.endswith("p.jsonl:4")


@given(
    n=st.integers(1, 40),
    p=st.sampled_from([2, 4, 8]),
    world=st.sampled_from([1, 2]),
    seed=st.integers(0, 5),
    step=st.integers(0, 30),
)
def test_step_indices_cover_each_epoch_once_and_shard_disjointly(n, p, world, seed, step):
    full = step_indices(step, n, p, seed, True)
    shards = [step_indices(step, n, p, seed, True, r, world) for r in range(world)]
    assert sum(shards, []) == full and all(0 <= i < n for i in full)
    # one epoch of the stream is a permutation of the prompts
    epoch = sum((step_indices(s, n, p, seed, True) for s in range(n)), [])[:n]
    assert sorted(epoch) == list(range(n))


def test_engine_cores_are_checked_and_the_learner_leaves_them():
    from opd.engine import parse_cpus

    with pytest.raises(OpdError, match="sampling.engine_cpus='1': must be empty unless"):
        build_config(None, {"sampling.engine_cpus": "1"}, [])  # no engine opd starts
    allowed = sorted(os.sched_getaffinity(0))
    with pytest.raises(OpdError, match="must be core ids like"):
        parse_cpus("1-x")
    with pytest.raises(OpdError, match="may run on cores"):
        parse_cpus(str(max(allowed) + 1))
    with pytest.raises(OpdError, match="leaves no core for the learner"):
        parse_cpus(",".join(map(str, allowed)))
    if len(allowed) < 2:
        pytest.skip("one core: nothing to split between an engine and the learner")
    assert (
        parse_cpus(f"{allowed[-1]}-{allowed[-1]}") == parse_cpus(f" {allowed[-1]}") == {allowed[-1]}
    )
    # In a child process: a thread started before the move is moved too (torch's pool is).
    code = (
        "import os, threading; from opd.engine import leave_cores\n"
        "ready, go, seen = threading.Event(), threading.Event(), []\n"
        "def worker():\n"
        "    ready.set(); go.wait(); seen.append(sorted(os.sched_getaffinity(0)))\n"
        "t = threading.Thread(target=worker); t.start(); ready.wait()\n"
        f"n = leave_cores({{{allowed[-1]}}}); go.set(); t.join()\n"
        "print(n, sorted(os.sched_getaffinity(0)), seen[0])\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    rest = [c for c in allowed if c != allowed[-1]]
    assert out.stdout.split("\n")[0] == f"{len(rest)} {rest} {rest}", out.stdout
