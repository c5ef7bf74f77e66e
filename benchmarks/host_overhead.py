"""Host (CPU) time of each fused op's Python path per call, with the Triton launches made no-ops
(or, with --gpu, real launches on a GPU beside eager PyTorch and Liger-Kernel).

A training step of a small model can be host-bound: the GPU waits for Python to issue the next
kernel. Then what a fused op costs on the host matters as much as its kernel time. This times,
for every registered pattern on its small example inputs (CPU tensors), the functional's forward
and forward + backward: the autograd.Function, the launcher's checks, views and allocations, and
the `kernel[grid]` lookup, with the launch itself replaced by a function that does nothing (so
neither the interpreter nor a GPU runs). What it leaves out is Triton's own launch path (argument
binding, specialisation, the driver call), which is the same for any caller.

    python benchmarks/host_overhead.py                  # every pattern
    python benchmarks/host_overhead.py --patterns rms_norm,rope --calls 2000
    python benchmarks/host_overhead.py --gpu --profile layer_norm   # GPU: where a call's host µs go
    python benchmarks/host_overhead.py --gpu --patterns layer_norm --anatomy   # ...and its parts

With --gpu the inputs are the patterns' small example shapes on the GPU, so the GPU finishes each
kernel before the host has issued the next: a call's wall time is its host time, Triton's launch
path included. Each row shows ours, eager PyTorch (`pattern.reference`) and Liger-Kernel.

Figures are µs per call on this machine's CPU; compare runs on the same machine only.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

GPU = "--gpu" in sys.argv
if not GPU:   # launchers accept CPU tensors only under the interpreter; set before the kernels are imported
    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402
from fusion_advisor.kernels import all_patterns  # noqa: E402


def _no_launch(*args, **kwargs) -> None:
    return None


def _no_op_launches() -> None:
    """`kernel[grid](...)` does nothing: every launcher goes through `__getitem__`."""
    from triton.runtime.interpreter import InterpretedFunction
    InterpretedFunction.__getitem__ = lambda self, grid: _no_launch


def _tensors(out) -> list[torch.Tensor]:
    return [out] if isinstance(out, torch.Tensor) else [o for o in out if isinstance(o, torch.Tensor)]


def _per_call_us(fn, calls: int, repeats: int) -> float:
    """The fastest of `repeats` means over `calls` calls, in µs: on a shared machine the minimum is
    the figure least disturbed by other processes (as timeit advises)."""
    for _ in range(max(10, calls // 10)):
        fn()
    times = []
    for _ in range(repeats):
        _sync()
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        _sync()
        times.append((time.perf_counter() - t0) / calls)
    return min(times) * 1e6


def _device() -> torch.device:
    return torch.device("cuda" if GPU else "cpu")


def _sync() -> None:
    if GPU:
        torch.cuda.synchronize()


def _calls(pattern, impl, device: torch.device):
    """(forward, forward + backward) closures of one implementation on the example inputs."""
    inputs = pattern.make_inputs(dict(pattern.example_params), device, True)
    args, kwargs = inputs.args, inputs.kwargs

    def forward():
        return impl(*args, **kwargs)

    outs = [o for o in _tensors(forward()) if o.requires_grad]
    upstream = [torch.ones_like(o) for o in outs]

    def forward_backward():
        got = [o for o in _tensors(forward()) if o.requires_grad]
        torch.autograd.backward(got, upstream)

    return forward, forward_backward


def measure(pattern, calls: int, repeats: int, impl=None) -> tuple[float, float]:
    """(forward µs, forward + backward µs) per call of `impl` (default `pattern.fused`) on the
    pattern's example inputs."""
    forward, forward_backward = _calls(pattern, impl or pattern.fused, _device())
    return _per_call_us(forward, calls, repeats), _per_call_us(forward_backward, calls, repeats)


