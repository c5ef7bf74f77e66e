"""A traced op sequence as a small expression graph: nodes (one per op), external inputs, scalars.

The linking rule (a trace has no tensor identity, only shapes and dtypes):
  * op 0's tensor arguments are all external inputs;
  * op i > 0 consumes op i-1's output through the first tensor argument whose dims and dtype
    equal that output's (for an in-place op, only `self`); if none does, op i does not consume
    op i-1 and the chain ends before it;
  * every other tensor argument is a new external input, read with its own dims (broadcast to
    the output by index arithmetic in the kernel); a Python number (traced as a 0-dim `double` or
    `long int` with no recorded value) is a runtime scalar argument; a recorded Scalar
    (`clamp(x, -1, 2)`, `alpha`, a `pow` exponent) is a constant compiled into the kernel.
Two consequences, both named in the generated module's header:
  * when two arguments of op i match (`y * torch.sigmoid(1.702 * y)`: both have y's shape), the
    first is taken as the chain value and the other becomes an external input, even if it is
    an earlier value of the chain. `bind={(op, slot): "v2"}` (or "in0") says what the trace
    cannot: that argument is the output of op 2 (or external input 0), read from registers;
  * a value modified in place later in the chain cannot be bound.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from fusion_advisor.kernels import autocast
from fusion_advisor.kernels.codegen import ops as op_table
from fusion_advisor.kernels.codegen.ops import FLOAT_DTYPES, Arg, OpSpec, Unsupported, lit
from fusion_advisor.kernels.registry import OpRecord, dtype_name


_BELOW_FP32 = (torch.float16, torch.bfloat16)
# Reductions whose output has their input's shape: pointwise ops may follow them in one kernel.
ELEMENTWISE_REDUCTIONS = ("softmax", "log_softmax")


class NotLinked(Unsupported):
    """A supported op that does not consume the previous op's output: a new chain starts there."""


@dataclass
class Operand:
    kind: str            # "value" (a node's output) | "input" | "scalar" | "const" | "none"
    ref: str             # "v3" | "in1" | "s0" | Triton literal | "None"
    value: Any = None    # a const's Python value (for the eager call)


@dataclass
class Input:
    name: str            # "in1": the kernel's external input
    shape: tuple
    dtype: torch.dtype
    op_index: int        # the op (and its argument) it feeds
    slot: str
    positive: bool = False   # feeds a divisor, log, sqrt...: make_inputs draws it from [0.5, 1.5]


@dataclass
class Scalar:
    name: str            # "s0": a runtime scalar argument (the trace holds no value)
    op_index: int
    slot: str
    type_name: str       # "double" | "long int" | "Scalar"
    placeholder: float | int   # what make_inputs passes


@dataclass
class Node:
    index: int
    record: OpRecord
    spec: OpSpec
    eager_name: str      # the aten op the eager chain calls ("add_" only on an intermediate)
    operands: list[Operand]
    params: dict
    shape: tuple
    dtype: torch.dtype
    reduction: str | None = None     # "sum" | "mean" | "amax" | "max" | "softmax" | "log_softmax"
    eager_cast: torch.dtype | None = None   # an in-place op run out of place: back to self's dtype
    autocast: bool = False   # traced under CUDA autocast, which ran it in fp32: its bf16/fp16 operands
                             # are cast to fp32 first (explicitly, in the eager reference too)

    @property
    def name(self) -> str:
        return f"v{self.index}"


