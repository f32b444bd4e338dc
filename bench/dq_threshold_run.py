"""``python -m mpiring.bench ARGS`` with the deterministic backward's dQ order threshold
(:data:`mpiring.backends.cupy_.DQ_INCREASING_DOCUMENTS`) set to ``$DQ_THR`` tokens: the
A/B of that threshold in bench/README.md (Long context, "Sixteenth session").

    DQ_THR=16384 mpiexec -n 4 python3 bench/dq_threshold_run.py longctx --varlen 131072 --documents 64 ...
"""

import os
import sys

import mpiring.backends.cupy_ as cupy_backend
from mpiring.bench import main

if __name__ == "__main__":
    cupy_backend.DQ_INCREASING_DOCUMENTS = int(os.environ["DQ_THR"])
    print(f"DQ_INCREASING_DOCUMENTS = {cupy_backend.DQ_INCREASING_DOCUMENTS}", file=sys.stderr)
    sys.exit(main())
