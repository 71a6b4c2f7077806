#!/usr/bin/env bash
# The GPU proof in one run, tiered, under its own time budget (benchmarks/gpu_session.py says what
# each tier measures). On a lent GPU, as ONE device call with timeout 600:
#     LDM_FAST_COMMIT=<commit> bash benchmarks/gpu_session.sh   # budget 540 s; results under $OUT
# CPU rehearsal (CI, tests/test_gpu_session.py): bash benchmarks/gpu_session.sh --dry-run
# diffusers' wheels under .whl/ are installed to a temp target first (the pip download command is
# in benchmarks/gpu_session.py and benchmarks/README.md).
set -uo pipefail
cd "$(dirname "$0")/.."
exec python -u -m benchmarks.gpu_session "$@"