@dataclass
class Graph:
    nodes: list[Node] = field(default_factory=list)
    inputs: list[Input] = field(default_factory=list)
    scalars: list[Scalar] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def reduction(self) -> Node | None:
        """The chain's one reduction: the last node, or a softmax / log_softmax followed by a
        pointwise epilogue (`softmax(x, 1) + bias`)."""
        return next((n for n in self.nodes if n.reduction), None)

    @property
    def pointwise(self) -> list[Node]:
        return [n for n in self.nodes if not n.reduction]

    @property
    def prologue(self) -> list[Node]:
        """The pointwise nodes before the reduction (all of them without one)."""
        red = self.reduction
        return self.nodes[:red.index] if red is not None else list(self.nodes)

    @property
    def epilogue(self) -> list[Node]:
        """The pointwise nodes after a softmax / log_softmax, on its output's shape."""
        red = self.reduction
        return self.nodes[red.index + 1:] if red is not None else []

    @property
    def reduced_block(self) -> tuple[int, int] | None:
        """The reduction's dims of the loop shape, first and last (adjacent dims: one block)."""
        red = self.reduction
        if red is None:
            return None
        dims = reduced_dims(red, len(self.loop_shape))
        return dims[0], dims[-1]

    @property
    def reduce_dims(self) -> tuple[int, int] | None:
        """The reduced block when it is not at the end (softmax over the channels of NCHW: (1, 1));
        the kernels then read the loop in a logical order with that block last."""
        block = self.reduced_block
        if block is None or block[1] == len(self.loop_shape) - 1:
            return None
        return block

    @property
    def loop_shape(self) -> tuple:
        """The shape the kernel iterates over: the broadcast of every input (before a reduction)."""
        red = self.reduction
        if red is None:
            return self.nodes[-1].shape
        src = red.operands[0]
        return self.value_shape(src)

    def value_shape(self, operand: Operand) -> tuple:
        if operand.kind == "value":
            return next(n.shape for n in self.nodes if n.name == operand.ref)
        return next(i.shape for i in self.inputs if i.name == operand.ref)

    def dtype_of(self, ref: str) -> torch.dtype:
        for n in self.nodes:
            if n.name == ref:
                return n.dtype
        return next(i.dtype for i in self.inputs if i.name == ref)


# Placeholders make_inputs passes for Python numbers whose value the trace does not hold: benign
# values for each op (a divisor of 2, a scale of 0.5, an offset of 1).
_PLACEHOLDERS = {"add": 1.0, "sub": 1.0, "rsub": 1.0, "mul": 0.5, "div": 2.0, "where": 0.0,
                 "masked_fill": 0.0, "minimum": 0.0, "maximum": 0.0}


def _placeholder(op: str, type_name: str) -> float | int | bool:
    value = _PLACEHOLDERS.get(op, 0.5)
    if type_name == "long int":
        return 2 if op in ("mul", "div") else 1
    if type_name == "bool":
        return True
    return value


def _binary_alias(short: str, args: list[Arg]) -> str:
    """torch.max(a, b) / torch.min(a, b) trace as aten::max / aten::min with two tensors."""
    if short in ("max", "min") and len(args) == 2 and args[1].kind == "tensor":
        return "maximum" if short == "max" else "minimum"
    return short


