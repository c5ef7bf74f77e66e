"""The norm family's sweep: rms_norm, add_rms_norm, layer_norm, add_layer_norm, group_norm over row lengths
N x row counts x dtypes, forward and forward+backward, beside eager PyTorch (the exact reference),
torch.compile(dynamic=False) of it and Liger-Kernel where it is installed (issue 14). group_norm
runs over (rows, N) in groups of 64 channels (one group below 64): the per-head GroupNorm of
RWKV / RetNet-style blocks, the pattern's own bench shapes.

    python benchmarks/bench_norms.py --out benchmarks/results/bench-norms-h100.csv   # ~6 min on an H100
    python benchmarks/bench_norms.py --quick                                           # ~1.5 min
    python benchmarks/bench_norms.py --patterns layer_norm --n 64,768 --rows 1048576 --dtypes bfloat16
    python benchmarks/bench_norms.py --n 1024 --rows 65536 --providers triton,compile --bwd-tile 4096   # A/B a tile
    python benchmarks/bench_norms.py --tune --dtypes bfloat16 ...     # search tiles on this GPU first (norm_tune.py)
    python benchmarks/bench_norms.py --table benchmarks/results/bench-norms-sweep-h100-6c20075.csv   # README table

Shapes run most important first, so that a time budget cuts the least useful ones: bf16 at 64k rows
for every N (in an order that spreads any prefix over short and long rows), then 4k and ~1M rows,
then fp32. torch.compile compiles every shape afresh (~5-10 s a shape on a cold cache): with all
five patterns, 64k rows of bf16 alone take ~6-8 minutes; --patterns and --n cut it. The largest row count is capped so no
tensor exceeds --max-tensor-bytes (2^28 by default). Every (pattern, shape, dtype) times both
passes and every provider.

GB/s divides the pattern's `fused_bytes` (what our fused launch moves, counted as the cost model
counts it, P = this GPU's SMs) by the median time, for every provider, so the providers' GB/s
compare directly; % copy is against a device-to-device copy measured once at the start (or
`--profile`'s calibrated figure). Timing is fusion_advisor.measure's, the code `fusion-advisor
bench` uses: GPU time between CUDA events (a spin kernel keeps launches ahead), input sets rotated
when one set fits in L2. The CSV has one row per (pattern, N, rows, dtype, pass, provider) with the
GPU, driver, torch, triton and liger versions; the end of the run prints, per pattern, the worst
shape against torch.compile and the worst % of copy.
"""
from __future__ import annotations

import argparse
import csv
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_kernels import environment, peak_bandwidth, significant  # noqa: E402  (the sibling script)

PATTERNS = ("rms_norm", "add_rms_norm", "layer_norm", "add_layer_norm", "group_norm")
# The 11 row lengths of issue 14, in the order they run: any prefix a time budget leaves is spread
# from short rows to long ones.
N_VALUES = (1024, 64, 8192, 768, 4096, 256, 16384, 512, 2048, 128, 5120)
ROW_VALUES = (65536, 4096, 1 << 20)
QUICK_N = (1024, 64, 8192, 768, 4096)
PASSES = ("forward", "forward+backward")
PROVIDERS = ("eager", "compile", "compile-max", "triton", "liger")
TILE_KNOBS = {"fwd_tile": "FWD_TILE", "bwd_tile": "BWD_TILE", "bwd_per_thread": "BWD_PER_THREAD",
              "warps_per_sm": "WARPS_PER_SM", "acc_in_memory_cols": "ACC_IN_MEMORY_COLS",
              "db_in_memory_cols": "DB_IN_MEMORY_COLS", "bwd_prefetch_tile": "BWD_PREFETCH_TILE",
              "reload_cols": "RELOAD_COLS"}
