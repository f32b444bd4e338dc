#!/bin/bash
# The CUDA kernels on one GPU, in one job: the GPU kernel tests against the float64
# oracle, compute-sanitizer (memcheck, racecheck) on bench/sanitize_case.py, then
# `python -m mpiring.bench kernel` beside torch SDPA with deterministic dQ (the default)
# and, at bf16 d128 16k, with atomic dQ; then packed documents against fixed length on
# this GPU (`longctx --varlen`: the kernels' document masks, no ring) and the largest
# context one GPU holds (`longctx --max-context`).
# Usage: bash bench/gpu_kernels.sh      (logs and kernel*.json under $OUT, a table last)
#   TESTS_K: a pytest -k selection of tests/test_gpu_kernels.py; SHARDS=n spreads the tests
#   over GPUs 0..n-1 (each GPU's share at once); SEQLENS (4096,16384);
#   PARTS: which parts run (default "tests sanitizers bench varlen max-context"), e.g. to
#   spread them over the GPUs of one machine, one CUDA_VISIBLE_DEVICES and $OUT each.
#   Opt-in parts: "probe" (bench/varlen_probe.py: wall vs kernel time with documents) and
#   "tiles" (the kernel bench at bf16 d128 16k with TILES_AB, default the 32-key forward,
#   beside the default tiles in the same job).
set -o pipefail
. bench/gpu_setup.sh || exit 1
PARTS=" ${PARTS:-tests sanitizers bench varlen max-context} "
part() { [[ $PARTS == *" $1 "* ]]; }
KERNEL_PYTEST="python3 -m pytest -q -p no:cacheprovider --timeout=120"  # not gpu_setup.sh's $PYTEST (the ring tests)
if part tests && [ "${SHARDS:-1}" -le 1 ]; then
    run tests timeout "${TEST_SECONDS:-420}" $KERNEL_PYTEST -x tests/test_gpu_kernels.py ${TESTS_K:+-k "$TESTS_K"}
elif part tests; then  # SHARDS=n: every n-th test on GPU i (0 ≤ i < n), all at once
    $KERNEL_PYTEST --collect-only tests/test_gpu_kernels.py ${TESTS_K:+-k "$TESTS_K"} | grep '::' > "$OUT/test-ids"
    for ((i = 0; i < SHARDS; i++)); do  # the test ids alone (with the file too, pytest runs it all)
        ids=$(awk -v i=$i -v n="$SHARDS" 'NR % n == i' "$OUT/test-ids")
        [ -z "$ids" ] && continue  # no ids: pytest would run the whole suite
        CUDA_VISIBLE_DEVICES=$i timeout "${TEST_SECONDS:-420}" $KERNEL_PYTEST $ids > "$OUT/tests-gpu$i.log" 2>&1 &
        pids[i]=$!
    done
    for ((i = 0; i < SHARDS; i++)); do
        if [ -n "${pids[i]}" ]; then wait "${pids[i]}"; record "tests-gpu$i" $?; else skipped "tests-gpu$i" "no tests"; fi
    done
fi
if part sanitizers && [ -z "$NO_SANITIZER" ] && command -v compute-sanitizer >/dev/null; then
    run memcheck timeout 120 compute-sanitizer --tool memcheck --error-exitcode 1 python3 bench/sanitize_case.py
    run racecheck timeout 180 compute-sanitizer --tool racecheck --error-exitcode 1 python3 bench/sanitize_case.py
fi
part bench && run bench timeout 240 python3 -m mpiring.bench kernel --seqlens "${SEQLENS:-4096,16384}" ${DTYPES:+--dtypes $DTYPES} \
    ${HEAD_DIMS:+--head-dims $HEAD_DIMS} --out "$OUT/kernel.json"
part bench && run bench-atomic timeout 90 python3 -m mpiring.bench kernel --dtypes bf16 --head-dims 128 --seqlens 16384 \
    --dq atomic --out "$OUT/kernel-atomic.json"
part varlen && run varlen timeout 120 python3 -m mpiring.bench longctx --varlen 65536 --documents 8 --out "$OUT/varlen-1gpu.json"
part probe && run probe timeout 150 python3 bench/varlen_probe.py --out "$OUT/varlen-probe.json"
part tiles && run tiles-default timeout 90 python3 -m mpiring.bench kernel --dtypes bf16 --head-dims 128 \
    --seqlens 16384 --out "$OUT/kernel-tiles-default.json"
part tiles && run tiles-ab timeout 90 python3 -m mpiring.bench kernel --dtypes bf16 --head-dims 128 --seqlens 16384 \
    --tiles "${TILES_AB:-128:fwd=4,2,32;bwd=8,64,128}" --out "$OUT/kernel-tiles-ab.json"
part max-context && run max-context timeout 240 python3 -m mpiring.bench longctx --max-context \
    --out "$OUT/max-context-1gpu.json"
result_table
