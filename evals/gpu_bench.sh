#!/usr/bin/env bash
# Full-size engine benchmark on one CUDA GPU: SD 2.1-base and SD 1.5 architectures (random weights built from the
# published configs, nothing downloaded), 512x512, fp16 UNet with fp32 energies, K=1 and K=3 intentions, the fast
# preset, and the memory switches. Prints one table per model and writes bench-out/<model>.json.
#   usage: evals/gpu_bench.sh [repeats]        (about 5-10 minutes on an H100-class GPU)
#   COMPILE=1 adds a torch.compile row (compilation takes minutes: keep it out of a time-limited session).
#   Each row is printed as it finishes ("[model] row: seconds, peak"), so a run cut short keeps what it measured.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-bench-out}
REPEATS=${1:-2}
mkdir -p "$OUT"
"$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else "no CUDA GPU visible: this script measures the GPU rows")'
for model in sd21-base sd15; do
  "$PY" - "$model" "$OUT" "$REPEATS" <<'PY'
import json, os, sys
from luciddrag.engine.bench import format_report, run_bench

model, out, repeats = sys.argv[1], sys.argv[2], int(sys.argv[3])
report = run_bench(model, resolution=512, steps=50, intentions=3, device="cuda", dtype="fp16", repeats=repeats,
                   switches=("parts", "fast", "checkpointing", "no-prune", "channels-last"),
                   compile=os.environ.get("COMPILE") == "1", log=lambda line: print(f"[{model}] {line}", flush=True))
print(format_report(report), flush=True)
with open(f"{out}/{model}.json", "w") as f:
    json.dump(report, f, indent=1)
PY
done
