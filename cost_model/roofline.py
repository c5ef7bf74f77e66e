"""The roofline: time of a kernel from its bytes and FLOPs on a DeviceProfile, and what one fused
kernel would save over a chain of them.

A kernel takes the longest of: moving its bytes at the bandwidth a kernel of that size achieves
(the calibration's curve: small kernels never reach peak bandwidth, and the curve's smallest
point is a kernel's fixed cost), doing its FLOPs at the peak rate of its dtype, and the shortest
kernel the GPU runs back to back. These are GPU times (kernel durations); the CPU's launch cost
is the launch-bound analyzer's business.
"""
from __future__ import annotations

import bisect
from collections import Counter
from typing import Sequence

from fusion_advisor.cost_model.device import DeviceProfile
from fusion_advisor.core.dtypes import TRACE_DTYPES
from fusion_advisor.cost_model.ops import OpCost, op_cost
from fusion_advisor.core.records import OpRecord
from fusion_advisor.core.result import Estimate

_TC_KEYS = {"bfloat16": "bf16_tc", "float16": "fp16_tc", "float32": "tf32_tc",
            # No fp8 key in the profiles yet: priced at the bf16 rate (conservative: half the speed).
            "float8_e4m3fn": "bf16_tc", "float8_e5m2": "bf16_tc"}


def peak_key(cost: OpCost) -> str:
    if cost.tensor_core:
        return _TC_KEYS.get(cost.dtype, "fp32")
    return "fp64" if cost.dtype == "float64" else "fp32"


def memory_time_us(bytes_moved: float, profile: DeviceProfile, bandwidth_scale: float = 1.0) -> float:
    """GPU time of one kernel that moves `bytes_moved` (read + written), from the profile's
    bandwidth curve: piecewise linear in bytes between measured sizes (time = fixed cost + bytes /
    bandwidth is linear in bytes), the smallest size's time below it, and the asymptotic copy
    bandwidth past the largest. Without a curve (datasheet profiles): the shortest kernel's time
    plus bytes at the copy bandwidth."""
    if bytes_moved <= 0:
        return 0.0
    bw_inf = profile.hbm_bytes_per_s * bandwidth_scale
    curve = sorted(profile.bandwidth_curve)
    if not curve:
        # Half the shortest back-to-back time is the gap before a kernel starts, half its
        # shortest run (about 1 + 1 µs on an H200); the bytes overlap the latter.
        gap = profile.min_kernel_us / 2
        return gap + max(profile.min_kernel_us - gap, bytes_moved / bw_inf * 1e6)
    sizes = [b for b, _ in curve]
    times = [b / (bw * bandwidth_scale) * 1e6 for b, bw in curve]
    i = bisect.bisect_left(sizes, bytes_moved)
    if i == 0:
        return times[0]
    if i == len(sizes):
        return times[-1] + (bytes_moved - sizes[-1]) / bw_inf * 1e6
    b0, b1, t0, t1 = sizes[i - 1], sizes[i], times[i - 1], times[i]
    return t0 + (bytes_moved - b0) * (t1 - t0) / (b1 - b0)


def kernel_time_us(cost: OpCost, profile: DeviceProfile, bandwidth_scale: float = 1.0) -> float:
    """Roofline GPU time of the kernel(s) `cost` describes, back to back: per kernel the longest
    of bytes / bw(bytes), flops / peak, loop elements / the element rate of the loop's family
    (plus the gap before a kernel), and the shortest kernel; bytes, FLOPs and elements split
    evenly over the op's kernels."""
    k = cost.kernels
    if k <= 0 or (cost.bytes == 0 and cost.flops == 0):
        return 0.0
    t_mem = memory_time_us(cost.bytes / k, profile, bandwidth_scale)
    t_compute = cost.flops / k / profile.peak(peak_key(cost)) * 1e6
    t_loop = 0.0
    rate = profile.element_rates.get(cost.loop) if cost.loop else None
    if cost.loop_elements and rate:
        t_loop = cost.loop_elements / k / rate * 1e6 + profile.min_kernel_us / 2
    return k * max(t_mem, t_compute, t_loop, profile.min_kernel_us)


def ridge_intensity(cost: OpCost, profile: DeviceProfile) -> float:
    """FLOPs per byte where the kernel's dtype turns from memory-bound to compute-bound."""
    return profile.peak(peak_key(cost)) / profile.hbm_bytes_per_s


def intensity(cost: OpCost) -> float:
    return cost.flops / cost.bytes if cost.bytes else float("inf")


def is_memory_bound(cost: OpCost, profile: DeviceProfile) -> bool:
    """Arithmetic intensity below the ridge point of the kernel's dtype. A kernel that moves no
    bytes (a view) is not memory-bound."""
    if cost.bytes == 0:
        return False
    return intensity(cost) < ridge_intensity(cost, profile)


def achieved_bandwidth(cost: OpCost, measured_us: float, profile: DeviceProfile) -> tuple[float, float]:
    """(bytes/s the measured kernel achieved, % of the profile's copy bandwidth)."""
    if measured_us <= 0:
        return 0.0, 0.0
    bps = cost.bytes / (measured_us * 1e-6)
    return bps, 100.0 * bps / profile.hbm_bytes_per_s


