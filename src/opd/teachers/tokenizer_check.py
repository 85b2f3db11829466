"""Does a served teacher read the student's token ids as the same tokens? Asked of the server
before step 1 (every run with a served teacher, run.preflight=false or not) and by `opd check`.

The server is asked at its root (vLLM's OpenAI server, `opd serve-teacher`; SGLang when it
answers in the same shape):
- POST /detokenize {"model", "tokens"} -> {"prompt"}: every special and added token, the ids of
  a conversation rendered by the chat template (when there is one) and up to SPREAD ids spread
  over the vocabulary, CHUNK at a time, must decode to the student's text;
- POST /tokenize {"model", "prompt", "add_special_tokens"} -> {"tokens"}: the special tokens'
  texts, the rendered conversation, a sentence (with and without special tokens, so BOS is
  compared) and each chunk's text must encode to the student's ids (merges, normalisation);
- GET /tokenizer_info, when it carries opd's `opd_len` and `opd_sha256` (`opd serve-teacher`):
  the vocabulary size must be the student's; an equal hash is noted.
The first difference is one line naming the token (its id and both texts). A server that offers
neither endpoint (404) cannot be checked: the run stops unless remote.trust_tokenizer=true.
"""

from __future__ import annotations

import hashlib
import json
import sys

from opd.errors import OpdError
from opd.teachers.served import Refused, ServedTeacher

SPREAD = 4096  # vocabulary ids compared, spread evenly over the vocabulary
CHUNK = 128  # ids per /detokenize request (and per text re-encoded through /tokenize)
NOT_OFFERED = (404, 405, 501)
SENTENCE = "Hello, world! 1 + 1 = 2.\n\tÜber café, 你好 🙂"
CHAT = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is 1 + 1?"},
    {"role": "assistant", "content": "2"},
    {"role": "user", "content": "And 2 + 2?"},
]
LEFT_OPEN = "a teacher that reads the student's ids as other tokens would train silently"


class TokenizerCheckFailed(OpdError):
    """The served teacher's tokenizer differs from the student's, or cannot be checked."""


def require_same_tokenizer(teacher: ServedTeacher, tokenizer, trust: bool, log: bool = True):
    """Check before step 1: an OpdError (and the teacher closed) on a difference, or when the
    server cannot be asked and remote.trust_tokenizer is false; the result kept on the teacher
    (teacher.tokenizer_check) for `opd check`."""
    status, detail = check_served_tokenizer(teacher, tokenizer)
    teacher.tokenizer_check = (status, detail)
    if status == "FAIL" or (status == "skipped" and not trust):
        teacher.close()
        if status == "FAIL":
            raise TokenizerCheckFailed(f"teacher {teacher.url}: {detail}")
        raise TokenizerCheckFailed(
            f"teacher {teacher.url}: cannot check its tokenizer against the student's ({detail}); "
            f"{LEFT_OPEN}: serve it with vLLM or `opd serve-teacher`, or set "
            "remote.trust_tokenizer=true if its tokenizer is the student's"
        )
    if log and status == "skipped":
        print(
            f"opd: WARNING: teacher {teacher.url}: its tokenizer is NOT checked ({detail}); "
            f"remote.trust_tokenizer=true: training as if it were the student's ({LEFT_OPEN})",
            file=sys.stderr,
        )
    elif log:
        print(f"opd: teacher {teacher.url}: tokenizer checked: {detail}", file=sys.stderr)
    return status, detail


