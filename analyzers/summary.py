"""The first look at a trace: where GPU time goes per step, how busy the GPU is, how small the
kernels are, which modules cost most. Returns plain data; the report renders it."""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field

import numpy as np
import pandas as pd

from fusion_advisor.analyzers.trace import Trace

SMALL_KERNEL_US = 10.0  # "small": under this a kernel is dominated by launch and ramp-up, not bytes


@dataclass
class StepSummary:
    steps: list[int]                 # ProfilerStep numbers summarised ([] = the whole trace)
    step_basis: str                  # "ProfilerStep" or "whole trace"
    has_gpu: bool
    wall_us_per_step: float          # CPU span of a step (profiled: includes profiler overhead)
    gpu_busy_us_per_step: float      # union of GPU activity intervals
    gpu_idle_us_per_step: float      # step's GPU window minus busy time
    gpu_busy_pct: float
    kernels_per_step: float
    small_kernel_share: float        # share of kernels under SMALL_KERNEL_US
    small_kernel_time_share: float   # share of GPU time in those kernels
    top_kernels: list[dict] = field(default_factory=list)   # name, calls_per_step, us_per_step, pct
    top_modules: list[dict] = field(default_factory=list)   # module, us_per_step, pct
    top_cpu_ops: list[dict] = field(default_factory=list)   # CPU-only traces: op, us_per_step, pct

    def to_dict(self) -> dict:
        return asdict(self)


_NOISE = [
    (re.compile(r"^void "), ""),
    (re.compile(r"at::native::|\(anonymous namespace\)::|c10::|std::"), ""),
    (re.compile(r"\((int|long|unsigned|at::|char|float|void).*\)$"), ""),  # trailing argument list
]


def short_kernel_name(name: str, width: int = 90) -> str:
    """A readable kernel name: no 'void', namespaces or argument list; cut to `width`."""
    s = name
    for rx, rep in _NOISE:
        s = rx.sub(rep, s)
    s = s.strip()
    return s if len(s) <= width else s[: width - 1] + "…"


def union_us(starts: np.ndarray, ends: np.ndarray) -> float:
    """Total length of the union of [start, end) intervals."""
    if len(starts) == 0:
        return 0.0
    order = np.argsort(starts, kind="stable")
    s, e = starts[order], ends[order]
    run_end = np.maximum.accumulate(e)
    # A new busy run starts where a start is past every earlier end.
    new_run = np.empty(len(s), dtype=bool)
    new_run[0] = True
    new_run[1:] = s[1:] > run_end[:-1]
    run_ids = np.cumsum(new_run) - 1
    run_start = s[new_run]
    run_stop = pd.Series(run_end).groupby(run_ids).max().to_numpy()
    return float((run_stop - run_start).sum())


def summarize(trace: Trace, top: int = 12) -> StepSummary:
    steps = trace.step_ids
    k = trace.kernel_ops()
    basis = "ProfilerStep" if steps else "whole trace"
    if steps:
        k = k[k["step"].isin(steps)]
        n_steps = len(steps)
        wall = float(trace.steps["dur"].mean())
    else:
        n_steps = 1
        spans = [(df["ts"].min(), df["end"].max()) for df in (trace.ops, k) if len(df)]
        wall = float(max(e for _, e in spans) - min(s for s, _ in spans)) if spans else 0.0
    has_gpu = len(k) > 0
    busy = idle = 0.0
    if has_gpu:
        for _, g in (k.groupby("step") if steps else [(None, k)]):
            b = union_us(g["ts"].to_numpy(), g["end"].to_numpy())
            window = float(g["end"].max() - g["ts"].min())
            busy += b
            idle += max(window - b, 0.0)
        busy /= n_steps
        idle /= n_steps
    total_gpu = float(k["dur"].sum()) if has_gpu else 0.0
    small = k["dur"] < SMALL_KERNEL_US if has_gpu else pd.Series(dtype=bool)
    summary = StepSummary(
        steps=steps, step_basis=basis, has_gpu=has_gpu,
        wall_us_per_step=round(wall, 3),
        gpu_busy_us_per_step=round(busy, 3), gpu_idle_us_per_step=round(idle, 3),
        gpu_busy_pct=round(100.0 * busy / (busy + idle), 2) if busy + idle > 0 else 0.0,
        kernels_per_step=round(len(k) / n_steps, 2),
        small_kernel_share=round(float(small.mean()), 4) if has_gpu else 0.0,
        small_kernel_time_share=round(float(k.loc[small, "dur"].sum()) / total_gpu, 4) if total_gpu else 0.0,
    )
    if has_gpu:
        by_name = k.groupby("name")["dur"].agg(["count", "sum"]).sort_values("sum", ascending=False).head(top)
        summary.top_kernels = [
            {"name": short_kernel_name(n), "calls_per_step": round(c / n_steps, 2),
             "us_per_step": round(s / n_steps, 3), "pct": round(100.0 * s / total_gpu, 2)}
            for n, (c, s) in zip(by_name.index, by_name.to_numpy())]
        mods = k.assign(module_class=k["module_class"].fillna("(no module)"))
        by_mod = mods.groupby("module_class")["dur"].sum().sort_values(ascending=False).head(top)
        summary.top_modules = [{"module": m, "us_per_step": round(s / n_steps, 3), "pct": round(100.0 * s / total_gpu, 2)}
                               for m, s in by_mod.items()]
    else:
        ops = trace.ops
        if steps:
            ops = ops[ops["step"].isin(steps)]
        top_level = ops[ops["depth"] == 0]
        total_cpu = float(top_level["dur"].sum()) or 1.0
        by_op = top_level.groupby("name")["dur"].sum().sort_values(ascending=False).head(top)
        summary.top_cpu_ops = [{"op": n, "us_per_step": round(s / n_steps, 3), "pct": round(100.0 * s / total_cpu, 2)}
                               for n, s in by_op.items()]
    return summary
