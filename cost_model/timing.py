"""The one timing harness: CUDA events around calls, on a warmed-up GPU, in µs.

Two ways to time, for two questions:
  time_calls         one call at a time, each between its own pair of events, with a short spin
                     kernel before each so the host stays ahead of the GPU: the GPU time of a call
                     (and, apart, the host time to issue it). bench and the benchmarks use it.
  back_to_back_us    a stream of `calls` calls between one pair of events (or one CUDA graph of
                     them): throughput per call, what calibrate's bandwidth and launch figures are.
On CPU tensors (the Triton interpreter), time_calls takes wall time: plumbing only.
torch is imported inside the functions: the cost model loads without it.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable


@dataclass
class Timing:
    p20_us: float
    p50_us: float
    p80_us: float
    host_us: float
    iterations: int


def quantiles(samples: list[float]) -> tuple[float, float, float]:
    """p20, p50, p80 (linear interpolation between order statistics)."""
    if len(samples) == 1:
        return samples[0], samples[0], samples[0]
    q = statistics.quantiles(samples, n=10, method="inclusive")
    return q[1], statistics.median(samples), q[7]


def time_calls(calls: list[Callable[[], Any]], device, before: Callable[[int], None] | None = None,
               warmup_ms: float = 25.0, rep_ms: float = 100.0, max_iters: int = 1000) -> Timing:
    """Time `calls` rotated (call k % len(calls) at iteration k); `before(k)` runs untimed ahead
    of each call (clearing grads). The first call of each is an untimed warm-up."""
    before = before or (lambda k: None)
    if device.type == "cuda":
        return _time_cuda(calls, before, warmup_ms, rep_ms, max_iters)
    return _time_host(calls, before)


def _time_cuda(calls, before, warmup_ms, rep_ms, max_iters) -> Timing:
    import torch

    n = len(calls)
    for k in range(n):
        before(k)
        calls[k]()
    torch.cuda.synchronize()
    # Rough GPU and host time per call, to size the warm-up, the loop and the spin.
    probe = max(5, n)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    t0 = time.perf_counter()
    start.record()
    for k in range(probe):
        before(k % n)
        calls[k % n]()
    end.record()
    host_probe_us = (time.perf_counter() - t0) / probe * 1e6
    torch.cuda.synchronize()
    gpu_ms = max(start.elapsed_time(end) / probe, 1e-3)
    spin_us = max(20.0, 2.0 * host_probe_us)
    iters = int(min(max_iters, max(10, rep_ms / (gpu_ms + spin_us / 1e3))))
    for k in range(int(min(200, max(1, warmup_ms / gpu_ms)))):
        before(k % n)
        calls[k % n]()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    host: list[float] = []
    cycles = int(spin_us * _spin_cycles_per_us())
    torch.cuda.synchronize()
    for k in range(iters):
        before(k % n)
        if cycles:
            torch.cuda._sleep(cycles)   # GPU busy while the host issues the call: no launch gaps timed
        h0 = time.perf_counter()
        starts[k].record()
        calls[k % n]()
        ends[k].record()
        host.append((time.perf_counter() - h0) * 1e6)
    torch.cuda.synchronize()
    p20, p50, p80 = quantiles([s.elapsed_time(e) * 1e3 for s, e in zip(starts, ends)])
    return Timing(p20, p50, p80, statistics.median(host), iters)


_CYCLES_PER_US: float | None = None


def _spin_cycles_per_us() -> float:
    """GPU clock cycles per µs for torch.cuda._sleep, measured once (0: no spin kernel here)."""
    import torch

    global _CYCLES_PER_US
    if _CYCLES_PER_US is None:
        if not hasattr(torch.cuda, "_sleep"):
            _CYCLES_PER_US = 0.0
            return 0.0
        cycles = 2_000_000
        torch.cuda._sleep(cycles)   # first launch loads the kernel
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        torch.cuda._sleep(cycles)
        end.record()
        torch.cuda.synchronize()
        _CYCLES_PER_US = cycles / max(start.elapsed_time(end) * 1e3, 1.0)
    return _CYCLES_PER_US


def _time_host(calls, before, iters: int = 3) -> Timing:
    """CPU tensors (the Triton interpreter): wall time per call. Plumbing only, never a GPU figure."""
    n = len(calls)
    before(0)
    calls[0]()
    samples = []
    for k in range(max(iters, n)):
        before(k % n)
        t0 = time.perf_counter()
        calls[k % n]()
        samples.append((time.perf_counter() - t0) * 1e6)
    p20, p50, p80 = quantiles(samples)
    return Timing(p20, p50, p80, p50, len(samples))


def percentile(values: list[float], q: float) -> float:
    s = sorted(values)
    pos = (len(s) - 1) * q
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def back_to_back_us(fn: Callable[[], None], calls: int, samples: int, graph: bool) -> list[float]:
    """`samples` timings (µs per call) of `calls` back-to-back calls of fn, after a warm-up: the
    throughput of a stream of calls (calibrate's bandwidth and launch figures).
    graph=True replays a CUDA graph of the calls: launches cost the CPU nothing."""
    import torch

    warm_up_on_side_stream(fn)
    torch.cuda.synchronize()
    if graph:
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for _ in range(calls):
                fn()
        run = g.replay
    else:
        def run():
            for _ in range(calls):
                fn()
    run()  # warm-up of the graph (or loop) itself
    torch.cuda.synchronize()
    out = []
    for _ in range(samples):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        end.synchronize()
        out.append(start.elapsed_time(end) * 1e3 / calls)
    return out


def warm_up_on_side_stream(fn: Callable[[], Any], times: int = 3) -> None:
    """Run fn `times` times on a side stream, then make the current stream wait for it: the warm-up
    CUDA graph capture asks for (allocations and autotuning happen outside the capture)."""
    import torch

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(times):
            fn()
    torch.cuda.current_stream().wait_stream(side)
