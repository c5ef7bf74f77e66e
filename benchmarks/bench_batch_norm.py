"""BatchNorm + ReLU in training (kernels/batch_norm_act.py) beside what it replaces: eager
(`F.relu(F.batch_norm(...))`, cuDNN's BN then a ReLU kernel) and torch.compile(dynamic=False) of it,
on the shapes of a ResNet-50's BN -> ReLU layers at batch 256, forward and forward + backward (GPU).
By default x is bf16 and the parameters fp32, as under bf16 autocast with fp32 master weights.

    python benchmarks/bench_batch_norm.py --out benchmarks/results/bench-batch-norm-h100.csv
    python benchmarks/bench_batch_norm.py --sweep      # our kernels at each tile / split setting

GB/s counts what our kernels move of x-sized tensors (forward: read x twice, write y; backward: read
dy and x twice, write dx), for every provider, so the columns compare directly; % copy is against a
device-to-device copy of x measured at the start. Timing is fusion-advisor bench's
(cost_model/timing.py). `--sweep` times our forward + backward at settings of batch_norm_core's
module constants (TILE_ELEMENTS, PROGRAMS_PER_SM, MAX_CONTIGUOUS_S, SMALL_ROW_POSITIONS,
TILE_WARPS), one changed at a time, the defaults first, to choose them from measured numbers.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_channel_norm import copy_bandwidth, pass_rows, write_rows  # noqa: E402  (sibling scripts)
from bench_kernels import environment  # noqa: E402

# (channels, height = width) of ResNet-50's BN -> ReLU layers: the stem, then each stage's
# bottleneck convs (1x1 at the stage's input size, 3x3 at its output size)
SHAPES = ((64, 112), (64, 56), (128, 56), (128, 28), (256, 28), (256, 14), (512, 14), (512, 7))
PASSES = ("forward", "forward+backward")
SWEEP = {"TILE_ELEMENTS": (2048, 8192), "PROGRAMS_PER_SM": (2, 8), "MAX_CONTIGUOUS_S": (128, 256),
         "SMALL_ROW_POSITIONS": (0,), "TILE_WARPS": (2, 4, 8, 16)}


def eager(x, running_mean, running_var, weight, bias):
    import torch.nn.functional as F
    return F.relu(F.batch_norm(x, running_mean, running_var, weight, bias, True, 0.1, 1e-5))


def ours(x, running_mean, running_var, weight, bias):
    from fusion_advisor.kernels.batch_norm_act import batch_norm_act
    return batch_norm_act(x, running_mean, running_var, weight, bias, True, 0.1, 1e-5, "relu")


def _inputs(torch, channels, size, batch, dtype, param_dtype, device):
    x = torch.randn(batch, channels, size, size, device=device, dtype=dtype, requires_grad=True)
    w = (1 + 0.1 * torch.randn(channels, device=device)).to(param_dtype).requires_grad_()
    b = (0.1 * torch.randn(channels, device=device)).to(param_dtype).requires_grad_()
    rm = torch.zeros(channels, device=device, dtype=param_dtype)
    rv = torch.ones(channels, device=device, dtype=param_dtype)
    return x, w, b, rm, rv


def _timer(torch, fn, x, w, b, rm, rv, backward, device):
    from fusion_advisor.cost_model.timing import time_calls
    dy = torch.randn_like(x)

    def call():
        y = fn(x, rm, rv, w, b)
        if backward:
            y.backward(dy)
        return y

    def clear(k):
        x.grad = w.grad = b.grad = None
    return time_calls([call], device, before=clear)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    ap.add_argument("--param-dtype", default="float32", choices=("bfloat16", "float16", "float32"))
    ap.add_argument("--out", help="CSV to write")
    ap.add_argument("--sweep", action="store_true", help="time our kernels at other settings of batch_norm_core")
    args = ap.parse_args(argv)
    import torch
    if not torch.cuda.is_available():
        raise SystemExit("bench_batch_norm.py: needs a CUDA GPU")
    device, dtype, param_dtype = torch.device("cuda"), getattr(torch, args.dtype), getattr(torch, args.param_dtype)
    env = environment(device)
    print(f"{env['gpu']}, torch {env['torch']}, triton {env['triton']}; batch {args.batch}, x {args.dtype}, "
          f"parameters {args.param_dtype}{'; sweep' if args.sweep else ''}")
    if args.sweep:
        return sweep(torch, args.batch, dtype, param_dtype, device)
    providers = {"eager": eager, "compile": torch.compile(eager, dynamic=False), "triton": ours}
    rows = []
    for channels, size in SHAPES:
        x, w, b, rm, rv = _inputs(torch, channels, size, args.batch, dtype, param_dtype, device)
        copy_bw = copy_bandwidth(x)
        shape = {"channels": channels, "height": size, "width": size, "batch": args.batch, "dtype": args.dtype,
                 "param_dtype": args.param_dtype}
        for pass_ in PASSES:
            backward = pass_ == "forward+backward"
            nbytes = (3 + (5 if backward else 0)) * x.numel() * x.element_size()
            times = {name: _timer(torch, fn, x, w, b, rm, rv, backward, device) for name, fn in providers.items()}
            rows += pass_rows(env, shape, pass_, times, nbytes, copy_bw)
    write_rows(rows, args.out)
    return 0


def sweep(torch, batch, dtype, param_dtype, device) -> int:
    """Our forward + backward at each shape: the defaults, then each constant of SWEEP at its other
    values (the rest at their defaults); p50 µs and % of copy."""
    from fusion_advisor.kernels import batch_norm_core as core
    defaults = {name: getattr(core, name) for name in SWEEP}
    settings = [{}] + [{name: v} for name, values in SWEEP.items() for v in values if v != defaults[name]]
    try:
        for channels, size in SHAPES:
            x, w, b, rm, rv = _inputs(torch, channels, size, batch, dtype, param_dtype, device)
            copy_bw = copy_bandwidth(x)
            nbytes = 8 * x.numel() * x.element_size()
            for setting in settings:
                for name, value in {**defaults, **setting}.items():
                    setattr(core, name, value)
                t = _timer(torch, ours, x, w, b, rm, rv, True, device)
                label = ", ".join(f"{k} {v}" for k, v in setting.items()) or "defaults"
                print(f"C {channels:4d} {size:3d}x{size:<3d} fwd+bwd {t.p50_us:8.1f} us "
                      f"{100 * nbytes / (t.p50_us * 1e-6) / copy_bw:5.1f}% copy  {label}", flush=True)
    finally:
        for name, value in defaults.items():
            setattr(core, name, value)
    return 0


if __name__ == "__main__":
    sys.exit(main())
