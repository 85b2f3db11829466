"""`opd serve-teacher` against bad input: a body over --max-body (413, before it is read), JSON
nested too deep (400, no recursion), a full queue (429 + Retry-After, which the client honours),
a port in use or a bad host (one line, before "serving"), and a fuzz over the request parser:
always a valid answer or a 4xx with one line, never a 500 or an exception."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from opd import tiny
from opd.cli import main
from opd.errors import OpdError
from opd.serve import TeacherScorer, create_app
from opd.serve_limits import (
    MAX_DEPTH,
    bind,
    check_completions,
    check_detokenize,
    check_tokenize,
    default_max_body,
    json_depth,
    parse_json,
    read_json,
)
from opd.teachers.local import LocalTeacher
from opd.teachers.served import ServedTeacher
from opd.types import Rollouts

from .test_served import free_port, serving

OK = {"model": "teacher", "prompt": [[1, 5, 6]], "max_tokens": 1, "prompt_logprobs": 2}


@pytest.fixture(scope="module")
def scorer(tok):
    """An untrained tiny teacher (context 64): scoring is milliseconds."""
    model = tiny.tiny_model(tok, hidden=32, layers=1, max_positions=64, seed=0)
    return TeacherScorer(model, tok)


def assert_one_line(response: httpx.Response, code: int, *words: str) -> str:
    assert response.status_code == code, response.text
    message = response.json()["error"]["message"]
    assert isinstance(message, str) and "\n" not in message and len(message) <= 300, message
    for w in words:
        assert w in message, (w, message)
    return message


def local_port(response: httpx.Response) -> int:
    """The client-side port of the connection that carried the response."""
    return response.extensions["network_stream"].get_extra_info("client_addr")[1]


# ---- the parser, without a server ---------------------------------------------------------


def test_depth_and_number_length_are_measured_on_the_bytes_before_parsing():
    deep = b"[" * 200_000 + b"]" * 200_000  # json.loads would raise RecursionError
    start = time.monotonic()
    assert parse_json(deep) == (400, "the request body's JSON is nested 200000 deep; at most 32")
    assert time.monotonic() - start < 1
    at_limit = b'{"a": ' + b"[" * (MAX_DEPTH - 1) + b"]" * (MAX_DEPTH - 1) + b"}"
    assert isinstance(parse_json(at_limit), dict)
    over = b'{"a": ' + b"[" * MAX_DEPTH + b"]" * MAX_DEPTH + b"}"
    assert parse_json(over)[0] == 400 and "nested 33 deep" in parse_json(over)[1]
    # brackets, quotes and digits inside strings do not count
    text = {"prompt": '\\"[[[{{' * 1000 + "9" * 500}
    assert isinstance(parse_json(json.dumps(text).encode()), dict)
    assert json_depth(b'{"a": "\\"[[[", "b": [[]]}') == 3
    assert json_depth(b'["unterminated [[[[') == 1

    assert parse_json(b'{"k": ' + b"7" * 5000 + b"}")[1].endswith("more than 100 digits")
    for body, words in [
        (b"", "empty"),
        (b'{"k": NaN}', "not JSON"),
        (b'{"k": Infinity}', "not JSON"),
        (b'{"k": "\xff"}', "not UTF-8"),
        (b"[1, 2]", "must be a JSON object"),
        (b'{"k": 1', "not JSON"),
        (b'\\"' * 100_000, "not JSON"),  # escapes outside strings: still linear
    ]:
        code, message = parse_json(body)
        assert code == 400 and words in message, (body[:20], message)


def test_default_body_limit_fits_the_largest_request_the_other_limits_allow(scorer):
    limit = default_max_body(64, scorer.max_len, scorer.vocab)
    biggest = {**OK, "prompt": [[scorer.vocab - 1] * scorer.max_len] * 64}
    assert len(json.dumps(biggest).encode()) <= limit < 2 * len(json.dumps(biggest)) + 2**20
    assert default_max_body(256, 2**31, 151936) == 256 * 131072 * 8 + 2**20  # context capped


def _request(headers: dict, chunks: list[bytes], received: list[int]):
    from starlette.requests import Request

    async def receive():
        if not chunks:
            raise AssertionError("read past the end")
        received.append(len(chunks[0]))
        return {"type": "http.request", "body": chunks.pop(0), "more_body": bool(chunks)}

    raw = [(k.lower().encode(), v.encode()) for k, v in headers.items()]
    return Request({"type": "http", "method": "POST", "headers": raw}, receive)


def test_content_length_is_checked_before_reading_and_a_stream_is_counted():
    received: list[int] = []
    big = _request({"content-length": str(10**9)}, [b"x" * 10] * 3, received)
    code, message = asyncio.run(read_json(big, 1000))
    assert (code, received) == (413, [])  # nothing read
    assert message == (
        "the request body is 1000000000 bytes; this server takes at most 1000 (--max-body)"
    )

    chunked = _request({"transfer-encoding": "chunked"}, [b"x" * 400] * 100, received)
    code, message = asyncio.run(read_json(chunked, 1000))
    assert code == 413 and "over 1000 bytes" in message
    assert received == [400, 400, 400]  # stopped at the chunk that crossed the limit

    received.clear()
    body = json.dumps(OK).encode()
    fits = _request({}, [body[:10], body[10:]], received)
    assert asyncio.run(read_json(fits, len(body))) == OK


# ---- through uvicorn: status codes and keep-alive ----------------------------------------


def test_bad_bodies_are_4xx_and_the_connection_stays_open(scorer):
    body = json.dumps(OK).encode()
    app = create_app(scorer, max_logprobs=5, max_rows=8, max_body=4000)
    with serving(app) as url, httpx.Client() as client:
        first = client.post(f"{url}/completions", content=body)
        assert first.status_code == 200
        port = local_port(first)
        cases = [
            (b'{"prompt": ' + b"[" * 200_000 + b"]" * 200_000 + b"}", 413, "at most 4000"),
            (b'{"prompt": ' + b"[" * 1000 + b"]" * 1000 + b"}", 400, "nested 1001 deep"),
            (b'{"prompt": [[' + b"1" * 3000 + b"]]}", 400, "more than 100 digits"),
            (b"x" * 4001, 413, "4001 bytes"),
            ("chunked", 413, "over 4000 bytes"),  # no Content-Length: counted as it streams
            (b"\xff\xfe", 400, "not UTF-8"),
            (json.dumps({**OK, "model": "a\nb\ud800" * 200}).encode(), 404, "does not exist"),
        ]
        for content, code, words in cases:
            for path in ("/v1/completions", "/tokenize", "/detokenize"):
                sent = iter([b"{" + b" " * 1000] * 5) if content == "chunked" else content
                r = client.post(url.removesuffix("/v1") + path, content=sent)
                assert_one_line(r, code, words)
                again = client.post(f"{url}/completions", content=body)
                assert again.json()["choices"] == first.json()["choices"]
                assert local_port(again) == port, (path, words)  # the same connection
        lone = json.dumps({"prompt": "a\ud800"}).encode()  # '\\ud800': valid JSON
        surrogate = client.post(url.removesuffix("/v1") + "/tokenize", content=lone)
        assert_one_line(surrogate, 400, "lone surrogate")  # the tokenizer would raise
        assert local_port(client.post(f"{url}/completions", content=body)) == port


# ---- the queue --------------------------------------------------------------------------


def _slow(scorer, seconds: float, started: threading.Event | None = None) -> TeacherScorer:
    slow = TeacherScorer(scorer.model, scorer.tokenizer)
    plain = slow.score

    def score(rows, ks):
        if started is not None:
            started.set()
        time.sleep(seconds)
        return plain(rows, ks)

    slow.score = score
    return slow


class _Counting(httpx.HTTPTransport):
    def __init__(self):
        super().__init__()
        self.codes: list[int] = []

    def handle_request(self, request):
        response = super().handle_request(request)
        self.codes.append(response.status_code)
        return response


def _rollouts(tok, n: int) -> Rollouts:
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(4, len(tok), (n, 9), generator=g)
    tokens[:, 0] = tok.bos_token_id
    return Rollouts(
        tokens_BT=tokens,
        attention_mask_BT=torch.ones_like(tokens),
        completion_mask_BT=torch.arange(9).expand(n, 9) >= 3,
        prompt_len=3,
        sampler_lp_BT=torch.zeros(n, 9),
        prompt_index_B=torch.arange(n),
    )


def test_a_full_queue_answers_429_with_retry_after_and_the_client_gets_every_answer(scorer, tok):
    started = threading.Event()
    app = create_app(_slow(scorer, 0.15, started), max_queue=1)
    with serving(app) as url:
        results: list[httpx.Response] = []

        def post():
            results.append(httpx.post(f"{url}/completions", json=OK, timeout=30))

        # The first request is being scored before the others arrive, so the queue's one place
        # is free for one of them (else which request counts as waiting is a race).
        threads = [threading.Thread(target=post) for _ in range(6)]
        threads[0].start()
        assert started.wait(30)
        for t in threads[1:]:
            t.start()
        for t in threads:
            t.join()
        codes = sorted(r.status_code for r in results)
        assert codes.count(200) >= 2 and codes.count(429) >= 1, codes  # 1 scored, 1 waiting
        for r in results:
            if r.status_code == 429:
                assert_one_line(r, 429, "--max-queue=1")
                assert 1 <= int(r.headers["Retry-After"]) <= 60

        # 40 requests, 4 in flight: fresh ones overtake those told to come back, so one request
        # can be refused more often than `retries` (the old client failed here 3 times in 3)
        batch = _rollouts(tok, 40)
        transport = _Counting()
        served = ServedTeacher(url, concurrency=4, batch_rows=1, transport=transport)
        got = served.score(batch)  # the default retries
        served.close()
        assert 429 in transport.codes, transport.codes  # the queue did refuse some
        want = LocalTeacher(scorer.model, len(tok)).score(batch)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_the_client_waits_out_429s_without_using_retries_until_its_time_budget():
    from .test_served import _answer, _fake, _rows

    busy = [6]  # six 429s, then answers: more than the 1 retry allowed

    def handler(request):
        if busy[0]:
            busy[0] -= 1
            return httpx.Response(429, headers={"Retry-After": "0"}, json={"error": "busy"})
        return _answer(request)

    served = _fake(handler, retries=1, backoff=0.01, timeout=5.0)
    assert served.score(_rows(2)).tolist() == [[0.0, -1.0, -1.0]] * 2
    assert busy == [0]
    served.close()

    calls = []

    def always_busy(request):
        calls.append(time.monotonic())
        return httpx.Response(429, headers={"Retry-After": "0"}, json={"error": "busy"})

    served = _fake(always_busy, retries=1, backoff=0.01, timeout=0.2)  # budget 2 x 0.2 s
    with pytest.raises(OpdError, match=r"scoring failed 2 times; last: HTTP 429: busy$"):
        served.score(_rows(1))
    assert 0.4 <= calls[-1] - calls[0] < 1.0 and len(calls) > 5, calls
    served.close()


# ---- the address, before "serving" ------------------------------------------------------


def test_bind_refuses_a_port_in_use_and_a_bad_host():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(OpdError, match=f"^port {port} on 127.0.0.1 is in use"):
            bind("127.0.0.1", port)
    with pytest.raises(OpdError, match="^--host 'no-such-host.invalid' is not an address"):
        bind("no-such-host.invalid", 8000)
    with pytest.raises(OpdError, match="^--host '192.0.2.1' is not an address of this machine"):
        bind("192.0.2.1", 8000)  # TEST-NET-1: resolves, but is nobody's here
    sock = bind("127.0.0.1", 0)
    assert sock.getsockname()[0] == "127.0.0.1"
    sock.close()


@pytest.fixture(scope="module")
def model_dir(tok, scorer, tmp_path_factory):
    return str(tiny.save(scorer.model, tok, tmp_path_factory.mktemp("served") / "teacher"))


def test_serve_teacher_checks_the_address_before_saying_serving(model_dir, capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        for argv, words in [
            (["--port", port], f"port {port} on 127.0.0.1 is in use"),
            (["--host", "no-such-host.invalid", "--api-key", "k"], "is not an address"),
            (["--max-queue", "0"], "--max-queue must be >= 1"),
        ]:
            with pytest.raises(SystemExit) as exc:
                main(["serve-teacher", model_dir, *argv])
            out, err = capsys.readouterr()
            assert exc.value.code == 2 and "serving" not in out, (out, err)
            lines = err.strip().splitlines()
            assert len(lines) == 1 and lines[0].startswith("opd: error: ") and words in err, err


def test_serve_teacher_serves_on_the_socket_it_checked(model_dir):
    port = free_port()
    cmd = [sys.executable, "-m", "opd", "serve-teacher", model_dir, "--port", str(port)]
    proc = subprocess.Popen(
        [*cmd, "--max-body", "5000", "--max-queue", "3"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = proc.stdout.readline()
        assert line.startswith(f"serving {model_dir} as 'teacher' on http://127.0.0.1:{port}/v1")
        assert "(bodies up to 5000 bytes, up to 3 requests queued)" in line
        r = httpx.post(f"http://127.0.0.1:{port}/tokenize", content=b"{" * 5001)
        assert_one_line(r, 413, "at most 5000")
        r = httpx.post(f"http://127.0.0.1:{port}/v1/completions", json=OK)
        assert r.status_code == 200 and len(r.json()["choices"][0]["prompt_logprobs"]) == 3
    finally:
        proc.terminate()
        proc.wait(30)


# ---- fuzz -------------------------------------------------------------------------------

# any character, lone surrogates often (hypothesis's own text() draws them about never)
_chars = st.characters() | st.integers(0xD800, 0xDFFF).map(chr)


def _text(max_size: int):
    return st.lists(_chars, max_size=max_size).map("".join)


_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**80), max_value=10**80),
    st.integers(min_value=-3, max_value=80),
    st.floats(allow_nan=False),
    _text(20),
)
_values = st.recursive(
    _scalars,
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=30,
)
_ids = st.lists(st.integers(-2, 80), min_size=1, max_size=6)
_model = st.sampled_from(["teacher", "other"]) | _values
# Nearly valid requests for each endpoint (each key sometimes left out or of another type), and
# any mix of the fields.
_completions = st.fixed_dictionaries(
    {
        "prompt": _ids | st.lists(_ids, min_size=1, max_size=3),
        "prompt_logprobs": st.integers(-1, 7),
    },
    optional={"model": _model, "max_tokens": st.sampled_from([0, 1, 2]) | _values},
)
_tokenize = st.fixed_dictionaries(
    {"prompt": _text(12)},
    optional={"model": _model, "add_special_tokens": st.booleans() | _values},
)
_detokenize = st.fixed_dictionaries({"tokens": _ids}, optional={"model": _model})
_requests = st.fixed_dictionaries(
    {},
    optional={
        "model": st.sampled_from(["teacher", "other", None]) | _values,
        "prompt": st.lists(st.integers(-2, 80), max_size=6)
        | st.lists(st.lists(st.integers(-2, 80), max_size=6), max_size=3)
        | _text(10)
        | _values,
        "tokens": st.lists(st.integers(-2, 80), max_size=6) | _values,
        "prompt_logprobs": st.integers(-1, 7) | _values,
        "max_tokens": st.sampled_from([0, 1, 2]) | _values,
        "add_special_tokens": st.booleans() | _values,
        "return_token_strs": _values,
        "stream": _values,
        "messages": _values,
    },
)


def _encode(value, ascii_only: bool) -> bytes:
    return json.dumps(value, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass")


_bodies = st.one_of(
    st.binary(max_size=200),
    _text(50).map(lambda s: s.encode("utf-8", "surrogatepass")),
    st.builds(_encode, _values, st.booleans()),
    st.builds(_encode, _requests, st.booleans()),
    st.builds(_encode, _completions | _tokenize | _detokenize, st.booleans()),
    st.integers(1, 3000).map(lambda n: b'{"prompt": ' + b"[" * n + b"]" * n + b"}"),
    st.integers(90, 6000).map(lambda n: b'{"prompt": [[' + b"9" * n + b"]]}"),
)
_paths = ["/v1/completions", "/tokenize", "/detokenize"]
# (path, body): half any body to any endpoint, half a nearly valid body for its own endpoint
_calls = st.one_of(
    st.tuples(st.sampled_from(_paths), _bodies),
    *[
        st.tuples(st.just(path), st.builds(_encode, shape, st.booleans()))
        for path, shape in zip(_paths, (_completions, _tokenize, _detokenize), strict=True)
    ],
)


def _assert_reason(answer):
    if answer is not None:
        code, message = answer
        assert 400 <= code < 500 and isinstance(message, str) and "\n" not in message, answer


def _check_all(body, scorer):
    for answer in (
        check_completions(body, "teacher", scorer, 5, 4),
        check_tokenize(body, "teacher"),
        check_detokenize(body, "teacher", scorer.vocab),
    ):
        _assert_reason(answer)


@settings(max_examples=300, deadline=None, database=None)
@given(body=_bodies, direct=_requests | _completions | _tokenize | _detokenize)
def test_fuzz_the_parser_and_the_checks_never_raise(body, direct, scorer):
    parsed = parse_json(body)
    assert isinstance(parsed, dict) or (parsed[0] == 400 and "\n" not in parsed[1])
    _check_all(parsed, scorer)
    _check_all(direct, scorer)  # values JSON cannot carry: tuples, surrogates unescaped, ...


def test_checks_quote_numbers_past_the_int_to_str_limit(scorer):
    huge = 10**5000  # str(huge) raises ValueError
    for body in (
        {"model": huge},
        {"model": [huge]},
        {"prompt": [[1, huge]], "prompt_logprobs": 0},
        {"prompt": [[1, 2]], "prompt_logprobs": -huge},
        {"prompt": [[1, 2]], "prompt_logprobs": 0, "max_tokens": huge},
        {"tokens": [huge]},
    ):
        _check_all(body, scorer)


@pytest.fixture(scope="module")
def client(scorer):
    from starlette.testclient import TestClient

    app = create_app(scorer, max_logprobs=5, max_rows=4, max_body=20_000)
    with TestClient(app) as c:  # raise_server_exceptions: an exception fails the test
        yield c


@settings(
    max_examples=300,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(call=_calls)
def test_fuzz_the_server_answers_every_body_with_a_4xx_or_a_valid_answer(client, scorer, call):
    path, body = call
    r = client.post(path, content=body)
    if r.status_code != 200:
        assert 400 <= r.status_code < 500, (r.status_code, r.text)
        message = r.json()["error"]["message"]
        assert isinstance(message, str) and "\n" not in message and len(message) <= 300
        return
    sent, answer = json.loads(body), r.json()
    if path == "/tokenize":
        assert answer["count"] == len(answer["tokens"])
        assert all(0 <= t < scorer.vocab for t in answer["tokens"])
    elif path == "/detokenize":
        assert answer["prompt"] == scorer.tokenizer.decode(sent["tokens"])
    else:
        prompt = sent["prompt"]
        rows = [prompt] if isinstance(prompt[0], int) else prompt
        assert len(answer["choices"]) == len(rows)
        for choice, row in zip(answer["choices"], rows, strict=True):
            entries = choice["prompt_logprobs"]
            assert len(entries) == len(row) and entries[0] is None
            for j in range(1, len(row)):
                assert entries[j][str(row[j])]["logprob"] <= 0
