"""Stall samples per opcode from Nsight Compute's source page (``ncu -i REP --page source --csv
--print-source sass --kernel-name K > K.csv``), one kernel per CSV, for a side-by-side view.

    python3 bench/ncu_summary.py ours.csv flash.csv

Prints, per file, the share of each stall reason and the opcodes with the most samples (share
of samples, of executed instructions, and their top stall reasons)."""

import collections
import csv
import re
import sys


def summary(path: str) -> str:
    rows = list(csv.reader(open(path)))
    header = rows[1]
    data = [dict(zip(header, r)) for r in rows[2:] if len(r) == len(header)]
    stalls = [h for h in header if h.startswith("stall_") and "Not Issued" not in h]
    total = collections.Counter()
    for d in data:
        for s in stalls:
            total[s] += int(d[s] or 0)
    samples = sum(total.values())
    executed = sum(int(d["Instructions Executed"] or 0) for d in data)
    lines = [f"{path}: {samples} stall samples, {executed} instructions executed",
             "  " + ", ".join(f"{k[6:]} {v / samples:.1%}" for k, v in total.most_common(10))]
    by_op, by_op_exec = collections.Counter(), collections.Counter()
    by_op_stall = collections.defaultdict(collections.Counter)
    for d in data:
        m = re.match(r"\s*(@!?U?P\w+\s+)?([A-Z0-9_]+)", d["Source"])
        op = m.group(2) if m else "?"
        by_op[op] += int(d["Warp Stall Sampling (All Samples)"] or 0)
        by_op_exec[op] += int(d["Instructions Executed"] or 0)
        for s in stalls:
            by_op_stall[op][s[6:]] += int(d[s] or 0)
    for op, n in by_op.most_common(14):
        top = ", ".join(f"{k} {c / samples:.1%}" for k, c in by_op_stall[op].most_common(3))
        lines.append(f"  {op:10s} samples {n / samples:6.1%}  executed {by_op_exec[op] / executed:6.1%}  top: {top}")
    return "\n".join(lines)


if __name__ == "__main__":
    print("\n".join(summary(p) for p in sys.argv[1:]))
