"""Communication per step: how long collectives take, and how much of that no compute hides.

On the GPU a collective (NCCL all-reduce, reduce-scatter, all-gather) runs on its own stream; the
time it costs the step is the part no compute kernel overlaps ("exposed"). A CPU-only trace (gloo)
has no kernels: there the collectives' CPU ops are counted whole, since the calling thread waits
on them. Collectives are never part of a fusion cluster (kernel class "communication").
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass

import numpy as np

from fusion_advisor.analyzers.kernel_classes import classify
from fusion_advisor.analyzers.trace import Trace

# CPU ops of collectives: c10d's ops (c10d::allreduce_), the backend's record_function ranges
# (gloo:all_reduce, nccl:all_reduce) and DDP's bucket reducer.
_CPU_COMM = re.compile(r"^(c10d::|gloo:|nccl:|record_param_comms)|all_?reduce|all_?gather|reduce_?scatter",
                       re.IGNORECASE)


@dataclass
class CommunicationSummary:
    comm_us_per_step: float          # the collectives' own time
    exposed_us_per_step: float       # the part of it no compute overlaps (all of it on a CPU trace)
    collectives_per_step: float
    basis: str                       # "gpu kernels" | "cpu ops"
    collectives: dict[str, float]    # kernel (or CPU op) name -> calls per step, all of class "communication"

    def to_dict(self) -> dict:
        return asdict(self)


def _union(starts: np.ndarray, ends: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sorted, disjoint intervals covering the given ones."""
    if len(starts) == 0:
        return starts, ends
    order = np.argsort(starts, kind="stable")
    s, e = starts[order], ends[order]
    merged_s, merged_e = [s[0]], [e[0]]
    for a, b in zip(s[1:].tolist(), e[1:].tolist()):
        if a <= merged_e[-1]:
            merged_e[-1] = max(merged_e[-1], b)
        else:
            merged_s.append(a)
            merged_e.append(b)
    return np.array(merged_s), np.array(merged_e)


def exposed_time(comm: list[tuple[float, float]], compute: list[tuple[float, float]]) -> float:
    """Total length of the `comm` intervals (unioned) that no `compute` interval covers."""
    if not comm:
        return 0.0
    cs, ce = _union(*map(np.asarray, zip(*comm)))
    if not compute:
        return float((ce - cs).sum())
    ks, ke = _union(*map(np.asarray, zip(*compute)))
    covered = 0.0
    for a, b in zip(cs.tolist(), ce.tolist()):
        lo = int(np.searchsorted(ke, a, side="right"))   # the first compute interval ending after a
        for x, y in zip(ks[lo:].tolist(), ke[lo:].tolist()):
            if x >= b:
                break
            covered += max(0.0, min(b, y) - max(a, x))
    return float((ce - cs).sum()) - covered


def summarize_communication(trace: Trace) -> CommunicationSummary | None:
    """None when the trace holds no collective."""
    steps = trace.step_ids
    n_steps = max(len(steps), 1)
    if trace.has_gpu:
        k = trace.kernels
        if steps:
            k = k[k["step"].isin(steps)]
        is_comm = (classify(trace).reindex(k.index) == "communication").to_numpy()
        if not is_comm.any():
            return None
        ts, end = k["ts"].to_numpy(dtype=float), k["end"].to_numpy(dtype=float)
        comm = list(zip(ts[is_comm], end[is_comm]))
        compute = list(zip(ts[~is_comm], end[~is_comm]))
        total = float((end[is_comm] - ts[is_comm]).sum())
        return CommunicationSummary(total / n_steps, exposed_time(comm, compute) / n_steps,
                                    float(is_comm.sum()) / n_steps, "gpu kernels", _per_step(k["name"][is_comm], n_steps))
    ops = trace.ops
    if steps:
        ops = ops[ops["step"].isin(steps)]
    names = ops["name"].astype(str)
    is_comm = names.str.contains(_CPU_COMM).to_numpy()
    if not is_comm.any():
        return None
    comm = ops[is_comm]
    # nested ranges (gloo:all_reduce inside c10d::allreduce_) count once: the outermost per thread
    spans = list(zip(comm["ts"].to_numpy(dtype=float), comm["end"].to_numpy(dtype=float)))
    outer = float(sum(e - s for s, e in zip(*_union(*map(np.asarray, zip(*spans))))))
    return CommunicationSummary(outer / n_steps, outer / n_steps, float(is_comm.sum()) / n_steps, "cpu ops",
                                _per_step(comm["name"], n_steps))


def _per_step(names, n_steps: int) -> dict[str, float]:
    return {str(name): round(count / n_steps, 3) for name, count in names.value_counts().items()}
