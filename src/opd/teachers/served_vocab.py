"""Whole-vocabulary log-probs from a served teacher, for objective.loss=full|jsd.

vLLM and SGLang return at most each position's top-k, so the exact divergences need the
teacher in-process, or `opd serve-teacher`, whose POST /v1/opd/vocab_logprobs answers the
teacher's log-probs over the whole vocabulary at the positions asked for (float32 bytes,
zlib-compressed). `served_logits` asks for every completion position of a batch through
`ServedTeacher.fan_out` (`remote.batch_rows` rows per request, `remote.concurrency` at a
time, retried and stopped on a failure like every scoring request), and gives the same
(TeacherLogits, lp_BT) as `LocalTeacher.logits`.
The (N, V) float32 block is held for the step: N completion tokens x V x 4 bytes.
"""

from __future__ import annotations

import zlib

import numpy as np
import torch

from opd.errors import OpdError
from opd.teachers.served import Refused, ServedTeacher, first_real_column, row_tokens
from opd.types import Rollouts, TeacherLogits

PATH = "/opd/vocab_logprobs"


def served_logits(teacher: ServedTeacher, rollouts: Rollouts) -> tuple[TeacherLogits, torch.Tensor]:
    rows = row_tokens(rollouts)
    mask_BT = rollouts.completion_mask_BT.cpu()
    first_B = first_real_column(rollouts.attention_mask_BT).tolist()
    # the index in the row sent of each completion token: p(. | x_<j) is what the loss reads
    positions = [(mask_BT[b].nonzero().flatten() - first_B[b]).tolist() for b in range(len(rows))]
    url = teacher.url + PATH

    def request(chunk: list[int], stop) -> torch.Tensor:
        payload = {"model": teacher.model, "prompt": [rows[i] for i in chunk],
                   "positions": [positions[i] for i in chunk]}  # fmt: skip
        return teacher._call("POST", url, payload, "scoring the whole vocabulary", stop=stop,
                             decode=decode)  # fmt: skip

    parts = teacher.fan_out(len(rows), request)
    lp_NV = torch.cat(parts) if parts else torch.zeros(0, 0)
    device = rollouts.tokens_BT.device
    rows_N, cols_N = mask_BT.nonzero(as_tuple=True)  # row-major: the order positions were sent
    if lp_NV.shape[0] != rows_N.numel():
        raise OpdError(
            f"teacher {teacher.url}: {lp_NV.shape[0]} positions scored for {rows_N.numel()} asked"
        )
    lp_BT = torch.zeros(mask_BT.shape)
    tokens = rollouts.tokens_BT.cpu()[rows_N, cols_N]
    lp_BT[rows_N, cols_N] = lp_NV.gather(1, tokens[:, None])[:, 0]
    where_BT = torch.full(mask_BT.shape, -1, dtype=torch.long)
    where_BT[rows_N, cols_N] = torch.arange(rows_N.numel())

    def logits(rows_n: torch.Tensor, cols_n: torch.Tensor) -> torch.Tensor:
        # log-probs stand in for logits: every loss takes their log_softmax, which keeps them
        return lp_NV[where_BT[rows_n.cpu(), cols_n.cpu()]].to(device)

    return logits, lp_BT.to(device)


def decode(response) -> torch.Tensor:
    """The answer's bytes as an (N, V) float32 tensor; a malformed one raises ValueError."""
    shape = [int(x) for x in response.headers.get("x-opd-shape", "").split(",")]
    if response.headers.get("x-opd-encoding") != "zlib-f32le" or len(shape) != 2:
        raise ValueError("not an opd vocab_logprobs answer (X-Opd-Shape, X-Opd-Encoding)")
    try:
        raw = zlib.decompress(response.content)
    except zlib.error as e:
        raise ValueError(f"corrupt body ({e})") from None
    if len(raw) != 4 * shape[0] * shape[1]:
        raise ValueError(f"{len(raw)} bytes for shape {shape}")
    return torch.from_numpy(np.frombuffer(raw, dtype="<f4").reshape(shape).copy())


def require_vocab_logprobs(teacher: ServedTeacher, loss: str) -> None:
    """Before step 1: does the server answer whole-vocabulary log-probs? A one-line error
    naming the alternatives when it does not (vLLM, SGLang)."""
    payload = {"model": teacher.model, "prompt": [[0, 0]], "positions": [[1]]}
    got = teacher._call(
        "POST", teacher.url + PATH, payload, "asking for whole-vocabulary log-probs",
        refusals=True, decode=decode,
    )  # fmt: skip
    if isinstance(got, Refused):
        raise OpdError(
            f"teacher {teacher.url}: objective.loss={loss!r} needs the teacher's log-probs over "
            f"the whole vocabulary, which this server does not give (HTTP {got.code} at "
            f"{PATH}; vLLM and SGLang return only each position's top-k): serve the teacher "
            "with `opd serve-teacher`, load it in-process, or use objective.loss=sampled|topk"
        )


class ServedVocab:
    """A served teacher that also gives whole-vocabulary log-probs (`opd serve-teacher`): what
    the router calls for objective.loss=full|jsd."""

    def __init__(self, served: ServedTeacher):
        self.served = served
        self.max_len = served.max_len

    def logits(self, rollouts: Rollouts) -> tuple[TeacherLogits, torch.Tensor]:
        return served_logits(self.served, rollouts)

    def score(self, rollouts: Rollouts) -> torch.Tensor:
        return self.served.score(rollouts)

    def score_topk(self, rollouts: Rollouts, k: int):
        return self.served.score_topk(rollouts, k)

    def close(self) -> None:
        self.served.close()
