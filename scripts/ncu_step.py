#!/usr/bin/env python3
"""Per-kernel device times of one decode step from an ncu CSV.

Usage: ncu --csv --metrics gpu__time_duration.sum <bench> ... > ncu.csv
       scripts/ncu_step.py ncu.csv [--marker EmbedKernel]
Prints each kernel of the last complete step (between the last two launches of
the marker kernel, which starts every step) with its time in microseconds, and
the sum. ncu serialises kernels and flushes caches between them, so the times
are upper bounds of what they take inside a CUDA graph.
"""
import csv
import sys


def main():
    path = sys.argv[1]
    marker = sys.argv[sys.argv.index("--marker") + 1] if "--marker" in sys.argv else "EmbedKernel"
    rows, header = [], None
    with open(path, newline="") as f:
        for r in csv.reader(f):
            if "Kernel Name" in r:
                header = r
            elif header and len(r) == len(header):
                rows.append(dict(zip(header, r)))
    starts = [i for i, r in enumerate(rows) if marker in r["Kernel Name"]]
    if len(starts) < 2:
        sys.exit(f"fewer than two '{marker}' launches in {path}")
    step = rows[starts[-2]:starts[-1]]
    us = lambda r: float(r["Metric Value"].replace(",", "")) / 1000.0
    for r in step:
        name = r["Kernel Name"].split("(")[0].replace("retort::<unnamed>::", "")[-56:]
        print(f"{us(r):8.1f}  {name:56s} grid {r['Grid Size']:>14s} block {r['Block Size']}")
    print(f"{sum(us(r) for r in step):8.1f}  total of {len(step)} kernels (us)")


if __name__ == "__main__":
    main()
