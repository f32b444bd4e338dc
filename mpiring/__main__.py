"""``python -m mpiring demo [options]``: run the self-checking demo (under mpiexec)."""

import sys


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in ("demo",):
        print("usage: python -m mpiring demo [--help]\n       python -m mpiring.bench {kernel,ring,...}")
        return 2
    from mpiring._entry import run_or_abort
    from mpiring.demo import main as demo

    return run_or_abort(lambda: demo(argv[1:]))


if __name__ == "__main__":
    sys.exit(main())
