"""How well does the cost model predict kernel times? Predicted vs measured, on this GPU.

For the unfused op chains of the examples (decomposed RMSNorm, SwiGLU, RoPE, bias+GELU,
add+LayerNorm, the GPT softmax chain, cross-entropy, dropout, and the pointwise / reduction /
norm / softmax ops autograd runs in backward), at several LLM sizes, and for the fused kernels
registered in `fusion_advisor.kernels` (forward, with their `fused_bytes`):
  - the op records come from running each chain once under torch.profiler and reading the trace
    back with fusion_advisor's own Trace (exactly what `fusion-advisor profile` sees);
  - predicted = the roofline time of each op's kernels on the device profile;
  - measured = CUDA events around a CUDA graph of the op repeated back to back (median of
    samples; the same way `calibrate` measures the bandwidth curve).
Prints the median and p90 absolute % error (targets: median <= 15 %, p90 <= 30 %) and a table per
op, and writes a CSV with the GPU, driver, torch and triton versions on every row.

    python benchmarks/cost_model_accuracy.py --profile h200.json --out accuracy.csv
    python benchmarks/cost_model_accuracy.py --dry-run          # CPU, tiny sizes: plumbing only
"""
from __future__ import annotations

import argparse
import csv
import math
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Callable

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")   # the fused kernels run interpreted on CPU

import torch.nn.functional as F  # noqa: E402

from fusion_advisor.analyzers.trace import Trace  # noqa: E402
from fusion_advisor.cost_model.device import DeviceProfile, load_profile  # noqa: E402
from fusion_advisor.cost_model.ops import OpCost, op_cost, unknown_reason  # noqa: E402
from fusion_advisor.cost_model.roofline import chain_dtype, kernel_time_us  # noqa: E402
from fusion_advisor.cost_model.timing import warm_up_on_side_stream  # noqa: E402
from fusion_advisor.core.errors import AdvisorError  # noqa: E402
from fusion_advisor.core.records import OpRecord  # noqa: E402

aten = torch.ops.aten


@dataclass
class Step:
    label: str
    fn: Callable[[], object]


@dataclass
class Row:
    chain: str
    size: str
    dtype: str
    step: str
    ops: str = ""
    bytes: int = 0
    flops: int = 0
    predicted_us: float = float("nan")
    measured_us: float = float("nan")
    trace_kernel_us: float = float("nan")     # the step's kernel durations in a profiler trace
    method: str = ""
    unknown: str = ""

    @property
    def error_pct(self) -> float:
        if not (self.measured_us > 0) or math.isnan(self.predicted_us):
            return float("nan")
        return 100.0 * (self.predicted_us - self.measured_us) / self.measured_us


# -- the chains, as the examples write them -----------------------------------------------------
def _rand(*shape, dtype, device, scale=1.0):
    return torch.randn(*shape, dtype=dtype, device=device) * scale


def rms_norm_chain(m, n, dt, dev):
    x, w = _rand(m, n, dtype=dt, device=dev), _rand(n, dtype=dt, device=dev)
    h = x.to(torch.float32)
    p = h.pow(2)
    v = p.mean(-1, keepdim=True)
    ve = v + 1e-6
    r = torch.rsqrt(ve)
    nh = h * r
    nb = nh.to(dt)
    return [Step("to", lambda: x.to(torch.float32)), Step("pow", lambda: h.pow(2)),
            Step("mean", lambda: p.mean(-1, keepdim=True)), Step("add", lambda: v + 1e-6),
            Step("rsqrt", lambda: torch.rsqrt(ve)), Step("mul", lambda: h * r),
            Step("to", lambda: nh.to(dt)), Step("mul", lambda: w * nb)]


def swiglu_chain(m, n, dt, dev):
    inter = int(math.ceil(n * 8 / 3 / 64) * 64)
    g, u = _rand(m, inter, dtype=dt, device=dev), _rand(m, inter, dtype=dt, device=dev)
    s = F.silu(g)
    return [Step("silu", lambda: F.silu(g)), Step("mul", lambda: s * u)]


