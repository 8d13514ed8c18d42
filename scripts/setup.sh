#!/usr/bin/env bash
# Creates .venv and installs visto with its test tools.
# torch is installed first and pinned (VISTO_TORCH, default torch==2.13.0: on our build machines
# that is a CPU wheel on disk). Set VISTO_TORCH=skip to keep the torch a venv already has,
# e.g. a CUDA build: `VISTO_TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"`.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
TORCH=${VISTO_TORCH:-torch==2.13.0}
PY=${PYTHON:-python3}

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV with $($PY --version)"
  "$PY" -m venv "$VENV"
fi
pip_() { "$VENV/bin/python" -m pip install --disable-pip-version-check -q "$@"; }
if [ "$TORCH" != "skip" ]; then
  echo "[setup] installing $TORCH"
  # shellcheck disable=SC2086  # TORCH may carry pip options on purpose
  pip_ $TORCH numpy
fi
# Keep whatever torch is now installed: a constraint stops pip from replacing it.
"$VENV/bin/python" -c "import torch; print(f'torch=={torch.__version__}')" > "$VENV/torch-constraint.txt"
echo "[setup] installing visto[dev] (torch kept at $(cat "$VENV/torch-constraint.txt"))"
pip_ -c "$VENV/torch-constraint.txt" -e ".[dev]"
# Grammar-constrained decoding (response_format json_schema in `visto serve`). xgrammar's
# declared needs include triton (~1 GB, GPU only): install it without, its other needs
# (numpy, pydantic, torch, transformers) come with visto.
pip_ --no-deps "xgrammar==0.2.8" "apache-tvm-ffi==0.1.15.post2"
echo "[setup] done: $VENV/bin/visto --help"
