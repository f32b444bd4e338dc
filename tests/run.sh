#!/usr/bin/env bash
# The whole test suite, as CI runs it: -n 1 (plain pytest), then -n 2, 3, 4 under mpiexec.
#   bash tests/run.sh [extra pytest args]
# `python -m mpi4py` turns an uncaught exception on one rank into MPI_Abort, and
# pytest-timeout's thread method ends a hung rank: a failure never hangs the run.
set -euo pipefail
cd "$(dirname "$0")/.."
# One BLAS thread per rank: 4 ranks × N BLAS threads on a few cores thrash.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" OPENBLAS_NUM_THREADS="${OPENBLAS_NUM_THREADS:-1}"
timeout_s="${MPIRING_TEST_TIMEOUT:-300}"
echo "== -n 1"
python -m pytest -q --timeout="$timeout_s" "$@"
for n in 2 3 4; do
    echo "== -n $n"
    mpiexec -n "$n" python -m mpi4py -m pytest -q -p no:cacheprovider --with-mpi -x \
        --timeout="$timeout_s" --timeout-method=thread "$@"
done
