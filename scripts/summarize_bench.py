"""Print the README's kernel table from a benchmarks/bench_kernels.py CSV.

    python scripts/summarize_bench.py bench_kernels.csv

One row per pattern and pass: our median GB/s and % of peak over the shapes swept, our speedup
over eager, torch.compile and Liger (geometric mean over shapes: p50 theirs / p50 ours), and the
shapes where another provider is faster than ours. Rows whose numerics failed are left out of the
speedups and named.
"""
from __future__ import annotations

import csv
import math
import statistics
import sys
from collections import defaultdict

OTHERS = ("eager", "compile", "liger")
NAMES = {"eager": "eager", "compile": "torch.compile", "liger": "Liger"}


def load(path: str) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    for r in rows:
        r["p50_ms"] = float(r["p50_ms"])
        r["gbps"] = float(r["gbps"])
        r["pct_peak_bw"] = float(r["pct_peak_bw"]) if r.get("pct_peak_bw") not in ("", None) else None
    return rows


def summarize(rows: list[dict]) -> list[dict]:
    """Per (pattern, pass): figures for our Triton kernel against the others."""
    by_shape: dict[tuple, dict[str, dict]] = defaultdict(dict)
    for r in rows:
        shape = f"{r['shape']} {r['variant']}" if r.get("variant") else r["shape"]   # older CSVs: no variant
        by_shape[(r["pattern"], r["pass"], shape, r["dtype"])][r["provider"]] = r
    out: dict[tuple, dict] = {}
    for (pattern, pass_, shape, dtype), providers in by_shape.items():
        entry = out.setdefault((pattern, pass_), {"pattern": pattern, "pass": pass_, "gbps": [], "pct": [],
                                                  "ratios": defaultdict(list), "losses": [], "failed": []})
        ours = providers.get("triton")
        if ours is None:
            continue
        if ours.get("numerics", "ok") != "ok":
            entry["failed"].append(f"{shape} {dtype}")
            continue
        entry["gbps"].append(ours["gbps"])
        if ours["pct_peak_bw"] is not None:
            entry["pct"].append(ours["pct_peak_bw"])
        for other in OTHERS:
            theirs = providers.get(other)
            if theirs is None or theirs.get("numerics", "ok") != "ok" or ours["p50_ms"] <= 0:
                continue
            ratio = theirs["p50_ms"] / ours["p50_ms"]
            entry["ratios"][other].append(ratio)
            if ratio < 1:
                entry["losses"].append(f"{shape} {dtype} vs {NAMES[other]} ({ratio:.2f}x)")
    return list(out.values())


def geomean(values: list[float]) -> float | None:
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else None


def markdown(summary: list[dict], gpu: str) -> str:
    lines = [f"Kernels on {gpu} (p50; speedup = their time / ours, geometric mean over shapes):", "",
             "| pattern | pass | our GB/s | % of peak | vs eager | vs torch.compile | vs Liger | where we lose |",
             "|---|---|---:|---:|---:|---:|---:|---|"]
    for e in summary:
        gbps = f"{statistics.median(e['gbps']):,.0f}" if e["gbps"] else "—"
        pct = f"{statistics.median(e['pct']):.0f} %" if e["pct"] else "—"
        ratios = [geomean(e["ratios"].get(o, [])) for o in OTHERS]
        cells = [f"{r:.2f}x" if r is not None else "—" for r in ratios]
        losses = "; ".join(e["losses"]) or "—"
        if e["failed"]:
            losses += f"; numerics FAILED on {', '.join(e['failed'])}"
        lines.append(f"| {e['pattern']} | {e['pass']} | {gbps} | {pct} | {' | '.join(cells)} | {losses} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python scripts/summarize_bench.py BENCH.csv", file=sys.stderr)
        return 2
    try:
        rows = load(argv[0])
    except (OSError, KeyError, ValueError) as exc:
        print(f"error: cannot read {argv[0]}: {exc}", file=sys.stderr)
        return 2
    if not rows:
        print(f"error: {argv[0]} has no rows", file=sys.stderr)
        return 2
    gpus = sorted({r["gpu"] for r in rows})
    print(markdown(summarize(rows), ", ".join(gpus)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