class GraphBuilder:
    """Adds ops one at a time; raises Unsupported (the op cannot be fused) or NotLinked (it does
    not consume the previous output) and leaves the graph as it was."""

    def __init__(self, bind: dict[tuple[int, int], str] | None = None, exact: bool = False):
        self.graph = Graph()
        self.bind = dict(bind or {})
        self.exact = exact
        self._meta: dict[str, Any] = {}
        # Storage tracking, for in-place ops: every value names the tensor it lives in (an input's
        # or an op's output; `to` to the same dtype returns its input itself, an in-place op its
        # self) and that tensor's version when the value was made. In-place ops bump the version.
        self._storage: dict[str, tuple[str, int]] = {}
        self._version: dict[str, int] = {}

    def add(self, record: OpRecord) -> Node:
        g = self.graph
        i = len(g.nodes)
        if g.reduction is not None and g.reduction.reduction not in ELEMENTWISE_REDUCTIONS:
            raise NotLinked(f"{g.reduction.record.short} ends the kernel: one trailing reduction per kernel")
        if not record.name.startswith("aten::"):
            raise Unsupported(f"{record.name} is not an aten op")
        n = max(len(record.dims), len(record.types))
        args = [op_table.classify(_at(record.dims, j), _at(record.types, j, ""), _at(record.concrete, j, ""))
                for j in range(n)]
        short = _binary_alias(record.short, args)
        spec, inplace = op_table.lookup(short)
        values, params = op_table.parse_args(spec, args)
        if spec.kind == "reduction":
            if g.reduction is not None:
                raise NotLinked(f"one reduction per kernel: {g.reduction.record.short} came first")
            params = _reduction_params(spec.name, args, params)
        if spec.check is not None:
            reason = spec.check(args, params)
            if reason:
                raise Unsupported(reason)
        operands = self._link(i, spec, inplace, values)
        inputs, scalars = [], []
        for s, (arg, operand) in enumerate(zip(values, operands)):
            if operand is not None:
                continue
            slot = _value_slots(spec)[s]
            if arg.kind == "tensor":
                if arg.dtype == torch.bool and (spec.name, slot) not in (("where", "condition"), ("masked_fill", "mask")):
                    raise Unsupported(f"{record.short}: a bool tensor as {slot}")
                if arg.dtype not in FLOAT_DTYPES + (torch.bool,):
                    raise Unsupported(f"{record.short}: input {slot} of dtype {dtype_name(arg.dtype)}")
                name = f"in{len(g.inputs) + len(inputs)}"
                inputs.append(Input(name, arg.dims, arg.dtype, i, slot, positive=s in spec.positive_operands))
                operands[s] = Operand("input", name)
            elif arg.kind == "number":
                name = f"s{len(g.scalars) + len(scalars)}"
                scalars.append(Scalar(name, i, slot, arg.type_name, _placeholder(spec.name, arg.type_name)))
                operands[s] = Operand("scalar", name)
            elif arg.kind == "scalar":
                if not isinstance(arg.value, (int, float)):
                    raise Unsupported(f"{record.short}: argument {slot}={arg.value!r}")
                operands[s] = Operand("const", lit(arg.value), arg.value)
            else:
                operands[s] = Operand("none", "None", None)
        # In place on an intermediate stays in place; on an external input (or a `to` that returned
        # one unchanged) it would modify the caller's tensor: the eager chain runs the out-of-place
        # op there, cast back to self's dtype where the in-place op would have kept it.
        self_storage = self._storage.get(operands[0].ref, (operands[0].ref, 0))[0]
        on_caller = operands[0].kind in ("input", "value") and self_storage.startswith("in")
        eager_name = record.short[:-1] if inplace and on_caller else record.short
        node = Node(i, record, spec, eager_name, operands, params, (), torch.float32,
                    op_table.REDUCTION_KINDS.get(spec.name) if spec.kind == "reduction" else None)
        meta_in = {**self._meta, **{x.name: torch.empty(x.shape, dtype=x.dtype, device="meta") for x in inputs},
                   **{x.name: x.placeholder for x in scalars}}
        out = _run_eager(node, meta_in)
        first = out[0] if isinstance(out, tuple) else out
        if inplace and on_caller:
            self_meta = meta_in[operands[0].ref]
            if first.shape != self_meta.shape:
                raise Unsupported(f"{record.short} would broadcast its self in place")
            if first.dtype != self_meta.dtype:
                node.eager_cast = self_meta.dtype
                first = first.to(self_meta.dtype)
        if first.dtype not in FLOAT_DTYPES:
            raise Unsupported(f"{record.short} produces {dtype_name(first.dtype)}")
        node.shape, node.dtype = tuple(first.shape), first.dtype
        if g.reduction is not None and node.shape != g.reduction.shape:
            raise NotLinked(f"{record.short} after {g.reduction.record.short} changes the shape to {node.shape}")
        if node.reduction is None and node.shape != torch.broadcast_shapes(
                *[meta_in[o.ref].shape for o in operands if o.kind in ("value", "input")]):
            raise Unsupported(f"{record.short} is not pointwise on these shapes")
        # Commit.
        g.inputs += inputs
        g.scalars += scalars
        g.nodes.append(node)
        self._meta.update({x.name: meta_in[x.name] for x in inputs})
        self._meta[node.name] = first
        for x in inputs:
            self._storage[x.name] = (x.name, 0)
        if inplace and not on_caller:          # a new version of self's tensor
            self._version[self_storage] = self._version.get(self_storage, 0) + 1
            self._storage[node.name] = (self_storage, self._version[self_storage])
        elif record.short == "to" and node.dtype == meta_in[operands[0].ref].dtype:   # self itself
            self._storage[node.name] = self._storage.get(operands[0].ref, (operands[0].ref, 0))
        else:
            self._storage[node.name] = (node.name, 0)
        if spec.name == "gelu" and _at(record.concrete, 1, "") == "":
            g.notes.append(f"op {i} gelu: the trace does not record `approximate` (torch records no strings); "
                           f"'none' (erf) assumed. Rebuild from a record with concrete 'tanh' if the model uses tanh.")
        return node

    def _link(self, i: int, spec: OpSpec, inplace: bool, values: list[Arg]) -> list[Operand | None]:
        g = self.graph
        operands: list[Operand | None] = [None] * len(values)
        for (op_i, s), ref in self.bind.items():
            if op_i != i:
                continue
            if s >= len(values) or values[s].kind != "tensor":
                raise Unsupported(f"bind: op {op_i} has no tensor argument {s}")
            storage, version = self._storage.get(ref, (ref, 0))
            if self._version.get(storage, 0) != version:
                raise Unsupported(f"bind: {ref} was modified in place after it was made")
            shape, dtype = self._value(ref)
            if (tuple(values[s].dims), values[s].dtype) != (shape, dtype) and self._autocast_fixup(ref, values[s]):
                shape, dtype = self._value(ref)
            if (tuple(values[s].dims), values[s].dtype) != (shape, dtype):
                raise Unsupported(f"bind: {ref} is {dtype_name(dtype)} {shape}, op {op_i} argument {s} is "
                                  f"{dtype_name(values[s].dtype)} {tuple(values[s].dims)}")
            operands[s] = Operand("value" if ref.startswith("v") else "input", ref)
        if i == 0:
            return operands
        if self.exact:   # `bind` names every earlier value an op reads (source_bind.py): nothing to guess
            # An op may read only inputs the chain already read: `0.5 * x * (1 + tanh(x + x ** 3))`
            # is a DAG over x, and `x ** 3` reads x alone.
            if not any(o is not None and o.kind in ("value", "input") for o in operands):
                raise NotLinked(f"op {i} reads no earlier value or input of the chain")
            return operands
        prev = g.nodes[-1]
        if any(o is not None and o.ref == prev.name for o in operands):
            return operands

        def matching() -> list[int]:
            return [s for s, a in enumerate(values) if operands[s] is None and a.kind == "tensor"
                    and tuple(a.dims) == prev.shape and a.dtype == prev.dtype and (not inplace or s == 0)]

        candidates = matching()
        if not candidates and any(operands[s] is None and a.kind == "tensor" and self._autocast_fixup(prev.name, a)
                                  for s, a in enumerate(values)):
            candidates = matching()
        if not candidates:
            raise NotLinked(f"no argument has the previous output's dims {prev.shape} and dtype "
                            f"{dtype_name(prev.dtype)}: it does not consume op {i - 1}")
        if len(candidates) > 1:
            names = _value_slots(spec)
            g.notes.append(f"op {i} {spec.name}: arguments {', '.join(names[s] for s in candidates)} all have the "
                           f"previous output's shape; `{names[candidates[0]]}` was taken as the chain value and the "
                           f"others are external inputs (pass bind= if one is an earlier value of the chain)")
        operands[candidates[0]] = Operand("value", prev.name)
        return operands

    def _autocast_fixup(self, ref: str, arg: Arg) -> bool:
        """The trace shows `arg` reading node `ref`'s output as float32 where the op's rules give
        bf16/fp16: the chain ran under CUDA autocast, whose fp32 policy ran that op (pow, exp,
        rsqrt, softmax, sum...) in fp32. Re-type the node so (True), unless something already read
        its lower-precision output or autocast has no kernel for it."""
        node = next((n for n in self.graph.nodes if n.name == ref), None)
        if (node is None or node.autocast or arg.kind != "tensor" or arg.dtype != torch.float32
                or tuple(arg.dims) != node.shape or node.dtype not in (torch.bfloat16, torch.float16)
                or node.eager_cast is not None or node.eager_name.endswith("_")
                or not autocast.has_autocast_kernel(node.eager_name)
                or any(o.ref == ref for n in self.graph.nodes for o in n.operands)):
            return False
        node.autocast = True
        env = {**self._meta, **{x.name: x.placeholder for x in self.graph.scalars}}
        out = _run_eager(node, env)
        first = out[0] if isinstance(out, tuple) else out
        node.dtype, self._meta[node.name] = first.dtype, first
        self.graph.notes.append(f"op {node.index} {node.record.short}: traced under CUDA autocast, which ran it in "
                                f"fp32 (the next op reads it as float32); the kernel and the reference do too")
        return True

    def _value(self, ref: str) -> tuple[tuple, torch.dtype]:
        for n in self.graph.nodes:
            if n.name == ref:
                return n.shape, n.dtype
        for x in self.graph.inputs:
            if x.name == ref:
                return tuple(x.shape), x.dtype
        raise Unsupported(f"bind: no value {ref} before this op")


