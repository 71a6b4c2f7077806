#!/usr/bin/env bash
# Everything only a GPU can show, in one prepared run (a lent GPU gives a session ~15 minutes in all):
#   1. the CUDA tests (capture/replay of every op, the attention kernels compiled, a device-side t assert)
#   2. host us per call against the bare kernel[grid] launch      (python -m benchmarks --host)
#   3. attention kernel vs SDPA per case; writes ldm_fast/attention_routes.json (impl="auto" routing)
#   4. end to end on SD 1.5 configs (eager, optimize, CUDA graphs, compile, attention, ldm_fast's models)
# Results land in benchmarks/results/<gpu>-*.json and under $OUT (the device tool brings $OUT back).
# diffusers is not on the GPU image: carry its wheels (see the device tool's README) and put them on
# PYTHONPATH first; without it step 4 reports "unavailable" and the rest still runs.
set -uo pipefail
cd "$(dirname "$0")/.."
export TRITON_INTERPRET=0 PYTHONUNBUFFERED=1
out="${OUT:-benchmarks/results/latest}"
mkdir -p "$out"
python -m pytest -q -p no:cacheprovider tests/test_cuda_graphs.py 2>&1 | tee "$out/gpu-tests.txt"
python -m benchmarks --host 2>&1 | tee "$out/host.txt"
python -m benchmarks.bench_attention --write-routes 2>&1 | tee "$out/attention.txt"
cp ldm_fast/attention_routes.json "$out/" 2>/dev/null
python -m benchmarks --e2e 2>&1 | tee "$out/e2e.txt"
cp benchmarks/results/*.json "$out/" 2>/dev/null
exit 0
