#!/bin/bash
# The ring benchmark and the GPU tests at -n N on an N-GPU machine, in one job:
#   1. python -m mpiring.bench ring over the CUDA-aware Open MPI (bench/gpu_env.sh), so
#      that all three transports (mpi-cuda, nccl, mpi-staged) run, beside torch CP;
#   2. tests/test_gpu_ring.py at -n N over the CUDA-aware MPI (every transport);
#   3. the auto-choice tests over the machine's own MPI (not CUDA-aware: auto -> nccl).
# Usage: bash bench/gpu_ring.sh [N] [bench options...]   (JSON + logs under $OUT, table last)
set -o pipefail
NP=${1:-$(nvidia-smi -L | wc -l)}; shift
. bench/gpu_setup.sh || exit 1
(
    . bench/gpu_env.sh .gpu/openmpi-4.1.4-cuda.tar.gz || exit 1
    $MPIRUN -np "$NP" python3 -m mpi4py -m mpiring.bench ring --out "$OUT/ring.json" "$@" 2>&1 | tee "$OUT/bench-ring.log"
    $MPIRUN -np "$NP" $PYTEST 2>&1 | tee "$OUT/cuda-mpi-n$NP.log"
)
mpirun --bind-to none -np "$NP" -x PYTHONPATH -x NCCL_NVLS_ENABLE -x PYTHONUNBUFFERED $PYTEST -k "auto or refused" 2>&1 \
    | tee "$OUT/system-mpi-n$NP.log"
echo; echo "== tests"
for f in "$OUT"/cuda-mpi-n*.log "$OUT"/system-mpi-n*.log; do
    echo "$(basename "$f"): $(grep -aE '(passed|failed|error)' "$f" | tail -1)"
done
echo "== ring"; sed -n '/^wrote/,$p' "$OUT/bench-ring.log"
