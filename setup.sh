#!/usr/bin/env bash
# Create .venv and install LucidDrag with its test extras. Safe to re-run.
# torch is installed first and pinned to 2.13.0: on our offline machines that is the CPU wheel on local disk; on a
# normal Linux machine it is PyPI's CUDA build. (A bare `torch` requirement would pull a multi-GB CUDA build here.)
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
# What the tests need from Debian: chromium for the web app's browser test (Playwright cannot download browsers on
# our machines) and the PostgreSQL server the services tests start themselves (tests/test_postgres_threads.py).
# Installed with apt-get as root, or with sudo when it needs no password; else we say what to run.
need=()
[ -x /usr/bin/chromium ] || need+=(chromium)
command -v initdb >/dev/null 2>&1 || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || need+=(postgresql)
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" -eq 0 ]; then SUDO=""
  elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then SUDO="sudo -n"
  else SUDO="none"
  fi
  if [ "$SUDO" != "none" ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing Debian's ${need[*]} (for the tests: web app browser test, services tests) ..."
    $SUDO apt-get update -q >/dev/null
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${need[@]}" >/dev/null
  else
    echo "note: ${need[*]} missing and could not be installed here (not root, no password-less sudo, or no" \
         "apt-get); the browser and services tests need them: run 'sudo apt-get install ${need[*]}'" \
         "(Debian/Ubuntu) and re-run ./setup.sh" >&2
  fi
fi
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
.venv/bin/python -m pip install -q "torch==${LUCIDDRAG_TORCH:-2.13.0}"
# The test extras, Ray Serve and the Postgres checkpointer, resolved together; the constraint keeps the torch above.
TORCH_PIN="torch==$(.venv/bin/python -c 'import torch; print(torch.__version__)')"
.venv/bin/python -m pip install -q -c <(echo "$TORCH_PIN") -e '.[dev,serve,postgres]'
echo "LucidDrag installed in .venv ($(.venv/bin/python -c 'import torch; print("torch", torch.__version__)'))"
