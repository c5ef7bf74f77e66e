"""Generated (generic-fusion) kernels against eager PyTorch and torch.compile, in GB/s (GPU).

Each chain is built the way the advisor builds it, from OpRecords as a trace records them, and
timed three ways on the same inputs: `eager` (the pattern's reference: one aten op, one kernel,
each), `compile` (torch.compile of that reference: Inductor fuses the chain), `generated`
(pattern.fused). GB/s counts the bytes a fused kernel must move (pattern.fused_bytes: inputs read
once, output written once; the backward's likewise), the same for all three, so the figures
compare times. With --kernel-time, `kernel µs` is each provider's summed GPU kernel time per call
under torch.profiler (no host time): where it is well below the p50, the call is host-bound.
`copy` is a device-to-device copy of the output's size and dtype (one read, one
write): the bandwidth a one-read-one-write kernel can reach here; `% copy` = generated / copy.

    python benchmarks/bench_codegen.py                   # about a minute on an H100 / H200
    python benchmarks/bench_codegen.py --quick --json out.json
    python benchmarks/bench_codegen.py --kernel-time      # also the GPU-only time per call
"""
from __future__ import annotations

import argparse
import json
import sys

import torch

from fusion_advisor.kernels.codegen import build_pattern
from fusion_advisor.core.records import OpRecord

TYPE = {torch.float32: "float", torch.bfloat16: "c10::BFloat16", torch.float16: "c10::Half"}


def _op(name, dims, types, concrete):
    return OpRecord(f"aten::{name}", tuple(dims), tuple(types), tuple(concrete))


def unary_chain(shape, dtype, k):
    """k pointwise ops on one tensor (scale, shift, activations): the pure bandwidth case."""
    t = TYPE[dtype]
    cycle = [_op("mul", [shape, ()], [t, "double"], ["", ""]),
             _op("add", [shape, (), ()], [t, "Scalar", "Scalar"], ["", "0.5", "1"]),
             _op("sigmoid", [shape], [t], [""]),
             _op("clamp", [shape, (), ()], [t, "Scalar", "Scalar"], ["", "-1.", "1."]),
             _op("silu", [shape], [t], [""]),
             _op("tanh", [shape], [t], [""]),
             _op("gelu", [shape, ()], [t, ""], ["", "tanh"]),
             _op("neg", [shape], [t], [""])]
    return [cycle[i % len(cycle)] for i in range(k)], None


def conv_tail(shape, dtype):
    """examples/conv_pointwise.py: bias (C,1,1), scale, clamp, quick-GELU, clamp."""
    t, c = TYPE[dtype], (shape[1], 1, 1)
    ops = [_op("add", [shape, c, ()], [t, t, "Scalar"], ["", "", "1"]),
           _op("mul", [shape, ()], [t, "double"], ["", ""]),
           _op("clamp", [shape, (), ()], [t, "Scalar", "Scalar"], ["", "-6.", "6."]),
           _op("mul", [shape, ()], [t, "double"], ["", ""]),
           _op("sigmoid", [shape], [t], [""]),
           _op("mul", [shape, shape], [t, t], ["", ""]),
           _op("clamp_max", [shape, ()], [t, "Scalar"], ["", "4."])]
    return ops, {(5, 0): "v2"}


def bias_gelu_residual(shape, dtype):
    """A transformer MLP tail: bias (D,), gelu(tanh), scale, + residual."""
    t, d = TYPE[dtype], (shape[-1],)
    ops = [_op("add", [shape, d, ()], [t, t, "Scalar"], ["", "", "1"]),
           _op("gelu", [shape, ()], [t, ""], ["", "tanh"]),
           _op("mul", [shape, ()], [t, "double"], ["", ""]),
           _op("add", [shape, shape, ()], [t, t, "Scalar"], ["", "", "1"])]
    return ops, None


def masked_softmax(shape, dtype):
    """Attention scores: scale, causal mask (S,S), softmax along the last dim."""
    t = TYPE[dtype]
    ops = [_op("mul", [shape, ()], [t, "double"], ["", ""]),
           _op("masked_fill", [shape, shape[-2:], ()], [t, "bool", "Scalar"], ["", "", "-inf"]),
           _op("softmax", [shape, (), ()], [t, "Scalar", ""], ["", "-1", ""])]
    return ops, None