# (bench flag -> kernels/norm_tiles.py constant)
COLUMNS = ["gpu", "driver", "torch", "triton", "liger", "tiles", "pattern", "n", "rows", "dtype", "pass", "provider",
           "p20_ms", "p50_ms", "p80_ms", "gbps", "pct_copy", "vs_compile", "vs_eager", "vs_compile_max", "numerics"]


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--patterns", default=",".join(PATTERNS))
    ap.add_argument("--n", default=None, help="comma-separated row lengths (default: the 11 of issue 14)")
    ap.add_argument("--rows", default=None, help="comma-separated row counts (default: 65536,4096,1048576)")
    ap.add_argument("--dtypes", default="bfloat16,float32")
    ap.add_argument("--providers", default="eager,compile,triton,liger",
                    help=f"comma-separated, of {', '.join(PROVIDERS)} (compile-max: mode="
                         "max-autotune-no-cudagraphs, minutes of autotuning per shape)")
    ap.add_argument("--quick", action="store_true", help=f"N in {QUICK_N}, 65536 rows, bf16, short timing loops")
    ap.add_argument("--time-budget", type=float, default=None,
                    help="seconds after which no new shape starts (default 330; 90 with --quick); "
                         "the shapes skipped are listed")
    ap.add_argument("--max-tensor-bytes", type=int, default=1 << 28)
    ap.add_argument("--profile", default=None, help="DeviceProfile JSON (fusion-advisor calibrate) for the "
                                                    "copy bandwidth; default: measure a copy here")
    ap.add_argument("--out", default="bench_norms.csv")
    ap.add_argument("--tune", action="store_true", help="first search the tiles of the sweep's row lengths and "
                                                        "dtypes on this GPU (kernels/norm_tune.py; ~10 s per "
                                                        "row length and dtype) and sweep with them")
    ap.add_argument("--compile-jobs", type=int, default=0,
                    help="first compile every shape's torch.compile and Triton kernels in this many processes "
                         "(inductor's and Triton's on-disk caches), so the timing loop compiles from cache: "
                         "the sweep is mostly compile time otherwise")
    ap.add_argument("--warm-shard", default=None, help=argparse.SUPPRESS)   # I/K: --compile-jobs' workers
    ap.add_argument("--table", metavar="CSV", default=None,
                    help="print a sweep CSV as the README's markdown table and stop (no GPU needed)")
    for flag, const in TILE_KNOBS.items():
        ap.add_argument("--" + flag.replace("_", "-"), type=int, default=None,
                        help=f"override norm_tiles.{const} for this run (to compare tile tables)")
    ap.add_argument("--no-pdl", action="store_true",
                    help="launch the backward's parameter-grad kernel after the backward ends, not while it "
                         "runs (kernels/common.py PDL: to compare)")
    ap.add_argument("--heuristic-tiles", action="store_true",
                    help="ignore the tuned tile tables (shipped and the user's): the heuristic's tiles, "
                         "with the overrides above")
    args = ap.parse_args(argv)
    ints = lambda text: [int(v) for v in text.split(",") if v.strip()]  # noqa: E731
    args.patterns = [p.strip() for p in args.patterns.split(",") if p.strip()]
    args.providers = [p.strip() for p in args.providers.split(",") if p.strip()]
    args.dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    args.n = ints(args.n) if args.n else list(QUICK_N if args.quick else N_VALUES)
    args.rows = ints(args.rows) if args.rows else ([65536] if args.quick else list(ROW_VALUES))
    if args.quick and args.dtypes == ["bfloat16", "float32"]:
        args.dtypes = ["bfloat16"]
    if args.time_budget is None:
        args.time_budget = 90.0 if args.quick else 330.0
    for p in args.providers:
        if p not in PROVIDERS:
            ap.error(f"unknown provider {p!r}")
    if "triton" not in args.providers:
        ap.error("--providers must include triton: every ratio is ours against another")
    return args


