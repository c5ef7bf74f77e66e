"""The kernel-library sweep: every registered pattern x its bench shapes x forward and
forward+backward x providers (eager reference, torch.compile of it, our Triton kernel, Liger).

    python benchmarks/bench_kernels.py                       # default sweep, < 8 min on one H200
    python benchmarks/bench_kernels.py --quick               # one shape per pattern, < 2 min
    python benchmarks/bench_kernels.py --patterns rms_norm --profile h200.json --out rms.csv
    python benchmarks/bench_kernels.py --dry-run             # CPU, Triton interpreter, one tiny shape

Writes a long-format CSV, one row per (pattern, shape, pass, provider):
    gpu, driver, torch, triton, pattern, shape, dtype, pass, provider, p20_ms, p50_ms, p80_ms,
    gbps, pct_peak_bw, peak_mem_bytes, numerics
GB/s divides `pattern.fused_bytes(params)` (the minimum bytes: inputs and outputs once) by the p50
time for every provider, so the providers' GB/s compare directly. % of peak is against the
calibrated copy bandwidth of a DeviceProfile JSON (`--profile`), else a copy measured here.
Timing is fusion_advisor.measure's: the same code as `fusion-advisor bench`.
Then prints a compact table; scripts/summarize_bench.py CSV prints the README's summary.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time
from pathlib import Path

COLUMNS = ["gpu", "driver", "torch", "triton", "pattern", "shape", "dtype", "pass", "provider", "p20_ms",
           "p50_ms", "p80_ms", "gbps", "pct_peak_bw", "peak_mem_bytes", "numerics", "variant"]
PASSES = ("forward", "forward+backward")
DEFAULT_MAX_SHAPES = 4        # per pattern in the default sweep: keeps it under 8 minutes on one H200
DEFAULT_TIME_BUDGET_S = 420   # shapes left when this runs out are skipped, and listed
QUICK_TIME_BUDGET_S = 100     # --quick: under 2 minutes with the shape that is running when it runs out


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--patterns", default="", help="comma-separated pattern names (default: all registered)")
    ap.add_argument("--providers", default=None,
                    help="comma-separated: eager, compile, triton, liger (default: all four; eager,triton "
                         "with --dry-run)")
    ap.add_argument("--quick", action="store_true", help="one shape per pattern, shorter timing loops")
    ap.add_argument("--all-shapes", action="store_true", help="every bench shape (default: at most "
                                                               f"{DEFAULT_MAX_SHAPES} per pattern, spread out)")
    ap.add_argument("--only", default="", metavar="KEY=VALUE[,KEY=VALUE]",
                    help="only the bench shapes whose params match, e.g. vocab=50257 or tokens=8192,vocab=50257 "
                         "(then every matching shape runs)")
    ap.add_argument("--out", default="bench_kernels.csv", help="CSV to write (default: bench_kernels.csv)")
    ap.add_argument("--profile", default=None, help="DeviceProfile JSON with the calibrated copy bandwidth "
                                                    "(hbm_bytes_per_s); default: measure a copy here")
    ap.add_argument("--time-budget-s", type=float, default=None,
                    help=f"stop starting new shapes after this many seconds (default: {DEFAULT_TIME_BUDGET_S}, "
                         f"{QUICK_TIME_BUDGET_S} with --quick); what is skipped is listed")
    ap.add_argument("--dry-run", action="store_true", help="CPU only: Triton interpreter, each pattern's "
                                                           "example shape, eager and triton; checks the plumbing")
    args = ap.parse_args(argv)
    try:
        args.only = dict(item.split("=", 1) for item in args.only.split(",") if item.strip())
    except ValueError:
        ap.error(f"--only takes KEY=VALUE pairs, got {args.only!r}")
    if args.time_budget_s is None:
        args.time_budget_s = QUICK_TIME_BUDGET_S if args.quick else DEFAULT_TIME_BUDGET_S
    if args.providers is None:
        args.providers = "eager,triton" if args.dry_run else "eager,compile,triton,liger"
    args.providers = [p.strip() for p in args.providers.split(",") if p.strip()]
    unknown = [p for p in args.providers if p not in ("eager", "compile", "triton", "liger")]
    if unknown:
        ap.error(f"unknown provider {unknown[0]!r}")
    if "eager" not in args.providers:
        ap.error("--providers must include eager: speedups are against it")
    return args


def pick_shapes(bench_params: tuple[dict, ...], quick: bool, all_shapes: bool, only: dict | None = None) -> list[dict]:
    """The shapes to run: with `only` ({key: value text}), every shape whose params match it; else
    the middle one with --quick; else up to DEFAULT_MAX_SHAPES spread from the first to the last
    (every one with --all-shapes)."""
    params = list(bench_params)
    if only:
        return [p for p in params if all(str(p.get(k)) == v for k, v in only.items())]
    if not params:
        return []
    if quick:
        return [params[len(params) // 2]]
    if all_shapes or len(params) <= DEFAULT_MAX_SHAPES:
        return params
    step = (len(params) - 1) / (DEFAULT_MAX_SHAPES - 1)
    return [params[round(i * step)] for i in range(DEFAULT_MAX_SHAPES)]


def peak_bandwidth(profile_path: str | None, device) -> tuple[float | None, str]:
    """(bytes/s, where it comes from)."""
    if profile_path:
        try:
            from fusion_advisor.cost_model.device import load_profile  # written by the cost-model work
        except ImportError:
            load_profile = None
        if load_profile is not None:
            prof = load_profile(profile_path)
            value = prof.get("hbm_bytes_per_s") if isinstance(prof, dict) else getattr(prof, "hbm_bytes_per_s", None)
        else:
            value = json.loads(Path(profile_path).read_text()).get("hbm_bytes_per_s")
        if not value:
            raise SystemExit(f"error: {profile_path} has no hbm_bytes_per_s")
        return float(value), f"calibrated copy bandwidth from {profile_path}"
    if device.type != "cuda":
        return None, "none (CPU dry run)"
    return measured_copy_bandwidth(device), "a 1 GiB device-to-device copy measured here"


def measured_copy_bandwidth(device) -> float:
    import torch
    from fusion_advisor.cost_model.timing import time_calls
    src = torch.empty(2**29, dtype=torch.float16, device=device)   # 1 GiB: far beyond L2
    dst = torch.empty_like(src)
    timing = time_calls([lambda: dst.copy_(src)], device, rep_ms=50)
    return 2 * src.numel() * src.element_size() / (timing.p50_us * 1e-6)


def environment(device) -> dict:
    import torch
    import triton
    from fusion_advisor.capture import _driver_version
    if device.type == "cuda":
        gpu, driver = torch.cuda.get_device_name(device), _driver_version() or ""
    else:
        gpu, driver = "cpu (TRITON_INTERPRET=1, dry run)", ""
    return {"gpu": gpu, "driver": driver, "torch": torch.__version__, "triton": triton.__version__}


def sweep(args) -> list[dict]:
    import torch
    from fusion_advisor import measure
    from fusion_advisor.kernels import registry
    from fusion_advisor.kernels.numerics import compare_pattern

    device = torch.device("cpu") if args.dry_run else torch.device("cuda")
    names = [n.strip() for n in args.patterns.split(",") if n.strip()]
    try:
        patterns = [registry.get(n) for n in names] if names else registry.all_patterns()
    except KeyError as exc:
        raise SystemExit(f"error: {exc.args[0]}") from None
    env = environment(device)
    peak, peak_source = peak_bandwidth(args.profile, device)
    print(f"{env['gpu']} | driver {env['driver'] or '-'} | torch {env['torch']} | triton {env['triton']} | "
          f"peak: {peak_source}" + (f" = {peak / 1e9:,.0f} GB/s" if peak else ""), flush=True)
    rep_ms, warmup_ms = (40.0, 10.0) if args.quick else (100.0, 25.0)
    started, rows, skipped = time.perf_counter(), [], []
    for pattern in patterns:
        shapes = [pattern.example_params] if args.dry_run else pick_shapes(pattern.bench_params, args.quick,
                                                                          args.all_shapes, args.only)
        for params in shapes:
            label = f"{pattern.name} {shape_text(params)}"
            if time.perf_counter() - started > args.time_budget_s:
                skipped.append(label)
                continue
            print(f"  {label} ...", flush=True)
            shape_start = time.perf_counter()
            try:
                rows += bench_shape(pattern, params, device, args.providers, env, peak, rep_ms, warmup_ms,
                                    measure, compare_pattern)
            except Exception as exc:  # one broken shape or provider must not lose the rest of the sweep
                print(f"    FAILED: {type(exc).__name__}: {str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ''}",
                      flush=True)
                skipped.append(label + " (failed)")
                torch_reset()
            print(f"    {time.perf_counter() - shape_start:.1f} s (compiling included)", flush=True)
            if args.out and not args.dry_run:
                write_csv(rows, args.out)  # after every shape: a run cut short keeps what it measured
    if skipped:
        print(f"time budget of {args.time_budget_s:.0f} s spent; skipped: {', '.join(skipped)}", file=sys.stderr)
    print(f"swept in {time.perf_counter() - started:.0f} s", flush=True)
    return rows


def bench_shape(pattern, params, device, providers, env, peak, rep_ms, warmup_ms, measure, compare_pattern) -> list[dict]:
    from fusion_advisor.cost_model.timing import time_calls

    fns, numerics = {}, {}
    for provider in providers:
        try:
            fns[provider] = measure.provider_callable(pattern, provider)
        except measure.ProviderUnavailable as exc:
            print(f"    {provider}: skipped ({exc})", flush=True)
            continue
        numerics[provider] = "ok"
        if provider != "eager":
            check = compare_pattern(pattern, params, device, candidate=fns[provider], backward=True)
            numerics[provider] = "ok" if check.ok else "FAILED: " + check.detail.splitlines()[0][:200]
    bytes_ = pattern.fused_bytes(params)
    rows = []
    for pass_ in PASSES:
        backward = pass_ == "forward+backward"
        work = measure.build_workload(pattern, params, device, backward=backward, requires_grad=True)
        moved = bytes_["forward"] + (bytes_["backward"] if backward else 0)
        for provider, fn in fns.items():
            timing = time_calls(work.calls(fn), device, before=work.clear_grads, warmup_ms=warmup_ms,
                                        rep_ms=rep_ms)
            memory = measure.measure_memory(work, fn, device)
            gbps = moved / (timing.p50_us * 1e-6) / 1e9
            rows.append({**env, "pattern": pattern.name, "shape": shape_of(params),
                         "dtype": params.get("dtype", ""), "pass": pass_, "provider": provider,
                         "p20_ms": round(timing.p20_us / 1e3, 5), "p50_ms": round(timing.p50_us / 1e3, 5),
                         "p80_ms": round(timing.p80_us / 1e3, 5), "gbps": significant(gbps),
                         "pct_peak_bw": round(100 * gbps * 1e9 / peak, 2) if peak else "",
                         "peak_mem_bytes": "" if memory.peak_bytes is None else memory.peak_bytes,
                         "numerics": numerics[provider], "variant": variant_of(params)})
        del work
    if "compile" in fns:
        torch_reset()
    return rows


def significant(x: float, digits: int = 4) -> float:
    """x to `digits` significant digits (a CPU dry run's GB/s is tiny, a GPU's is thousands)."""
    return float(f"{x:.{digits}g}")


def torch_reset() -> None:
    import torch
    torch._dynamo.reset()


def shape_of(params: dict) -> str:
    """"65536x768" from a pattern's `shape`; a pattern sized by other params (padded_linear's tokens,
    in_features, out_features) by those: "tokens=8192 in_features=768 out_features=50265"."""
    if "shape" in params:
        return "x".join(map(str, params["shape"]))
    return " ".join(f"{k}={v}" for k, v in params.items() if isinstance(v, int) and not isinstance(v, bool)
                    and k != "num_sms")


def variant_of(params: dict) -> str:
    """What else tells two bench shapes of one size apart: "activation=hardswish", "mask=causal"
    (the params given as text or flags, the dtype aside)."""
    return " ".join(f"{k}={v}" for k, v in params.items() if isinstance(v, (str, bool)) and k != "dtype")


def shape_text(params: dict) -> str:
    return " ".join(filter(None, (shape_of(params), params.get("dtype", ""), variant_of(params))))


def write_csv(rows: list[dict], path: str) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)


def print_table(rows: list[dict]) -> None:
    """One line per (pattern, shape, pass): p50 and GB/s per provider, our speedup vs each."""
    groups: dict[tuple, dict[str, dict]] = {}
    for r in rows:
        shape = f"{r['shape']} {r['variant']}" if r.get("variant") else r["shape"]
        groups.setdefault((r["pattern"], shape, r["dtype"], r["pass"]), {})[r["provider"]] = r
    providers = [p for p in ("eager", "compile", "triton", "liger") if any(p in g for g in groups.values())]
    head = f"{'pattern':<14}{'shape':<16}{'pass':<18}" + "".join(f"{p + ' ms':>12}" for p in providers) + \
        f"{'triton GB/s':>13}{'% peak':>8}" + "".join(f"{'vs ' + p:>11}" for p in providers if p != "triton")
    print(head)
    for (pattern, shape, dtype, pass_), g in groups.items():
        line = f"{pattern:<14}{shape:<16}{pass_:<18}"
        line += "".join(f"{g[p]['p50_ms']:>12.4f}" if p in g else f"{'-':>12}" for p in providers)
        ours = g.get("triton")
        line += f"{ours['gbps']:>13,.0f}" if ours else f"{'-':>13}"
        line += f"{ours['pct_peak_bw']:>8}" if ours and ours["pct_peak_bw"] != "" else f"{'-':>8}"
        for p in providers:
            if p == "triton":
                continue
            line += (f"{g[p]['p50_ms'] / ours['p50_ms']:>10.2f}x" if ours and p in g and ours["p50_ms"] > 0
                     else f"{'-':>11}")
        print(line)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"   # read when the kernels are defined: set before importing them
    else:
        import torch
        if not torch.cuda.is_available():
            print("error: no CUDA GPU (use --dry-run to check the plumbing on CPU)", file=sys.stderr)
            return 3
    rows = sweep(args)
    write_csv(rows, args.out)
    print_table(rows)
    print(f"wrote {args.out} ({len(rows)} rows)")
    bad = sorted({f"{r['pattern']}/{r['provider']}" for r in rows if r["numerics"] != "ok"})
    if bad:
        print(f"numerics FAILED for: {', '.join(bad)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