def _scale_kernel_fn():
    import triton
    import triton.language as tl

    @triton.jit
    def scale(X, Y, n, factor, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tl.store(Y + offs, tl.load(X + offs, mask=offs < n) * factor, mask=offs < n)
    return scale


def anatomy(calls: int, repeats: int) -> list[tuple[str, float]]:
    """Where a fused op's host time goes, from its parts: a torch op and a trivial Triton launch
    alone, each inside a minimal autograd.Function (forward and backward one launch each), and the
    eager op with autograd. Same (252, 431) fp32 tensor as the patterns' examples. Meant for --gpu:
    on CPU tensors the torch rows include the CPU doing the multiply, and the launch is a no-op."""
    device = _device()
    scale = _scale_kernel_fn()
    x = torch.randn(252, 431, device=device, requires_grad=True)
    buf, up, n = torch.empty_like(x), torch.ones_like(x), x.numel()

    def launch(src, dst):
        scale[(-(-n // 1024),)](src, dst, n, 2.0, BLOCK=1024)
        return dst

    class TorchOps(torch.autograd.Function):
        @staticmethod
        def forward(ctx, t):
            return t * 2.0

        @staticmethod
        def backward(ctx, g):
            return g * 2.0

    class TritonOps(torch.autograd.Function):
        @staticmethod
        def forward(ctx, t):
            return launch(t, torch.empty_like(t))

        @staticmethod
        def backward(ctx, g):
            return launch(g, torch.empty_like(g))

    def with_backward(fn):
        return lambda: torch.autograd.backward([fn(x)], [up])

    rows = [("torch op alone (mul, out=)", lambda: torch.mul(x.detach(), 2.0, out=buf)),
            ("Triton launch alone", lambda: launch(x.detach(), buf)),
            ("eager x * 2, fwd+bwd", with_backward(lambda t: t * 2.0)),
            ("Function of torch ops, fwd+bwd", with_backward(TorchOps.apply)),
            ("Function of Triton launches, fwd+bwd", with_backward(TritonOps.apply))]
    return [(name, _per_call_us(fn, calls, repeats)) for name, fn in rows]


def profile(pattern, calls: int) -> None:
    """cProfile of `calls` forward + backward calls of ours: the functions with the most own time."""
    import cProfile
    import pstats
    _, forward_backward = _calls(pattern, pattern.fused, _device())
    for _ in range(20):
        forward_backward()
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(calls):
        forward_backward()
    _sync()
    prof.disable()
    pstats.Stats(prof).sort_stats("tottime").print_stats(20)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--patterns", default="", help="comma-separated pattern names (default: all)")
    ap.add_argument("--calls", type=int, default=500, help="calls per timed repeat")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--gpu", action="store_true", help="real launches on the GPU, beside eager and Liger-Kernel")
    ap.add_argument("--profile", default="", help="also print a cProfile of this pattern's forward + backward")
    ap.add_argument("--anatomy", action="store_true", help="also time the parts of a fused op's host cost: a torch op "
                                                           "and a Triton launch alone and inside an autograd.Function")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    if GPU:
        import triton
        print(f"host µs per call, real launches on {torch.cuda.get_device_name()} (torch {torch.__version__}, "
              f"triton {triton.__version__})")
    else:
        _no_op_launches()
        print(f"host µs per call, Triton launches as no-ops, CPU tensors (torch {torch.__version__})")
    wanted = {p for p in args.patterns.split(",") if p}
    patterns = [p for p in all_patterns() if not wanted or p.name in wanted]
    impls = ("ours", "eager", "liger") if GPU else ("ours",)
    print(f"{'pattern':<16} " + " ".join(f"{i + ' ' + what:>16}" for i in impls for what in ("fwd", "fwd+bwd")))
    for pattern in patterns:
        cells = []
        for impl in impls:
            fn = {"ours": pattern.fused, "eager": pattern.reference, "liger": pattern.liger}[impl]
            try:
                cells += [f"{t:>16.1f}" for t in measure(pattern, args.calls, args.repeats, fn)] if fn else [f"{'—':>16}"] * 2
            except Exception as exc:  # one pattern's failure must not hide the others' figures
                cells += [f"{type(exc).__name__:>16}"] * 2
        print(f"{pattern.name:<16} " + " ".join(cells), flush=True)
    if args.anatomy:
        print("\nthe parts, host µs per call")
        for name, us in anatomy(args.calls, args.repeats):
            print(f"{name:<40} {us:>10.1f}", flush=True)
    if args.profile:
        profile(next(p for p in patterns if p.name == args.profile), args.calls)
    return 0


if __name__ == "__main__":
    sys.exit(main())