def _at(seq: Sequence | None, j: int, default: Any = ()) -> Any:
    if seq is None or j >= len(seq):
        return default
    return seq[j] if seq[j] is not None else default


def _value_slots(spec: OpSpec) -> list[str]:
    return [s.name for s in spec.slots if s.role == "value"]


def _reduction_params(name: str, args: list[Arg], params: dict) -> dict:
    """Normalise the overloads: sum(x, dtype) is a full reduction; dims become a list."""
    params = dict(params)
    if name in ("sum", "mean") and len(args) == 2:       # sum(self, dtype): every dim
        dtype = args[1]
        params = {"dim": None, "keepdim": False,
                  "dtype": op_table.dtype_from_code(dtype.value) if dtype.kind == "scalar" else None}
    if name == "max" and params.get("dim") is None:
        raise Unsupported("max over every dim (no indices); use amax")
    return params


def reduced_dims(node: Node, rank: int) -> list[int]:
    dim = node.params.get("dim")
    if dim is None or dim == [] or dim == ():
        return list(range(rank))
    dims = dim if isinstance(dim, (list, tuple)) else [dim]
    return sorted(d % rank for d in dims)


def _run_eager(node: Node, env: dict[str, Any]) -> Any:
    """Run the node's aten op on meta tensors: its output shape and dtype, by torch's own rules."""
    pos, kw = eager_args(node, lambda o: env[o.ref] if o.kind in ("value", "input", "scalar") else o.value)
    if node.autocast:
        pos = [p.to(torch.float32) if isinstance(p, torch.Tensor) and p.dtype in _BELOW_FP32 else p for p in pos]
    if node.reduction is not None:
        rank = len(pos[0].shape)
        dims = reduced_dims(node, rank)
        if dims != list(range(dims[0], dims[-1] + 1)) or (rank > 1 and len(dims) == rank):
            raise Unsupported(f"{node.record.short} over dims {node.params.get('dim')}: one dim, or one block of "
                              f"adjacent dims short of all of them, is supported")
        if len(dims) > 1 and node.reduction not in ("sum", "mean", "amax"):
            raise Unsupported(f"{node.record.short} over dims {dims}: over several dims only sum, mean and amax")
    try:
        return getattr(torch.ops.aten, node.eager_name)(*pos, **kw)
    except Exception as exc:  # torch rejects these shapes or arguments
        raise Unsupported(f"{node.record.short}: torch rejects the traced arguments ({str(exc).splitlines()[0]})") from None


