"""A vLLM server process that opd starts and stops: the engine of sampling.backend=vllm (and the
tests' real vLLM).

    with serve_vllm(model_dir, venv) as base_url:   # "http://127.0.0.1:PORT/v1"
        ...

vLLM comes from the venv `scripts/vllm_venv.sh` makes when $OPD_VLLM_VENV names it (vLLM pins
its own torch and transformers, so it rarely shares the trainer's environment), else from the
`vllm` command on PATH. The server listens on loopback only, logs to a file, and is always
stopped on exit (SIGTERM to `vllm serve`, which stops its engine process; SIGKILL to its whole
process group after a grace period). Start-up takes 30-45 s on a 2-core CPU machine.
"""

from __future__ import annotations

import os
import shutil
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

from opd.errors import OpdError

VENV_ENV = "OPD_VLLM_VENV"
MARKER = ".opd-vllm-venv-ok"  # written last by scripts/vllm_venv.sh
HOST = "127.0.0.1"


def venv_problem(venv: Path) -> str | None:
    """Why a venv made by scripts/vllm_venv.sh can't be used (None when it is installed)."""
    if not (venv / MARKER).is_file():
        return f"no installed vLLM venv at {venv} (no {MARKER}; run scripts/vllm_venv.sh)"
    if not os.access(venv / "bin" / "vllm", os.X_OK):
        return f"{venv}/bin/vllm is missing or not executable"
    return None


def vllm_command(venv: Path | None = None) -> tuple[str, Path | None]:
    """(the `vllm` executable, its venv or None): `venv`, else $OPD_VLLM_VENV, else PATH."""
    venv = venv or (Path(os.environ[VENV_ENV]).expanduser() if os.environ.get(VENV_ENV) else None)
    if venv is not None:
        if problem := venv_problem(venv):
            raise OpdError(f"${VENV_ENV}: {problem}")
        return str(venv / "bin" / "vllm"), venv
    found = shutil.which("vllm")
    if not found:
        raise OpdError(
            "sampling.backend=vllm needs vLLM: install it here, or set $OPD_VLLM_VENV to a "
            "venv made by scripts/vllm_venv.sh (or give sampling.urls of running engines)"
        )
    return found, None


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def log_tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError as e:
        return f"(no log: {e})"


def healthy(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://{HOST}:{port}/health", timeout=2) as r:
            return r.status == 200
    except (OSError, urllib.error.URLError):
        return False


def parse_cpus(text: str, field: str = "sampling.engine_cpus") -> set[int]:
    """'1', '0,2' or '8-15' as a set of core ids, each one this process may run on."""
    if not hasattr(os, "sched_setaffinity"):
        raise OpdError(f"{field}={text!r}: placing processes on cores needs Linux")
    cpus: set[int] = set()
    try:
        for part in text.split(","):
            lo, _, hi = part.strip().partition("-")
            cpus.update(range(int(lo), int(hi or lo) + 1))
    except ValueError:
        raise OpdError(f"{field}={text!r}: must be core ids like '1', '0,2' or '8-15'") from None
    allowed = os.sched_getaffinity(0)
    if not cpus or not cpus <= allowed:
        raise OpdError(f"{field}={text!r}: this process may run on cores {sorted(allowed)} only")
    if cpus == allowed:
        raise OpdError(f"{field}={text!r}: leaves no core for the learner ({sorted(allowed)})")
    return cpus


def leave_cores(cpus: set[int]) -> int:
    """Move every thread of this process off `cpus` (the engine's); the number of cores left."""
    rest = os.sched_getaffinity(0) - cpus
    for tid in os.listdir("/proc/self/task"):
        try:
            os.sched_setaffinity(int(tid), rest)
        except OSError:  # a thread that ended meanwhile
            pass
    return len(rest)


def stop(proc: subprocess.Popen, grace: float) -> None:
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
    venv: Path | None = None,
    name: str = "teacher",
    max_model_len: int = 128,
    max_logprobs: int = 20,
    dtype: str = "float32",
    timeout: float = 180,
    log_path: Path | None = None,
    grace: float = 20,
    extra_args: list[str] | tuple[str, ...] = (),
    env_extra: dict[str, str] | None = None,
    cpus: str = "",
) -> Iterator[str]:
    """Start `vllm serve model_dir` on 127.0.0.1 and yield its base URL (".../v1"); with `cpus`
    ('1', '8-15') the server runs on those cores only, its engine's threads bound to them.

    Raises OpdError (with the log's tail) when vLLM is missing, the server exits, or /health
    does not answer within `timeout` seconds."""
    command, venv = vllm_command(venv)
    port = free_port()
    if log_path is None:
        fd, path = tempfile.mkstemp(prefix=f"vllm-serve-{port}-", suffix=".log")
        os.close(fd)
        log_path = Path(path)
    cmd = [
        command, "serve", str(model_dir), "--host", HOST, "--port", str(port),
        "--dtype", dtype, "--max-model-len", str(max_model_len),
        "--max-logprobs", str(max_logprobs), "--enforce-eager", "--served-model-name", name,
        *extra_args,
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    env.update(
        HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", VLLM_NO_USAGE_STATS="1", DO_NOT_TRACK="1"
    )
    if venv is not None:
        env.update(VIRTUAL_ENV=str(venv), PATH=f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}")
    env.update(env_extra or {})
    cores = parse_cpus(cpus) if cpus else None
    if cores:
        env["VLLM_CPU_OMP_THREADS_BIND"] = ",".join(map(str, sorted(cores)))
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env=env, start_new_session=True,
        )  # fmt: skip
    if cores:  # before the server starts its engine process, which inherits the placement
        try:
            os.sched_setaffinity(proc.pid, cores)
        except ProcessLookupError:  # exited already: reported below with its log
            pass
    try:
        t0 = time.monotonic()
        deadline = t0 + timeout
        while not healthy(port):
            if proc.poll() is not None:
                raise OpdError(
                    f"vllm serve exited with status {proc.returncode} before /health answered "
                    f"(log {log_path}): {log_tail(log_path, 1)}"
                )
            if time.monotonic() > deadline:
                raise OpdError(
                    f"vllm serve: /health did not answer within {timeout:.0f} s (log {log_path})"
                )
            time.sleep(0.5)
        serve_vllm.last_startup_s = time.monotonic() - t0  # type: ignore[attr-defined]
        yield f"http://{HOST}:{port}/v1"
    finally:
        stop(proc, grace)
