"""Ring attention forward and backward on random data, checked against the float64 oracle.

    mpiexec -n 4 python examples/ring_attention_demo.py [--seqlen-local 512 --dtype bfloat16 ...]

The same as ``python -m mpiring demo``.
"""

import sys

from mpiring.demo import main

if __name__ == "__main__":
    sys.exit(main())
