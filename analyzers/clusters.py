"""Clusters: chains of memory-bound kernels, producer to consumer, that one fused kernel could
replace, merged across steps and repeated layers, matched to a registered pattern and priced.

The trace has no tensor identities, so a chain is read off launch order, module scopes and
shapes. What a chain is, rule by rule:

1. Units. The kernels one op launches back to back (a memset and its reduction, LayerNorm
   backward's two kernels) form one unit. On a CPU-only trace a unit is a leaf op that would
   launch a kernel (views and allocations do not). Units are taken per step, per CPU thread,
   per stream and per direction (forward / backward), in launch order.
2. Breakers end a chain and never belong to one: GEMM, attention, convolution, communication
   and already-compiled (Triton) kernels; every kernel of an op that launches one of those
   (a matmul's input copies, cuBLAS workspace memsets); host copies (a DtoH/HtoD memcpy
   synchronises); a kernel the roofline puts above the ridge point (not memory-bound); a kernel
   of unknown class without a cost rule; a kernel without a launching op.
   One exception: a GEMM that reads none of the chain's outputs (SwiGLU's up_proj runs between
   silu and mul) is stepped over when the next kernel reads the chain's output; it stays out of
   the cluster.
3. Links. Within one module call, the next unit joins when one of its inputs is related to a
   tensor the chain already holds: same shape, same element count (a view), broadcastable
   (keepdim reductions, [1,1,S,D] rotary tables), or the same leading dims (a slice of the last
   dim: rotate_half). Inside one module that is loose on purpose: RoPE and RMSNorm are small
   DAGs, not single chains, and one fused kernel replaces the whole DAG.
4. Module boundaries. A module call's chain stands on its own: RMSNorm's 8 kernels are one
   cluster, the residual add before it is not folded in. Two pieces on either side of a
   boundary join when the next piece strictly consumes the previous one's output (same shape
   or element count) and
     (a) a registered pattern matches the joined ops and neither piece alone (residual add +
         RMSNorm once `add_rms_norm` is registered), or
     (b) both pieces are single kernels (or a run of single kernels): a module that already is
         one kernel (nn.LayerNorm) is only worth fusing together with its neighbour (the
         residual add before it: add + LayerNorm).
5. Autograd's gradient accumulation (an add/add_ the engine runs between backward nodes when a
   tensor had several consumers) belongs to a chain only inside one module call (x feeds both
   pow and mul inside RMSNorm); between modules it is the graph summing gradients, which no
   module's fused backward replaces: it stays out.
6. A cluster has at least 2 kernels (2 units on a CPU-only trace).

Occurrences of the same chain (leaf op names, input shapes and dtypes, leaf module classes,
direction) merge into one Cluster, whatever the step or the layer: the 9 LlamaRMSNorm calls of a
4-layer Llama (2 per layer and the final norm) are one forward cluster with 9 occurrences per
step. Scalar arguments are not part of the signature (they do not change bytes); pattern params
are read from the first occurrence.
"""
from __future__ import annotations

import dataclasses
import hashlib
import math
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import pandas as pd

from fusion_advisor import kernels as pattern_registry
from fusion_advisor.analyzers.kernel_classes import classify, kernel_class
from fusion_advisor.analyzers.summary import short_kernel_name
from fusion_advisor.analyzers.trace import Trace
from fusion_advisor.cost_model.device import DeviceProfile
from fusion_advisor.cost_model.ops import TRACE_DTYPES, OpCost, TensorSpec, op_cost
from fusion_advisor.cost_model.roofline import cluster_estimate, is_memory_bound
from fusion_advisor.kernels.registry import OpRecord
from fusion_advisor.result import Cluster

MIN_KERNELS = 2
BREAK_CLASSES = {"gemm": "a GEMM", "attention": "an attention kernel", "conv": "a convolution",
                 "communication": "a collective", "triton": "an already-compiled (Triton) kernel"}
MEMORY_CLASSES = {"elementwise", "reduction", "normalization", "softmax", "memcpy", "memset"}
_EVALUATE = "autograd::engine::evaluate_function"
_ACCUMULATE_OPS = {"aten::add_", "aten::add"}
_FOREACH = "aten::_foreach_"
_NO_SCOPE = -1
_ACCUMULATION_SCOPE = -2        # a gradient accumulation between module calls: joins nothing
# Leaf ops that launch no kernel (CPU-only traces: which leaf ops would be a kernel on a GPU).
_NO_KERNEL_OPS = {"aten::empty", "aten::empty_like", "aten::empty_strided", "aten::resize_", "aten::set_",
                  "aten::lift_fresh", "aten::detach", "detach", "aten::result_type", "aten::is_nonzero",
                  "aten::_local_scalar_dense", "aten::item", "aten::to", "aten::zeros", "aten::ones"}


