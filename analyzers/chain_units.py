"""Units: what the clusters analyzer builds chains of, one per op that launched kernels.

On a GPU trace a unit is the kernels one op launched back to back (a memset and its reduction,
LayerNorm backward's two kernels, a foreach op's launches); on a CPU-only trace it is an op that
would launch a kernel on a GPU. Each unit carries what the chain rules need: its leaf op as an
OpRecord, the shapes it reads and writes (from the cost model's rules, else the recorded
arguments), its module call, its direction and record_function range, how many passes over the
data it makes, and, when it cannot be part of a chain, why (`breaker`).

Units come in groups: per step, CPU thread, stream and direction, in launch order.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from fusion_advisor.analyzers.kernel_classes import classify, kernel_class
from fusion_advisor.analyzers.summary import short_kernel_name
from fusion_advisor.analyzers.trace import Trace
from fusion_advisor.cost_model.device import DeviceProfile
from fusion_advisor.core.dtypes import TRACE_DTYPES
from fusion_advisor.cost_model.ops import OpCost, op_cost
from fusion_advisor.cost_model.roofline import is_memory_bound
from fusion_advisor.core.records import OpRecord

BREAK_CLASSES = {"gemm": "a GEMM", "attention": "an attention kernel", "conv": "a convolution",
                 "communication": "a collective", "triton": "an already-compiled (Triton) kernel"}
MEMORY_CLASSES = {"elementwise", "reduction", "normalization", "softmax", "memcpy", "memset"}
_EVALUATE = "autograd::engine::evaluate_function"
_ACCUMULATE_OPS = {"aten::add_", "aten::add"}
_FOREACH = "aten::_foreach_"
NO_SCOPE = -1
ACCUMULATION_SCOPE = -2        # a gradient accumulation between module calls: joins nothing
# Leaf ops that launch no kernel on a GPU, for CPU-only traces (besides the cost model's views).
_NO_KERNEL_OPS = {"aten::empty", "aten::empty_like", "aten::empty_strided", "aten::resize_", "aten::set_",
                  "aten::lift_fresh", "aten::detach", "aten::result_type", "aten::is_nonzero",
                  "aten::_local_scalar_dense", "aten::item"}


@dataclass
class Unit:
    """One op's kernels (GPU trace) or one op (CPU-only trace)."""

    op_row: int
    top_row: int
    kernel_rows: list[int]
    kernel_names: list[str]
    dur: float
    scope: int                    # module_row of the module call (or NO_SCOPE / ACCUMULATION_SCOPE)
    scope_cls: str | None         # that module's class ("LlamaRMSNorm")
    backward: bool
    record: OpRecord
    reads: list[tuple[int, ...]]
    writes: list[tuple[int, ...]]
    breaker: str | None = None    # why it cannot be in a chain
    gemm_reads: list[tuple[int, ...]] = field(default_factory=list)  # activations a GEMM reads
    accumulation: bool = False    # autograd summing a gradient between backward nodes
    context: tuple = ()           # (backward, record_function range): a change ends a chain
    passes: int = 1               # passes over the data: what counts towards a chain's length
    kernel_class: str | None = None   # of its first kernel (CPU-only: from the op's name)


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
            self._records[row] = OpRecord.from_trace(self.name[row], self.input_dims[row], self.input_types[row],
                                                     self.concrete[row], self.class_path[mrow] if mrow >= 0 else None)
        return self._records[row]


def flat_shapes(dims, types) -> list[tuple[int, ...]]:
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
    recorded = flat_shapes(record.dims, record.types)
    if cost is None:
        return recorded, []
    reads = list(dict.fromkeys(recorded + [s.shape for s in cost.reads]))
    return reads, [s.shape for s in cost.writes]


def numel(shape: tuple[int, ...]) -> int:
    return math.prod(shape) if shape else 1


def related(a: tuple[int, ...], b: tuple[int, ...]) -> bool:
    """Loose link inside one module call (rule 3)."""
    na, nb = numel(a), numel(b)
    if na <= 1 or nb <= 1:
        return False
    if a == b or na == nb:
        return True
    if len(a) == len(b) and a[:-1] == b[:-1]:
        return True
    # Broadcastable, aligned from the right as torch broadcasts ([S,S] mask on [B,H,S,S] scores).
    return all(x == y or x == 1 or y == 1 for x, y in zip(reversed(a), reversed(b)))


def feeds(written: tuple[int, ...], read: tuple[int, ...]) -> bool:
    """Strict producer -> consumer: the read tensor is the written one, or a view of it."""
    n = numel(written)
    return n > 1 and (written == read or n == numel(read))


class Classifier:
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


