#!/usr/bin/env bash
# Run every GPU path once (bf16 training on Ray Train + DeepSpeed, Ray Data embedding with a GPU per actor,
# faiss on the GPU, a Serve replica with num_gpus) and print one line per path; JSON in bench_out/gpu_check.json.
# Exit status: 0 all ok, 1 a path failed, 3 no CUDA device (every path skipped), 124 over the time limit.
# Options go to benchmarks/gpu_check.py (--out, --work, --only, --cpu). GPU_CHECK_TIMEOUT: seconds (default 480).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
if [ ! -x "$PY" ]; then echo "gpu_check: $PY not found (run 'make setup' first, or set PYTHON)" >&2; exit 2; fi
timeout --kill-after=30 "${GPU_CHECK_TIMEOUT:-480}" "$PY" -m benchmarks.gpu_check "$@"
rc=$?
if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
  echo "gpu_check: stopped after ${GPU_CHECK_TIMEOUT:-480} s; the JSON report names the path that was running" >&2
fi
exit "$rc"
