#!/bin/bash
# The CUDA kernels on one GPU, in one job: the GPU kernel tests against the float64
# oracle, compute-sanitizer (memcheck, racecheck) on bench/sanitize_case.py, then
# `python -m mpiring.bench kernel` beside torch SDPA with deterministic dQ (the default)
# and, at bf16 d128 16k, with atomic dQ; then packed documents against fixed length on
# this GPU (`longctx --varlen`: the kernels' document masks, no ring).
# Usage: bash bench/gpu_kernels.sh      (logs and kernel*.json under $OUT, a table last)
#   TESTS_K: a pytest -k selection of tests/test_gpu_kernels.py; SEQLENS (4096,16384).
set -o pipefail
. bench/gpu_setup.sh || exit 1
run tests timeout "${TEST_SECONDS:-420}" python3 -m pytest -q -p no:cacheprovider --timeout=120 -x \
    tests/test_gpu_kernels.py ${TESTS_K:+-k "$TESTS_K"}
if [ -z "$NO_SANITIZER" ] && command -v compute-sanitizer >/dev/null; then
    run memcheck timeout 120 compute-sanitizer --tool memcheck --error-exitcode 1 python3 bench/sanitize_case.py
    run racecheck timeout 180 compute-sanitizer --tool racecheck --error-exitcode 1 python3 bench/sanitize_case.py
fi
run bench timeout 240 python3 -m mpiring.bench kernel --seqlens "${SEQLENS:-4096,16384}" ${DTYPES:+--dtypes $DTYPES} \
    ${HEAD_DIMS:+--head-dims $HEAD_DIMS} --out "$OUT/kernel.json"
run bench-atomic timeout 90 python3 -m mpiring.bench kernel --dtypes bf16 --head-dims 128 --seqlens 16384 \
    --dq atomic --out "$OUT/kernel-atomic.json"
run varlen timeout 120 python3 -m mpiring.bench longctx --varlen 65536 --documents 8 --out "$OUT/varlen-1gpu.json"
result_table
