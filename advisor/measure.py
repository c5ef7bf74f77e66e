"""How a provider of one fused op is built, timed and its memory measured: the same code for
`fusion-advisor bench` (the user's shapes) and benchmarks/bench_kernels.py (the kernel sweep).

Providers, for a registered FusionPattern:
  eager       `pattern.reference`: the PyTorch code as the user runs it
  triton      `pattern.fused`: our Triton replacement
  compile     `torch.compile(pattern.reference)`: what the compiler makes of the same code
  liger       `pattern.liger`: Liger-Kernel's equivalent, where one exists and is installed
  cuda_graph  the eager reference captured in a torch.cuda.CUDAGraph and replayed

Timing, with the profiler off (cost_model/timing.py): every call is warmed up first (torch.compile compiles, Triton
autotunes), then each timed call gets its own pair of CUDA events. A short spin kernel before each
start event keeps the host ahead of the GPU, so the events measure GPU time, not launch latency;
the host time to issue a call is measured apart (`host_us`). When one input set fits in L2, several
are built and rotated so that no call reads what the call before it left in L2.
"""
from __future__ import annotations

import gc
import math
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from fusion_advisor.kernels.numerics import tensor_outputs
from fusion_advisor.kernels.registry import FusionPattern, Inputs

PROVIDERS = ("eager", "triton", "compile", "liger")
CUDA_GRAPH = "cuda_graph"
LABELS = {"eager": "eager PyTorch", "triton": "our Triton kernel", "compile": "torch.compile",
          "liger": "Liger-Kernel", CUDA_GRAPH: "CUDA graph of eager"}

DEFAULT_L2_BYTES = 50 * 2**20   # H100/H200 SXM; used when the device does not say
MAX_INPUT_SETS = 32


class ProviderUnavailable(Exception):
    """This provider cannot run here (not installed, no equivalent); the message says why."""


def provider_callable(pattern: FusionPattern, provider: str) -> Callable[..., Any]:
    """The function a provider runs, with the pattern's argument convention."""
    if provider == "eager":
        return pattern.reference
    if provider == "triton":
        return pattern.fused
    if provider == "compile":
        # A fresh compile per call site: the dynamo cache lives on the reference's code object,
        # so shape after shape would otherwise hit the recompile limit and fall back to eager.
        torch._dynamo.reset()
        return torch.compile(pattern.reference, dynamic=False)
    if provider == "liger":
        if pattern.liger is None:
            raise ProviderUnavailable(f"Liger-Kernel has no equivalent of {pattern.name}")
        try:
            import liger_kernel  # noqa: F401 - only asking whether it is installed
        except ImportError:
            raise ProviderUnavailable("liger-kernel is not installed") from None
        return pattern.liger
    raise ValueError(f"unknown provider {provider!r} (known: {', '.join(PROVIDERS)})")


# -- workloads ----------------------------------------------------------------------------------
@dataclass
class Workload:
    """Input sets for one pattern on one shape, and the upstream gradients of each."""

    sets: list[Inputs]
    backward: bool
    grad_outputs: list[int] = field(default_factory=list)       # outputs that get an upstream grad
    upstream: list[list[torch.Tensor]] = field(default_factory=list)  # per set

    @property
    def set_bytes(self) -> int:
        return _tensor_bytes(self.sets[0])

    def clear_grads(self, k: int) -> None:
        for i in self.sets[k].grad_inputs:
            self.sets[k].args[i].grad = None

    def call(self, fn: Callable[..., Any], k: int) -> Callable[[], Any]:
        """One call of `fn` on set k: forward, then backward when the workload has one."""
        inputs = self.sets[k]
        args, kwargs = inputs.args, inputs.kwargs
        if not self.backward:
            return lambda: fn(*args, **kwargs)
        grads, idx = self.upstream[k], self.grad_outputs
        leaves = [args[i] for i in inputs.grad_inputs]

        def forward_backward():
            # autograd.grad, not .backward(): in a model the grads flow on to the layer before. Into
            # leaves' .grad, one tensor returned for two inputs (an add + norm's dx and dresidual) is
            # cloned for the second: two more passes over M x N that no model pays (add_rms_norm's
            # fwd+bwd at 524,288 x 256 bf16 on an H100 took 896 us for all providers alike: 10 passes'
            # bytes at 99 % of copy, where its kernels move 8).
            outs = tensor_outputs(fn(*args, **kwargs))
            if leaves:
                torch.autograd.grad([outs[i] for i in idx], leaves, grads, allow_unused=True)
            else:
                torch.autograd.backward([outs[i] for i in idx], grads)
        return forward_backward

    def calls(self, fn: Callable[..., Any]) -> list[Callable[[], Any]]:
        return [self.call(fn, k) for k in range(len(self.sets))]


