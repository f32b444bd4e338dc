"""A rank that dies mid-ring ends the whole job within 5 s when run the documented way
(``mpiexec -n N python -m mpi4py script.py``, README "Errors and failing ranks").

Each case launches its own ``mpiexec -n 4`` (the one next to this Python), so it runs
at -n 1 only (``serial``). The abort time is measured from the failing rank's
timestamp, written just before it fails, to the end of ``mpiexec``.

Without ``python -m mpi4py`` nobody calls MPI_Abort and the other ranks would wait in
the ring forever; with ``timeout=`` they raise TimeoutError instead, and the job ends.
"""

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

WORKER = Path(__file__).with_name("abort_worker.py")
ABORT_WITHIN_S = 5.0


def _mpiexec() -> str | None:
    beside = Path(sys.executable).parent / "mpiexec"
    return str(beside) if beside.exists() else shutil.which("mpiexec")


def _clean_env(timeout) -> dict:
    # This pytest process is an MPI singleton: its PMI variables would confuse a
    # nested mpiexec.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PMI_", "PMIX_", "MPIR_", "HYDRA_", "MPI_"))}
    env.update(OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MPIRING_ABORT_TIMEOUT=str(timeout or 0))
    return env


@pytest.mark.serial
@pytest.mark.parametrize("mode,launcher,timeout", [
    ("raise", ["-m", "mpi4py"], None),
    ("raise-backward", ["-m", "mpi4py"], None),
    ("exit", ["-m", "mpi4py"], None),
    ("raise", [], 1.0),  # no MPI_Abort: the ring waits time out on the other ranks
    ("raise-entry", [], None),  # no python -m mpi4py: the entry points' run_or_abort aborts
], ids=["raise", "raise-backward", "exit", "raise-without-mpi4py-timeout", "raise-entry-point"])
def test_failing_rank_ends_the_job(tmp_path, mode, launcher, timeout):
    mpiexec = _mpiexec()
    if mpiexec is None:
        pytest.skip("no mpiexec next to this Python or on PATH")
    stamp = tmp_path / "failed_at"
    cmd = [mpiexec, "-n", "4", sys.executable, *launcher, str(WORKER), mode, str(stamp)]
    started = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=_clean_env(timeout), text=True)
    try:
        output, _ = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        proc.kill()
        output, _ = proc.communicate()
        pytest.fail(f"mpiexec still running after 120 s (a hang):\n{output[-3000:]}")
    ended = time.time()
    assert stamp.exists(), f"the failure was never injected (exit code {proc.returncode}):\n{output[-3000:]}"
    abort_s = ended - float(stamp.read_text())
    print(f"\n{mode}: job ended {abort_s:.2f} s after the failure (whole run {ended - started:.1f} s), "
          f"exit code {proc.returncode}")
    assert proc.returncode != 0, f"exit code 0 after a failing rank:\n{output[-3000:]}"
    assert abort_s < ABORT_WITHIN_S, f"the job took {abort_s:.2f} s to end after the failure:\n{output[-3000:]}"
