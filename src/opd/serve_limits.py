"""What `opd serve-teacher` accepts before any work: the address it listens on, the size of a
request body, and the shape of its JSON.

- `bind`: the listening socket, made before the model is loaded and before "serving" is printed;
  a port in use or a host that does not resolve is a one-line OpdError.
- `read_json`: a request body of at most `max_body` bytes (Content-Length checked before reading,
  a chunked body counted while it streams) -> the JSON object, or (status, one-line reason).
- `parse_json`: bytes -> the JSON object, or (400, reason); nesting depth and number length are
  measured on the bytes before `json.loads` runs, so no input can recurse or parse for long.
- `check_completions`, `check_vocab_logprobs`, `check_tokenize`, `check_detokenize`: a parsed
  body -> None when the server can answer it, else (status, reason).
Every reason is one line; no input raises.
"""

from __future__ import annotations

import errno
import json
import re
import socket
from array import array
from itertools import accumulate

from opd.errors import OpdError

MAX_DEPTH = 32  # JSON nesting; a scoring request needs 3
MAX_DIGITS = 100  # digits in one JSON number; token ids and k need a handful
MAX_MESSAGE = 300  # characters of an error message

# A JSON string, escapes included; an unterminated one runs to the end, so that no match is
# ever abandoned half-way (which would make the scan quadratic).
_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*(?:"|\\?\Z)', re.DOTALL)
_LONG_NUMBER = re.compile(rb"[0-9]{%d}" % (MAX_DIGITS + 1))
_NOT_BRACKET = bytes(b for b in range(256) if b not in b"[]{}")
_SIGN = bytes.maketrans(b"[{]}", b"\x01\x01\xff\xff")  # as signed bytes: +1 open, -1 close


def default_max_body(max_rows: int, max_len: int, vocab: int) -> int:
    """Bytes of the largest request the other limits allow: max_rows rows of max_len ids, each
    id written as its digits and ", ", plus 1 MiB for the rest (capped context: 128k)."""
    per_token = len(str(max(vocab - 1, 0))) + 2
    return max_rows * min(max_len, 131072) * per_token + 2**20


def one_line(message, limit: int = MAX_MESSAGE, quote: bool = False) -> str:
    """A message (or, quoted, a value's repr) as one line of valid Unicode of at most `limit`
    characters: no newlines, no lone surrogates."""
    try:
        text = " ".join((repr(message) if quote else str(message)).split())
    except ValueError:  # an int past sys.get_int_max_str_digits(), maybe inside a list
        text = "(a number too long to print)"
    text = text.encode("utf-8", "replace").decode("utf-8")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _short(value, quote: bool = False) -> str:
    """A value quoted in a message."""
    return one_line(value, 60, quote)


def json_depth(data: bytes) -> int:
    """The deepest nesting of [] and {} in JSON bytes, brackets inside strings not counted.

    No recursion, and C loops only (regex, translate, accumulate): linear in the body."""
    brackets = _STRING.sub(b'""', data).translate(None, _NOT_BRACKET)
    return max(accumulate(array("b", brackets.translate(_SIGN))), default=0)


def parse_json(data: bytes, max_depth: int = MAX_DEPTH):
    """The JSON object in `data`, or (400, why not)."""
    if not data.strip():
        return 400, "the request body is empty; send a JSON object"
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return 400, "the request body is not UTF-8 JSON"
    skeleton = _STRING.sub(b'""', data)  # numbers and brackets inside strings do not count
    if _LONG_NUMBER.search(skeleton):
        return 400, f"the request body holds a number with more than {MAX_DIGITS} digits"
    depth = json_depth(skeleton)  # (the strings are empty by now)
    if depth > max_depth:
        return 400, f"the request body's JSON is nested {depth} deep; at most {max_depth}"
    try:
        body = json.loads(text, parse_constant=_no_constant)
    except (ValueError, RecursionError) as e:
        return 400, one_line(f"the request body is not JSON ({e})")
    return body if isinstance(body, dict) else (400, "the request body must be a JSON object")


def _no_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


async def read_json(request, max_body: int):
    """The request's JSON object, or (status, why not): 413 past `max_body` bytes."""
    from starlette.requests import ClientDisconnect

    declared = request.headers.get("content-length")
    if declared is not None and declared.strip().isdigit() and int(declared) > max_body:
        return 413, too_large(f"{int(declared)} bytes", max_body)
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > max_body:
                return 413, too_large(f"over {max_body} bytes", max_body)
            chunks.append(chunk)
    except ClientDisconnect:
        return 400, "the client disconnected before the body was read"
    return parse_json(b"".join(chunks))


def too_large(size: str, max_body: int) -> str:
    return f"the request body is {size}; this server takes at most {max_body} (--max-body)"


def _refuse_body_or_model(body, name: str, null_model: bool):
    """(status, reason) when the body is not a JSON object (read_json's own refusal passes
    through) or names another model; None otherwise. A missing "model" is this server's; an
    explicit null is too where `null_model`."""
    if not isinstance(body, dict):
        return body if isinstance(body, tuple) else (400, "the request body must be a JSON object")
    model = body.get("model", name)
    if model != name and not (null_model and model is None):
        return 404, f"The model `{_short(model)}` does not exist (this server has `{name}`)."
    return None


def check_tokenize(body, name):
    """(status, reason) for a /tokenize request this server cannot answer, else None."""
    if refused := _refuse_body_or_model(body, name, null_model=True):
        return refused
    if "messages" in body:
        return 400, "this server tokenizes a prompt, not chat messages"
    if not isinstance(body.get("prompt"), str):
        return 400, "prompt must be a string"
    try:
        body["prompt"].encode("utf-8")
    except UnicodeEncodeError:
        return 400, "prompt is not valid Unicode (it holds a lone surrogate)"
    if not isinstance(body.get("add_special_tokens", True), bool):
        return 400, "add_special_tokens must be true or false"
    return None


def check_detokenize(body, name, vocab: int):
    """(status, reason) for a /detokenize request this server cannot answer, else None."""
    if refused := _refuse_body_or_model(body, name, null_model=True):
        return refused
    tokens = body.get("tokens")
    if not isinstance(tokens, list) or not all(
        isinstance(t, int) and not isinstance(t, bool) for t in tokens
    ):
        return 400, "tokens must be a list of token ids"
    bad = [t for t in tokens if not 0 <= t < vocab]
    if bad:
        return 400, f"token id {_short(bad[0])} is outside the vocabulary [0, {vocab})"
    return None


def check_completions(body, name, scorer, max_logprobs, max_rows):
    """(status, reason) for a request this server cannot answer, else None."""
    if refused := _refuse_body_or_model(body, name, null_model=False):
        return refused
    if problem := check_rows(body.get("prompt"), scorer, max_rows):
        return problem
    k = body.get("prompt_logprobs")
    if k is None:
        return (
            400,
            "this server only scores prompts: set prompt_logprobs (0 = the actual tokens only)",
        )
    if not isinstance(k, int) or isinstance(k, bool) or k < 0:
        return 400, f"prompt_logprobs={_short(k, quote=True)}: must be an integer >= 0"
    if k > max_logprobs:
        return 400, f"prompt_logprobs={k} exceeds this server's --max-logprobs={max_logprobs}"
    if body.get("max_tokens", 1) not in (0, 1):
        return (
            400,
            f"max_tokens={_short(body.get('max_tokens'), quote=True)}: this server scores prompts; use 0 or 1",
        )
    if body.get("stream"):
        return 400, "stream is not supported"
    return None


def check_rows(prompt, scorer, max_rows):
    """(status, reason) unless `prompt` is token ids (a list, or a list of lists) the model can
    read: in its vocabulary and context, at most max_rows rows."""
    if isinstance(prompt, str) or (
        isinstance(prompt, list) and prompt and isinstance(prompt[0], str)
    ):
        return (
            400,
            "prompt must be token ids (a list of ints, or a list of lists): text is not tokenised here",
        )
    if not isinstance(prompt, list) or not prompt:
        return 400, "prompt must be a non-empty list of token ids, or a list of such lists"
    rows = [prompt] if isinstance(prompt[0], int) else prompt
    if len(rows) > max_rows:
        return 400, f"{len(rows)} sequences in one request; this server takes at most {max_rows}"
    for i, r in enumerate(rows):
        if not isinstance(r, list) or not r:
            return 400, f"prompt[{i}] must be a non-empty list of token ids"
        if not all(isinstance(t, int) and not isinstance(t, bool) for t in r):
            return 400, f"prompt[{i}] holds a value that is not an integer token id"
        if len(r) > scorer.max_len:
            return 400, f"prompt[{i}] has {len(r)} tokens; the model's context is {scorer.max_len}"
        bad = [t for t in r if not 0 <= t < scorer.vocab]
        if bad:
            return (
                400,
                f"prompt[{i}] holds token id {_short(bad[0])} outside the vocabulary [0, {scorer.vocab})",
            )
    return None


def check_vocab_logprobs(body, name, scorer, max_rows, max_floats):
    """/v1/opd/vocab_logprobs: rows of ids, the positions j (1 <= j <= len) whose next-token
    distribution p(. | x_<j) is wanted, and optionally the ids wanted at each (else the whole
    vocabulary); at most max_floats log-probs in the answer."""
    if refused := _refuse_body_or_model(body, name, null_model=False):
        return refused
    rows = body.get("prompt")
    if isinstance(rows, list) and rows and isinstance(rows[0], int):
        return 400, "prompt must be a list of token-id lists (one per sequence)"
    if problem := check_rows(rows, scorer, max_rows):
        return problem
    positions, wanted = body.get("positions"), body.get("token_ids")
    if not isinstance(positions, list) or len(positions) != len(rows):
        return 400, "positions must be a list with one list of positions per sequence"
    if wanted is not None and (not isinstance(wanted, list) or len(wanted) != len(rows)):
        return 400, "token_ids must be null (the whole vocabulary) or one list per sequence"
    n, asked = 0, []
    for i, (row, pos) in enumerate(zip(rows, positions, strict=True)):
        if not isinstance(pos, list) or not all(
            isinstance(j, int) and not isinstance(j, bool) and 1 <= j <= len(row) for j in pos
        ):
            return (
                400,
                f"positions[{i}] must be integers in [1, {len(row)}] (the sequence's length)",
            )
        if wanted is None:
            n += len(pos) * scorer.vocab
            continue
        ids = wanted[i]
        if not isinstance(ids, list) or len(ids) != len(pos):
            return 400, f"token_ids[{i}] must hold one list of ids per position"
        asked = asked or ids[:1]  # the request's first position sets how many ids each asks
        for got in ids:
            if not isinstance(got, list) or not all(
                isinstance(t, int) and not isinstance(t, bool) and 0 <= t < scorer.vocab
                for t in got
            ):
                return 400, f"token_ids[{i}] holds a value that is not an id in [0, {scorer.vocab})"
            if len(got) != len(asked[0]):
                return 400, f"token_ids[{i}]: every position must ask for as many ids"
            n += len(got)
    if n > max_floats:
        return (
            413,
            f"{n} log-probs asked for in one request, more than {max_floats}; send fewer rows",
        )
    return None


def bind(host: str, port: int) -> socket.socket:
    """A socket bound to (host, port), as uvicorn would bind it, or a one-line OpdError."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        infos = socket.getaddrinfo(
            host or None, port, family, socket.SOCK_STREAM, 0, socket.AI_PASSIVE
        )
    except (socket.gaierror, ValueError) as e:  # ValueError: a NUL, or not IDNA-encodable
        why = getattr(e, "strerror", None) or e
        raise OpdError(f"--host {host!r} is not an address this machine can use ({why})") from None
    fam, kind, proto, _, address = infos[0]
    sock = socket.socket(fam, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            why = f"port {port} on {host} is in use (another server?); choose another --port"
        elif e.errno == errno.EADDRNOTAVAIL:
            why = f"--host {host!r} is not an address of this machine"
        elif e.errno == errno.EACCES:
            why = f"port {port} on {host}: permission denied (ports below 1024 need privileges)"
        else:
            why = f"cannot listen on {host}:{port} ({e.strerror or e})"
        raise OpdError(why) from None
    return sock
