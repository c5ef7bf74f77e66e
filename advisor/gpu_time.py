"""How long the GPU worked in a step of a verification run, and on what: read off a short
torch.profiler window (CUDA activity only) after the timed steps.

A median step time says whether a patch made the step slower, not why. Set beside the step's wall
time, the GPU's busy time does: busy time that fell while the step grew means the GPU waited longer
for the host (the patch's Python and launches cost more than its kernels saved; CUDA graphs or
compiled blocks remove that), and busy time that grew means the kernels ran slower in the model
than on the bench. On the H100 zoo (T5 v1.1, bf16) the patch measured 0.76x with every kernel
faster than eager on the bench; the step time alone could not say which of the two it was.
"""
from __future__ import annotations

from dataclasses import dataclass, field

TOP_KERNELS = 12   # kernels kept per run, by time: enough to name what grew, small in the JSON


@dataclass
class GpuTime:
    busy_s: float                                   # union of kernel / copy intervals, per step
    steps: int                                      # steps profiled
    kernels_s: dict[str, float] = field(default_factory=dict)   # short kernel name -> s per step, top ones


def gpu_time(events, steps: int) -> GpuTime | None:
    """From the profiler's kineto events (`prof.profiler.kineto_results.events()`, or anything with
    device_type(), name(), start_ns(), duration_ns()): the GPU's busy time and its top kernels per
    step over `steps` steps. None with no step or no GPU activity (a CPU run)."""
    import numpy as np
    from torch.autograd import DeviceType

    from fusion_advisor.analyzers.summary import short_kernel_name, union_us

    starts, ends, by_name = [], [], {}
    for e in events:
        if e.device_type() != DeviceType.CUDA:
            continue
        start, duration = e.start_ns(), e.duration_ns()
        starts.append(start)
        ends.append(start + duration)
        name = short_kernel_name(e.name(), width=60)
        by_name[name] = by_name.get(name, 0) + duration
    if steps < 1 or not starts:
        return None
    busy_ns = union_us(np.array(starts, dtype=np.int64), np.array(ends, dtype=np.int64))
    top = sorted(by_name.items(), key=lambda kv: -kv[1])[:TOP_KERNELS]
    return GpuTime(busy_s=busy_ns / steps * 1e-9, steps=steps,
                   kernels_s={name: ns / steps * 1e-9 for name, ns in top})


def why_slower(before_step_s: float | None, before_busy_s: float | None, after_step_s: float | None,
               after_busy_s: float | None, before_kernels: dict[str, float] | None = None,
               after_kernels: dict[str, float] | None = None) -> str | None:
    """One sentence on why the patched step (after) is slower than the unpatched one (before), from
    their step and GPU-busy times; None where it is not slower or a figure is missing."""
    if None in (before_step_s, before_busy_s, after_step_s, after_busy_s) or after_step_s <= before_step_s:
        return None
    slower = after_step_s - before_step_s
    more_gpu = after_busy_s - before_busy_s
    ms = lambda s: f"{s * 1e3:,.2f} ms"  # noqa: E731
    busy = f"GPU busy {ms(before_busy_s)} -> {ms(after_busy_s)} a step"
    idle = f"GPU idle {ms(before_step_s - before_busy_s)} -> {ms(after_step_s - after_busy_s)}"
    if more_gpu < 0.5 * slower:
        return (f"why slower: the GPU waited on the host ({busy}, {idle}): the patch's Python and kernel launches "
                f"cost the host more than its kernels save the GPU; CUDA graphs or the compiled blocks take that "
                f"host time away")
    grew = _grown_kernels(before_kernels or {}, after_kernels or {})
    return (f"why slower: the GPU itself worked longer ({busy}): kernels ran slower in the model than on the "
            f"bench" + (f"; grew most: {grew}" if grew else ""))


def _grown_kernels(before: dict[str, float], after: dict[str, float], n: int = 3) -> str:
    growth = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in set(before) | set(after)}
    top = [(k, d) for k, d in sorted(growth.items(), key=lambda kv: -kv[1]) if d > 0][:n]
    return ", ".join(f"{k} +{d * 1e3:,.2f} ms" for k, d in top)