def _tensor_bytes(inputs: Inputs) -> int:
    return sum(a.numel() * a.element_size() for a in inputs.args if isinstance(a, torch.Tensor))


def l2_bytes(device: torch.device) -> int:
    if device.type != "cuda":
        return DEFAULT_L2_BYTES
    return int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0) or DEFAULT_L2_BYTES)


def input_sets_needed(set_bytes: int, l2: int, cap: int = MAX_INPUT_SETS) -> int:
    """Enough sets that cycling through them moves about 3x the L2 (outputs and intermediates
    take L2 too), so each call starts cold as it would mid-step; one when a set alone is that big."""
    if set_bytes <= 0:
        return 1
    return max(1, min(cap, math.ceil(3 * l2 / set_bytes)))


def build_workload(pattern: FusionPattern, params: dict, device: torch.device, backward: bool,
                   requires_grad: bool | None = None, seed: int = 0, n_sets: int | None = None) -> Workload:
    """Input sets on `device` with the captured shapes and dtypes. `requires_grad` (default:
    `backward`) is whether the inputs need grad: a training forward records autograd state even
    when timed alone."""
    requires_grad = backward if requires_grad is None else requires_grad
    torch.manual_seed(seed)
    first = pattern.make_inputs(params, device, requires_grad)
    if n_sets is None:
        n_sets = input_sets_needed(_tensor_bytes(first), l2_bytes(device)) if device.type == "cuda" else 1
    sets = [first] + [pattern.make_inputs(params, device, requires_grad) for _ in range(n_sets - 1)]
    work = Workload(sets=sets, backward=backward)
    if backward:
        outs = tensor_outputs(pattern.reference(*first.args, **first.kwargs))
        work.grad_outputs = [i for i, o in enumerate(outs) if o.requires_grad]
        if not work.grad_outputs:
            raise ValueError(f"{pattern.name}: no output of the reference requires grad; nothing to time backward")
        work.upstream = [[torch.randn_like(outs[i]) for i in work.grad_outputs] for _ in sets]
        del outs
        for k in range(len(sets)):
            work.clear_grads(k)
    return work


# -- memory -------------------------------------------------------------------------------------
@dataclass
class Memory:
    peak_bytes: int | None
    activation_bytes: int | None


def measure_memory(work: Workload, fn: Callable[..., Any], device: torch.device) -> Memory:
    """On set 0: bytes the forward leaves allocated (outputs, tensors saved for backward) and the
    peak of the whole call, both above what was allocated before it. None off CUDA."""
    if device.type != "cuda":
        return Memory(None, None)
    inputs = work.sets[0]
    work.clear_grads(0)
    # The timing loop's last outputs can still be alive in a reference cycle, freed by whichever
    # collection comes next, perhaps mid-call: a base read before that overstates what stays, and
    # padded_linear's eager fwd+bwd on the H100 read a peak of -12.8 GB. Collect them first.
    gc.collect()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    outs = tensor_outputs(fn(*inputs.args, **inputs.kwargs))
    torch.cuda.synchronize()
    activation = torch.cuda.memory_allocated() - base
    if work.backward:
        torch.autograd.backward([outs[i] for i in work.grad_outputs], work.upstream[0])
        torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    del outs
    work.clear_grads(0)
    return Memory(int(peak), int(activation))


# -- CUDA graphs --------------------------------------------------------------------------------
def graph_replays(work: Workload, fn: Callable[..., Any]) -> tuple[list[Callable[[], Any]], list[torch.cuda.CUDAGraph]]:
    """Capture one call of `fn` per input set (forward, and backward when the workload has one)
    in its own CUDA graph; return the replays. Keep the graphs alive while timing."""
    graphs, replays = [], []
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):   # warm-up off the capture stream, as torch.cuda.graph requires
        for k in range(len(work.sets)):
            for _ in range(3):
                work.clear_grads(k)
                work.call(fn, k)()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    for k in range(len(work.sets)):
        work.clear_grads(k)   # the graph allocates the grads in its own pool and writes them on replay
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            work.call(fn, k)()
        graphs.append(graph)
        replays.append(graph.replay)
    torch.cuda.synchronize()
    return replays, graphs
