"""Teacher scoring throughput of each backend on the same work: in-process, `opd serve-teacher`,
and a real vLLM server (when scripts/vllm_venv.sh has installed one).

Work: 64 sequences x 41 tokens (BOS + 40 completion tokens after a 0-token prompt split), a
3.2M-parameter Llama teacher (h256/L4, head size 64, character vocabulary), float32, scored
through opd's own Teacher backends (LocalTeacher / ServedTeacher), so the numbers include
everything a training step pays: request building, JSON, parsing. Median of 7 after a warm-up.

    python benchmarks/teacher_scoring.py
"""

from __future__ import annotations

import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from opd import tiny  # noqa: E402
from opd.teachers.local import LocalTeacher  # noqa: E402
from opd.teachers.served import ServedTeacher  # noqa: E402
from opd.types import Rollouts  # noqa: E402

ROWS, LENGTH, PROMPT = 64, 41, 9


def rollouts(vocab: int) -> Rollouts:
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(4, vocab, (ROWS, LENGTH), generator=g)
    tokens[:, 0] = 1  # BOS
    mask = torch.zeros(ROWS, LENGTH, dtype=torch.bool)
    mask[:, PROMPT:] = True
    return Rollouts(
        tokens_BT=tokens,
        attention_mask_BT=torch.ones(ROWS, LENGTH, dtype=torch.long),
        completion_mask_BT=mask,
        prompt_len=PROMPT,
        sampler_lp_BT=torch.zeros(ROWS, LENGTH),
        prompt_index_B=torch.arange(ROWS),
    )


def timed(fn, repeats: int = 7) -> float:
    fn()
    secs = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        secs.append(time.perf_counter() - t0)
    return statistics.median(secs)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_health(url: str, proc, limit: float = 240) -> None:
    t0 = time.monotonic()
    while time.monotonic() - t0 < limit:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"{url} did not answer within {limit} s")


def serve(cmd: list[str], health: str, env=None):
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        env=env,
    )
    wait_health(health, proc)
    return proc


def stop(proc) -> None:
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)


def measure_served(url: str, label: str, work: Rollouts, want: torch.Tensor) -> list:
    """The same work as one request of 64 rows, and as 4 requests of 16 in flight together."""
    out = []
    for rows, in_flight in ((64, 1), (16, 4)):
        client = ServedTeacher(url, batch_rows=rows, concurrency=in_flight)
        assert torch.allclose(client.score(work), want, atol=1e-4)
        name = f"{label} ({ROWS // rows} x {rows} rows, {in_flight} in flight)"
        out.append((name, timed(lambda c=client: c.score(work))))
        client.close()
    return out


def main() -> None:
    torch.set_num_threads(2)
    tok = tiny.char_tokenizer()
    model = tiny.tiny_model(tok, hidden=256, layers=4, heads=4, kv_heads=4, seed=0).eval()
    work = rollouts(len(tok))
    tokens = ROWS * LENGTH
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        path = tiny.save(model, tok, Path(tmp) / "teacher")
        local = LocalTeacher(model, len(tok))
        want = local.score(work)
        results.append(("in-process (LocalTeacher)", timed(lambda: local.score(work))))

        port = free_port()
        proc = serve(
            [sys.executable, "-m", "opd", "serve-teacher", str(path), "--port", str(port)],
            f"http://127.0.0.1:{port}/health",
        )
        try:
            url = f"http://127.0.0.1:{port}/v1"
            results += measure_served(url, "opd serve-teacher", work, want)
        finally:
            stop(proc)

        venv = Path(os.environ.get("OPD_VLLM_VENV", Path.home() / ".cache/opd/vllm-venv"))
        if (venv / ".opd-vllm-venv-ok").is_file():
            port = free_port()
            env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1"}
            env.pop("PYTHONPATH", None)
            cmd = [str(venv / "bin/vllm"), "serve", str(path), "--host", "127.0.0.1"]
            cmd += ["--port", str(port), "--dtype", "float32", "--max-model-len", "128"]
            cmd += ["--max-logprobs", "20", "--enforce-eager", "--served-model-name", "teacher"]
            proc = serve(cmd, f"http://127.0.0.1:{port}/health", env)
            try:
                url = f"http://127.0.0.1:{port}/v1"
                results += measure_served(url, "vLLM cpu", work, want)
            finally:
                stop(proc)
        else:
            results.append(("vLLM: not measured (no venv; run scripts/vllm_venv.sh)", float("nan")))

    print(f"teacher scoring, {ROWS} sequences x {LENGTH} tokens, 3.2M Llama, fp32, 2 threads")
    print("| backend | median s | tokens/s |")
    print("|---|---|---|")
    for name, sec in results:
        print(f"| {name} | {sec:.3f} | {tokens / sec:,.0f} |")


if __name__ == "__main__":
    main()