def channel_softmax_tail(shape, dtype):
    """A conv output (NCHW): softmax over the channels (dim=1, not the last), + bias (C,1,1),
    * scale, sigmoid: one kernel reading NCHW in place."""
    t, c = TYPE[dtype], (shape[1], 1, 1)
    ops = [_op("softmax", [shape, (), ()], [t, "Scalar", ""], ["", "1", ""]),
           _op("add", [shape, c, ()], [t, t, "Scalar"], ["", "", "1"]),
           _op("mul", [shape, ()], [t, "double"], ["", ""]),
           _op("sigmoid", [shape], [t], [""])]
    return ops, None


def new_gelu(shape, dtype):
    """minGPT's NewGELU, one Python line: a DAG over x (its dataflow as source_bind reads it)."""
    t = TYPE[dtype]
    ops = [_op("mul", [shape, ()], [t, "double"], ["", ""]),
           _op("pow", [shape, ()], [t, "Scalar"], ["", "3."]),
           _op("mul", [shape, ()], [t, "double"], ["", ""]),
           _op("add", [shape, shape, ()], [t, t, "Scalar"], ["", "", "1"]),
           _op("mul", [shape, ()], [t, "double"], ["", ""]),
           _op("tanh", [shape], [t], [""]),
           _op("add", [shape, (), ()], [t, "double", "Scalar"], ["", "", "1"]),
           _op("mul", [shape, shape], [t, t], ["", ""])]
    bind = {(1, 0): "in0", (2, 0): "v1", (3, 0): "in0", (3, 1): "v2", (4, 0): "v3", (5, 0): "v4", (6, 0): "v5",
            (7, 0): "v0", (7, 1): "v6"}
    return ops, bind


def configs(quick: bool):
    big = (1 << 26) if not quick else (1 << 24)
    rows = [("4 unary ops", *unary_chain((big,), torch.bfloat16, 4)),
            ("8 unary ops", *unary_chain((big,), torch.bfloat16, 8)),
            ("4 unary ops", *unary_chain((big,), torch.float32, 4)),
            ("conv tail (7 ops)", *conv_tail((32, 128, 64, 64), torch.bfloat16)),
            ("conv tail (7 ops)", *conv_tail((32, 128, 64, 64), torch.float32)),
            ("bias+gelu+scale+residual", *bias_gelu_residual((16384, 4096), torch.bfloat16)),
            ("scale+mask+softmax", *masked_softmax((8, 12, 1024, 1024), torch.bfloat16)),
            ("softmax(C)+bias*scale+sig", *channel_softmax_tail((128, 64, 64, 64), torch.float32)),
            ("softmax(C)+bias*scale+sig", *channel_softmax_tail((128, 64, 64, 64), torch.bfloat16)),
            ("NewGELU (one line)", *new_gelu((16384, 3072), torch.float32)),
            ("NewGELU (one line)", *new_gelu((16384, 3072), torch.bfloat16))]
    return rows[:4] if quick else rows


def _ms(fn, do_bench) -> tuple[float, float, float]:
    return tuple(do_bench(fn, warmup=25, rep=100, quantiles=[0.2, 0.5, 0.8]))


def kernel_us(run, calls: int = 20) -> float:
    """GPU time per call: the summed device time of the kernels (and copies) it runs, from
    torch.profiler; the host's time between launches is not in it."""
    from torch.profiler import ProfilerActivity, profile
    run()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            run()
        torch.cuda.synchronize()
    total = sum(getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0)
                for e in prof.key_averages())
    return total / calls


