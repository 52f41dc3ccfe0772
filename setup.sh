#!/usr/bin/env bash
# Create .venv and install LucidDrag with its test extras. Safe to re-run.
# torch is installed first and pinned to 2.13.0: on our offline machines that is the CPU wheel on local disk; on a
# normal Linux machine it is PyPI's CUDA build. (A bare `torch` requirement would pull a multi-GB CUDA build here.)
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
.venv/bin/python -m pip install -q "torch==${LUCIDDRAG_TORCH:-2.13.0}"
.venv/bin/python -m pip install -q -e '.[dev]'
echo "LucidDrag installed in .venv ($(.venv/bin/python -c 'import torch; print("torch", torch.__version__)'))"
