# Sourced by bench/gpu_check.sh and bench/gpu_ring.sh on a GPU machine: the environment
# every rank needs, the carried wheels (.whl/, e.g. pytest-mpi, missing on the image),
# and the GPUs listed into $OUT.
export NCCL_NVLS_ENABLE=0 OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/mpiring-out}; mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || return 1
fi
export PYTHONPATH=/tmp/site:$PWD
nvidia-smi -L | tee "$OUT/gpus.txt"
PYTEST="python3 -m mpi4py -m pytest -q -p no:cacheprovider --with-mpi --timeout=600 tests/test_gpu_ring.py"