def roofline_point(cost: OpCost, measured_us: float | None, profile: DeviceProfile) -> dict:
    """The fields of one roofline point in the AdvisorResult's `kernels` list (estimates from the
    cost model; achieved bandwidth from the measured time)."""
    point = {"bytes_estimate": cost.bytes, "flops_estimate": cost.flops,
             "intensity": None if cost.bytes == 0 else cost.flops / cost.bytes,
             "estimate_us": kernel_time_us(cost, profile), "memory_bound": is_memory_bound(cost, profile),
             "achieved_gbps": None, "pct_of_peak_bw": None}
    if measured_us:
        bps, pct = achieved_bandwidth(cost, measured_us, profile)
        point["achieved_gbps"] = bps / 1e9
        point["pct_of_peak_bw"] = pct
    return point


# -- a chain as it runs now, and fused ------------------------------------------------------------
def chain_dtype(ops: Sequence[OpRecord]) -> str | None:
    """The floating dtype most of the chain's tensors have: what a TensorList in it holds."""
    seen = Counter(TRACE_DTYPES[t][0] for op in ops for t in (op.types or ())
                   if t in TRACE_DTYPES and TRACE_DTYPES[t][0] in ("float32", "bfloat16", "float16", "float64"))
    return seen.most_common(1)[0][0] if seen else None


def external_bytes(costs: Sequence[OpCost]) -> int:
    """Bytes one fused kernel must move for this chain: the tensors it reads that no earlier op
    of the chain wrote (external inputs), and the tensors it writes that no later op reads
    (external outputs: the chain's result and anything else it leaves behind, e.g. statistics).

    The trace has no tensor identities, so a read matches an earlier write by (element count,
    dtype): views between ops keep both. Within one op, each earlier write matches at most one
    read (in mul(silu(g), u) only one operand can be silu's output). A real external input that
    happens to match an earlier intermediate is missed; a pattern's `fused_bytes` is exact."""
    produced: dict[tuple[int, str], list[list]] = {}    # key -> [[spec, consumed?], ...] in order
    outputs: list[list] = []
    inputs = 0
    for cost in costs:
        used: Counter = Counter()
        for spec in cost.reads:
            key = (spec.numel, spec.dtype)
            entries = produced.get(key, [])
            if used[key] < len(entries):
                entries[-1 - used[key]][1] = True       # the latest unmatched such write
                used[key] += 1
            else:
                inputs += spec.nbytes
        for spec in cost.writes:
            entry = [spec, False]
            produced.setdefault((spec.numel, spec.dtype), []).append(entry)
            outputs.append(entry)
    return inputs + sum(spec.nbytes for spec, consumed in outputs if not consumed)


def _fused_cost(bytes_fused: int, flops: int, costs: Sequence[OpCost]) -> OpCost:
    dtype = "float64" if any(c.dtype == "float64" for c in costs) else "float32"
    return OpCost(bytes_read=bytes_fused, bytes_written=0, flops=flops, dtype=dtype)


def cluster_estimate(ops: Sequence[OpRecord], fused_bytes: int | None, profile: DeviceProfile,
                     dtype_hint: str | None = None, traced_us: float | None = None) -> Estimate:
    """Estimate for one occurrence of a chain of ops on `profile`.

    now: the sum of each op's roofline kernel time, and `traced_us`, the chain's kernels' time in
    the trace, where it timed GPU kernels. fused: one kernel moving `fused_bytes` (the matched
    pattern's exact count; None = the chain's external tensors, `external_bytes`) and doing the
    chain's FLOPs. The saving is measured now minus the fused estimate where the trace has a time,
    else roofline minus roofline: the roofline assumes eager runs at the copy bandwidth, and it
    does not always (under autocast, ResNet's BatchNorm + ReLU saved 2.4 ms a call in bench on an
    H100, where the roofline now had left a 2 µs saving). The saving's range comes from the
    profile's bandwidth spread. Ops without a cost rule are listed in `unknown_ops`: then `now_us`
    covers only the priced ops (the roofline saving is a lower bound), and without a pattern's
    `fused_bytes` nothing fused is estimated."""
    hint = dtype_hint or chain_dtype(ops)
    costs: list[OpCost] = []
    unknown: list[str] = []
    for op in ops:
        cost = op_cost(op, hint)
        if cost is None:
            unknown.append(op.name)
        else:
            costs.append(cost)
    flops = sum(c.flops for c in costs)
    est = Estimate(profile=profile.label(), bytes_now=sum(c.bytes for c in costs), flops=flops,
                   now_us=sum(kernel_time_us(c, profile) for c in costs), unknown_ops=unknown)
    if fused_bytes is None and not unknown and costs:
        fused_bytes = external_bytes(costs)
    if fused_bytes is None:
        return est
    fused = _fused_cost(int(fused_bytes), flops, costs)
    est.bytes_fused = int(fused_bytes)
    est.fused_us = kernel_time_us(fused, profile)
    traced = traced_us if traced_us is not None and traced_us > 0 else None
    est.now_traced_us = traced
    est.saving_us = (traced if traced is not None else est.now_us) - est.fused_us
    savings = []
    for scale in profile.bandwidth_spread:
        now = traced if traced is not None else sum(kernel_time_us(c, profile, scale) for c in costs)
        savings.append(now - kernel_time_us(fused, profile, scale))
    est.saving_lo_us = min(savings + [est.saving_us])
    est.saving_hi_us = max(savings + [est.saving_us])
    return est