def check_served_tokenizer(teacher: ServedTeacher, tokenizer) -> tuple[str, str]:
    """("ok", what was compared), ("FAIL", the first difference) or ("skipped", why)."""
    server = _Server(teacher)
    info = server.ask("GET", "/tokenizer_info", None)
    size = info.get("opd_len") if isinstance(info, dict) else None
    if isinstance(size, int) and size != len(tokenizer):
        return "FAIL", (
            f"tokenizers differ: the student has {len(tokenizer)} tokens, the teacher {size}"
        )
    chunks, texts, covers = probe(tokenizer)
    compared, absent = [], []
    for what, check, items in (
        ("/detokenize", _decode_alike, chunks),
        ("/tokenize", _encode_alike, texts),
    ):
        outcome, text = check(server, tokenizer, items)
        if outcome == "differ":
            return "FAIL", f"tokenizers differ: {text}"
        (compared if outcome == "alike" else absent).append(f"POST {what}{text}")
    if not compared:
        return "skipped", "the server offers neither " + " nor ".join(absent)
    n_ids = len({i for c in chunks for i in c})
    said = {
        "POST /detokenize": f"{n_ids} ids decode alike",
        "POST /tokenize": f"{len(texts)} texts encode alike",
    }
    detail = " and ".join(said[w] for w in compared) + f" ({covers})"
    detail += "".join(f"; not compared: the server offers no {w}" for w in absent)
    sha = info.get("opd_sha256") if isinstance(info, dict) else None
    if sha and sha == tokenizer_sha256(tokenizer):
        detail += f"; same tokenizer (sha256 {sha[:12]})"
    return "ok", detail


