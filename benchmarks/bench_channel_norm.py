"""ConvNeXt's channels_first LayerNorm (kernels/channel_norm.py) beside what it replaces: eager
(Hugging Face's permute -> F.layer_norm -> permute) and torch.compile(dynamic=False) of it, on the
shapes of a ConvNeXt-T stage's downsampling norms at a training batch, bf16, forward and
forward + backward (GPU).

    python benchmarks/bench_channel_norm.py --out benchmarks/results/bench-channel-norm-h100.csv
    python benchmarks/bench_channel_norm.py --batch 64 --dtype float32
    python benchmarks/bench_channel_norm.py --sweep     # our kernels alone at each tile and warp count

`--sweep` times our forward and backward launchers (kernels only, no autograd) at every
(BLOCK_S, num_warps) candidate of each shape, the default plan marked, to choose `_blocks`'s rule
from measured numbers.

GB/s counts what our kernels move (forward: read x, write y; backward: read dy and x, write dx;
statistics and parameters left out), for every provider, so the columns compare directly; % copy is
against a device-to-device copy of x measured at the start. Timing is fusion-advisor bench's
(cost_model/timing.py: CUDA events, launches kept ahead by a spin kernel). Prints one line a shape;
the CSV has the GPU, driver and versions.
"""
from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_kernels import environment, significant  # noqa: E402  (the sibling script)

# (channels, height = width) of ConvNeXt-T's channels_first norms: the stem's, then each downsampling's input
SHAPES = ((96, 56), (96, 56), (192, 28), (384, 14))
PASSES = ("forward", "forward+backward")


def eager(x, weight, bias, eps=1e-6):
    """ConvNextLayerNorm.forward, data_format="channels_first" (transformers 5.x)."""
    import torch.nn.functional as F
    features = x.permute(0, 2, 3, 1)
    features = F.layer_norm(features, (x.shape[1],), weight, bias, eps)
    return features.permute(0, 3, 1, 2)


def copy_bandwidth(x) -> float:
    """Bytes a second of a device-to-device copy of x (read + written): the % copy columns' 100 %."""
    from fusion_advisor.cost_model.timing import time_calls
    copy = time_calls([lambda: x.detach().clone()], x.device)
    return 2 * x.numel() * x.element_size() / (copy.p50_us * 1e-6)


def pass_rows(env: dict, shape: dict, pass_: str, times: dict, nbytes: int, copy_bw: float) -> list[dict]:
    """Print one pass's line (ours: µs and % of copy; eager and compile: their time over ours) and
    return its CSV rows, one a provider. `times`: provider -> Timing, ours under "triton"."""
    ours = times["triton"]
    line = f"C {shape['channels']:4d} {shape['height']:3d}x{shape['width']:<3d} {pass_:<17} ours {ours.p50_us:8.1f} us " \
           f"{100 * nbytes / (ours.p50_us * 1e-6) / copy_bw:5.1f}% copy"
    for other in ("eager", "compile"):
        line += f" | {other} {times[other].p50_us / ours.p50_us:5.2f}x"
    print(line, flush=True)
    return [{**env, **shape, "pass": pass_, "provider": name, "p50_ms": round(t.p50_us / 1e3, 5),
             "gbps": significant(nbytes / (t.p50_us * 1e-6) / 1e9),
             "pct_copy": round(100 * nbytes / (t.p50_us * 1e-6) / copy_bw, 1),
             "vs_ours": round(t.p50_us / ours.p50_us, 3)} for name, t in times.items()]


