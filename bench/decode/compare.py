#!/usr/bin/env python3
"""Sets retort's decode_bench JSON lines beside torch_v4.py's (same GPU, same
run) as a markdown table: per-layer step time of each, tokens/s at the
retort stack's depth, and the speed ratio per layer (the two stacks may hold
different layer counts: bf16 experts fill memory four times faster).

usage: compare.py RETORT_LOG TORCH_JSONL
"""
import json
import sys


def load(path):
    rows = {}
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line.startswith("{"):
                continue
            r = json.loads(line)
            if r.get("skipped"):
                continue
            rows[(r["batch"], r["context"])] = r
    return rows


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    ours, theirs = load(sys.argv[1]), load(sys.argv[2])
    print("| batch | context | retort ms/layer | % of roofline | PyTorch ms/layer | retort speed-up |")
    print("|---:|---:|---:|---:|---:|---:|")
    for key in sorted(ours):
        r = ours[key]
        t = theirs.get(key)
        roof = 100.0 * r["roofline_ms"] / r["ms_per_step"]
        torch_ms = f'{t["ms_per_layer"]:.3f}' if t else "skipped"
        ratio = f'{t["ms_per_layer"] / r["ms_per_layer"]:.2f}x' if t else "-"
        print(f'| {key[0]} | {key[1]} | {r["ms_per_layer"]:.3f} | {roof:.0f}% | {torch_ms} | {ratio} |')


if __name__ == "__main__":
    main()