def eager_args(node: Node, value_of) -> tuple[list, dict]:
    """Positional and keyword arguments of the eager call, in the traced order."""
    pos, kw = [], {}
    operands = iter(node.operands)
    for slot in node.spec.slots:
        if slot.role == "ignore":
            break
        if slot.role == "value":
            pos.append(value_of(next(operands)))
            continue
        value = node.params.get(slot.name, slot.default)
        if slot.kwonly:
            if value != slot.default:
                kw[slot.name] = value
        else:
            pos.append(value)
    return pos, kw


def build_graph(ops: Sequence[OpRecord], bind: dict[tuple[int, int], str] | None = None,
                exact: bool = False) -> Graph:
    """The whole op list as one graph; Unsupported (with the op's index) if any op cannot join.
    exact: `bind` holds every link (read off the source), none is guessed from shapes."""
    if not ops:
        raise Unsupported("an empty chain")
    builder = GraphBuilder(bind, exact)
    for i, record in enumerate(ops):
        try:
            builder.add(record)
        except Unsupported as exc:
            raise type(exc)(f"op {i} ({record.name}): {exc}") from None
    _carry_positive_domain(builder.graph)
    return builder.graph


# A value keeps the sign of its operand through these (operand slot -> the other operand must be a
# positive constant, or None): an input reached only through them draws from [0.5, 1.5] too. T5's
# `log(relative_position.float() / max_exact)` otherwise drew negative numerators, both sides
# computed NaN there, and the check refused the chain (NaN != NaN).
_SIGN_KEEPING = {"to": (0, None), "_to_copy": (0, None), "mul": (0, 1), "div": (0, 1)}