def bench_one(name, ops, bind, backward: bool, do_bench, device=torch.device("cuda"), compile_backend="inductor",
              kernel_time: bool = False) -> dict:
    # A bind that names every link is read off the source (exact): NewGELU is a DAG over x.
    pattern = build_pattern(ops, bind=bind, exact=bind is not None and len(bind) >= len(ops) - 1)
    inputs = pattern.make_inputs(pattern.example_params, device, backward)
    args, kwargs = inputs.args, inputs.kwargs
    compiled = torch.compile(pattern.reference, dynamic=False, backend=compile_backend)
    providers = {"eager": pattern.reference, "compile": compiled, "generated": pattern.fused}
    ref = pattern.reference(*args, **kwargs)
    ref0 = ref[0] if isinstance(ref, tuple) else ref
    out = pattern.fused(*args, **kwargs)
    out0 = out[0] if isinstance(out, tuple) else out
    max_err = float((out0.detach().float() - ref0.detach().float()).abs().max())
    b = pattern.fused_bytes(pattern.example_params)
    nbytes = b["forward"] + (b["backward"] if backward else 0)
    grad_args = [a for a in args if a.requires_grad]
    dout = torch.randn_like(ref0)
    result = {"chain": name, "shape": list(ref0.shape), "dtype": str(ref0.dtype).replace("torch.", ""),
              "pass": "forward+backward" if backward else "forward", "bytes": nbytes, "max_abs_err": max_err,
              "measured": {}}
    for label, fn in providers.items():
        if backward:
            def run(fn=fn):
                o = fn(*args, **kwargs)
                torch.autograd.grad(o[0] if isinstance(o, tuple) else o, grad_args, dout)
        else:
            def run(fn=fn):
                with torch.no_grad():
                    fn(*args, **kwargs)
        p20, p50, p80 = _ms(run, do_bench)
        result["measured"][label] = {"p20_us": 1e3 * p20, "p50_us": 1e3 * p50, "p80_us": 1e3 * p80,
                                     "gbps": nbytes / (p50 * 1e-3) / 1e9}
        if kernel_time:
            result["measured"][label]["kernel_us"] = kernel_us(run)
    copy_src = torch.empty_like(ref0)
    copy_dst = torch.empty_like(ref0)
    copy_ms = _ms(lambda: copy_dst.copy_(copy_src), do_bench)[1]
    result["copy_gbps"] = 2 * copy_src.numel() * copy_src.element_size() / (copy_ms * 1e-3) / 1e9
    result["generated_pct_of_copy"] = 100 * result["measured"]["generated"]["gbps"] / result["copy_gbps"]
    return result


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="fewer, smaller chains")
    p.add_argument("--no-backward", action="store_true", help="forward only")
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--kernel-time", action="store_true",
                   help="also each provider's GPU kernel time per call (torch.profiler): host-bound or not")
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("bench_codegen.py needs a CUDA GPU", file=sys.stderr)
        return 3
    from triton.testing import do_bench
    torch.manual_seed(0)
    results = []
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}")
    head = f"{'chain':<26}{'dtype':<9}{'pass':<8}{'eager':>9}{'compile':>9}{'generated':>10}  GB/s: {'eager':>6}{'compile':>8}{'gen':>6}{'copy':>6}{'%copy':>7}"
    print(head)
    for name, ops, bind in configs(args.quick):
        for backward in ([False] if args.no_backward else [False, True]):
            r = bench_one(name, ops, bind, backward, do_bench, kernel_time=args.kernel_time)
            results.append(r)
            m = r["measured"]
            print(f"{name:<26}{r['dtype']:<9}{'fw+bw' if backward else 'fw':<8}"
                  f"{m['eager']['p50_us']:>8.0f}u{m['compile']['p50_us']:>8.0f}u{m['generated']['p50_us']:>9.0f}u  "
                  f"      {m['eager']['gbps']:>6.0f}{m['compile']['gbps']:>8.0f}{m['generated']['gbps']:>6.0f}"
                  f"{r['copy_gbps']:>6.0f}{r['generated_pct_of_copy']:>6.0f}%   err {r['max_abs_err']:.1e}"
                  + (f"   kernel µs: {m['eager']['kernel_us']:.0f} {m['compile']['kernel_us']:.0f} "
                     f"{m['generated']['kernel_us']:.0f}" if args.kernel_time else ""), flush=True)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "results": results}, fh,
                      indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