def write_rows(rows: list[dict], path: str | None) -> None:
    if path and rows:
        with open(path, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        print(f"wrote {path}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    ap.add_argument("--out", help="CSV to write")
    ap.add_argument("--sweep", action="store_true", help="time our kernels at each tile and warp count")
    args = ap.parse_args(argv)
    import torch
    if not torch.cuda.is_available():
        raise SystemExit("bench_channel_norm.py: needs a CUDA GPU")
    if args.sweep:
        return sweep(args.batch, getattr(torch, args.dtype))
    from fusion_advisor.cost_model.timing import time_calls
    from fusion_advisor.kernels.channel_norm import channels_first_layer_norm

    device, dtype = torch.device("cuda"), getattr(torch, args.dtype)
    env = environment(device)
    compiled = torch.compile(eager, dynamic=False)
    providers = {"eager": eager, "compile": compiled, "triton": channels_first_layer_norm}
    rows = []
    print(f"{env['gpu']}, torch {env['torch']}, triton {env['triton']}; batch {args.batch}, {args.dtype}")
    for channels, size in SHAPES:
        x = torch.randn(args.batch, channels, size, size, device=device, dtype=dtype, requires_grad=True)
        w = (1 + 0.1 * torch.randn(channels, device=device)).to(dtype).requires_grad_()
        b = (0.1 * torch.randn(channels, device=device)).to(dtype).requires_grad_()
        dy = torch.randn_like(x)
        copy_bw = copy_bandwidth(x)
        shape = {"channels": channels, "height": size, "width": size, "batch": args.batch, "dtype": args.dtype}
        for pass_ in PASSES:
            backward = pass_ == "forward+backward"
            nbytes = (2 + (3 if backward else 0)) * x.numel() * x.element_size()
            times = {}
            for name, fn in providers.items():
                def call(fn=fn):
                    y = fn(x, w, b)
                    if backward:
                        y.backward(dy)
                    return y

                def clear(k):
                    x.grad = w.grad = b.grad = None
                times[name] = time_calls([call], device, before=clear)
            rows += pass_rows(env, shape, pass_, times, nbytes, copy_bw)
    write_rows(rows, args.out)
    return 0


def sweep(batch: int, dtype, device=None) -> int:
    """Each shape's forward and backward launcher at every (BLOCK_S, warps) candidate: p50 µs and %
    of copy (forward moves 2 x-sized tensors, backward 3), the default plan starred."""
    import torch
    from fusion_advisor.cost_model.timing import time_calls
    from fusion_advisor.kernels import channel_norm as cn
    from fusion_advisor.kernels.common import next_power_of_2

    device = device or torch.device("cuda")
    default_blocks = cn._blocks
    print(f"{torch.cuda.get_device_name() if device.type == 'cuda' else device}, torch {torch.__version__}; batch {batch}, {dtype}; sweep")
    try:
        for channels, size in dict.fromkeys(SHAPES):
            x = torch.randn(batch, channels, size, size, device=device, dtype=dtype)
            w = 1 + 0.1 * torch.randn(channels, device=device, dtype=dtype)
            b = 0.1 * torch.randn(channels, device=device, dtype=dtype)
            dy = torch.randn_like(x)
            copy_bw = copy_bandwidth(x)
            block_c = next_power_of_2(channels)
            _, mean, rstd = cn.channel_norm_fwd(x, w, b, 1e-6, False)
            for pass_, tile, nbytes, call in (
                    ("forward", cn.FWD_TILE, 2, lambda: cn.channel_norm_fwd(x, w, b, 1e-6, False)),
                    ("backward", cn.BWD_TILE, 3, lambda: cn.channel_norm_bwd(dy, x, w, b, mean, rstd))):
                chosen = default_blocks(channels, size * size, tile)
                for block_s in (4, 8, 16, 32, 64, 128):
                    for warps in (2, 4, 8, 16):
                        if block_c * block_s > 32768 or block_c * block_s < 32 * warps:
                            continue
                        cn._blocks = lambda c, s, t, orders=(False,), cfg=(block_c, block_s, warps): cfg
                        t = time_calls([call], device)
                        pct = 100 * nbytes * x.numel() * x.element_size() / (t.p50_us * 1e-6) / copy_bw
                        star = " *" if (block_c, block_s, warps) == chosen else ""
                        print(f"C {channels:4d} {size:3d}x{size:<3d} {pass_:<8} BLOCK_S {block_s:3d} warps {warps:2d} "
                              f"{t.p50_us:8.1f} us {pct:5.1f}% copy{star}", flush=True)
    finally:
        cn._blocks = default_blocks
    return 0


if __name__ == "__main__":
    sys.exit(main())