def gpu_units(trace: Trace, cl: Classifier) -> list[list[Unit]]:
    """Units per (step, thread, device, stream, direction), in launch order."""
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
                          "tid": tid, "device": sel["device"].to_numpy(), "stream": sel["stream"].to_numpy(),
                          "bwd": bwd, "order": order_ts,
                          "name": sel["name"].to_numpy(), "kind": sel["kind"].to_numpy(),
                          "dur": sel["dur"].to_numpy(), "cls": classes.reindex(sel.index).to_numpy()})
    key = ["step", "tid", "device", "stream", "bwd"]
    frame = frame.sort_values(key + ["order"], kind="stable")
    groups = []
    for _, g in frame.groupby(key, sort=False, dropna=False):
        units: list[Unit] = []
        for rec in g.itertuples(index=False):
            if units and rec.op_row >= 0 and units[-1].op_row == rec.op_row:
                u = units[-1]
                u.kernel_rows.append(int(rec.krow))
                u.kernel_names.append(short_kernel_name(rec.name))
                u.dur += float(rec.dur)
                if u.breaker is None and _kernel_breaker(rec, cl):
                    u.breaker = f"{_kernel_breaker(rec, cl)} ({u.record.name})"
                continue
            units.append(_new_unit(cl, int(rec.op_row), owner, breaker_owner, rec))
        for u in units:
            u.passes = _passes(u, cl)
        groups.append(units)
    return groups


def _passes(unit: Unit, cl: Classifier) -> int:
    """How many kernels of this op count towards a chain's length: the passes over the data its
    cost rule says it makes (LayerNorm backward: 2), else its distinct kernels, memsets left out
    (a memset before a reduction, or one foreach op split into launches of the same kernel, is
    one pass)."""
    cost = cl.cost(unit.op_row) if unit.op_row >= 0 else None
    if cost is not None and cost.kernels > 0:
        return cost.kernels
    names = {n for n in unit.kernel_names if not n.startswith("Memset")}
    return max(len(names), 1)


def _kernel_breaker(rec, cl: Classifier) -> str | None:
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


def _new_unit(cl: Classifier, row: int, owner: np.ndarray, breaker_owner: dict, rec) -> Unit:
    """A unit for op `row`, from its first kernel `rec` (or a _CpuRec standing for one)."""
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
        record, reads, writes, top, scope, backward, accumulation = OpRecord("?"), [], [], -1, NO_SCOPE, False, False
    annotation = col.annotation[top] if top >= 0 and isinstance(col.annotation[top], str) else None
    unit = Unit(op_row=row, top_row=top, kernel_rows=[int(rec.krow)], kernel_names=[short_kernel_name(rec.name)],
                dur=float(rec.dur), scope=scope, scope_cls=None, backward=backward, record=record,
                reads=reads, writes=writes, accumulation=accumulation, context=(backward, annotation),
                kernel_class=rec.cls)
    own = int(owner[row]) if row >= 0 else -1
    if own in breaker_owner and rec.cls not in BREAK_CLASSES:
        unit.breaker = f"{BREAK_CLASSES[breaker_owner[own]]} ({col.name[own]}: its {rec.cls} kernel)"
    else:
        reason = _kernel_breaker(rec, cl)
        unit.breaker = f"{reason} ({record.name})" if reason and row >= 0 else reason
    if row >= 0 and (rec.cls == "gemm" or breaker_owner.get(own) == "gemm"):
        unit.gemm_reads = _gemm_activations(cl, own, top)
    return unit


def _gemm_activations(cl: Classifier, row: int, top: int) -> list[tuple[int, ...]]:
    """What a GEMM op reads that could be a chain's output: under nn.Linear only its input x
    (the weight is a parameter: in a tiny model its transpose can have an activation's shape);
    otherwise every tensor argument."""
    if top >= 0 and cl.col.name[top] == "aten::linear":
        rec = cl.record(top)
        return flat_shapes(rec.dims[:1], rec.types[:1])
    rec = cl.record(row)
    return flat_shapes(rec.dims, rec.types)


def cpu_units(trace: Trace, cl: Classifier) -> list[list[Unit]]:
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
    groups: dict[tuple, list[Unit]] = {}
    for row, cls in zip(rows, classes):
        col = cl.col
        rec = _CpuRec(krow=-1, op_row=row, name=col.name[row], kind="kernel", dur=0.0, cls=cls)
        unit = _new_unit(cl, row, owner, breaker_owner, rec)
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


def _launches_kernel(cl: Classifier, row: int, name: str, has_child: bool) -> bool:
    if not name.startswith("aten::") or name in _NO_KERNEL_OPS:
        return False
    cost = cl.cost(row)
    if cost is None and has_child:
        return False
    if cost is not None and cost.kernels == 0:
        return False
    record = cl.record(row)
    shapes = flat_shapes(record.dims, record.types)
    return any(numel(s) > 1 for s in shapes)


@dataclass
class _CpuRec:
    krow: int
    op_row: int
    name: str
    kind: str
    dur: float
    cls: str


