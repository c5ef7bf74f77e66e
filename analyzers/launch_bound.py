"""GPU idle and launch-bound time: does the GPU wait on the CPU, and what would fix it?

Per step, the GPU timeline (every stream merged) is cut into busy runs and gaps. A gap is a
*launch wait* when the kernel after it was launched late: its launch call (cudaLaunchKernel,
cuLaunchKernelEx, ...) began only after the GPU had run out of work. The GPU sat idle because the
CPU had not issued the next kernel yet; CUDA graphs (or `torch.compile(mode="reduce-overhead")`,
which captures them) remove that per-kernel CPU cost. Any other gap (the kernel was launched in
time but started late: an event, a sync, scheduling) is `other_gap_us`.

A second witness is the queue delay (kernel start minus its launch call): when the CPU runs
ahead, kernels wait in the stream's queue for milliseconds; when the step is launch-bound they
start a few µs after their launch.

The profiler itself slows the CPU (record_shapes, with_stack): a profiled step can look
launch-bound when the unprofiled one is not. When `fusion-advisor profile` timed the steps
without the profiler (`step_time_s_unprofiled` in the trace), that time is compared with the GPU
busy time, and a step whose GPU is busy for most of its unprofiled time is not called
launch-bound.

Verdict, from the share of the step's GPU window spent in launch waits (the thresholds are ours,
read off the fixtures: tiny models sit above 90 %, GPU-bound fp32 runs below 10 %):
  >= 30 %   "launch-bound"          -> CUDA graphs first
  10-30 %   "partly launch-bound"   -> CUDA graphs help; so do fewer launches (fusion)
  <  10 %   "gpu-bound"             -> the time is in kernels: fuse the memory-bound ones

Returns plain data (`LaunchBound.to_dict()`): the figures that justify the advice come with it.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
import pandas as pd

from fusion_advisor.analyzers.summary import SMALL_KERNEL_US
from fusion_advisor.analyzers.trace import Trace

LAUNCH_BOUND_SHARE = 0.30        # launch waits / GPU window at or above: launch-bound
PARTLY_LAUNCH_BOUND_SHARE = 0.10
# A step whose GPU is busy for at least this share of the unprofiled step time is GPU-bound,
# whatever the profiled trace shows.
GPU_BUSY_UNPROFILED_SHARE = 0.70
# Fused kernels are worth suggesting when the clusters' estimated saving is at least this share of
# GPU busy time (or, without estimates, when memory-bound kernels hold MEMORY_BOUND_SHARE of it).
FUSION_SAVING_SHARE = 0.02
MEMORY_BOUND_SHARE = 0.20
TOP_WHERE = 8


@dataclass
class LaunchBound:
    steps: list[int]
    verdict: str                         # "launch-bound" | "partly launch-bound" | "gpu-bound"
    gpu_window_us_per_step: float        # first kernel start to last kernel end
    gpu_busy_us_per_step: float          # union of kernel intervals
    gpu_idle_us_per_step: float          # window - busy
    launch_wait_us_per_step: float       # idle gaps after which the next launch came late
    other_gap_us_per_step: float         # idle gaps with the next kernel already launched
    launch_wait_share: float             # launch waits / GPU window
    launch_waits_per_step: float         # number of such gaps
    kernels_per_step: float
    short_kernels_per_step: float        # kernels under SMALL_KERNEL_US
    short_kernel_launch_waits_per_step: float  # launch waits that follow a short kernel
    median_queue_delay_us: float | None  # kernel start - launch call start (median)
    cpu_us_per_launch: float | None      # CPU span of the step's launches / number of launches
    step_wall_us: float | None           # profiled CPU span of a step
    unprofiled_step_us: float | None     # the same step timed without the profiler, if known
    gpu_busy_share_unprofiled: float | None
    memory_bound_us_per_step: float | None   # GPU time in memory-bound kernels
    memory_bound_share: float | None         # of GPU busy time
    fusion_saving_estimate_us_per_step: float | None  # the clusters' estimated saving, if given
    launches_fused_away_per_step: float | None        # launches the clusters would no longer make
    by_phase: dict = field(default_factory=dict)    # phase -> launch wait µs per step
    where: list[dict] = field(default_factory=list)  # phase, module, launch_wait_us_per_step, waits_per_step
    remedies: list[dict] = field(default_factory=list)  # remedy, applies, figure_us_per_step, reason
    primary_remedy: str | None = None
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def _phase(backward: np.ndarray, annotation: np.ndarray) -> np.ndarray:
    ann = pd.Series(annotation, dtype=object).fillna("").astype(str)
    out = np.where(backward, "backward", "forward").astype(object)
    out[ann.str.startswith("Optimizer.step").to_numpy()] = "optimizer"
    out[ann.str.startswith("Optimizer.zero_grad").to_numpy()] = "zero_grad"
    return out


def _gpu_kernels(trace: Trace) -> pd.DataFrame:
    """Kernels of the analysed steps with launch time, phase and module."""
    k = trace.kernel_ops()
    steps = trace.step_ids
    if steps:
        k = k[k["step"].isin(steps)]
    if k.empty:
        return k
    la = trace.launches
    lrow = k["launch_row"].to_numpy()
    has = lrow >= 0
    launch_ts = np.full(len(k), np.nan)
    if len(la):
        launch_ts[has] = la["ts"].to_numpy()[lrow[has]]
    k = k.assign(launch_ts=launch_ts)
    top = k["top_row"].to_numpy()
    ann = np.full(len(k), None, dtype=object)
    okt = top >= 0
    if "annotation" in trace.ops and okt.any():
        ann[okt] = trace.ops["annotation"].to_numpy(dtype=object)[top[okt]]
    backward = k["backward"].fillna(False).to_numpy(dtype=bool)
    return k.assign(phase=_phase(backward, ann), module_class=k["module_class"].fillna("(no module)"))


def analyze_launch_bound(trace: Trace, memory_bound: pd.Series | None = None,
                         clusters: list | None = None) -> LaunchBound | None:
    """Launch-bound figures and advice; None for a trace without GPU kernels.

    `memory_bound`: a boolean per row of `trace.kernels` (True = the kernel is memory-bound), from
    the kernel classes and the roofline; without it the memory-bound figures are None.
    `clusters`: the clusters analyzer's findings (result.Cluster), whose estimated savings and
    launches back the fused-kernel remedy."""
    k = _gpu_kernels(trace)
    if k.empty:
        return None
    steps = trace.step_ids
    groups = list(k.groupby("step")) if steps else [(None, k)]
    n_steps = len(groups)
    totals = dict(window=0.0, busy=0.0, launch_wait=0.0, other=0.0, waits=0, short=0, short_waits=0)
    delays, cpu_per_launch = [], []
    wait_rows = []  # (phase, module, gap)
    for _, g in groups:
        g = g.sort_values("ts", kind="stable")
        start, end = g["ts"].to_numpy(), g["end"].to_numpy()
        run_end = np.maximum.accumulate(end)
        gaps = np.clip(start[1:] - run_end[:-1], 0.0, None)
        launch_ts = g["launch_ts"].to_numpy()
        # The next kernel's launch call began after the GPU ran dry: the GPU waited on the CPU.
        late = launch_ts[1:] >= run_end[:-1]
        window = float(run_end[-1] - start[0])
        busy = window - float(gaps.sum())
        totals["window"] += window
        totals["busy"] += busy
        totals["launch_wait"] += float(gaps[late].sum())
        totals["other"] += float(gaps[~late].sum())
        is_wait = late & (gaps > 0)
        totals["waits"] += int(is_wait.sum())
        short = g["dur"].to_numpy() < SMALL_KERNEL_US
        totals["short"] += int(short.sum())
        totals["short_waits"] += int((is_wait & short[:-1]).sum())
        ok = ~np.isnan(launch_ts)
        delays.append(start[ok] - launch_ts[ok])
        if ok.sum() > 1:
            cpu_per_launch.append(float(np.nanmax(launch_ts) - np.nanmin(launch_ts)) / (ok.sum() - 1))
        nxt = g.iloc[1:]
        wait_rows.append(pd.DataFrame({"phase": nxt["phase"].to_numpy()[is_wait],
                                       "module": nxt["module_class"].to_numpy()[is_wait],
                                       "gap": gaps[is_wait]}))
    per = {key: val / n_steps for key, val in totals.items()}
    waits = pd.concat(wait_rows, ignore_index=True)
    by_phase = {ph: round(float(us) / n_steps, 3)
                for ph, us in waits.groupby("phase")["gap"].sum().sort_values(ascending=False).items()}
    where = []
    if len(waits):
        agg = waits.groupby(["phase", "module"])["gap"].agg(["sum", "count"]).sort_values("sum", ascending=False)
        where = [{"phase": ph, "module": mod, "launch_wait_us_per_step": round(float(s) / n_steps, 3),
                  "waits_per_step": round(float(c) / n_steps, 2)}
                 for (ph, mod), (s, c) in zip(agg.index, agg.to_numpy())][:TOP_WHERE]

    all_delays = np.concatenate(delays) if delays else np.array([])
    share = per["launch_wait"] / per["window"] if per["window"] > 0 else 0.0
    unprof_s = (trace.run_info or {}).get("step_time_s_unprofiled")
    unprof_us = float(unprof_s) * 1e6 if unprof_s else None
    busy_share_unprof = min(per["busy"] / unprof_us, 1.0) if unprof_us else None
    mem_us = mem_share = None
    if memory_bound is not None:
        flags = memory_bound.reindex(k.index).fillna(False).to_numpy(dtype=bool)
        mem_us = float(k["dur"].to_numpy()[flags].sum()) / n_steps
        mem_share = mem_us / per["busy"] if per["busy"] > 0 else 0.0

    lb = LaunchBound(
        steps=steps, verdict="gpu-bound",
        gpu_window_us_per_step=round(per["window"], 3), gpu_busy_us_per_step=round(per["busy"], 3),
        gpu_idle_us_per_step=round(per["window"] - per["busy"], 3),
        launch_wait_us_per_step=round(per["launch_wait"], 3), other_gap_us_per_step=round(per["other"], 3),
        launch_wait_share=round(share, 4), launch_waits_per_step=round(per["waits"], 2),
        kernels_per_step=round(len(k) / n_steps, 2), short_kernels_per_step=round(per["short"], 2),
        short_kernel_launch_waits_per_step=round(per["short_waits"], 2),
        median_queue_delay_us=round(float(np.median(all_delays)), 3) if len(all_delays) else None,
        cpu_us_per_launch=round(float(np.mean(cpu_per_launch)), 3) if cpu_per_launch else None,
        step_wall_us=round(float(trace.steps["dur"].mean()), 3) if steps else None,
        unprofiled_step_us=round(unprof_us, 3) if unprof_us else None,
        gpu_busy_share_unprofiled=round(busy_share_unprof, 4) if busy_share_unprof is not None else None,
        memory_bound_us_per_step=round(mem_us, 3) if mem_us is not None else None,
        memory_bound_share=round(mem_share, 4) if mem_share is not None else None,
        fusion_saving_estimate_us_per_step=None, launches_fused_away_per_step=None,
        by_phase=by_phase, where=where,
    )
    if clusters is not None:
        # Memory-bound clusters only: a derived memory trade (linear_cross_entropy) repeats its loss
        # cluster's launches and fuses none of its GEMMs away.
        clusters = [c for c in clusters if c.memory_bound]
        lb.fusion_saving_estimate_us_per_step = round(sum((c.estimate.saving_us or 0.0) * c.occurrences_per_step
                                                          for c in clusters), 3)
        # One fused launch per occurrence each way (a fused backward may need a second, small one).
        lb.launches_fused_away_per_step = round(sum(max(c.launches_per_step - c.occurrences_per_step, 0.0)
                                                    for c in clusters), 2)
    _advise(lb)
    return lb


def _advise(lb: LaunchBound) -> None:
    """Verdict and remedies from the figures (each remedy says which figure backs it)."""
    share = lb.launch_wait_share
    if share >= LAUNCH_BOUND_SHARE:
        lb.verdict = "launch-bound"
    elif share >= PARTLY_LAUNCH_BOUND_SHARE:
        lb.verdict = "partly launch-bound"
    if lb.verdict != "gpu-bound" and lb.gpu_busy_share_unprofiled is not None \
            and lb.gpu_busy_share_unprofiled >= GPU_BUSY_UNPROFILED_SHARE:
        lb.notes.append(f"the profiled step waits on the CPU for {100 * share:.0f} % of its GPU window, but "
                        f"without the profiler the GPU is busy {100 * lb.gpu_busy_share_unprofiled:.0f} % of "
                        "the step: the waits are profiler overhead")
        lb.verdict = "gpu-bound"

    pct = f"{100 * share:.0f} %"
    delay = (f"; kernels start a median {lb.median_queue_delay_us:,.0f} µs after their launch"
             if lb.median_queue_delay_us is not None else "")
    unprof = ""
    if lb.unprofiled_step_us and lb.gpu_busy_share_unprofiled is not None:
        unprof = (f"; unprofiled, a step takes {lb.unprofiled_step_us:,.0f} µs for "
                  f"{lb.gpu_busy_us_per_step:,.0f} µs of GPU work")
    graphs = {
        "remedy": "cuda_graphs",
        "title": 'CUDA graphs / torch.compile(mode="reduce-overhead")',
        "applies": lb.verdict != "gpu-bound",
        "figure_us_per_step": lb.launch_wait_us_per_step,
        "reason": (f"the GPU waits {lb.launch_wait_us_per_step:,.0f} µs per step for the CPU to launch the next "
                   f"kernel ({pct} of its {lb.gpu_window_us_per_step:,.0f} µs window, "
                   f"{lb.launch_waits_per_step:,.0f} waits){delay}{unprof}"),
    }
    saving = lb.fusion_saving_estimate_us_per_step
    if saving is not None:
        applies = saving >= FUSION_SAVING_SHARE * lb.gpu_busy_us_per_step and saving > 0
    else:
        applies = lb.memory_bound_share is not None and lb.memory_bound_share >= MEMORY_BOUND_SHARE
    parts = []
    if lb.memory_bound_share is not None:
        parts.append(f"memory-bound kernels take {lb.memory_bound_us_per_step:,.0f} µs per step "
                     f"({100 * lb.memory_bound_share:.0f} % of GPU busy time)")
    if saving is not None:
        parts.append(f"fusing the clusters would save an estimated {saving:,.0f} µs per step")
    if lb.launches_fused_away_per_step and lb.verdict != "gpu-bound":
        parts.append(f"and launch about {lb.launches_fused_away_per_step:,.0f} fewer kernels per step, each of "
                     "which this step pays for on the CPU")
    fused = {
        "remedy": "fused_kernels",
        "title": "fused kernels for the memory-bound clusters",
        "applies": bool(applies),
        "figure_us_per_step": saving if saving is not None else lb.memory_bound_us_per_step,
        "reason": "; ".join(parts) if parts else "no memory-bound figures for this trace",
    }
    lb.remedies = [graphs, fused]
    applicable = [r for r in lb.remedies if r["applies"]]
    if lb.verdict == "launch-bound":
        lb.primary_remedy = "cuda_graphs"
    elif applicable:
        lb.primary_remedy = max(applicable, key=lambda r: r["figure_us_per_step"] or 0.0)["remedy"]
    else:
        lb.primary_remedy = None
        lb.notes.append("neither remedy applies: the GPU time is in compute-bound kernels (GEMM, attention); "
                        "look at their efficiency, not at fusion or launches")
