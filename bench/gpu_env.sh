# Source on a GPU machine to run mpiring over the CUDA-aware Open MPI of ../shared/cuda-mpi/
# (Open MPI 4.1.4 --with-cuda, smcuda BTL with CUDA IPC). The library never needs this
# file: it only switches which libmpi mpi4py loads, so that `transport="auto"` finds a
# CUDA-aware MPI and picks mpi-cuda.
#
#   . bench/gpu_env.sh [openmpi-4.1.4-cuda.tar.gz]     # default: .gpu/openmpi-4.1.4-cuda.tar.gz
#   $MPIRUN -np 4 python3 -m mpiring.bench ring      # MPIRUN forwards the variables below
#
# mpi4py looks for libmpi in its own environment first; MPI4PY_LIBMPI makes it load this
# one (check: MPI.Get_library_version() says 4.1.4).
_tarball=${1:-${MPIRING_CUDA_MPI_TARBALL:-.gpu/openmpi-4.1.4-cuda.tar.gz}}
_root=${MPIRING_CUDA_MPI_ROOT:-/tmp/ompi-cuda}
if [ ! -x "$_root/openmpi-4.1.4-cuda/bin/mpirun" ]; then
    mkdir -p "$_root" && tar -xzf "$_tarball" -C "$_root" || return 1
fi
export OPAL_PREFIX=$_root/openmpi-4.1.4-cuda
export PATH=$OPAL_PREFIX/bin:$PATH
export LD_LIBRARY_PATH=$OPAL_PREFIX/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
export MPI4PY_LIBMPI=$OPAL_PREFIX/lib/libmpi.so.40
# The machines run commands as root; NVLink multicast stays off (shared hosts).
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 NCCL_NVLS_ENABLE=0
# mpirun with every variable the ranks need; --bind-to none: NCCL's proxy thread and the
# rank's Python must not share one core.
export MPIRUN="mpirun --bind-to none -x PATH -x LD_LIBRARY_PATH -x MPI4PY_LIBMPI -x OPAL_PREFIX -x NCCL_NVLS_ENABLE -x PYTHONPATH -x PYTHONUNBUFFERED"
unset _tarball _root