def probe(tokenizer) -> tuple[list[list[int]], list[tuple[str, bool]], str]:
    """Chunks of ids to decode, (text, add_special_tokens) pairs to encode, and what they
    cover."""
    n = len(tokenizer)
    special = set(tokenizer.all_special_ids) | set(getattr(tokenizer, "added_tokens_decoder", {}))
    special = sorted(i for i in special if 0 <= i < n)
    spread = list(range(n)) if n <= SPREAD else [i * (n - 1) // (SPREAD - 1) for i in range(SPREAD)]
    chat = _chat_text(tokenizer)
    chat_ids = tokenizer.encode(chat, add_special_tokens=False) if chat else []

    def chunked(ids):
        return [ids[s : s + CHUNK] for s in range(0, len(ids), CHUNK)]

    chunks = chunked(special) + chunked(chat_ids) + chunked(spread)
    texts = [("".join(tokenizer.convert_ids_to_tokens(special)), False)] if special else []
    texts += [(SENTENCE, True), (SENTENCE, False)] + ([(chat, False)] if chat else [])
    texts += [(tokenizer.decode(c), False) for c in chunked(spread)]
    covers = f"{len(special)} special tokens, " + ("a chat-template conversation, " if chat else "")
    return chunks, texts, covers + f"{len(spread)} of {n} ids spread over the vocabulary"


def tokenizer_sha256(tokenizer) -> str | None:
    """A hash of the fast tokenizer's full definition and its chat template (None: a slow one)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    h = hashlib.sha256(backend.to_str().encode())
    template = getattr(tokenizer, "chat_template", None)
    h.update(json.dumps(template, sort_keys=True, default=str).encode())
    return h.hexdigest()


class _Server:
    def __init__(self, teacher: ServedTeacher):
        self.teacher = teacher
        self.root = teacher.url.removesuffix("/v1")
        self.model = {"model": teacher.model} if teacher.model else {}

    def ask(self, method: str, path: str, payload: dict | None):
        """The JSON body, or a Refused (a 4xx other than 401/403, or a 501)."""
        body = None if payload is None else self.model | payload
        return self.teacher._call(method, self.root + path, body, f"asking {path}", refusals=True)

    def decode(self, ids: list[int]):
        """The server's text of `ids`, a Refused, or None when the answer has no text."""
        body = self.ask("POST", "/detokenize", {"tokens": ids})
        if isinstance(body, Refused):
            return body
        text = body.get("prompt", body.get("text")) if isinstance(body, dict) else None
        return text if isinstance(text, str) else None

    def encode(self, text: str, special: bool):
        body = self.ask("POST", "/tokenize", {"prompt": text, "add_special_tokens": special})
        if isinstance(body, Refused):
            return body
        ids = body.get("tokens") if isinstance(body, dict) else None
        ok = isinstance(ids, list) and all(isinstance(i, int) for i in ids)
        return ids if ok else None


def _decode_alike(server: _Server, tokenizer, chunks) -> tuple[str, str]:
    """("alike", ""), ("differ", the first difference) or ("absent", the server's answer)."""
    for n, chunk in enumerate(chunks):
        got = server.decode(chunk)
        if n == 0 and _absent(got):
            return "absent", _absence(got)
        if _same_text(tokenizer, got, tokenizer.decode(chunk)):
            continue
        for i in chunk:
            one, mine = server.decode([i]), tokenizer.decode([i])
            if not _same_text(tokenizer, one, mine):
                return (
                    "differ",
                    f"id {i} is {mine!r} for the student, {_shown(one)} for the teacher",
                )
        return "differ", (
            f"ids {chunk[0]}..{chunk[-1]} decode to {tokenizer.decode(chunk)[:60]!r}... for the "
            f"student, {_shown(got)[:60]}... for the teacher"
        )
    return "alike", ""


def _same_text(tokenizer, got, want: str) -> bool:
    """Equal, or equal once both have had the decoder's space clean-up (" ." -> "."), which
    depends on a setting whose default moved between transformers versions."""
    if got == want or not isinstance(got, str):
        return got == want
    clean = getattr(tokenizer, "clean_up_tokenization", None)
    return clean is not None and clean(got) == clean(want)


def _encode_alike(server: _Server, tokenizer, texts) -> tuple[str, str]:
    """("alike", ""), ("differ", the first difference) or ("absent", the server's answer)."""
    for n, (text, special) in enumerate(texts):
        got = server.encode(text, special)
        if n == 0 and _absent(got):
            return "absent", _absence(got)
        want = tokenizer.encode(text, add_special_tokens=special)
        if got == want:
            continue
        shown = f"{text[:40]!r}{'...' if len(text) > 40 else ''}"
        if not isinstance(got, list):
            return "differ", f"the teacher's /tokenize does not encode {shown} ({_shown(got)})"
        common = min(len(want), len(got))
        j = next((j for j in range(common) if want[j] != got[j]), common)
        return "differ", (
            f"token {j} of {shown} (add_special_tokens={special}) is "
            f"{_one(tokenizer, want, j)} for the student, {_one(tokenizer, got, j, server)} "
            "for the teacher"
        )
    return "alike", ""


def _absence(answer) -> str:
    return f" (HTTP {answer.code}: {answer.detail})" if answer else " (answered in another shape)"


def _absent(answer) -> bool:
    """An endpoint the server does not have (or that answers in another shape)."""
    return answer is None or (isinstance(answer, Refused) and answer.code in NOT_OFFERED)


def _one(tokenizer, ids: list[int], j: int, server: _Server | None = None) -> str:
    """Token j of `ids` as "id N 'text'" (the server's text when `server` is given)."""
    if j >= len(ids):
        return "past the end"
    text = server.decode([ids[j]]) if server else tokenizer.decode([ids[j]])
    if not isinstance(text, str):  # the server cannot decode: the student's text, said so
        return f"id {ids[j]} ({tokenizer.decode([ids[j]])!r} to the student)"
    return f"id {ids[j]} {text!r}"


def _shown(answer) -> str:
    if isinstance(answer, Refused):
        return f"refused (HTTP {answer.code}: {answer.detail})"
    return repr(answer) if isinstance(answer, str) else "an answer without the expected field"


def _chat_text(tokenizer) -> str:
    """A short conversation rendered by the tokenizer's chat template ("" without one)."""
    if not getattr(tokenizer, "chat_template", None):
        return ""
    for messages in (CHAT, CHAT[1:]):  # some templates refuse a system message
        try:
            return tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=True
            )
        except Exception:  # jinja raises anything a template asks it to
            continue
    return ""