# -- units ---------------------------------------------------------------------------------------
@dataclass
class _Unit:
    op_row: int
    top_row: int
    kernel_rows: list[int]
    kernel_names: list[str]
    dur: float
    scope: int                    # module_row of the module call (or _NO_SCOPE / _ACCUMULATION_SCOPE)
    scope_cls: str | None         # that module's class ("LlamaRMSNorm")
    backward: bool
    record: OpRecord
    reads: list[tuple[int, ...]]
    writes: list[tuple[int, ...]]
    breaker: str | None = None    # why it cannot be in a chain
    gemm_reads: list[tuple[int, ...]] = field(default_factory=list)  # activations a GEMM reads
    accumulation: bool = False
    context: tuple = ()           # (backward, record_function range): a change ends a chain

    passes: int = 1               # passes over the data (see `_passes`)

    @property
    def size(self) -> int:
        return self.passes


def _as_tuple(x):
    return tuple(_as_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x


class OpColumns:
    """The ops frame's columns as arrays (row lookups in a DataFrame are slow), and the
    OpRecord of any row, with its module class path, built once."""

    _COLS = ("name", "input_dims", "input_types", "concrete", "module_row", "top_row", "parent_row", "backward",
             "tid", "step", "source", "annotation", "fwd_row")

    def __init__(self, trace: Trace):
        ops = trace.ops
        for col in self._COLS:
            setattr(self, col, ops[col].to_numpy(dtype=object) if col in ops else np.full(len(ops), None, dtype=object))
        self.class_path = trace.modules["class_path"].to_numpy(dtype=object) if len(trace.modules) else []
        self._records: dict[int, OpRecord] = {}

    def record(self, row: int) -> OpRecord:
        if row not in self._records:
            mrow = int(self.module_row[row])
            self._records[row] = OpRecord(
                name=self.name[row], dims=_as_tuple(self.input_dims[row] or ()),
                types=tuple(self.input_types[row] or ()), concrete=tuple(self.concrete[row] or ()),
                module=self.class_path[mrow] if mrow >= 0 else None)
        return self._records[row]


def _flat_shapes(dims, types) -> list[tuple[int, ...]]:
    """Tensor shapes among recorded arguments (TensorLists flattened)."""
    out = []
    for d, t in zip(dims or (), types or ()):
        if t == "TensorList" and d:
            out.extend(tuple(s) for s in d if isinstance(s, (list, tuple)))
        elif t in TRACE_DTYPES and isinstance(d, (list, tuple)) and not any(isinstance(x, (list, tuple)) for x in d):
            out.append(tuple(d))
    return out


def _tensors(record: OpRecord, cost: OpCost | None) -> tuple[list, list]:
    """(shapes the op reads, shapes it writes). Reads: its recorded tensor arguments and what the
    cost rule says it reads (nll_loss reads one gathered element per row, but its recorded input
    is the whole log-probability matrix: both link). Writes: the cost rule's outputs (cat's is
    flat; its element count is what links it); none when the op has no rule."""
    recorded = _flat_shapes(record.dims, record.types)
    if cost is None:
        return recorded, []
    reads = list(dict.fromkeys(recorded + [s.shape for s in cost.reads]))
    return reads, [s.shape for s in cost.writes]


def _numel(shape: tuple[int, ...]) -> int:
    return math.prod(shape) if shape else 1


def _related(a: tuple[int, ...], b: tuple[int, ...]) -> bool:
    """Loose link inside one module call (rule 3)."""
    na, nb = _numel(a), _numel(b)
    if na <= 1 or nb <= 1:
        return False
    if a == b or na == nb:
        return True
    if len(a) == len(b) and a[:-1] == b[:-1]:
        return True
    # Broadcastable, aligned from the right as torch broadcasts ([S,S] mask on [B,H,S,S] scores).
    return all(x == y or x == 1 or y == 1 for x, y in zip(reversed(a), reversed(b)))


def _feeds(written: tuple[int, ...], read: tuple[int, ...]) -> bool:
    """Strict producer -> consumer: the read tensor is the written one, or a view of it."""
    n = _numel(written)
    return n > 1 and (written == read or n == _numel(read))


class _Classifier:
    """Class and memory-boundness of kernels and ops, cached by op row."""

    def __init__(self, trace: Trace, profile: DeviceProfile):
        self.trace, self.profile = trace, profile
        self.col = OpColumns(trace)
        self.kernel_classes = classify(trace) if trace.has_gpu else pd.Series(dtype=object)
        self.costs: dict[int, OpCost | None] = {}

    def record(self, row: int) -> OpRecord:
        return self.col.record(row)

    def cost(self, row: int) -> OpCost | None:
        """The op's cost; an op the profiler records no dtype for (a TensorList: cat, stack) is
        priced as fp32 here, which is enough to tell memory-bound from not and to link shapes
        (cluster estimates price it again with the chain's dtype)."""
        if row not in self.costs:
            record = self.record(row)
            self.costs[row] = op_cost(record) or op_cost(record, "float32")
        return self.costs[row]

    def memory_bound(self, cls: str, row: int) -> bool | None:
        """True / False, or None when neither the class nor the roofline can tell."""
        if cls in BREAK_CLASSES:
            return False
        if cls in ("memcpy", "memset"):      # the op's cost is not the copy's or the memset's
            return True
        cost = self.cost(row) if row >= 0 else None
        if cost is not None and cost.bytes > 0:
            return is_memory_bound(cost, self.profile)
        if cls in MEMORY_CLASSES:
            return True
        return None

    def kernel_memory_bound(self) -> pd.Series:
        """A boolean per row of `trace.kernels`: the kernel is memory-bound."""
        k = self.trace.kernels
        out = [bool(self.memory_bound(cls, int(row)))
               for cls, row in zip(self.kernel_classes.tolist(), k["op_row"].tolist())] if len(k) else []
        return pd.Series(out, index=k.index, dtype=bool)


def _owner_rows(ops: pd.DataFrame) -> np.ndarray:
    """The op that owns each op: its top-level op, or in backward the autograd node op under
    `evaluate_function` (the node's kernels, and its sum_to reductions beside it)."""
    parent = ops["parent_row"].to_numpy()
    top = ops["top_row"].to_numpy()
    depth = ops["depth"].to_numpy()
    names = ops["name"].to_numpy(dtype=object)
    is_eval = np.array([isinstance(n, str) and n.startswith(_EVALUATE) for n in names], dtype=bool)
    owner = top.copy()
    rows = np.flatnonzero(is_eval[top] & (depth >= 1))
    for r in rows:          # walk up to depth 1
        x = r
        while depth[x] > 1:
            x = parent[x]
        owner[r] = x
    return owner


def _gpu_units(trace: Trace, cl: _Classifier) -> list[list[_Unit]]:
    """Units per (step, thread, stream, direction), in launch order."""
    k = trace.kernels
    ops = trace.ops
    steps = trace.step_ids
    sel = k[k["step"].isin(steps)] if steps else k
    if sel.empty:
        return []
    owner = _owner_rows(ops)
    classes = cl.kernel_classes
    # Owners that launch a breaker kernel: every kernel they launch belongs to it.
    breaker_owner: dict[int, str] = {}
    for row, cls in zip(sel["op_row"].tolist(), classes.reindex(sel.index).tolist()):
        if row >= 0 and cls in BREAK_CLASSES:
            breaker_owner.setdefault(int(owner[row]), cls)
    la_ts = trace.launches["ts"].to_numpy() if len(trace.launches) else np.array([])
    lrow = sel["launch_row"].to_numpy()
    order_ts = np.where(lrow >= 0, la_ts[np.clip(lrow, 0, None)] if len(la_ts) else np.nan, sel["ts"].to_numpy())
    op_rows = sel["op_row"].to_numpy()
    tid = np.where(op_rows >= 0, ops["tid"].to_numpy()[np.clip(op_rows, 0, None)], -1)
    bwd = np.where(op_rows >= 0, ops["backward"].to_numpy(dtype=bool)[np.clip(op_rows, 0, None)], False)
    frame = pd.DataFrame({"krow": sel.index.to_numpy(), "op_row": op_rows, "step": sel["step"].to_numpy(),
                          "tid": tid, "stream": sel["stream"].to_numpy(), "bwd": bwd, "order": order_ts,
                          "name": sel["name"].to_numpy(), "kind": sel["kind"].to_numpy(),
                          "dur": sel["dur"].to_numpy(), "cls": classes.reindex(sel.index).to_numpy()})
    frame = frame.sort_values(["step", "tid", "stream", "bwd", "order"], kind="stable")
    groups = []
    for _, g in frame.groupby(["step", "tid", "stream", "bwd"], sort=False):
        units: list[_Unit] = []
        for rec in g.itertuples(index=False):
            if units and rec.op_row >= 0 and units[-1].op_row == rec.op_row:
                u = units[-1]
                u.kernel_rows.append(int(rec.krow))
                u.kernel_names.append(short_kernel_name(rec.name))
                u.dur += float(rec.dur)
                if u.breaker is None and _kernel_breaker(rec, cl):
                    u.breaker = f"{_kernel_breaker(rec, cl)} ({u.record.name})"
                continue
            units.append(_new_unit(trace, cl, int(rec.op_row), owner, breaker_owner, rec))
        for u in units:
            u.passes = _passes(u, cl)
        groups.append(units)
    return groups


def _passes(unit: _Unit, cl: _Classifier) -> int:
    """How many kernels of this op count towards a chain's length: the passes over the data its
    cost rule says it makes (LayerNorm backward: 2), else its distinct kernels, memsets left out
    (a memset before a reduction, or one foreach op split into launches of the same kernel, is
    one pass)."""
    cost = cl.cost(unit.op_row) if unit.op_row >= 0 else None
    if cost is not None and cost.kernels > 0:
        return cost.kernels
    names = {n for n in unit.kernel_names if not n.startswith("Memset")}
    return max(len(names), 1)


def _kernel_breaker(rec, cl: _Classifier) -> str | None:
    if rec.op_row < 0:
        return "a kernel without a recorded launching op"
    if rec.kind == "memcpy" and "DtoD" not in rec.name:
        return f"a host copy ({rec.name.split(' (')[0]}), which synchronises"
    if rec.cls in BREAK_CLASSES:
        return BREAK_CLASSES[rec.cls]
    bound = cl.memory_bound(rec.cls, rec.op_row)
    if bound is None:
        return "a kernel of unknown class without a cost rule"
    if not bound:
        return "a compute-bound kernel"
    return None


def _new_unit(trace: Trace, cl: _Classifier, row: int, owner: np.ndarray, breaker_owner: dict, rec) -> _Unit:
    col = cl.col
    if row >= 0:
        record = cl.record(row)
        reads, writes = _tensors(record, cl.cost(row))
        top = int(col.top_row[row])
        scope = int(col.module_row[row])
        backward = bool(col.backward[row])
        parent = int(col.parent_row[row])
        accumulation = (backward and record.name in _ACCUMULATE_OPS and parent >= 0
                        and str(col.name[parent]).startswith(_EVALUATE))
    else:
        record, reads, writes, top, scope, backward, accumulation = OpRecord("?"), [], [], -1, _NO_SCOPE, False, False
    annotation = col.annotation[top] if top >= 0 and isinstance(col.annotation[top], str) else None
    unit = _Unit(op_row=row, top_row=top, kernel_rows=[int(rec.krow)], kernel_names=[short_kernel_name(rec.name)],
                 dur=float(rec.dur), scope=scope, scope_cls=None, backward=backward, record=record,
                 reads=reads, writes=writes, accumulation=accumulation, context=(backward, annotation))
    own = int(owner[row]) if row >= 0 else -1
    if own in breaker_owner and rec.cls not in BREAK_CLASSES:
        unit.breaker = f"{BREAK_CLASSES[breaker_owner[own]]} ({col.name[own]}: its {rec.cls} kernel)"
    else:
        reason = _kernel_breaker(rec, cl)
        unit.breaker = f"{reason} ({record.name})" if reason and row >= 0 else reason
    if row >= 0 and (rec.cls == "gemm" or breaker_owner.get(own) == "gemm"):
        unit.gemm_reads = _gemm_activations(trace, cl, own, top)
    return unit


def _gemm_activations(trace: Trace, cl: _Classifier, row: int, top: int) -> list[tuple[int, ...]]:
    """What a GEMM reads that could be a chain's output: under nn.Linear only its input x (the
    weight is a parameter); otherwise every tensor argument."""
    if top >= 0 and cl.col.name[top] == "aten::linear":
        rec = cl.record(top)
        shapes = _flat_shapes(rec.dims[:1], rec.types[:1])
        return shapes
    rec = cl.record(row)
    return _flat_shapes(rec.dims, rec.types)


def _cpu_units(trace: Trace, cl: _Classifier) -> list[list[_Unit]]:
    """CPU-only trace: the ops that would launch a kernel on a GPU, per (step, thread, direction).

    An op is one when nothing below it is one, and it is an aten op that its cost rule prices as
    launching a kernel (views and allocations launch none), or an unpriced aten op with nothing
    below it. Ops on 0-dim tensors only are left out: they are bookkeeping that stays on the CPU
    in GPU runs too (AdamW's step counters). A foreach op is one unit: on a GPU it runs
    multi-tensor elementwise kernels, on a CPU the per-tensor loop below it. An op inside a GEMM,
    attention or convolution op (CPU attention runs zero_/mul/... ops inside) takes its class."""
    ops = trace.ops
    steps = trace.step_ids
    if ops.empty:
        return []
    in_steps = ops["step"].isin(steps).to_numpy() if steps else np.ones(len(ops), dtype=bool)
    parents = ops["parent_row"].to_numpy()
    has_child = np.zeros(len(ops), dtype=bool)
    has_child[parents[parents >= 0]] = True
    below = np.zeros(len(ops), dtype=bool)     # a kernel op somewhere below
    kernel_op = np.zeros(len(ops), dtype=bool)
    names = ops["name"].to_numpy(dtype=object)
    for row in np.argsort(-ops["depth"].to_numpy(), kind="stable"):
        if not below[row] and in_steps[row]:
            kernel_op[row] = _launches_kernel(cl, int(row), str(names[row]), bool(has_child[row]))
        if (below[row] or kernel_op[row]) and parents[row] >= 0:
            below[parents[row]] = True
    # Top-down: the breaker class and the foreach op above each op.
    ancestor_class = np.full(len(ops), None, dtype=object)
    in_foreach = np.zeros(len(ops), dtype=bool)
    for row in np.argsort(ops["depth"].to_numpy(), kind="stable"):
        p = parents[row]
        if p >= 0:
            ancestor_class[row] = ancestor_class[p] or _cpu_class(str(names[p]), breakers_only=True)
            in_foreach[row] = in_foreach[p] or str(names[p]).startswith(_FOREACH)
    is_foreach = np.array([str(n).startswith(_FOREACH) for n in names], dtype=bool)
    kernel_op = (kernel_op & ~in_foreach) | (is_foreach & ~in_foreach & in_steps)
    owner = _owner_rows(ops)
    rows = np.flatnonzero(kernel_op).tolist()
    classes = [ancestor_class[r] or _cpu_class(str(names[r])) for r in rows]
    breaker_owner: dict[int, str] = {}
    for row, cls in zip(rows, classes):
        if cls in BREAK_CLASSES:
            breaker_owner.setdefault(int(owner[row]), cls)
    groups: dict[tuple, list[_Unit]] = {}
    for row, cls in zip(rows, classes):
        col = cl.col
        rec = _CpuRec(krow=-1, op_row=row, name=col.name[row], kind="kernel", dur=0.0, cls=cls)
        unit = _new_unit(trace, cl, row, owner, breaker_owner, rec)
        unit.kernel_rows, unit.kernel_names = [], [col.name[row]]
        unit.passes = _passes(unit, cl)
        key = (int(col.step[row]), int(col.tid[row]), bool(col.backward[row]))
        groups.setdefault(key, []).append(unit)
    return list(groups.values())


def _cpu_class(op_name: str, breakers_only: bool = False) -> str | None:
    """A CPU-only op's class: what kernel_classes says of a kernel launched by it (op names
    stand in for kernel names: CPU attention ops carry 'attention' in theirs)."""
    if op_name.startswith(_FOREACH):
        cls = "elementwise"       # multi_tensor_apply kernels on a GPU
    else:
        cls = kernel_class(op_name.split("::")[-1], op_name)
    return cls if not breakers_only or cls in BREAK_CLASSES else None


def _launches_kernel(cl: _Classifier, row: int, name: str, has_child: bool) -> bool:
    if not name.startswith("aten::") or name in _NO_KERNEL_OPS:
        return False
    cost = cl.cost(row)
    if cost is None and has_child:
        return False
    if cost is not None and cost.kernels == 0:
        return False
    record = cl.record(row)
    shapes = _flat_shapes(record.dims, record.types)
    return any(_numel(s) > 1 for s in shapes)


@dataclass
class _CpuRec:
    krow: int
    op_row: int
    name: str
    kind: str
    dur: float
    cls: str


# -- chains --------------------------------------------------------------------------------------
@dataclass
class _Piece:
    """Consecutive linked units of one module call."""

    units: list[_Unit]

    @property
    def size(self) -> int:
        return sum(u.size for u in self.units)

    @property
    def scope(self) -> int:
        return self.units[0].scope

    def writes(self) -> list[tuple[int, ...]]:
        return [s for u in self.units for s in u.writes]

    def tensors(self) -> list[tuple[int, ...]]:
        return [s for u in self.units for s in u.reads + u.writes]


@dataclass
class _Run:
    """Linked pieces between two chain ends; `end_reason` says why it ended."""

    pieces: list[_Piece]
    end_reason: str = "the end of the step"


def _resolve_accumulation(units: list[_Unit]) -> None:
    """Rule 5: an accumulation joins the module call it sits inside, else nothing."""
    for i, u in enumerate(units):
        if not u.accumulation:
            continue
        prev = next((units[j].scope for j in range(i - 1, -1, -1) if not units[j].accumulation), None)
        nxt = next((units[j].scope for j in range(i + 1, len(units)) if not units[j].accumulation), None)
        u.scope = prev if prev is not None and prev == nxt and prev >= 0 else _ACCUMULATION_SCOPE


def _describe(u: _Unit) -> str:
    return str(u.breaker)


def _runs(units: list[_Unit]) -> list[_Run]:
    """Rules 2-3 and the strict link of rule 4: cut a unit stream into runs of pieces."""
    runs: list[_Run] = []
    cur: _Run | None = None
    skipped: list[_Unit] = []    # independent GEMMs stepped over (rule 2's exception)

    def close(reason: str) -> None:
        nonlocal cur
        if cur is not None:
            cur.end_reason = reason
            runs.append(cur)
        cur = None

    for u in units:
        if u.breaker is not None:
            if cur is None:
                continue
            if u.gemm_reads and not any(_feeds(w, r) for w in _chain_writes(cur) for r in u.gemm_reads):
                skipped.append(u)
                continue
            close(f"next: {_describe(skipped[0] if skipped else u)}")
            skipped = []
            continue
        if cur is None:
            cur = _Run([_Piece([u])])
            continue
        last = cur.pieces[-1]
        if u.context != last.units[-1].context:
            # Forward, backward and the optimizer (its record_function range) never share a chain.
            close(f"the next kernel runs in {u.context[1] or ('backward' if u.context[0] else 'forward')}")
            skipped = []
            cur = _Run([_Piece([u])])
            continue
        if skipped:
            # Across a skipped GEMM only a strict consumer of the chain's output continues it.
            if u.scope == last.scope and any(_feeds(w, r) for w in _chain_writes(cur) for r in u.reads):
                skipped = []
                last.units.append(u)
                continue
            close(f"next: {_describe(skipped[0])}")
            skipped = []
            cur = _Run([_Piece([u])])
            continue
        if u.scope == last.scope and u.scope != _ACCUMULATION_SCOPE:
            held = last.tensors()
            # Kernels of one top-level op (cross_entropy: log_softmax, nll_loss) always link.
            # Ops whose shapes the profiler did not record (a foreach op over many tensors) link
            # on order and module alone.
            shapeless = not u.reads and not last.units[-1].reads
            if u.top_row == last.units[-1].top_row or shapeless or any(_related(r, t) for r in u.reads for t in held):
                last.units.append(u)
                continue
            close("the next kernel reads none of this chain's tensors")
            cur = _Run([_Piece([u])])
            continue
        if any(_feeds(w, r) for w in last.writes() for r in u.reads):
            cur.pieces.append(_Piece([u]))
            continue
        close("the next kernel reads none of this chain's tensors")
        cur = _Run([_Piece([u])])
    close("the end of the step" if not skipped else f"next: {_describe(skipped[0])}")
    return runs


def _chain_writes(run: _Run) -> list[tuple[int, ...]]:
    return [s for p in run.pieces for s in p.writes()]


def _unit_label(col: OpColumns, u: _Unit) -> str:
    """Module class path of a unit; outside modules, the record_function range it ran in."""
    if u.scope == _NO_SCOPE and u.top_row >= 0 and isinstance(col.annotation[u.top_row], str):
        return col.annotation[u.top_row]
    return _scope_label(col, u.scope)


def _scope_label(col: OpColumns, scope: int) -> str:
    if scope >= 0:
        return str(col.class_path[scope])
    return "autograd gradient accumulation" if scope == _ACCUMULATION_SCOPE else "(no module)"


# -- pattern matching ----------------------------------------------------------------------------
class _Matcher:
    """Forward ops of a chain (the top-level ops the user's code called) and their pattern."""

    def __init__(self, trace: Trace, cl: _Classifier, launching_tops: np.ndarray):
        self.trace, self.cl, self.launching_tops = trace, cl, launching_tops

    def forward_rows(self, units: Sequence[_Unit]) -> list[int]:
        if not units[0].backward:
            return list(dict.fromkeys(u.top_row for u in units if u.top_row >= 0))
        # Backward: the forward ops its nodes differentiate, widened to every kernel-launching
        # top-level op between the first and the last of them on the forward thread (an add of a
        # scalar has no backward kernel but is part of the forward chain).
        fwd, tops = self.cl.col.fwd_row, self.cl.col.top_row
        rows = sorted({int(tops[fwd[u.op_row]]) for u in units if u.op_row >= 0 and fwd[u.op_row] >= 0})
        if not rows:
            return []
        col = self.cl.col
        lo, hi = np.searchsorted(self.launching_tops, [rows[0], rows[-1]], side="left")
        return [int(r) for r in self.launching_tops[lo:hi + 1]
                if r <= rows[-1] and col.tid[r] == col.tid[rows[0]] and not col.backward[r]]

    def match(self, units: Sequence[_Unit]) -> tuple[object, dict] | None:
        rows = sorted(self.forward_rows(units))
        if not rows:
            return None
        return pattern_registry.match([self.cl.record(r) for r in rows])

    def spans(self, left: Sequence[_Unit], right: Sequence[_Unit]) -> bool:
        """Rule 4a: a pattern matches left+right, and not left or right alone, and its signature
        covers ops of both sides."""
        joined = self.match(list(left) + list(right))
        if joined is None:
            return False
        pattern = joined[0]
        alone = {m[0].name for m in (self.match(left), self.match(right)) if m is not None}
        if pattern.name in alone:
            return False
        left_rows = set(self.forward_rows(left))
        rows = sorted(self.forward_rows(list(left) + list(right)))
        names = [self.cl.record(r).short for r in rows]
        m = re.search(pattern.forward_signature, " ".join(names))
        if m is None:
            return False
        # Which ops the regex covered: count names before its start and end.
        first = len(" ".join(names)[:m.start()].split())
        last = len(" ".join(names)[:m.end()].split()) - 1
        covered = rows[first:last + 1]
        return any(r in left_rows for r in covered) and any(r not in left_rows for r in covered)


def _join(run: _Run, matcher: _Matcher) -> list[tuple[list[_Unit], str]]:
    """Rule 4: group a run's pieces into chains; each with the reason it ended."""
    chains: list[tuple[list[_Unit], str]] = []
    cur = list(run.pieces[0].units)
    cur_lone = run.pieces[0].size == 1
    for piece in run.pieces[1:]:
        joinable = piece.scope != _ACCUMULATION_SCOPE and cur[-1].scope != _ACCUMULATION_SCOPE
        lone = piece.size == 1
        if joinable and ((cur_lone and lone) or matcher.spans(cur, piece.units)):
            cur += piece.units
            cur_lone = cur_lone and lone
            continue
        chains.append((cur, f"module boundary: the next kernel runs in {_scope_label(matcher.cl.col, piece.scope)}"))
        cur, cur_lone = list(piece.units), lone
    chains.append((cur, run.end_reason))
    return chains


# -- merging and pricing -------------------------------------------------------------------------
def _signature(units: Sequence[_Unit]) -> tuple:
    return (units[0].backward,) + tuple(
        (u.record.name, repr(_flat_shapes(u.record.dims, u.record.types)),
         tuple(t for t in u.record.types if t in TRACE_DTYPES or t == "TensorList"), u.scope_cls, u.size)
        for u in units)


def _cluster_id(sig: tuple) -> str:
    digest = hashlib.sha1(repr(sig).encode()).hexdigest()[:10]
    return ("bwd-" if sig[0] else "fwd-") + digest


@dataclass
class ClusterFindings:
    clusters: list[Cluster]                 # ranked by estimated saving per step
    kernel_cluster: pd.Series               # cluster id per row of trace.kernels (None outside)
    kernel_memory_bound: pd.Series          # bool per row of trace.kernels
    kernel_classes: pd.Series               # class per row of trace.kernels
    op_columns: OpColumns                   # the trace's ops as arrays, with their OpRecords


def find_clusters(trace: Trace, profile: DeviceProfile) -> ClusterFindings:
    """Every memory-bound cluster of the trace's steps, merged, matched and priced on `profile`."""
    cl = _Classifier(trace, profile)
    groups = _gpu_units(trace, cl) if trace.has_gpu else _cpu_units(trace, cl)
    mods = trace.modules
    cls_of = mods["cls"].to_numpy(dtype=object) if len(mods) else np.array([], dtype=object)
    units_all = [u for g in groups for u in g]
    for g in groups:
        _resolve_accumulation(g)
    for u in units_all:
        u.scope_cls = cls_of[u.scope] if u.scope >= 0 else None
    launching_tops = np.array(sorted({u.top_row for u in units_all if u.top_row >= 0}), dtype=np.int64)
    matcher = _Matcher(trace, cl, launching_tops)

    found: dict[tuple, list[tuple[list[_Unit], str]]] = {}
    for g in groups:
        for run in _runs(g):
            for chain, reason in _join(run, matcher):
                if sum(u.size for u in chain) >= MIN_KERNELS:
                    found.setdefault(_signature(chain), []).append((chain, reason))

    n_steps = max(len(trace.step_ids), 1)
    cluster_of = np.full(len(trace.kernels), None, dtype=object)   # Trace rows are labelled 0..n-1
    clusters = []
    for sig, occurrences in found.items():
        cid = _cluster_id(sig)
        for chain, _ in occurrences:
            for u in chain:
                cluster_of[u.kernel_rows] = cid
        clusters.append(_build_cluster(trace, cl, matcher, cid, occurrences, n_steps, profile))
    clusters.sort(key=_rank_key, reverse=True)
    kernel_cluster = pd.Series(cluster_of, index=trace.kernels.index, dtype=object)
    return ClusterFindings(clusters, kernel_cluster, cl.kernel_memory_bound(), cl.kernel_classes, cl.col)


def _rank_key(c: Cluster) -> tuple:
    saving = c.estimate.saving_us
    return (saving is not None, (saving or 0.0) * c.occurrences_per_step, c.measured_us_per_step)


def _dtype_names(records: Sequence[OpRecord]) -> list[str]:
    """Dtypes of the tensors the chain reads (0-dim arguments, wrapped Python scalars, left out)."""
    return sorted({TRACE_DTYPES[t][0] for r in records for d, t in zip(r.dims, r.types)
                   if t in TRACE_DTYPES and isinstance(d, (list, tuple)) and len(d) > 0})


def _build_cluster(trace: Trace, cl: _Classifier, matcher: _Matcher, cid: str,
                   occurrences: list[tuple[list[_Unit], str]], n_steps: int, profile: DeviceProfile) -> Cluster:
    first, reason = occurrences[0]
    records = [u.record for u in first]
    direction = "backward" if first[0].backward else "forward"
    paths = Counter()
    for chain, _ in occurrences:
        weights = Counter()
        for u in chain:
            weights[_unit_label(cl.col, u)] += u.size
        # The module holding most of the chain's kernels; on a tie the later one (where it ends).
        order = {label: i for i, label in enumerate(weights)}
        paths[max(weights, key=lambda s: (weights[s], order[s]))] += 1
    module_class = paths.most_common(1)[0][0]
    source = next((cl.col.source[u.op_row] for u in first
                   if u.op_row >= 0 and isinstance(cl.col.source[u.op_row], str)), None)
    matched = matcher.match(first)
    pattern_name, params, fused = None, {}, None
    if matched is not None:
        pattern, params = matched
        pattern_name = pattern.name
        fused = pattern.fused_bytes(params).get(direction)
    estimate = cluster_estimate(records, fused, profile)
    measured = sum(u.dur for chain, _ in occurrences for u in chain)
    launches = sum(len(u.kernel_rows) for chain, _ in occurrences for u in chain)
    return Cluster(
        id=cid, direction=direction, pattern=pattern_name, pattern_params=dict(params),
        module_class=module_class, source=source,
        ops=[dataclasses.asdict(r) for r in records],
        kernels=[n for u in first for n in u.kernel_names],
        dtypes=_dtype_names(records),
        occurrences_per_step=round(len(occurrences) / n_steps, 3),
        launches_per_step=round(launches / n_steps, 3),
        measured_us_per_step=round(measured / n_steps, 3),
        measured_us_per_occurrence=round(measured / len(occurrences), 3),
        estimate=estimate, split_reason=reason, memory_bound=True,
    )
