#!/bin/bash
# GPU correctness of the three transports, for a GPU machine with N GPUs (one rank each):
#   1. the machine's own MPI (not CUDA-aware): nccl, mpi-staged; mpi-cuda must be refused;
#   2. the CUDA-aware Open MPI (bench/gpu_env.sh): mpi-cuda, and auto must pick it.
# Usage: bash bench/gpu_check.sh [N]     (logs under $OUT, a short table last)
# Needs .gpu/openmpi-4.1.4-cuda.tar.gz and, where pytest-mpi is missing, its wheel in .whl/.
set -o pipefail
NP=${1:-$(nvidia-smi -L | wc -l)}
. bench/gpu_setup.sh || exit 1

run "system-mpi-n$NP" $SYSTEM_MPIRUN -np "$NP" $PYTEST
if . bench/gpu_env.sh .gpu/openmpi-4.1.4-cuda.tar.gz; then
    python3 -c "from mpi4py import MPI; print(MPI.Get_library_version().splitlines()[0])"
    ompi_info --parsable --all | grep mpi_built_with_cuda_support
    run "cuda-mpi-n$NP" $MPIRUN -np "$NP" $PYTEST -k "mpi-cuda or auto"
else
    skipped "cuda-mpi-n$NP" "bench/gpu_env.sh failed (.gpu/openmpi-4.1.4-cuda.tar.gz missing?)"
fi
result_table