def shape_plan(args) -> list[tuple[str, int, int, str]]:
    """(pattern, n, rows, dtype), most important first: bf16 before fp32, the first row count
    before the others; the largest row counts capped at --max-tensor-bytes a tensor."""
    import torch
    plan = []
    for dtype in args.dtypes:
        size = getattr(torch, dtype).itemsize
        for rows in args.rows:
            for n in args.n:
                fitted = min(rows, args.max_tensor_bytes // (n * size))
                smaller = [r for r in args.rows if r < rows]
                if fitted < rows and smaller and fitted <= max(smaller):
                    continue  # the cap brings it down to a row count the sweep already has
                for pattern in args.patterns:
                    plan.append((pattern, n, fitted, dtype))
    seen, unique = set(), []
    for item in plan:
        if item not in seen:
            seen.add(item)
            unique.append(item)
    return unique


def set_tiles(args) -> str:
    """Apply the --*-tile overrides to kernels/norm_tiles.py's table; the table as a CSV label."""
    from fusion_advisor.kernels import norm_tiles
    for flag, const in TILE_KNOBS.items():
        value = getattr(args, flag)
        if value is not None:
            setattr(norm_tiles, const, value)
    if args.heuristic_tiles:
        norm_tiles.tuned_table = lambda gpu: {}
    if args.no_pdl:
        from fusion_advisor.kernels import common
        common.PDL = False
    norm_tiles.fwd_config.cache_clear()
    norm_tiles.bwd_config.cache_clear()
    return (f"fwd{norm_tiles.FWD_TILE}/bwd{norm_tiles.BWD_TILE}x{norm_tiles.BWD_PER_THREAD}"
            f"/{norm_tiles.WARPS_PER_SM}w/mem{norm_tiles.ACC_IN_MEMORY_COLS}/dbmem{norm_tiles.DB_IN_MEMORY_COLS}"
            f"/pf{norm_tiles.BWD_PREFETCH_TILE}/reload{norm_tiles.RELOAD_COLS}{'/no-pdl' if args.no_pdl else ''}")


# A provider whose one call takes longer is left out of that pass: timing it would spend the sweep's
# budget (Liger's group_norm backward on (rows, N) inputs took ~4 s a call on an H100, 73 s a shape).
SLOW_CALL_S = 0.25


def one_call_s(work, fn) -> float:
    """Seconds one call of fn takes on set 0 (after a first call that compiles and warms)."""
    import torch
    for _ in range(2):
        work.clear_grads(0)
        torch.cuda.synchronize()
        started = time.perf_counter()
        work.call(fn, 0)()
        torch.cuda.synchronize()
    return time.perf_counter() - started


def provider_fn(pattern, provider: str, measure):
    if provider == "compile-max":
        import torch
        torch._dynamo.reset()
        return torch.compile(pattern.reference, dynamic=False, mode="max-autotune-no-cudagraphs")
    return measure.provider_callable(pattern, provider)


def bench_one(pattern, params, providers, device, env, copy_bw, rep_ms, warmup_ms, measure, numerics_ok) -> list[dict]:
    from fusion_advisor.cost_model.timing import time_calls

    fns = {}
    for provider in providers:
        try:
            fns[provider] = provider_fn(pattern, provider, measure)
        except measure.ProviderUnavailable:
            continue
    moved = pattern.fused_bytes(params)
    rows = []
    for pass_ in PASSES:
        backward = pass_ == "forward+backward"
        work = measure.build_workload(pattern, params, device, backward=backward, requires_grad=True)
        nbytes = moved["forward"] + (moved["backward"] if backward else 0)
        times = {}
        for provider, fn in fns.items():
            try:
                call_s = one_call_s(work, fn)
                if call_s > SLOW_CALL_S and provider != "triton":
                    print(f"    {provider} {pass_}: left out, {call_s:.2f} s a call", flush=True)
                    continue
                times[provider] = time_calls(work.calls(fn), device, before=work.clear_grads,
                                                     warmup_ms=warmup_ms, rep_ms=rep_ms)
            except Exception as exc:  # one provider failing (Liger on an odd shape) must not lose the others
                print(f"    {provider} {pass_}: FAILED {type(exc).__name__}: {str(exc)[:200]}", flush=True)
        ours = times.get("triton")
        for provider, t in times.items():
            gbps = nbytes / (t.p50_us * 1e-6) / 1e9
            row = {**env, "pattern": pattern.name, "n": params["shape"][-1], "rows": params["shape"][0],
                   "dtype": params["dtype"], "pass": pass_, "provider": provider,
                   "p20_ms": round(t.p20_us / 1e3, 5), "p50_ms": round(t.p50_us / 1e3, 5),
                   "p80_ms": round(t.p80_us / 1e3, 5), "gbps": significant(gbps),
                   "pct_copy": round(100 * gbps * 1e9 / copy_bw, 1) if copy_bw else "",
                   "vs_compile": "", "vs_eager": "", "vs_compile_max": "",
                   "numerics": numerics_ok if provider == "triton" else ""}
            if provider == "triton":
                for other in ("compile", "eager"):
                    if other in times:
                        row[f"vs_{other}"] = round(times[other].p50_us / t.p50_us, 3)
                if "compile-max" in times:
                    row["vs_compile_max"] = round(times["compile-max"].p50_us / t.p50_us, 3)
            rows.append(row)
        if ours:
            pct = f"{100 * nbytes / (ours.p50_us * 1e-6) / copy_bw:5.1f}% copy" if copy_bw else ""
            line = f"    {pass_:<17} ours {ours.p50_us:9.1f} us {pct}"
            for other in ("eager", "compile", "compile-max", "liger"):
                if other in times:
                    line += f" | {other} {times[other].p50_us / ours.p50_us:5.2f}x"
            print(line, flush=True)
        del work
    return rows


def warm_shard(args, shard: int, shards: int) -> int:
    """Build every `shards`-th shape of the plan from `shard` on: compile and Triton kernels run
    once each pass, untimed, filling the on-disk caches the timing process then reads."""
    import torch
    from fusion_advisor import measure
    from fusion_advisor.kernels import registry
    from fusion_advisor.kernels.common import sm_count
    device, done = torch.device("cuda"), 0
    set_tiles(args)
    for index, (name, n, n_rows, dtype) in enumerate(shape_plan(args)):
        if index % shards != shard:
            continue
        pattern, params = registry.get(name), shape_params(name, n, n_rows, dtype, sm_count(device))
        try:
            for provider in [p for p in args.providers if p in ("compile", "compile-max", "triton")]:
                fn = provider_fn(pattern, provider, measure)
                for pass_ in PASSES:
                    work = measure.build_workload(pattern, params, device, backward=pass_ == "forward+backward",
                                                  requires_grad=True, n_sets=1)
                    work.calls(fn)[0]()
            torch.cuda.synchronize()
            done += 1
        except Exception:  # the timing process reports it
            pass
        torch._dynamo.reset()
        torch.cuda.empty_cache()
    return done


def compile_in_parallel(args, argv, jobs: int) -> None:
    """--compile-jobs: `jobs` copies of this script, each warming its shard of the plan."""
    from fusion_advisor.kernels.norm_tune import run_shards
    base = [sys.executable, __file__, *(argv if argv is not None else sys.argv[1:])]
    print(f"compiled the plan's {len(shape_plan(args))} shapes {run_shards(base, '--warm-shard', jobs)}", flush=True)


def shape_params(name: str, n: int, n_rows: int, dtype: str, sms: int) -> dict:
    """The pattern's params for one sweep shape (group_norm in groups of 64 channels)."""
    params = {"shape": [n_rows, n], "dtype": dtype, "eps": 1e-6 if "rms" in name else 1e-5, "num_sms": sms}
    if name == "group_norm":
        params["num_groups"] = max(1, n // 64)
    return params


def write_csv(rows: list[dict], path: str) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)


def summary(rows: list[dict]) -> list[str]:
    """Per pattern and pass (ours, bf16 and fp32 together): the worst shape against torch.compile,
    the worst % of copy, and the geometric mean against compile."""
    lines = []
    ours = [r for r in rows if r["provider"] == "triton"]
    for key in sorted({(r["pattern"], r["pass"]) for r in ours}):
        group = [r for r in ours if (r["pattern"], r["pass"]) == key]
        line = f"{key[0]:<15}{key[1]:<17}"
        vs = [r for r in group if r["vs_compile"] != ""]
        if vs:
            worst = min(vs, key=lambda r: r["vs_compile"])
            geo = math.exp(sum(math.log(r["vs_compile"]) for r in vs) / len(vs))
            line += (f" worst vs compile {worst['vs_compile']:.2f}x at {worst['rows']}x{worst['n']} {worst['dtype']}"
                     f" | geomean {geo:.2f}x")
        pct = [r for r in group if r["pct_copy"] != ""]
        if pct:
            low = min(pct, key=lambda r: r["pct_copy"])
            line += f" | lowest {low['pct_copy']}% copy at {low['rows']}x{low['n']} {low['dtype']}"
        ve = [r for r in group if r["vs_eager"] != ""]
        if ve:
            worst_e = min(ve, key=lambda r: r["vs_eager"])
            line += f" | worst vs eager {worst_e['vs_eager']:.2f}x at {worst_e['rows']}x{worst_e['n']}"
        lines.append(line)
    return lines


def markdown_table(rows: list[dict], pass_: str = "forward+backward") -> list[str]:
    """Issue 14's view of a sweep CSV's rows (ours): one line per pattern, one column per row length,
    each cell "% of copy / x torch.compile" at the largest row count swept there, then per pattern
    the geometric mean against compile and the worst shape at any row count."""
    ours = [r for r in rows if r["provider"] == "triton" and r["pass"] == pass_ and r["vs_compile"] != ""]
    ns = sorted({int(r["n"]) for r in ours})
    lines = ["| pattern | " + " | ".join(f"N = {n}" for n in ns) + " | geomean vs compile | worst vs compile |",
             "|---|" + "---:|" * (len(ns) + 2)]
    for pattern in [p for p in PATTERNS if any(r["pattern"] == p for r in ours)]:
        mine = [r for r in ours if r["pattern"] == pattern]
        cells = []
        for n in ns:
            at_n = [r for r in mine if int(r["n"]) == n]
            if not at_n:
                cells.append("—")
                continue
            r = max(at_n, key=lambda r: int(r["rows"]))
            cells.append(f"{float(r['pct_copy']):.0f} % / {float(r['vs_compile']):.2f}×")
        geo = math.exp(sum(math.log(float(r["vs_compile"])) for r in mine) / len(mine))
        worst = min(mine, key=lambda r: float(r["vs_compile"]))
        lines.append(f"| {pattern} | " + " | ".join(cells) + f" | {geo:.2f}× | {float(worst['vs_compile']):.2f}× at "
                     f"{int(worst['rows']):,} × {worst['n']} |")
    return lines


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.table:
        try:
            with open(args.table, newline="", encoding="utf-8") as fh:
                print("\n".join(markdown_table(list(csv.DictReader(fh)))))
        except (OSError, KeyError, ValueError) as exc:   # no file, or not a bench_norms CSV
            print(f"error: {args.table}: not a bench_norms.py CSV ({type(exc).__name__}: {exc})", file=sys.stderr)
            return 2
        return 0
    import torch
    if not torch.cuda.is_available():
        print("error: no CUDA GPU (the norm kernels' CPU checks are tests/kernels/test_norm_core.py)", file=sys.stderr)
        return 3
    from fusion_advisor import measure
    from fusion_advisor.kernels import registry
    from fusion_advisor.kernels.common import sm_count
    from fusion_advisor.kernels.numerics import compare_pattern

    device = torch.device("cuda")
    if args.warm_shard:
        shard, shards = (int(v) for v in args.warm_shard.split("/"))
        warm_shard(args, shard, shards)
        return 0
    try:
        patterns = {name: registry.get(name) for name in args.patterns}
    except KeyError as exc:
        print(f"error: {exc.args[0]}", file=sys.stderr)
        return 2
    env = environment(device)
    try:
        import importlib.metadata as md
        env["liger"] = md.version("liger-kernel")
    except Exception:
        env["liger"] = ""
    env["tiles"] = set_tiles(args)
    if args.tune:
        from fusion_advisor.kernels import norm_tune
        tune_start = time.perf_counter()
        path = norm_tune.tune(args.n, [getattr(torch, d) for d in args.dtypes], device)
        print(f"tuned in {time.perf_counter() - tune_start:.0f} s: {path}", flush=True)
    from fusion_advisor.kernels import norm_tiles
    if norm_tiles.tuned_table(norm_tiles.gpu_name(device)):
        env["tiles"] += " + tuned " + norm_tiles.tuned_path(norm_tiles.gpu_name(device)).name
    copy_bw, source = peak_bandwidth(args.profile, device)
    print(f"{env['gpu']} | driver {env['driver']} | torch {env['torch']} | triton {env['triton']} | "
          f"liger {env['liger'] or '-'} | tiles {env['tiles']} | copy {copy_bw / 1e9:,.0f} GB/s ({source})", flush=True)
    rep_ms, warmup_ms = (30.0, 10.0) if args.quick else (60.0, 15.0)
    sms = sm_count(device)
    started, rows, skipped = time.perf_counter(), [], []   # the budget counts the parallel compile too
    if args.compile_jobs > 1:
        compile_in_parallel(args, argv, args.compile_jobs)
    for name, n, n_rows, dtype in shape_plan(args):
        label = f"{name} {n_rows}x{n} {dtype}"
        if time.perf_counter() - started > args.time_budget:
            skipped.append(label)
            continue
        pattern = patterns[name]
        params = shape_params(name, n, n_rows, dtype, sms)
        print(f"  {label}", flush=True)
        try:
            check = compare_pattern(pattern, {**params, "shape": [min(n_rows, 4096), n]}, device, backward=True)
            numerics_ok = "ok" if check.ok else "FAILED: " + check.detail.splitlines()[0][:200]
            if not check.ok:
                print(f"    numerics {numerics_ok}", flush=True)
            shape_started = time.perf_counter()
            rows += bench_one(pattern, params, args.providers, device, env, copy_bw, rep_ms, warmup_ms, measure,
                              numerics_ok)
            print(f"    ({time.perf_counter() - shape_started:.1f} s)", flush=True)
        except Exception as exc:  # one broken shape must not lose the rest of the sweep
            print(f"    FAILED: {type(exc).__name__}: {str(exc)[:300]}", flush=True)
            skipped.append(label + " (failed)")
        torch._dynamo.reset()
        torch.cuda.empty_cache()
        write_csv(rows, args.out)   # after every shape: a run cut short keeps what it measured
    print(f"swept in {time.perf_counter() - started:.0f} s; wrote {args.out} ({len(rows)} rows)")
    if skipped:
        print(f"time budget of {args.time_budget:.0f} s spent; skipped {len(skipped)}: {', '.join(skipped[:40])}"
              + (" ..." if len(skipped) > 40 else ""), file=sys.stderr)
    print("\nworst shapes (ours):")
    for line in summary(rows):
        print("  " + line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
