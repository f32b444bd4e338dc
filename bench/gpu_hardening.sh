#!/bin/bash
# GPU hardening (issue 7, and issue 4's load test) on a machine with N GPUs, one rank each,
# in under 8 minutes:
#   1. the machine's own MPI (not CUDA-aware): tests/test_gpu_hardening.py (device
#      mismatches, bitwise determinism over nccl and mpi-staged, the GPU soak), then
#      tests/test_gpu_ring.py -k back_to_back (200 queued forward+backward calls per transport);
#   2. the CUDA-aware Open MPI (bench/gpu_env.sh): the same for mpi-cuda and auto.
# Usage: bash bench/gpu_hardening.sh [N]
#   logs and soak.jsonl (one JSON line per soak: seconds, CuPy pool per rank) under $OUT,
#   a short table last. MPIRING_GPU_SOAK_CALLS / MPIRING_LOAD_CALLS (200 each) set the
#   call counts; MPIRING_HARDENING_BUDGET_S (450) the time all jobs share.
# Needs .gpu/openmpi-4.1.4-cuda.tar.gz (step 2) and, where pytest-mpi is missing, its wheel in .whl/.
set -o pipefail
NP=${1:-$(nvidia-smi -L | wc -l)}
. bench/gpu_setup.sh || exit 1
DEADLINE=$((SECONDS + ${MPIRING_HARDENING_BUDGET_S:-450}))
export MPIRING_SOAK_JSON=$OUT/soak.jsonl
export MPIRING_GPU_SOAK_CALLS=${MPIRING_GPU_SOAK_CALLS:-200} MPIRING_LOAD_CALLS=${MPIRING_LOAD_CALLS:-200}
# The float64 oracle runs on the host: share the cores out among the ranks.
cores=$(nproc)
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$((cores / NP > 0 ? cores / NP : 1))}
FORWARD="-x MPIRING_SOAK_JSON -x MPIRING_GPU_SOAK_CALLS -x MPIRING_LOAD_CALLS -x OMP_NUM_THREADS"
rm -f "$MPIRING_SOAK_JSON"
HARDENING="$PYTEST_MPI -s --timeout=150 --timeout-method=thread tests/test_gpu_hardening.py"
LOAD="$PYTEST_MPI --timeout=150 --timeout-method=thread tests/test_gpu_ring.py"

job() {  # job NAME SECONDS CMD...: `run` under `timeout`, capped by what is left of the budget
    local name=$1 want=$2 left=$((DEADLINE - SECONDS - 15))
    shift 2
    if [ "$left" -lt 30 ]; then
        skipped "$name" "out of time (MPIRING_HARDENING_BUDGET_S)"
        return
    fi
    run "$name" timeout -k 10 $((want < left ? want : left)) "$@"
}

job "hardening-system-mpi-n$NP" 170 $SYSTEM_MPIRUN $FORWARD -np "$NP" $HARDENING
job "load-system-mpi-n$NP" 80 $SYSTEM_MPIRUN $FORWARD -np "$NP" $LOAD -k back_to_back
if . bench/gpu_env.sh .gpu/openmpi-4.1.4-cuda.tar.gz; then
    python3 -c "from mpi4py import MPI; print(MPI.Get_library_version().splitlines()[0])"
    job "hardening-cuda-mpi-n$NP" 120 $MPIRUN $FORWARD -np "$NP" $HARDENING -k "mpi-cuda or auto"
    job "load-cuda-mpi-n$NP" 60 $MPIRUN $FORWARD -np "$NP" $LOAD -k "back_to_back and mpi-cuda"
else
    skipped "cuda-mpi-n$NP" "bench/gpu_env.sh failed (.gpu/openmpi-4.1.4-cuda.tar.gz missing?)"
fi

# One table row per soak (rank 0 wrote a JSON line each): time, and the pool's growth.
while IFS=$'\t' read -r name line; do
    jobs+=("$name")
    result[$name]=$line
done < <(python3 - "$MPIRING_SOAK_JSON" <<'EOF'
import json, os, sys
if os.path.exists(sys.argv[1]):
    for line in open(sys.argv[1]):
        r = json.loads(line)
        grow = lambda key: max(p[f"{key}_end"] - p[f"{key}_start"] for p in r["per_rank"]) / 2**20
        wrong = sum(p["wrong"] for p in r["per_rank"])
        print(f"soak-{r['transport']}-n{r['ranks']}\t{r['calls']} calls in {r['seconds']} s, {wrong} wrong (all ranks); "
              f"CuPy pool growth (worst rank): used {grow('used'):+.1f} MiB, total {grow('total'):+.1f} MiB")
EOF
)
echo "(wall time: $SECONDS s)"
result_table
