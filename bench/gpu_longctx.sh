#!/bin/bash
# Long context on an N-GPU machine, in one job (bench/README.md "Long context"):
#   1. examples/long_context.py: exact causal attention over $TOKENS (default 4M) tokens,
#      bf16, 8 heads, head dim 128, zigzag, forward and backward, sampled-row float64 check;
#   2. python -m mpiring.bench longctx: peak memory vs memory_estimate at several sizes,
#      the largest context that fits (N GPUs and one), varlen vs fixed, step timelines.
# Over the image's MPI (not CUDA-aware): transport auto -> nccl (mpi-staged in the timeline).
# Usage: bash bench/gpu_longctx.sh [N]      (JSON, logs and figures under $OUT)
#   TOKENS=0 skips the example; LONGCTX_ARGS replaces the bench's options (below).
set -o pipefail
NP=${1:-$(nvidia-smi -L | wc -l)}
. bench/gpu_setup.sh || exit 1
RUN="mpirun --bind-to none -np $NP -x PYTHONPATH -x NCCL_NVLS_ENABLE -x PYTHONUNBUFFERED"
[ "${TOKENS:-4M}" != 0 ] && timeout "${EXAMPLE_TIMEOUT:-290}" $RUN python3 examples/long_context.py --tokens "${TOKENS:-4M}" \
    --json "$OUT/long_context.json" 2>&1 | tee "$OUT/long_context.log"
# whatever is left of a ~555 s job (the device tool's 10-minute call) goes to the bench
# (at least 10 s: `timeout 0` would mean no limit at all)
left=$(( ${JOB_SECONDS:-555} - SECONDS )); [ "$left" -lt 10 ] && left=10
timeout "$left" $RUN python3 -m mpiring.bench longctx ${LONGCTX_ARGS:---memory 65536,262144 --memory-window 1024 \
    --memory-varlen 16384,65536 --varlen 32768 --timeline 32768 --max-context} --out "$OUT/longctx.json" --plot "$OUT" \
    2>&1 | tee "$OUT/longctx.log"
