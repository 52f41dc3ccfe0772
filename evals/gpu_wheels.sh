#!/usr/bin/env bash
# Fetch, here (where PyPI is reachable), the wheels the lent GPU machine lacks for evals/gpu_bench.sh, into .whl/.
# That machine has Python 3.12 with torch, transformers, tokenizers, safetensors, huggingface-hub, numpy, pillow,
# psutil, tqdm and typer, but no diffusers or pydantic, and it cannot reach PyPI: the wheels travel with the
# working tree (`carry: [".whl"]`). Versions are the ones installed in .venv, so both machines run the same code.
#   usage: evals/gpu_wheels.sh        then, on the GPU machine (one command):
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl \
#     && PYTHONPATH=/tmp/site PY=python3 PYTHONUNBUFFERED=1 evals/gpu_bench.sh 1
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
rm -rf .whl && mkdir -p .whl
log=$(mktemp)
if ! .venv/bin/python -m pip wheel -q --no-deps --no-build-isolation -w .whl . >"$log" 2>&1; then  # luciddrag
  cat "$log" >&2; exit 1
fi
rm -rf build "$log"
pins=()
for name in diffusers pydantic pydantic_core annotated_types typing_inspection importlib_metadata; do
  pins+=("$name==$(.venv/bin/python -c "import importlib.metadata as m; print(m.version('$name'))")")
done
platforms=()
for n in 2_28 2_27 2_17 2_5; do platforms+=(--platform "manylinux_${n}_x86_64"); done
.venv/bin/python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${platforms[@]}" --platform manylinux2014_x86_64 -d .whl "${pins[@]}" 2> >(grep -v "is ignored: it is neither" >&2)
ls -1 .whl
du -sh .whl
