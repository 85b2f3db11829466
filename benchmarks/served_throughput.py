"""Raw scoring throughput of a real vLLM server (CPU build): prompt_logprobs over HTTP, against
the in-process Hugging Face forward of the same model, and the server's start-up time.

Work: 64 sequences x 41 tokens (BOS + 40 random tokens), k=0 (each position's own token only),
sent as one request of 64 and as 8 concurrent requests of 8, straight to /v1/completions (no
opd client in between; benchmarks/teacher_scoring.py measures opd's ServedTeacher). The teacher
is tests/test_vllm.py's shape: a Llama of hidden 64, 2 layers, 2 heads of size 32 (vLLM's CPU
attention needs head size 32, 64, 80, ...), float32, untrained (the weights do not change the
cost). Median of 5 after a warm-up.

    OPD_VLLM_VENV=~/.cache/opd/vllm-venv python benchmarks/served_throughput.py

The venv is the one scripts/vllm_venv.sh makes ($OPD_VLLM_VENV, default ~/.cache/opd/vllm-venv).
Without it, or when the server does not come up, the script prints one line saying why and
exits with status 1 (nothing was measured).
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # tests/vllm_server.py: how the tests start and stop vLLM

from opd import tiny  # noqa: E402
from tests.vllm_server import SERVED_NAME, post_json, serve_vllm, venv_problem  # noqa: E402

ROWS, LENGTH, IN_FLIGHT, REPEATS = 64, 41, 8, 5


def score(url: str, ids_N: list[list[int]]) -> None:
    status, body = post_json(
        url + "/completions",
        {"model": SERVED_NAME, "prompt": ids_N, "max_tokens": 1, "prompt_logprobs": 0},
    )
    if status != 200 or len(body["choices"]) != len(ids_N):
        raise RuntimeError(f"/completions answered {status}: {str(body)[:500]}")


def median_seconds(fn) -> float:
    fn()  # warm-up
    secs = []
    for _ in range(REPEATS):
        t0 = time.perf_counter()
        fn()
        secs.append(time.perf_counter() - t0)
    return statistics.median(secs)


def main() -> int:
    problem = venv_problem()
    if problem:
        print(
            f"served_throughput: vLLM not available: {problem}; set OPD_VLLM_VENV to a venv made "
            "by scripts/vllm_venv.sh",
            file=sys.stderr,
        )
        return 1
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(2)
    tok = tiny.char_tokenizer()
    model = tiny.tiny_model(tok, hidden=64, layers=2, heads=2, kv_heads=2, seed=0)
    g = torch.Generator().manual_seed(0)
    body = torch.randint(4, len(tok), (ROWS, LENGTH - 1), generator=g)
    ids_N = [[tok.bos_token_id] + row for row in body.tolist()]
    tokens = ROWS * LENGTH

    with tempfile.TemporaryDirectory() as tmp:
        path = tiny.save(model, tok, Path(tmp) / "teacher")
        ref = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
        fd, log = tempfile.mkstemp(prefix="vllm-serve-", suffix=".log")  # kept if it fails
        os.close(fd)
        try:
            with serve_vllm(path, log_path=Path(log)) as url:
                startup = serve_vllm.last_startup_s

                def concurrent():
                    n = ROWS // IN_FLIGHT
                    chunks = [ids_N[i : i + n] for i in range(0, ROWS, n)]
                    with ThreadPoolExecutor(IN_FLIGHT) as pool:
                        list(pool.map(lambda c: score(url, c), chunks))

                @torch.no_grad()
                def in_process():
                    ref(torch.tensor(ids_N)).logits.float().log_softmax(-1)

                results = [
                    (f"vLLM: one request of {ROWS}", median_seconds(lambda: score(url, ids_N))),
                    (
                        f"vLLM: {IN_FLIGHT} concurrent requests of {ROWS // IN_FLIGHT}",
                        median_seconds(concurrent),
                    ),
                    (f"in-process HF forward [{ROWS}, {LENGTH}]", median_seconds(in_process)),
                ]
        except RuntimeError as e:
            first = str(e).splitlines()[0].rstrip(":")
            print(f"served_throughput: vLLM server failed: {first}", file=sys.stderr)
            return 1
        os.unlink(log)

    print(f"prompt-logprob scoring, {ROWS} sequences x {LENGTH} tokens, k=0, fp32, 2 threads")
    print("| path | median s | tokens/s |")
    print("|---|---|---|")
    for name, sec in results:
        print(f"| {name} | {sec:.3f} | {tokens / sec:,.0f} |")
    print(f"vLLM server start-up (until /health answered): {startup:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
