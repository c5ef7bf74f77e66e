"""How long `fusion-advisor analyze` takes, and how much memory, on a large trace.

Builds a trace of about N events by replicating a real one (each copy shifted in time past the
previous one, with its External ids, correlation ids and Python ids offset so every link stays
unique), then runs `fusion-advisor analyze --json` on it in a subprocess and reports wall seconds
and the subprocess's peak RSS.

    python benchmarks/scale_analyze.py                       # ~1M events from the llama fixture
    python benchmarks/scale_analyze.py --events 200000 --keep /tmp/big.json.gz
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ID_KEYS = ("External id", "correlation", "Python id", "Python parent id")


def replicate(src: Path, n_events: int, dest: Path) -> int:
    doc = json.loads(gzip.open(src).read())
    events = doc["traceEvents"]
    timed = [e for e in events if "ts" in e and isinstance(e.get("ts"), (int, float))]
    span = max(e["ts"] + e.get("dur", 0) for e in timed) - min(e["ts"] for e in timed) + 1000.0
    max_id = 1 + max((e.get("args", {}).get(k) or 0) for e in events for k in ID_KEYS
                     if isinstance(e.get("args", {}).get(k), int))
    max_id = max(max_id, 1 + max((e.get("id") or 0) for e in events if isinstance(e.get("id"), int)))
    copies = max(1, round(n_events / len(events)))
    written = 0
    with gzip.open(dest, "wt", compresslevel=1) as out:
        head = {k: v for k, v in doc.items() if k != "traceEvents"}
        out.write(json.dumps(head)[:-1] + ', "traceEvents": [\n')
        first = True
        for c in range(copies):
            for e in events:
                if c:
                    e = dict(e)
                    if isinstance(e.get("ts"), (int, float)):
                        e["ts"] = e["ts"] + c * span
                    if isinstance(e.get("id"), int):
                        e["id"] = e["id"] + c * max_id
                    name = e.get("name", "")
                    if name.startswith("ProfilerStep#"):  # each copy is a new pair of steps
                        e["name"] = f"ProfilerStep#{int(name[13:]) + c * 1000}"
                    args = e.get("args")
                    if args:
                        args = dict(args)
                        for k in ID_KEYS:
                            if isinstance(args.get(k), int):
                                args[k] += c * max_id
                        e["args"] = args
                out.write(("" if first else ",\n") + json.dumps(e))
                first = False
                written += 1
        out.write("\n]}\n")
    return written


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--events", type=int, default=1_000_000)
    p.add_argument("--source", type=Path, default=ROOT / "tests" / "data" / "llama-bf16-h200.json.gz")
    p.add_argument("--keep", type=Path, help="keep the generated trace here")
    args = p.parse_args()
    tmp = Path(tempfile.mkdtemp())
    trace = args.keep or tmp / "big.json.gz"
    t0 = time.perf_counter()
    n = replicate(args.source, args.events, trace)
    build_s = time.perf_counter() - t0
    raw_mb = sum(len(line) for line in gzip.open(trace, "rb")) / 1e6
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "fusion_advisor.cli", "analyze", str(trace), "--json"],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wall = time.perf_counter() - t0
    peak_gb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1e6  # KiB on Linux
    if proc.returncode:
        sys.exit(f"analyze failed: {proc.stderr.strip()}")
    result = json.loads(proc.stdout)
    print(f"machine      {platform.processor() or platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}")
    print(f"trace        {n:,} events, {raw_mb:,.0f} MB of JSON, {trace.stat().st_size / 1e6:,.0f} MB gzipped "
          f"(built in {build_s:.0f} s from {args.source.name})")
    print(f"analyze      {wall:.1f} s wall, peak RSS {peak_gb:.2f} GB")
    print(f"result       {len(result.get('clusters', []))} clusters, {result['summary']['kernels_per_step']:.0f} kernels/step")
    if not args.keep:
        trace.unlink()


if __name__ == "__main__":
    main()
