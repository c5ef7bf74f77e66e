"""Linears of misaligned width as candidates (`padded_linear`), derived from the forward
`aten::linear` ops whose weight has a dimension that is not a multiple of 8 elements.

A GEMM is a breaker (rule 2 in clusters.py): no memory-bound chain holds one, so no signature
matches it. An odd width (an LM head over a vocabulary of 50,265) is a known way to lose
tensor-core GEMM speed, which torch.compile wins back by padding; the kernels layer's
padded_linear is the same trick as a module swap. Whether it pays on a shape is bench's to
measure: these clusters carry the trace's GEMM time, and no cost-model estimate.

Found: each forward `aten::linear` for which the kernels layer's params_from_linear gives params
(misaligned, a float dtype). Occurrences of one (params, module class path) merge into one cluster,
as the memory-bound clusters do; its measured time is the linear's forward kernels plus the backward
kernels of the autograd nodes it recorded (ops whose forward row is the linear or one of its children).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Callable, Sequence

from fusion_advisor.core.result import Cluster, Estimate


def misaligned_linear_clusters(col, units: Sequence, n_steps: int, params_from_linear: Callable) -> list[Cluster]:
    """col: the trace's OpColumns; units: its launching ops (chain_units.Unit), whose durations give
    the GEMMs' time; params_from_linear: padded_linear's (op record) -> params, or None."""
    groups: dict[tuple, tuple[dict, list[int]]] = {}   # (params, module class path) -> (params, rows)
    for row, name in enumerate(col.name):
        if name != "aten::linear" or col.backward[row]:
            continue
        record = col.record(row)
        params = params_from_linear(record)
        if params is not None:
            groups.setdefault((json.dumps(params, sort_keys=True), record.module), (params, []))[1].append(row)
    if not groups:
        return []
    linear_rows = {row for _, rows in groups.values() for row in rows}
    fwd_us: dict[int, float] = {}
    bwd_us: dict[int, float] = {}
    for u in units:
        if u.backward:
            f = col.fwd_row[u.op_row] if u.op_row >= 0 else -1
            owner = _top(col, int(f)) if f is not None and f >= 0 else None
            if owner in linear_rows:
                bwd_us[owner] = bwd_us.get(owner, 0.0) + u.dur
        elif u.top_row in linear_rows:
            fwd_us[u.top_row] = fwd_us.get(u.top_row, 0.0) + u.dur
    out = []
    for key, (params, rows) in groups.items():
        module_path = key[1]
        total = sum(fwd_us.get(r, 0.0) + bwd_us.get(r, 0.0) for r in rows)
        per_step = total / max(n_steps, 1)
        backward = any(r in bwd_us for r in rows)
        out.append(Cluster(
            id="gemm-" + hashlib.sha1(key[0].encode() + str(module_path).encode()).hexdigest()[:10],
            direction="forward", pattern="padded_linear", pattern_params=params,
            module_class=module_path, source=col.source[rows[0]], ops=[dataclasses.asdict(col.record(rows[0]))],
            kernels=[], dtypes=[params["dtype"]],
            occurrences_per_step=round(len(rows) / max(n_steps, 1), 3), launches_per_step=0.0,
            measured_us_per_step=round(per_step, 3), measured_us_per_occurrence=round(total / len(rows), 3),
            estimate=Estimate(), split_reason=None, memory_bound=False,
            notes=[f"a GEMM of misaligned width ({params['tokens']} x {params['in_features']} by "
                   f"{params['out_features']} x {params['in_features']}): its forward"
                   + (" and backward" if backward else "") + " kernels took the measured time; padded to a "
                   "multiple of 64 it may run faster (bench measures it; not priced by the cost model)"]))
    return out


def _top(col, row: int) -> int:
    """The outermost op of `row` (the aten::linear a child addmm belongs to)."""
    t = col.top_row[row]
    return int(t) if t is not None and t >= 0 else row
