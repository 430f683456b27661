#!/usr/bin/env bash
# Idempotent set-up: a virtual environment in .venv with torch and the package (editable, with the
# dev extra). Safe to run again: it does nothing when pyproject.toml has not changed since the
# last successful install.
#
# torch is installed first, on its own: on the project's CPU machines `torch==2.13.0` resolves to a
# local CPU wheel; on a GPU machine it resolves to the normal CUDA build. The rest is then installed
# with a constraint pinning the torch that is there, so no other package can pull a different
# (multi-GB CUDA) torch over it.
set -euo pipefail
cd "$(dirname "$0")/.."

# pip here is configured with extra local indexes that print one harmless warning per package
quiet() { "$@" 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }; }

PYTHON="${PYTHON:-python3}"
VENV="${RAMOE_VENV:-.venv}"
TORCH_SPEC="${RAMOE_TORCH_SPEC:-torch==2.13.0}"

if [ ! -x "$VENV/bin/python" ]; then
    echo "[setup] creating $VENV with $($PYTHON --version)"
    "$PYTHON" -m venv "$VENV"
fi
PY="$VENV/bin/python"

# DeepSpeed's CPU comm op, compiled once where every training looks for it (train_worker.ray_env), so that
# the first training of a sweep or of the tests does not pay it (~45 s on 2 cores); a GPU machine has none
# (and this quick check keeps its repeated set-up from importing DeepSpeed each time)
build_ops() {
    if ! command -v nvidia-smi >/dev/null \
        && [ ! -d "${TORCH_EXTENSIONS_DIR:-.ramoe_cache/torch_extensions}/deepspeed_shm_comm" ]; then
        echo "[setup] building DeepSpeed's CPU comm op (once, ~1 min)"
        quiet "$PY" -c "from ramoe_ray import train_worker; train_worker.build_comm_op()"
    fi
}

want="$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)"
stamp="$VENV/.ramoe-setup"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    build_ops
    exit 0
fi

if ! "$PY" -c "import torch" 2>/dev/null; then
    echo "[setup] installing $TORCH_SPEC"
    quiet "$PY" -m pip install -q "$TORCH_SPEC"
fi
torch_version="$("$PY" -c 'import torch; print(torch.__version__)' 2>/dev/null)"
echo "torch==$torch_version" > "$VENV/constraints.txt"
echo "[setup] torch $torch_version (cuda: $("$PY" -c 'import torch; print(torch.cuda.is_available())' 2>/dev/null))"

echo "[setup] installing ramoe_ray and its dependencies (first time: a few minutes)"
quiet "$PY" -m pip install -q -c "$VENV/constraints.txt" -e ".[dev]"

build_ops
echo "$want" > "$stamp"
echo "[setup] done: $VENV"
