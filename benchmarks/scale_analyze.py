"""How long `fusion-advisor analyze` takes, and how much memory, on a large trace.

Builds a trace of about N events by replicating a real one (each copy shifted in time past the
previous one, with its External ids, correlation ids and Python ids offset so every link stays
unique), then runs `fusion-advisor analyze --json` on it in a subprocess and reports wall seconds
and the subprocess's peak RSS.

    python benchmarks/scale_analyze.py                       # ~1M events from the llama fixture
    python benchmarks/scale_analyze.py --events 200000 --keep /tmp/big.json.gz
    python benchmarks/scale_analyze.py --ranks 8             # a torchrun job: 8 ranks of ~1M events, merged

With --ranks N the trace is written N times as trace.rank<k>.json.gz and the multi-rank merge of
`profile --nproc-per-node` (advisor/distributed.py: every rank's step and communication figures,
the slowest rank analysed in full) runs on them; the memory figure is then the peak of the summed
RSS of the merging process and its workers, sampled every 0.1 s.
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
    p.add_argument("--ranks", type=int, default=0, help="merge this many rank traces (advisor/distributed.py)")
    args = p.parse_args()
    if args.ranks:
        return merge_ranks(args)
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


def _tree_rss_bytes(pid: int) -> int:
    """Summed RSS of a process and its descendants, from /proc."""
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(entry))
            rss[int(entry)] = int(fields[21]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, IndexError, ValueError):
            continue
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        total += rss.get(p, 0)
        todo.extend(children.get(p, []))
    return total


def merge_ranks(args) -> None:
    folder = Path(tempfile.mkdtemp())
    first = folder / "trace.rank0.json.gz"
    n = replicate(args.source, args.events, first)
    for k in range(1, args.ranks):
        os.link(first, folder / f"trace.rank{k}.json.gz")
    code = ("import sys; from pathlib import Path; from fusion_advisor.distributed import merge, rank_traces; "
            "r = merge(rank_traces(Path(sys.argv[1]))); print(len(r.distributed['ranks']), len(r.clusters))")
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", code, str(folder)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    peak = 0
    while proc.poll() is None:
        peak = max(peak, _tree_rss_bytes(proc.pid))
        time.sleep(0.1)
    wall = time.perf_counter() - t0
    out, err = proc.communicate()
    if proc.returncode:
        sys.exit(f"merge failed: {err.strip()}")
    print(f"machine      {platform.processor() or platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}")
    print(f"job          {args.ranks} ranks x {n:,} events ({first.stat().st_size / 1e6:,.0f} MB gzipped each)")
    print(f"merge        {wall:.1f} s wall, peak RSS {peak / 1e9:.2f} GB (process tree); ranks, clusters: {out.strip()}")
    for f in folder.iterdir():
        f.unlink()
    folder.rmdir()


if __name__ == "__main__":
    main()
