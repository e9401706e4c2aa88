#!/usr/bin/env python3
"""Summarise a CubeCL profile log from `PROFILE=1 benches/gpu/run.sh` (profile.log or .xz).

CubeCL prints a table of the kernels run since the previous synchronisation at every sync. In
`sd_gpu` each measurement syncs after its warm-up forwards and after its timed ones, so of
each pair of tables the second holds exactly `--iters` forwards. This prints every table's
total and kernel count, then, for the tables named by --tables (default: the largest by kernel
count, normally a timed one), the kernels grouped by family (the name up to its hash) with
their share of the time.

    python3 benches/gpu/profile_summary.py profile.log.xz [--tables 3,5] [--top 25]
"""

import argparse
import lzma
import re
import sys
from collections import defaultdict

UNITS = {"ns": 1e-6, "µs": 1e-3, "us": 1e-3, "ms": 1.0, "s": 1e3}


def ms(text):
    m = re.fullmatch(r"\s*([0-9.]+)\s*(ns|µs|us|ms|s)\s*", text)
    if not m:
        raise ValueError(f"not a duration: {text!r}")
    return float(m.group(1)) * UNITS[m.group(2)]


def tables(lines):
    """Yield each summary table as a list of (name, total ms, count)."""
    rows, inside = [], False
    for line in lines:
        if line.startswith("| Name"):
            rows, inside = [], True
            continue
        if not inside or not line.startswith("|") or "⎼" in line or "⎺" in line:
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        # A name may itself contain " | " (e.g. "KernelScalarBinop | AddOp_…"): the last
        # three cells are duration, count and ratio.
        name, duration, count = " | ".join(cells[:-3]), cells[-3], cells[-2]
        if name == "Total":
            inside = False
            yield rows
            continue
        rows.append((name, ms(duration), int(count)))


def family(name):
    """A kernel's name without the hash CubeCL appends to each compiled variant."""
    return re.sub(r"_[0-9a-f]{6,}\b", "", name)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("log")
    parser.add_argument("--tables", help="comma-separated table indices to detail")
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args()
    opener = lzma.open if args.log.endswith(".xz") else open
    with opener(args.log, "rt", encoding="utf-8") as f:
        all_tables = list(tables(f))
    if not all_tables:
        sys.exit(f"{args.log}: no profile tables")
    print("table  kernels   total ms")
    for i, rows in enumerate(all_tables):
        print(f"{i:5}  {sum(c for _, _, c in rows):7}  {sum(t for _, t, _ in rows):9.3f}")
    if args.tables:
        chosen = [int(i) for i in args.tables.split(",")]
    else:
        chosen = [max(range(len(all_tables)), key=lambda i: sum(c for *_, c in all_tables[i]))]
    for i in chosen:
        groups = defaultdict(lambda: [0.0, 0])
        for name, t, c in all_tables[i]:
            g = groups[family(name)]
            g[0] += t
            g[1] += c
        total = sum(t for t, _ in groups.values())
        print(f"\ntable {i}: {total:.3f} ms in {sum(c for _, c in groups.values())} kernels")
        print(f"{'ms':>9} {'share':>6} {'count':>6}  family")
        for name, (t, c) in sorted(groups.items(), key=lambda kv: -kv[1][0])[: args.top]:
            print(f"{t:9.3f} {100 * t / total:5.1f}% {c:6}  {name}")


if __name__ == "__main__":
    main()
