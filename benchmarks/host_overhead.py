"""Host (CPU) time of each fused op's Python path per call, with the Triton launches made no-ops.

A training step of a small model can be host-bound: the GPU waits for Python to issue the next
kernel. Then what a fused op costs on the host matters as much as its kernel time. This times,
for every registered pattern on its small example inputs (CPU tensors), the functional's forward
and forward + backward: the autograd.Function, the launcher's checks, views and allocations, and
the `kernel[grid]` lookup, with the launch itself replaced by a function that does nothing (so
neither the interpreter nor a GPU runs). What it leaves out is Triton's own launch path (argument
binding, specialisation, the driver call), which is the same for any caller.

    python benchmarks/host_overhead.py                  # every pattern
    python benchmarks/host_overhead.py --patterns rms_norm,rope --calls 2000

Figures are µs per call on this machine's CPU; compare runs on the same machine only.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

# Launchers accept CPU tensors only under the interpreter; set before the kernels are imported.
os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402
from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

from fusion_advisor.kernels import all_patterns  # noqa: E402


def _no_launch(*args, **kwargs) -> None:
    return None


def _no_op_launches() -> None:
    """`kernel[grid](...)` does nothing: every launcher goes through `__getitem__`."""
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
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        times.append((time.perf_counter() - t0) / calls)
    return min(times) * 1e6


def measure(pattern, calls: int, repeats: int) -> tuple[float, float]:
    """(forward µs, forward + backward µs) per call of `pattern.fused` on its example inputs."""
    inputs = pattern.make_inputs(dict(pattern.example_params), torch.device("cpu"), True)
    args, kwargs = inputs.args, inputs.kwargs

    def forward():
        return pattern.fused(*args, **kwargs)

    outs = [o for o in _tensors(forward()) if o.requires_grad]
    upstream = [torch.ones_like(o) for o in outs]

    def forward_backward():
        got = [o for o in _tensors(forward()) if o.requires_grad]
        torch.autograd.backward(got, upstream)

    return _per_call_us(forward, calls, repeats), _per_call_us(forward_backward, calls, repeats)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--patterns", default="", help="comma-separated pattern names (default: all)")
    ap.add_argument("--calls", type=int, default=500, help="calls per timed repeat")
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    _no_op_launches()
    wanted = {p for p in args.patterns.split(",") if p}
    patterns = [p for p in all_patterns() if not wanted or p.name in wanted]
    print(f"host µs per call, Triton launches as no-ops, CPU tensors (torch {torch.__version__})")
    print(f"{'pattern':<16} {'forward':>10} {'fwd+bwd':>10}")
    fwd_total = both_total = 0.0
    for pattern in patterns:
        fwd_us, both_us = measure(pattern, args.calls, args.repeats)
        fwd_total, both_total = fwd_total + fwd_us, both_total + both_us
        print(f"{pattern.name:<16} {fwd_us:>10.1f} {both_us:>10.1f}", flush=True)
    print(f"{'sum':<16} {fwd_total:>10.1f} {both_total:>10.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
