"""Host (CPU) cost of one call of a generated module's `fused`, forward and forward+backward.

The Triton launches are replaced by no-ops, so this runs on a machine without a GPU and times
only the Python around them: argument checks, shape and launch-parameter arithmetic, output and
gradient-buffer allocation, autograd, the small torch reductions that finish broadcast inputs'
gradients. On a GPU this cost is paid on every call; when it exceeds the kernel's run time, the
kernel waits for the CPU and a timer around the call (triton.testing.do_bench) measures the CPU.
Not included: Triton's own launcher (binding the arguments, the specialisation key, the driver
call), which a no-op cannot stand in for.

The chains are bench_codegen.py's, at small shapes of the same structure (the host cost does not
depend on the sizes, but CPU allocations and the finishing reductions would). `floor` is an
autograd.Function that only allocates its output (and its input's gradient): what any
autograd-aware custom kernel pays.

    python benchmarks/codegen_host_overhead.py          # tens of seconds on a laptop CPU
"""
from __future__ import annotations

import argparse
import os
import sys
import timeit
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")   # the generated modules accept CPU tensors then
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from bench_codegen import bias_gelu_residual, conv_tail, masked_softmax, unary_chain  # noqa: E402
from fusion_advisor.kernels.codegen import build_pattern, generated  # noqa: E402


def chains():
    return [("4 unary ops", *unary_chain((4096,), torch.bfloat16, 4)),
            ("8 unary ops", *unary_chain((4096,), torch.bfloat16, 8)),
            ("conv tail (7 ops)", *conv_tail((2, 128, 8, 8), torch.bfloat16)),
            ("bias+gelu+scale+residual", *bias_gelu_residual((64, 256), torch.bfloat16)),
            ("scale+mask+softmax", *masked_softmax((1, 2, 64, 64), torch.bfloat16))]


class _NoLaunch:
    """Stands in for a @triton.jit kernel: `kernel[grid](...)` does nothing."""

    def __getitem__(self, grid):
        return _no_op


def _no_op(*args, **kwargs):
    return None


class _Floor(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return torch.empty_like(x)

    @staticmethod
    def backward(ctx, dout):
        return torch.empty_like(dout)


def _floor(x, *rest, **kwargs):
    return _Floor.apply(x)


def time_us(fn, repeat: int, number: int) -> float:
    """The best of `repeat` runs of the mean µs per call over `number` calls: the other processes
    of a shared machine only ever add time."""
    fn()
    runs = timeit.repeat(fn, repeat=repeat, number=number)
    return 1e6 * min(runs) / number


def measure(fused, args, kwargs, repeat: int, number: int) -> dict:
    grad_args = [a for a in args if a.requires_grad]
    out = fused(*args, **kwargs)
    dout = torch.empty_like(out[0] if isinstance(out, tuple) else out)

    def forward():
        with torch.no_grad():
            fused(*args, **kwargs)

    def forward_backward():
        o = fused(*args, **kwargs)
        torch.autograd.grad(o[0] if isinstance(o, tuple) else o, grad_args, dout)

    return {"forward_us": time_us(forward, repeat, number),
            "forward_backward_us": time_us(forward_backward, repeat, number)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeat", type=int, default=7)
    p.add_argument("--number", type=int, default=300)
    opts = p.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(1)
    print(f"host CPU cost per call, Triton launches replaced by no-ops; torch {torch.__version__}, "
          f"{os.cpu_count()} CPUs")
    print(f"{'chain':<26}{'fw µs':>8}{'fw+bw µs':>10}")
    floor_done = False
    for name, ops, bind in chains():
        pattern = build_pattern(ops, bind=bind)
        module = generated(pattern).module
        module._forward_kernel, module._backward_kernel = _NoLaunch(), _NoLaunch()
        inputs = pattern.make_inputs(pattern.example_params, torch.device("cpu"), True)
        if not floor_done:
            r = measure(_floor, inputs.args, {}, opts.repeat, opts.number)
            print(f"{'floor (autograd.Function)':<26}{r['forward_us']:>8.1f}{r['forward_backward_us']:>10.1f}")
            floor_done = True
        r = measure(module.fused, inputs.args, inputs.kwargs, opts.repeat, opts.number)
        print(f"{name:<26}{r['forward_us']:>8.1f}{r['forward_backward_us']:>10.1f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