def rope_chain(m, n, dt, dev):
    head_dim = 128 if n >= 1024 else 32
    heads = max(1, n // head_dim)
    b, s = max(1, m // 1024), min(m, 1024)
    q = _rand(b, heads, s, head_dim, dtype=dt, device=dev)
    cos, sin = _rand(1, 1, s, head_dim, dtype=dt, device=dev), _rand(1, 1, s, head_dim, dtype=dt, device=dev)
    x1, x2 = q[..., : head_dim // 2], q[..., head_dim // 2:]
    nx2 = -x2
    rot = torch.cat((nx2, x1), dim=-1)
    qc, rs = q * cos, rot * sin
    return [Step("mul", lambda: q * cos), Step("neg", lambda: -x2), Step("cat", lambda: torch.cat((nx2, x1), dim=-1)),
            Step("mul", lambda: rot * sin), Step("add", lambda: qc + rs)]


def bias_gelu_chain(m, n, dt, dev):
    x, b = _rand(m, 4 * n, dtype=dt, device=dev), _rand(4 * n, dtype=dt, device=dev)
    y = x + b
    return [Step("add", lambda: x + b), Step("gelu", lambda: F.gelu(y, approximate="tanh"))]


def add_layer_norm_chain(m, n, dt, dev):
    x, r = _rand(m, n, dtype=dt, device=dev), _rand(m, n, dtype=dt, device=dev)
    w, b = _rand(n, dtype=dt, device=dev), _rand(n, dtype=dt, device=dev)
    y = x + r
    return [Step("add", lambda: x + r), Step("layer_norm", lambda: F.layer_norm(y, (n,), w, b, 1e-5))]


def softmax_attention_chain(m, n, dt, dev):
    # GPT's hand-written attention scores: (batch, heads, seq, seq), seq 512..2048.
    s = 512 if m <= 4096 else 1024 if m <= 16384 else 2048
    heads = max(1, n // 64)
    b = max(1, m // s)
    while b * heads * s * s > (1 << 28):    # keep each score tensor under 256 M elements
        b = max(1, b // 2)
        if b == 1:
            heads = max(1, heads // 2)
    att = _rand(b, heads, s, s, dtype=dt, device=dev)
    mask = torch.ones(s, s, dtype=torch.bool, device=dev).tril()
    notmask = ~mask
    scaled = att * 0.125
    masked = scaled.masked_fill(notmask, float("-inf"))
    return [Step("mul", lambda: att * 0.125), Step("masked_fill", lambda: scaled.masked_fill(notmask, float("-inf"))),
            Step("softmax", lambda: F.softmax(masked, dim=-1))]


def cross_entropy_chain(m, n, dt, dev):
    vocab = 32000 if n >= 2048 else 8192
    rows = max(256, m // 4)
    logits = _rand(rows, vocab, dtype=dt, device=dev)
    target = torch.randint(0, vocab, (rows,), device=dev)
    lf = logits.float()
    lp = F.log_softmax(lf, dim=-1)
    return [Step("to", lambda: logits.float()), Step("log_softmax", lambda: F.log_softmax(lf, dim=-1)),
            Step("nll_loss", lambda: F.nll_loss(lp, target))]


def dropout_chain(m, n, dt, dev):
    x = _rand(m, n, dtype=dt, device=dev)
    y, mask = aten.native_dropout(x, 0.1, True)
    return [Step("native_dropout", lambda: aten.native_dropout(x, 0.1, True)),
            Step("native_dropout_backward", lambda: aten.native_dropout_backward(y, mask, 1 / 0.9))]


def backward_ops_chain(m, n, dt, dev):
    # The leaf ops autograd runs for the layers above, called directly on their shapes.
    inter = int(math.ceil(n * 8 / 3 / 64) * 64)
    dy_i, g = _rand(m, inter, dtype=dt, device=dev), _rand(m, inter, dtype=dt, device=dev)
    dy, x = _rand(m, n, dtype=dt, device=dev), _rand(m, n, dtype=dt, device=dev)
    w, b = _rand(n, dtype=dt, device=dev), _rand(n, dtype=dt, device=dev)
    _, mean, rstd = aten.native_layer_norm(x, [n], w, b, 1e-5)
    acc = torch.zeros(m, n, dtype=dt, device=dev)
    rstd_rms = _rand(m, 1, dtype=torch.float32, device=dev)
    xf = x.float()
    s = 512
    heads = max(1, min(16, n // 64))
    bsz = max(1, m // s)
    while bsz * heads * s * s > (1 << 27):
        bsz = max(1, bsz // 2)
    p = torch.softmax(_rand(bsz, heads, s, s, dtype=dt, device=dev), -1)
    dp = _rand(bsz, heads, s, s, dtype=dt, device=dev)
    qt = _rand(bsz, s, heads, n // heads, dtype=dt, device=dev).transpose(1, 2)
    return [
        Step("silu_backward", lambda: aten.silu_backward(dy_i, g)),
        Step("gelu_backward", lambda: aten.gelu_backward(dy_i, g, approximate="tanh")),
        Step("native_layer_norm_backward",
             lambda: aten.native_layer_norm_backward(dy, x, [n], mean, rstd, w, b, [True, True, True])),
        Step("_softmax_backward_data", lambda: aten._softmax_backward_data(dp, p, -1, dt)),
        Step("sum (bias grad)", lambda: dy.sum(0, keepdim=True)),
        Step("sum (row)", lambda: (xf * rstd_rms).sum(-1, keepdim=True)),
        Step("mul (broadcast)", lambda: dy * w),
        Step("mul (rstd)", lambda: xf * rstd_rms),
        Step("add_ (grad accumulation)", lambda: acc.add_(dy)),
        Step("contiguous (transpose)", lambda: qt.contiguous()),
        Step("fill_", lambda: acc.fill_(0)),
    ]


CHAINS = {
    "rms_norm": rms_norm_chain, "swiglu": swiglu_chain, "rope": rope_chain, "bias_gelu": bias_gelu_chain,
    "add_layer_norm": add_layer_norm_chain, "softmax_attention": softmax_attention_chain,
    "cross_entropy": cross_entropy_chain, "dropout": dropout_chain, "backward_ops": backward_ops_chain,
}
# (tokens, hidden): from a small model's layer to a large one's.
GPU_SIZES = [(2048, 1024), (4096, 2048), (16384, 4096), (16384, 8192)]
DRY_SIZES = [(64, 32)]


# -- op records: run the chain once under the profiler and read it back -------------------------
def _op_record(trace: Trace, row: int) -> OpRecord:
    ops = trace.ops

    def tup(x):
        return tuple(tup(v) for v in x) if isinstance(x, (list, tuple)) else x
    return OpRecord(name=ops.at[row, "name"], dims=tup(ops.at[row, "input_dims"] or ()),
                    types=tuple(ops.at[row, "input_types"] or ()), concrete=tuple(ops.at[row, "concrete"] or ()))


def records_per_step(steps: list[Step]) -> tuple[list[list[OpRecord]], list[float]]:
    """The ops each step runs: on a GPU, the ops that launched its kernels (what a cluster holds);
    on CPU (plumbing only), the step's outermost ops, priced as the composites they are. Also the
    sum of each step's kernel durations as the profiler recorded them (nan on CPU): what a trace
    shows, as against the back-to-back time `measure_us` takes."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    # with_stack: Trace (pandas 3) fails on a trace whose ops have no source at all; reported.
    with torch.profiler.profile(activities=activities, record_shapes=True, with_stack=True) as prof:
        for st in steps:                  # once unlabelled: warm caches, allocator, autotuning
            st.fn()
        for i, st in enumerate(steps):
            with torch.profiler.record_function(f"step#{i}"):
                st.fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(path)
        trace = Trace.load(path)
    ops = trace.ops
    if trace.has_gpu:
        leaves = sorted(set(int(r) for r in trace.kernels["op_row"] if r >= 0))
    else:
        leaves = [r for r in range(len(ops)) if ops.at[r, "parent_row"] < 0]
    an = trace.annotations
    k = trace.kernels
    out, kernel_us = [], []
    for i in range(len(steps)):
        span = an[(an["name"] == f"step#{i}") & ~an["gpu"].astype(bool)]
        if span.empty:
            out.append([])
            kernel_us.append(float("nan"))
            continue
        t0, t1 = float(span["ts"].iloc[0]), float(span["ts"].iloc[0] + span["dur"].iloc[0])
        rows = [r for r in leaves if t0 <= ops.at[r, "ts"] <= t1]
        out.append([_op_record(trace, r) for r in rows])
        kernel_us.append(float(k.loc[k["op_row"].isin(rows), "dur"].sum()) if trace.has_gpu else float("nan"))
    return out, kernel_us


# -- timing --------------------------------------------------------------------------------------
def measure_us(fn: Callable[[], object], target_ms: float, samples: int) -> tuple[float, str]:
    """Median µs per call of fn run back to back: CUDA events around a CUDA graph of repeated
    calls (eager calls where capture fails); wall clock on CPU (meaningless, plumbing only)."""
    if not torch.cuda.is_available():
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e6, "cpu-wall"
    warm_up_on_side_stream(fn)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    once_us = max(start.elapsed_time(end) * 1e3, 1.0)
    calls = int(max(1, min(200, target_ms * 1e3 / once_us)))
    method = "graph"
    try:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(calls):
                fn()
        run = graph.replay
    except RuntimeError:
        method = "eager"
        torch.cuda.synchronize()

        def run():
            for _ in range(calls):
                fn()
    run()
    torch.cuda.synchronize()
    times = []
    for _ in range(samples):
        start.record()
        run()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / calls)
    return statistics.median(times), method


def price(records: list[OpRecord], profile: DeviceProfile, dtype_hint: str | None) -> tuple[float, int, int, list[str]]:
    total, nbytes, flops, unknown = 0.0, 0, 0, []
    for rec in records:
        cost = op_cost(rec, dtype_hint)
        if cost is None:
            unknown.append(f"{rec.name} ({unknown_reason(rec, dtype_hint)})")
            continue
        total += kernel_time_us(cost, profile)
        nbytes += cost.bytes
        flops += cost.flops
    return total, nbytes, flops, unknown


# -- the run -------------------------------------------------------------------------------------
def run_chains(chains: dict, profile: DeviceProfile, sizes, dtypes, dev, target_ms, samples, log) -> list[Row]:
    rows = []
    for (m, n) in sizes:
        for dt in dtypes:
            for name, build in chains.items():
                steps = build(m, n, dt, dev)
                recs, kernel_us = records_per_step(steps)
                size = f"{m}x{n}"
                dname = str(dt).replace("torch.", "")
                chain_pred = 0.0
                hint = chain_dtype([r for rec in recs for r in rec])     # as cluster_estimate does
                for st, rec, k_us in zip(steps, recs, kernel_us):
                    pred, nbytes, flops, unknown = price(rec, profile, hint)
                    meas, method = measure_us(st.fn, target_ms, samples)
                    rows.append(Row(name, size, dname, st.label, " ".join(r.name.replace("aten::", "") for r in rec),
                                    nbytes, flops, pred if rec else float("nan"), meas, k_us, method,
                                    "; ".join(unknown)))
                    chain_pred += pred

                def whole():
                    for st in steps:
                        st.fn()
                meas, method = measure_us(whole, target_ms, samples)
                rows.append(Row(name, size, dname, "(whole chain)", "", 0, 0, chain_pred, meas,
                                float(sum(kernel_us)), method))
                log(f"{name:<18} {size:>11} {dname:<9} predicted {chain_pred:9.1f} µs  measured {meas:9.1f} µs")
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    return rows


def run_patterns(profile: DeviceProfile, dev, dry_run: bool, target_ms, samples, log) -> list[Row]:
    from fusion_advisor.kernels import all_patterns
    rows = []
    for pattern in all_patterns():
        plist = [pattern.example_params] if dry_run else list(pattern.bench_params)[:6]
        for params in plist:
            inputs = pattern.make_inputs(params, dev, False)
            fused_bytes = pattern.fused_bytes(params)["forward"]
            cost = OpCost(bytes_read=fused_bytes, bytes_written=0, flops=0)
            pred = kernel_time_us(cost, profile)
            meas, method = measure_us(lambda: pattern.fused(*inputs.args, **inputs.kwargs), target_ms, samples)
            size = "x".join(str(d) for d in params.get("shape", [])) or str(params)
            rows.append(Row(f"fused:{pattern.name}", size, str(params.get("dtype", "")), "fused forward",
                            pattern.name, fused_bytes, 0, pred, meas, float("nan"), method))
            log(f"fused {pattern.name:<12} {size:>11} predicted {pred:9.1f} µs  measured {meas:9.1f} µs")
    return rows


def _pct(values: list[float], q: float) -> float:
    s = sorted(values)
    if not s:
        return float("nan")
    pos = (len(s) - 1) * q
    lo, hi = int(pos), min(int(pos) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def summarize(rows: list[Row], out) -> dict:
    def errs(sel):
        return [abs(r.error_pct) for r in sel if not math.isnan(r.error_pct)]
    groups = {"ops": [r for r in rows if not r.chain.startswith("fused:") and r.step != "(whole chain)"],
              "chains": [r for r in rows if r.step == "(whole chain)"],
              "fused kernels": [r for r in rows if r.chain.startswith("fused:")]}
    summary = {}
    print("\nabsolute % error (predicted vs measured)      n   median      p90", file=out)
    for label, sel in groups.items():
        e = errs(sel)
        summary[label] = {"n": len(e), "median": _pct(e, 0.5), "p90": _pct(e, 0.9)}
        print(f"  {label:<40} {len(e):5d} {summary[label]['median']:7.1f} % {summary[label]['p90']:7.1f} %", file=out)
    print("\nby op (step)                                   n   median      p90   signed median", file=out)
    by_step: dict[str, list[Row]] = {}
    for r in groups["ops"]:
        by_step.setdefault(r.step, []).append(r)
    for step, sel in sorted(by_step.items(), key=lambda kv: -_pct(errs(kv[1]), 0.5) if errs(kv[1]) else 0):
        e = errs(sel)
        signed = [r.error_pct for r in sel if not math.isnan(r.error_pct)]
        print(f"  {step:<40} {len(e):5d} {_pct(e, 0.5):7.1f} % {_pct(e, 0.9):7.1f} % {_pct(signed, 0.5):+8.1f} %", file=out)
    unknown = sorted({u for r in rows for u in r.unknown.split("; ") if u})
    if unknown:
        print("\nops without a cost rule (not priced):", file=out)
        for u in unknown:
            print(f"  {u}", file=out)
    return summary


def write_csv(path: str, rows: list[Row], env: dict) -> None:
    cols = ["gpu", "driver", "torch", "triton", "profile", "chain", "size", "dtype", "step", "ops", "bytes", "flops",
            "predicted_us", "measured_us", "error_pct", "trace_kernel_us", "method", "unknown_ops"]
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(cols)
        for r in rows:
            w.writerow([env["gpu"], env["driver"], env["torch"], env["triton"], env["profile"], r.chain, r.size, r.dtype,
                        r.step, r.ops, r.bytes, r.flops, f"{r.predicted_us:.3f}", f"{r.measured_us:.3f}",
                        f"{r.error_pct:.2f}", f"{r.trace_kernel_us:.3f}", r.method, r.unknown])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--profile", help="calibrated DeviceProfile JSON (default: the best profile for this GPU)")
    p.add_argument("--target", default="h200", help="datasheet profile for --dry-run without a GPU (default h200)")
    p.add_argument("--out", default="cost-model-accuracy.csv", help="CSV to write")
    p.add_argument("--dry-run", action="store_true", help="tiny sizes, one sample: checks the plumbing, not timings")
    p.add_argument("--chains", default="", help="comma-separated subset of: " + ", ".join(CHAINS))
    p.add_argument("--no-fused", action="store_true", help="skip the registered fused kernels")
    args = p.parse_args(argv)

    t_start = time.perf_counter()
    gpu = torch.cuda.is_available()
    dev = torch.device("cuda" if gpu else "cpu")
    try:
        if args.profile:
            profile = DeviceProfile.load(args.profile)
        else:
            profile = load_profile() if gpu else load_profile(target=args.target)
    except AdvisorError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    chains = dict(CHAINS)
    if args.chains:
        wanted = [c.strip() for c in args.chains.split(",") if c.strip()]
        unknown = [c for c in wanted if c not in CHAINS]
        if unknown:
            p.error(f"unknown chains: {', '.join(unknown)}")
        chains = {name: CHAINS[name] for name in wanted}
    from fusion_advisor.cost_model.calibrate import driver_version
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    env = {"gpu": torch.cuda.get_device_name() if gpu else "cpu", "driver": driver_version() if gpu else None,
           "torch": torch.__version__, "triton": triton_version, "profile": profile.label()}
    print(f"{env['gpu']}  driver {env['driver']}  torch {env['torch']}  triton {env['triton']}\n"
          f"profile: {profile.label()}", flush=True)
    if not gpu and not args.dry_run:
        print("no CUDA GPU: timings on CPU mean nothing; use --dry-run to check the plumbing", file=sys.stderr)
        return 3

    def log(msg):
        print(msg, flush=True)
    sizes = DRY_SIZES if args.dry_run else GPU_SIZES
    dtypes = [torch.float32] if args.dry_run else [torch.bfloat16]
    target_ms, samples = (0.0, 1) if args.dry_run else (1.0, 7)
    torch.manual_seed(0)
    rows = run_chains(chains, profile, sizes, dtypes, dev, target_ms, samples, log)
    if not args.dry_run:
        rows += run_chains(chains, profile, [(4096, 2048)], [torch.float32], dev, target_ms, samples, log)
    if not args.no_fused:
        rows += run_patterns(profile, dev, args.dry_run, target_ms, samples, log)
    summary = summarize(rows, sys.stdout)
    write_csv(args.out, rows, env)
    print(f"\nwrote {args.out} ({len(rows)} rows) in {time.perf_counter() - t_start:.0f} s")
    if not args.dry_run:
        ops = summary["ops"]
        verdict = "meets" if ops["median"] <= 15 and ops["p90"] <= 30 else "misses"
        print(f"per-op error {verdict} the targets (median <= 15 %, p90 <= 30 %)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
