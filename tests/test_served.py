"""Served teachers: `opd serve-teacher` against the in-process teacher, its 4xx answers, request
batching, a run through it, and a fake server that misbehaves on purpose (5xx, slow, dropped,
malformed, wrong count)."""

from __future__ import annotations

import contextlib
import http.server
import json
import re
import socket
import threading
import time

import httpx
import pytest
import torch

from opd.config import build_config
from opd.data import load_prompts
from opd.errors import OpdError
from opd.models import load_model, load_tokenizer
from opd.samplers import make_sampler
from opd.serve import TeacherScorer, create_app
from opd.teachers.local import LocalTeacher
from opd.teachers.served import ServedTeacher

from .conftest import assert_same_topk
from .test_cli import assert_one_line_error, call, distill_args, run_cli


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serving(app):
    """Run a FastAPI app with uvicorn in a thread on a free loopback port."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        server.should_exit = True
        thread.join(10)


@pytest.fixture(scope="module")
def teacher(models):
    return load_model(str(models["teacher"])), load_tokenizer(str(models["teacher"]))


@pytest.fixture(scope="module")
def server(teacher):
    model, tok = teacher
    with serving(create_app(TeacherScorer(model, tok), max_logprobs=5, max_rows=64)) as url:
        yield url


@pytest.fixture(scope="module")
def batch(models, prompts_file):
    tok = load_tokenizer(str(models["student"]))
    student = load_model(str(models["student"]))
    prompts, _ = load_prompts(str(prompts_file), tok)
    sampler = make_sampler(student, tok, len(tok), 10)
    return sampler.sample(prompts[:6], 2, torch.Generator().manual_seed(0))  # left-padded rows


def test_served_log_probs_equal_in_process(server, teacher, batch):
    model, tok = teacher
    local = LocalTeacher(model, len(tok))
    served = ServedTeacher(server, batch_rows=5, concurrency=2)  # 12 rows -> 3 requests
    assert served.model == "teacher"  # discovered from /v1/models
    torch.testing.assert_close(served.score(batch), local.score(batch), atol=1e-5, rtol=0)
    lp_s, ids_s, lpk_s = served.score_topk(batch, 3)
    lp_l, ids_l, lpk_l = local.score_topk(batch, 3)
    torch.testing.assert_close(lp_s, lp_l, atol=1e-5, rtol=0)
    assert_same_topk(batch, (lp_s, ids_s, lpk_s), (lp_l, ids_l, lpk_l), 1e-5)
    served.close()


def test_serve_teacher_answers_bad_requests_with_the_reason(server, teacher):
    tok = teacher[1]
    ok = {"model": "teacher", "prompt": [[1, 5, 6]], "max_tokens": 1, "prompt_logprobs": 0}
    cases = [
        ({"prompt": "text"}, 400, "token ids"),
        ({"prompt_logprobs": 6}, 400, "--max-logprobs=5"),
        ({"prompt_logprobs": None}, 400, "set prompt_logprobs"),
        ({"model": "other"}, 404, "does not exist"),
        ({"prompt": [[1, len(tok) + 3]]}, 400, "outside the vocabulary"),
        ({"prompt": [[1, 2]] * 65}, 400, "at most 64"),
        ({"prompt": [[1] * 300]}, 400, "context"),
        ({"max_tokens": 5}, 400, "max_tokens"),
        ({"model": "teacher", "prompt": "x"}, 400, "token ids"),
    ]
    with httpx.Client() as client:
        good = client.post(f"{server}/completions", json=ok)
        assert good.status_code == 200
        entries = good.json()["choices"][0]["prompt_logprobs"]
        assert entries[0] is None and set(entries[1]) == {"5"} and entries[1]["5"]["rank"] >= 1
        for change, code, words in cases:
            r = client.post(f"{server}/completions", json=ok | change)
            assert r.status_code == code, change
            assert words in r.json()["error"]["message"], change
        assert client.get(f"{server}/models").json()["data"][0]["id"] == "teacher"

    with pytest.raises(OpdError, match=r"HTTP 400: .*max-logprobs"):
        ServedTeacher(server).score_topk(_one_row(), 6)


def _one_row():
    from opd.types import Rollouts

    return Rollouts(
        tokens_BT=torch.tensor([[1, 5, 6, 7]]),
        attention_mask_BT=torch.ones(1, 4, dtype=torch.long),
        completion_mask_BT=torch.tensor([[False, False, True, True]]),
        prompt_len=2,
        sampler_lp_BT=torch.zeros(1, 4),
        prompt_index_B=torch.tensor([0]),
    )


def test_api_key_is_required_when_set(teacher):
    model, tok = teacher
    with serving(create_app(TeacherScorer(model, tok), api_key="s3cret")) as url:
        assert httpx.get(f"{url.removesuffix('/v1')}/health").status_code == 200
        assert httpx.get(f"{url}/models").status_code == 401
        with pytest.raises(OpdError, match="HTTP 401.*teacher_api_key"):
            ServedTeacher(url)
        served = ServedTeacher(url, api_key="s3cret")
        assert served.score(_one_row()).shape == (1, 4)
        served.close()


def test_concurrent_requests_share_forward_passes(teacher, batch):
    model, tok = teacher
    scorer = TeacherScorer(model, tok)
    calls = []
    plain = scorer.score

    def slow_score(rows, ks):
        calls.append(len(rows))
        time.sleep(0.3)  # long enough for the other requests to queue up behind this one
        return plain(rows, ks)

    scorer.score = slow_score
    with serving(create_app(scorer)) as url:
        served = ServedTeacher(url, batch_rows=1, concurrency=12)  # 12 requests at once
        lp = served.score(batch)
        served.close()
    torch.testing.assert_close(lp, LocalTeacher(model, len(tok)).score(batch), atol=1e-5, rtol=0)
    assert sum(calls) == 12 and len(calls) <= 4, calls


def test_run_through_served_teacher_matches_in_process(models, prompts_file, server, tmp_path):
    def first_step(teacher, out):
        args = distill_args(models, prompts_file, out, 1)
        args[args.index("--teacher") + 1] = teacher
        r = run_cli(args + ["run.preflight=false"])
        assert r.returncode == 0, r.stderr
        return json.loads((out / "metrics.jsonl").read_text().splitlines()[0])

    served = first_step(server, tmp_path / "served")
    local = first_step(str(models["teacher"]), tmp_path / "local")
    assert served["teacher/kl"] == pytest.approx(local["teacher/kl"], abs=1e-5)
    assert served["loss"] == pytest.approx(local["loss"], abs=1e-5)


# -- the teacher's tokenizer, checked against the student's before step 1 -------------------


def swapped_tokenizer(tok, a: str, b: str, folder):
    """`tok` with the ids of tokens a and b swapped: the same size, other ids."""
    tok.save_pretrained(folder)
    path = folder / "tokenizer.json"
    data = json.loads(path.read_text())
    vocab = data["model"]["vocab"]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    path.write_text(json.dumps(data))
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder))


def test_serve_teacher_tokenizes_and_detokenizes_as_vllm_does(server, teacher):
    tok = teacher[1]
    root = server.removesuffix("/v1")
    ids = tok("ab=")["input_ids"]
    with httpx.Client() as client:
        r = client.post(f"{root}/tokenize", json={"model": "teacher", "prompt": "ab="})
        assert r.json()["tokens"] == ids and r.json()["count"] == len(ids)
        r = client.post(f"{root}/tokenize", json={"prompt": "ab=", "add_special_tokens": False})
        assert r.json()["tokens"] == ids[1:]
        assert client.post(f"{root}/detokenize", json={"tokens": ids}).json() == {
            "prompt": tok.decode(ids)
        }
        assert client.get(f"{root}/tokenizer_info").json()["opd_len"] == len(tok)
        for path, body, code in [
            ("/tokenize", {"model": "other", "prompt": "a"}, 404),
            ("/tokenize", {"prompt": [1, 2]}, 400),
            ("/detokenize", {"tokens": ["a"]}, 400),
            ("/detokenize", {"tokens": [len(tok)]}, 400),
        ]:
            assert client.post(root + path, json=body).status_code == code, (path, body)


def test_opd_check_reports_the_served_tokenizer(
    models, prompts_file, server, teacher, tmp_path, capsys
):
    from opd.cli import main

    def check(url):
        with pytest.raises(SystemExit) as e:
            main(["check", "--student", str(models["student"]), "--teacher", url,
                  "--prompts", str(prompts_file)])  # fmt: skip
        return e.value.code, capsys.readouterr().out

    code, out = check(server)
    assert code == 0, out
    assert re.search(r"tokenizers \[default\] +ok +\d+ ids decode alike and \d+ texts encode", out)
    assert "same tokenizer (sha256 " in out
    (self_kl,) = [line for line in out.splitlines() if "teacher self-KL [default]" in line]
    assert "skipped" in self_kl and "does not sample (HTTP 400: this server only scores" in self_kl
    assert "so not checked: that the server scores its own samples at KL ~ 0" in self_kl
    model, tok = teacher
    other = swapped_tokenizer(tok, "a", "b", tmp_path / "tok")
    with serving(create_app(TeacherScorer(model, other))) as url:
        code, out = check(url)
    a = tok.convert_tokens_to_ids("a")
    assert code == 1, out
    assert f"FAIL     teacher {url}: tokenizers differ: id {a} is 'a' for the student, " in out


def test_a_teacher_with_other_ids_of_the_same_size_is_refused_before_step_1(
    models, prompts_file, teacher, tmp_path, capsys
):
    model, tok = teacher
    other = swapped_tokenizer(tok, "a", "b", tmp_path / "tok")
    assert len(other) == len(tok) and other.get_vocab() != tok.get_vocab()
    out = tmp_path / "run"
    args = distill_args(models, prompts_file, out, 1, "run.preflight=false")  # checked anyway
    a = tok.convert_tokens_to_ids("a")
    with serving(create_app(TeacherScorer(model, other))) as url:
        args[args.index("--teacher") + 1] = url
        code, err = call(args, capsys)
    want = f"opd: error: teacher {url}: tokenizers differ: id {a} is 'a' for the student, 'b' for the teacher"
    assert_one_line_error(code, err, want)
    assert err.strip() == want and not (out / "metrics.jsonl").exists()


def test_a_server_without_the_tokenizer_endpoints_is_refused_unless_trusted(
    models, prompts_file, proxy, tmp_path, capsys
):
    proxy.tokenizer_endpoints = False
    args = distill_args(models, prompts_file, tmp_path / "run", 1, "run.preflight=false")
    args[args.index("--teacher") + 1] = proxy.url
    code, err = call(args, capsys)
    assert_one_line_error(
        code, err, f"teacher {proxy.url}: cannot check its tokenizer against the student's",
        "neither POST /detokenize (HTTP 404: Not Found) nor POST /tokenize (HTTP 404",
        "would train silently", "remote.trust_tokenizer=true",
    )  # fmt: skip
    code, err = call(args + ["remote.trust_tokenizer=true"], capsys)
    assert code == 0, err
    assert f"opd: WARNING: teacher {proxy.url}: its tokenizer is NOT checked" in err
    assert (tmp_path / "run" / "metrics.jsonl").is_file()


# -- a server that misbehaves on purpose --------------------------------------------------


class FaultyProxy:
    """Forwards to a real teacher server, except that each scoring request first takes the next
    fault from `faults`: "500", "slow", "drop", "badjson", "wrongcount" (None = behave)."""

    def __init__(self, upstream: str, slow_s: float):
        self.upstream, self.slow_s, self.faults = upstream, slow_s, []
        self.requests = 0
        self.tokenizer_endpoints = True  # False: /tokenize and /detokenize answer 404
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                r = httpx.get(proxy.upstream + self.path.removeprefix("/v1"))
                self._send(r.status_code, r.content)

            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                if self.path in ("/tokenize", "/detokenize"):  # the tokenizer check: no faults
                    if not proxy.tokenizer_endpoints:
                        return self._send(404, b'{"detail": "Not Found"}')
                    r = httpx.post(proxy.upstream.removesuffix("/v1") + self.path, content=body)
                    return self._send(r.status_code, r.content)
                proxy.requests += 1
                fault = proxy.faults.pop(0) if proxy.faults else None
                if fault == "500":
                    return self._send(500, b'{"error": {"message": "engine died"}}')
                if fault == "drop":
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return None
                if fault == "slow":
                    time.sleep(proxy.slow_s)
                r = httpx.post(proxy.upstream + "/completions", content=body, timeout=30)
                content = r.content
                if fault == "badjson":
                    content = content[: len(content) // 2]
                elif fault == "wrongcount":
                    data = json.loads(content)
                    data["choices"][0]["prompt_logprobs"] = data["choices"][0]["prompt_logprobs"][
                        :-1
                    ]
                    content = json.dumps(data).encode()
                return self._send(r.status_code, content)

            def _send(self, code, content):
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(content)))
                self.end_headers()
                self.wfile.write(content)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def proxy(server):
    p = FaultyProxy(server, slow_s=4.0)
    yield p
    p.close()


def test_every_fault_is_retried_and_the_scores_are_right(proxy, teacher, batch):
    model, tok = teacher
    served = ServedTeacher(proxy.url, timeout=2.0, retries=8, backoff=0.01, batch_rows=64)
    proxy.faults = ["500", "slow", "drop", "badjson", "wrongcount"]
    lp = served.score(batch)
    assert proxy.requests >= 6 and not proxy.faults  # (more if a loaded machine is slow)
    torch.testing.assert_close(lp, LocalTeacher(model, len(tok)).score(batch), atol=1e-5, rtol=0)
    proxy.faults = ["500"] * 3
    with pytest.raises(OpdError, match=r"failed 3 times; last: HTTP 500: engine died"):
        ServedTeacher(proxy.url, retries=2, backoff=0.01, batch_rows=64).score(batch)
    served.close()


def test_run_stops_with_one_line_and_resumes_after_the_server_recovers(
    models, prompts_file, proxy, tmp_path
):
    out = tmp_path / "run"
    args = distill_args(models, prompts_file, out, 4, "--save-every", "2")
    args[args.index("--teacher") + 1] = proxy.url
    args += ["remote.retries=2", "remote.backoff=0.01", "run.preflight=false"]
    proxy.faults = [None, None, None] + ["500"] * 3  # steps 1-3 scored, step 4's request fails
    r = run_cli(args)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert lines[-1].startswith("opd: error: teacher ") and "failed 3 times" in lines[-1]
    assert "Traceback" not in r.stderr
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_000002"]
    r = run_cli(args)  # the server behaves again
    assert r.returncode == 0, r.stderr
    assert "resuming from" in r.stdout and (out / "final").is_dir()
    steps = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps[-1] == 4


def test_bad_urls_and_unreachable_servers_are_one_line_errors():
    with pytest.raises(OpdError, match="is not valid"):
        ServedTeacher("http://host:80a/v1")
    with pytest.raises(OpdError, match=r"failed 1 times; last: connection failed"):
        ServedTeacher(f"http://127.0.0.1:{free_port()}/v1", retries=0)


def test_config_rejects_bad_remote_and_loss_values():
    base = {"model.student": "s", "model.teacher": "t", "data.prompts": "p", "run.out": "o"}
    for key, value, words in [
        ("objective.loss", "kl", "objective.loss='kl'"),
        ("remote.api", "tgi", "remote.api='tgi'"),
        ("remote.retries", "-1", "remote.retries=-1"),
        ("objective.jsd_beta", "2", "objective.jsd_beta=2.0"),
    ]:
        with pytest.raises(OpdError, match=words):
            build_config(None, base | {key: value}, [])
    with pytest.raises(OpdError, match="sampling.group_size=1: must be >= 2"):
        build_config(None, base | {"objective.kind": "rl", "sampling.group_size": "1"}, [])


def test_scorer_with_k_above_the_vocabulary_returns_all_of_it(teacher):
    model, tok = teacher
    ((entries, _),) = TeacherScorer(model, tok).score([[1, 5, 6]], [len(tok) + 10])
    assert entries[0] is None and all(len(e) == len(tok) for e in entries[1:])


class FakeSGLang:
    """SGLang's native /generate as its docs describe it, answered by the in-process scorer:
    `meta_info.input_token_logprobs` = [[logprob, id, text], ...] with a null logprob first,
    `input_top_logprobs` = per position a list of [logprob, id, text] (null first)."""

    def __init__(self, scorer):
        fake = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                fake.paths.append(self.path)
                rows, k = body["input_ids"], body["top_logprobs_num"]
                out = []
                for entries, _ in scorer.score(rows, [k] * len(rows)):
                    tokens = [[None, rows[len(out)][0], None]]
                    tops = [None]
                    for j in range(1, len(entries)):
                        actual = str(rows[len(out)][j])
                        tokens.append([entries[j][actual]["logprob"], int(actual), None])
                        ranked = sorted(entries[j].items(), key=lambda kv: kv[1]["rank"])[:k]
                        tops.append([[v["logprob"], int(t), None] for t, v in ranked])
                    meta = {"input_token_logprobs": tokens, "input_top_logprobs": tops}
                    out.append({"text": "", "meta_info": meta})
                content = json.dumps(out).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(content)))
                self.end_headers()
                self.wfile.write(content)

        self.paths = []
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()


def test_sglang_native_api(teacher, batch):
    model, tok = teacher
    fake = FakeSGLang(TeacherScorer(model, tok))
    try:
        served = ServedTeacher(fake.url, api="sglang", batch_rows=5)
        local = LocalTeacher(model, len(tok))
        torch.testing.assert_close(served.score(batch), local.score(batch), atol=1e-5, rtol=0)
        assert_same_topk(batch, served.score_topk(batch, 3), local.score_topk(batch, 3), 1e-5)
        assert set(fake.paths) == {"/generate"}
        served.close()
    finally:
        fake.httpd.shutdown()


# -- stopping, Retry-After and jitter, against a fake transport ---------------------------


def _rows(n: int):
    """n one-token-prompt rows whose first token is the row's number (so a fake can tell them
    apart)."""
    from opd.types import Rollouts

    tokens = torch.tensor([[b + 1, 5, 6] for b in range(n)])
    return Rollouts(
        tokens_BT=tokens,
        attention_mask_BT=torch.ones_like(tokens),
        completion_mask_BT=torch.tensor([[False, True, True]] * n),
        prompt_len=1,
        sampler_lp_BT=torch.zeros(n, 3),
        prompt_index_B=torch.arange(n),
    )


def _answer(request: httpx.Request) -> httpx.Response:
    """A vLLM /completions answer: log p = -1 for every token."""
    rows = json.loads(request.content)["prompt"]
    choices = [
        {"index": i, "prompt_logprobs": [None] + [{str(t): {"logprob": -1.0}} for t in ids[1:]]}
        for i, ids in enumerate(rows)
    ]
    return httpx.Response(200, json={"choices": choices})


def _fake(handler, **kw) -> ServedTeacher:
    return ServedTeacher("http://fake/v1", model="m", transport=httpx.MockTransport(handler), **kw)


def test_a_request_that_fails_for_good_stops_its_siblings_at_once():
    hits = []

    def handler(request):
        hits.append(time.monotonic())
        if json.loads(request.content)["prompt"][0][0] == 4:  # the last row's request
            return httpx.Response(400, json={"error": {"message": "bad row"}})
        time.sleep(0.3)  # the siblings are slow and never recover
        return httpx.Response(503, json={"error": {"message": "overloaded"}})

    served = _fake(handler, retries=3, backoff=0.5, concurrency=4, batch_rows=1)
    start = time.monotonic()
    with pytest.raises(OpdError, match=r"^teacher http://fake/v1: HTTP 400: bad row$"):
        served.score(_rows(4))
    assert time.monotonic() - start < 0.25  # neither the slow siblings nor their backoff
    count = len(hits)
    time.sleep(1.2)  # past the in-flight siblings and their first backoff
    assert len(hits) == count  # nobody retried after the call gave up
    served.close()


def test_retry_after_is_obeyed_and_capped():
    from datetime import datetime, timedelta, timezone
    from email.utils import format_datetime

    hits, answers = [], []

    def handler(request):
        hits.append(time.monotonic())
        return answers.pop(0)() if answers else _answer(request)

    def in_2s():  # an HTTP date has whole seconds: 1-2 s from now
        when = datetime.now(timezone.utc) + timedelta(seconds=2)
        return httpx.Response(503, headers={"Retry-After": format_datetime(when, usegmt=True)})

    answers[:] = [lambda: httpx.Response(429, headers={"Retry-After": "1"}), in_2s]
    served = _fake(handler, retries=3, backoff=0.001, timeout=5.0)
    assert served.score(_rows(1)).tolist() == [[0.0, -1.0, -1.0]]
    gaps = [b - a for a, b in zip(hits, hits[1:], strict=False)]
    assert 0.95 <= gaps[0] < 1.5 and 0.95 <= gaps[1] < 2.5, gaps
    served.close()

    hits.clear()
    answers[:] = [lambda: httpx.Response(503, headers={"Retry-After": "3600"})]
    served = _fake(handler, retries=1, backoff=0.001, timeout=0.4)  # an hour, capped at 0.4 s
    served.score(_rows(1))
    assert 0.35 <= hits[1] - hits[0] < 1.0, hits
    served.close()


def test_backoff_is_jittered_within_bounds():
    import random

    hits = []

    def handler(request):
        hits.append(time.monotonic())
        return httpx.Response(503, text="busy")

    served = _fake(handler, retries=4, backoff=0.1)
    served.rng = random.Random(0)  # draws well below the full backoff for this seed
    with pytest.raises(OpdError, match=r"failed 5 times; last: HTTP 503: busy"):
        served.score(_rows(1))
    gaps = [b - a for a, b in zip(hits, hits[1:], strict=False)]
    full = [0.1 * 2**i for i in range(4)]
    assert all(f / 2 - 0.005 <= g < f + 0.15 for g, f in zip(gaps, full, strict=True)), gaps
    assert min(g / f for g, f in zip(gaps, full, strict=True)) < 0.8, gaps  # not the plain backoff
    served.close()