def _carry_positive_domain(g: Graph) -> None:
    wanted = {o.ref for n in g.nodes for s, o in enumerate(n.operands)
              if s in n.spec.positive_operands and o.kind == "value"}
    by_name = {n.name: n for n in g.nodes}
    inputs = {x.name: x for x in g.inputs}
    for node in reversed(g.nodes):
        if node.name not in wanted or node.spec.name not in _SIGN_KEEPING:
            continue
        ops = node.operands
        if node.spec.name == "mul" and ops[0].kind == "const":   # 2 * x: the value is the other one
            ops = [ops[1], ops[0]]
        slot, other = _SIGN_KEEPING[node.spec.name]
        if other is not None and not (ops[other].kind == "const" and isinstance(ops[other].value, (int, float))
                                      and ops[other].value > 0):
            continue
        source = ops[slot]
        if source.kind == "value" and source.ref in by_name:
            wanted.add(source.ref)
        elif source.kind == "input" and source.ref in inputs:
            inputs[source.ref].positive = True


def split_supported(ops: Sequence[OpRecord]) -> list[tuple[list[OpRecord], str | None]]:
    """Cut a traced chain into runs that one generated kernel each can replace.

    Returns (segment, why it ended) pairs; the last reason is None when the chain simply ends. An
    unsupported op belongs to no segment (it stays eager); a supported op that does not consume
    the previous output starts the next segment; a reduction ends its segment."""
    segments: list[tuple[list[OpRecord], str | None]] = []
    current: list[OpRecord] = []
    builder = GraphBuilder()

    def close(reason: str | None) -> None:
        nonlocal current, builder
        if current:
            segments.append((current, reason))
        current, builder = [], GraphBuilder()

    def take(i: int, record: OpRecord) -> None:
        builder.add(record)
        current.append(record)
        red = builder.graph.reduction
        if red is not None and red.reduction not in ELEMENTWISE_REDUCTIONS:
            close(f"op {i} ({record.name}) is a reduction: it ends the kernel")

    for i, record in enumerate(ops):
        try:
            take(i, record)
        except NotLinked as exc:
            close(f"op {i} ({record.name}): {exc}")
            try:
                take(i, record)            # it starts the next segment
            except Unsupported as again:
                close(f"op {i} ({record.name}): {again}")
        except Unsupported as exc:
            close(f"op {i} ({record.name}): {exc}")
    close(None)
    return segments


def records_from_frame(ops, module_paths: Sequence[str | None] | None = None) -> list[OpRecord]:
    """OpRecords from rows of a Trace's `ops` frame (columns name, input_dims, input_types,
    concrete), in row order."""
    records = []
    for k, (name, dims, types, concrete) in enumerate(zip(ops["name"], ops["input_dims"], ops["input_types"],
                                                          ops["concrete"])):
        records.append(OpRecord.from_trace(name, dims, types, concrete,
                                           module_paths[k] if module_paths is not None else None))
    return records
