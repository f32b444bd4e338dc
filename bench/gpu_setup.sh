# Sourced by the bench/gpu_*.sh scripts on a GPU machine: the environment every rank
# needs, the carried wheels (.whl/, e.g. pytest-mpi, missing on the image), the GPUs
# listed into $OUT, and `run`/`result_table` for scripts that run several pytest jobs.
export NCCL_NVLS_ENABLE=0 OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/mpiring-out}; mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || return 1
fi
export PYTHONPATH=/tmp/site:$PWD
nvidia-smi -L | tee "$OUT/gpus.txt"
PYTEST_MPI="python3 -m mpi4py -m pytest -q -p no:cacheprovider --color=no --with-mpi"
PYTEST="$PYTEST_MPI --timeout=600 tests/test_gpu_ring.py"
# The machine's own Open MPI (not CUDA-aware); add -np N. bench/gpu_env.sh's $MPIRUN is the CUDA-aware one.
SYSTEM_MPIRUN="mpirun --bind-to none -x PYTHONPATH -x NCCL_NVLS_ENABLE -x PYTHONUNBUFFERED"

# Jobs and their table: `run NAME CMD...` runs one job, its output into $OUT/NAME.log, and
# keeps its exit status and pytest's last summary line for `result_table`, which prints
# them in the order they ran. `skipped NAME WHY` records a job that could not start.
declare -gA result=()
declare -ga jobs=()
run() {
    local name=$1
    shift
    echo "=== $name: $*"
    "$@" 2>&1 | tee "$OUT/$name.log"
    record "$name" "${PIPESTATUS[0]}"
}
# `record NAME RC`: a job whose output is already in $OUT/NAME.log (e.g. run in the background).
record() {
    local name=$1 rc=$2
    jobs+=("$name")
    case $rc in 124 | 137) rc="$rc (timed out?)" ;; esac
    result[$name]="rc=$rc $(sed 's/\x1b\[[0-9;]*m//g' "$OUT/$name.log" \
        | grep -aE '[0-9]+ (passed|failed|skipped|deselected|errors?|xfailed|xpassed)\b.* in [0-9.]+s' | tail -1)"
}
skipped() {
    jobs+=("$1")
    result[$1]="not run: $2"
}
result_table() {
    local name
    echo; echo "| job | result |"; echo "|---|---|"
    for name in "${jobs[@]}"; do echo "| $name | ${result[$name]} |"; done
}
