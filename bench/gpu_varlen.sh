#!/bin/bash
# Packed documents on an N-GPU machine (bench/README.md "Long context", seventh session):
# varlen throughput against one sequence of the same length (fixed side: zigzag), for the
# bench's random documents ordered by mpiring.layout.pack_documents with layout=contiguous,
# and in their given order with layout=striped; then every rank's step timeline of the
# packed ring. Over the image's MPI (not CUDA-aware): transport auto -> nccl.
# Usage: bash bench/gpu_varlen.sh [N]      (JSON and logs under $OUT)
#   DOCUMENTS="16 64" TOKENS=32768 (per GPU) are the defaults.
set -o pipefail
NP=${1:-$(nvidia-smi -L | wc -l)}
. bench/gpu_setup.sh || exit 1
RUN="mpirun --bind-to none -np $NP -x PYTHONPATH -x NCCL_NVLS_ENABLE -x PYTHONUNBUFFERED"
L="python3 -m mpiring.bench longctx --varlen ${TOKENS:-32768} --fixed-layout zigzag"
for docs in ${DOCUMENTS:-16 64}; do
    for layout in "contiguous --pack" "striped"; do
        name=varlen$NP-d$docs-${layout%% *}
        timeout 120 $RUN $L --documents "$docs" --layout $layout --out "$OUT/$name.json" 2>&1 | tee "$OUT/$name.log"
    done
    timeout 120 $RUN python3 -m mpiring.bench longctx --timeline "${TOKENS:-32768}" --documents "$docs" --pack \
        --layout contiguous --transports nccl --out "$OUT/timeline$NP-d$docs.json" 2>&1 | tee "$OUT/timeline$NP-d$docs.log"
done
