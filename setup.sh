#!/usr/bin/env bash
# Create .venv and install LucidDrag with its test extras. Safe to re-run.
# torch is installed first and pinned to 2.13.0: on our offline machines that is the CPU wheel on local disk; on a
# normal Linux machine it is PyPI's CUDA build. (A bare `torch` requirement would pull a multi-GB CUDA build here.)
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
# The web app's browser test (tests/test_web_browser.py) drives Debian's chromium: Playwright cannot download
# browsers on our machines. Installed with apt-get as root, or with sudo when it needs no password; else we say how.
if [ ! -x /usr/bin/chromium ]; then
  if [ "$(id -u)" -eq 0 ]; then SUDO=""
  elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then SUDO="sudo -n"
  else SUDO="none"
  fi
  if [ "$SUDO" != "none" ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing Debian's chromium (for the web app's browser test) ..."
    $SUDO apt-get update -q >/dev/null
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null
  else
    echo "note: /usr/bin/chromium is missing and could not be installed here (not root, no password-less sudo," \
         "or no apt-get); the web app's browser test needs it: run 'sudo apt-get install chromium' (Debian/Ubuntu)" \
         "and re-run ./setup.sh" >&2
  fi
fi
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
.venv/bin/python -m pip install -q "torch==${LUCIDDRAG_TORCH:-2.13.0}"
.venv/bin/python -m pip install -q -e '.[dev]'
echo "LucidDrag installed in .venv ($(.venv/bin/python -c 'import torch; print("torch", torch.__version__)'))"
