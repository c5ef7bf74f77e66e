"""Bytes and FLOPs of one traced op, from its recorded shapes, dtypes and scalar arguments.

One rule per op family. A rule prices the kernel(s) the op launches as the minimum traffic the
computation needs: each input tensor read once, each output written once (a broadcast input is
read once, at its own size). Where an op runs more than one kernel that each must pass over the
data (LayerNorm backward: one kernel for the input gradient, one for the weight gradient), the rule
says so and counts both passes, with `kernels` set to match.

An op without a rule, or whose record lacks what its rule needs, gets None from `op_cost`: it is
reported as unknown, never guessed. `unknown_reason` says why.

What the trace records (Kineto, record_shapes=True): `Input Dims` (a shape per argument, [] for
scalars and 0-dim tensors, nested lists for a TensorList), `Input type` ("float", "c10::BFloat16",
"Scalar", "ScalarList", "TensorList", "" for None/str/bool...), `Concrete Inputs` (scalar
arguments as strings), `Input Strides`. Not recorded: output shapes and dtypes (derived here
from the inputs and the op's semantics) and the element type inside a TensorList. OpRecord does
not carry the strides yet; the rules use them where a record has a `strides` field.

Bytes alone do not time every kernel: some loops are bound by elements per second (PyTorch's
generic strided pointwise loop, row softmax, LayerNorm). Such a rule also names the loop family
and its element count (`OpCost.loop`, `loop_elements`); the device profile's rates price them.

Ops priced: the leaf ops that launch kernels (`Trace.kernels.op_row`), the view ops (free: no
kernel), and the composites that launch exactly one kernel (linear, matmul, softmax, layer_norm,
to, contiguous, embedding, scaled_dot_product_attention...).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Callable, Sequence

from fusion_advisor.core.dtypes import TRACE_DTYPES
from fusion_advisor.core.records import OpRecord, TensorSpec

# c10::ScalarType codes, as scalar arguments (dtype=, input_dtype) appear in Concrete Inputs.
SCALAR_TYPE_CODES = {0: "uint8", 1: "int8", 2: "int16", 3: "int32", 4: "int64", 5: "float16", 6: "float32",
                     7: "float64", 11: "bool", 15: "bfloat16", 23: "float8_e5m2", 24: "float8_e4m3fn"}

_FLOAT_RANK = {"float8_e5m2": 0, "float8_e4m3fn": 0, "float16": 1, "bfloat16": 1, "float32": 2, "float64": 3}
_INT_RANK = {"bool": 0, "uint8": 1, "int8": 1, "int16": 2, "int32": 3, "int64": 4}
TENSOR_CORE_DTYPES = {"bfloat16", "float16", "float8_e4m3fn", "float8_e5m2"}


@dataclass
class OpCost:
    bytes_read: int
    bytes_written: int
    flops: int
    tensor_core: bool = False
    dtype: str = "float32"            # the dtype that sets the FLOP rate
    kernels: int = 1                  # kernels the op launches (0 for views)
    # Kernels bound by elements per second as well as bytes: `loop_elements` elements processed by
    # a loop of family `loop` ("strided": PyTorch's generic pointwise loop, taken when an operand
    # is broadcast or not contiguous; "softmax": the row-softmax forward; "norm": LayerNorm).
    # The profile's element_rates price them.
    loop: str | None = None
    loop_elements: int = 0
    reads: tuple[TensorSpec, ...] = ()    # the tensors read, for matching producers and consumers
    writes: tuple[TensorSpec, ...] = ()   # the tensors written

    @property
    def bytes(self) -> int:
        return self.bytes_read + self.bytes_written


class Unpriced(Exception):
    """A rule cannot price this record; the message says why (becomes `unknown_reason`)."""


# -- reading an OpRecord -------------------------------------------------------------------------
class _Args:
    """Positional view of one OpRecord's recorded arguments."""

    def __init__(self, op: OpRecord):
        self.op = op
        self.dims = list(op.dims or ())
        self.types = list(op.types or ())
        self.concrete = list(op.concrete or ())
        # Input Strides, where the record carries them (OpRecord may grow a `strides` field).
        self.strides = list(getattr(op, "strides", None) or ())

    def __len__(self) -> int:
        return max(len(self.dims), len(self.types))

    def type(self, i: int) -> str:
        return self.types[i] if i < len(self.types) else ""

    def is_tensor(self, i: int) -> bool:
        return self.type(i) in TRACE_DTYPES and i < len(self.dims) and isinstance(self.dims[i], (list, tuple))

    def tensor(self, i: int) -> TensorSpec:
        if not self.is_tensor(i):
            raise Unpriced(f"argument {i} is not a recorded tensor (type {self.type(i)!r})")
        dims = self.dims[i]
        if any(isinstance(d, (list, tuple)) for d in dims):
            raise Unpriced(f"argument {i} has nested dims")
        return TensorSpec(tuple(int(d) for d in dims), TRACE_DTYPES[self.type(i)][0])

    def mixed_layouts(self) -> bool:
        """True if, by the recorded strides, the tensor arguments cannot run as one flat
        contiguous loop: one is not dense (a slice), or two are dense in different dim orders (a
        transposing copy). Same-order dense tensors, even permuted, vectorize. False without
        strides (OpRecord may grow a `strides` field)."""
        orders = set()
        for i in range(len(self)):
            if not self.is_tensor(i) or i >= len(self.strides) or not self.dims[i]:
                continue
            order = _dense_order(self.dims[i], self.strides[i])
            if order is None:
                return True
            orders.add(order)
        return len(orders) > 1

    def optional_tensor(self, i: int) -> TensorSpec | None:
        """A `Tensor?` argument: None when absent (recorded with type '' and dims [])."""
        return self.tensor(i) if self.is_tensor(i) else None

    def tensors(self) -> list[TensorSpec]:
        return [self.tensor(i) for i in range(len(self)) if self.is_tensor(i)]

    def value(self, i: int) -> str:
        return str(self.concrete[i]) if i < len(self.concrete) and self.concrete[i] is not None else ""

    def int_value(self, i: int, default: int | None = None) -> int:
        text = self.value(i)
        try:
            return int(float(text))
        except ValueError:
            if default is not None:
                return default
            raise Unpriced(f"argument {i} ({text!r}) is not a recorded integer") from None

    def float_value(self, i: int, default: float | None = None) -> float:
        try:
            return float(self.value(i))
        except ValueError:
            if default is not None:
                return default
            raise Unpriced(f"argument {i} is not a recorded number") from None

    def bool_value(self, i: int, default: bool = False) -> bool:
        text = self.value(i)
        if text in ("True", "true", "1"):
            return True
        if text in ("False", "false", "0"):
            return False
        return default

    def int_list(self, i: int) -> list[int] | None:
        """'[-1]' / '[0, 1]' -> ints; None when absent or not recorded."""
        text = self.value(i).strip()
        if not text.startswith("["):
            return None
        inner = text.strip("[]").strip()
        if not inner:
            return []
        try:
            return [int(x) for x in inner.split(",")]
        except ValueError:
            return None

    def scalar_type(self, i: int) -> str | None:
        text = self.value(i)
        if not re.fullmatch(r"-?\d+", text):
            return None
        return SCALAR_TYPE_CODES.get(int(text))

    def tensor_list(self, i: int, dtype: str | None) -> list[TensorSpec]:
        if self.type(i) != "TensorList" or i >= len(self.dims):
            raise Unpriced(f"argument {i} is not a TensorList")
        shapes = self.dims[i]
        if not shapes or not all(isinstance(s, (list, tuple)) for s in shapes):
            raise Unpriced("the TensorList's shapes are not recorded")
        if dtype is None:
            raise Unpriced("the profiler records no dtype inside a TensorList (give the chain's dtype)")
        return [TensorSpec(tuple(int(d) for d in s), dtype) for s in shapes]


# -- shape and dtype helpers ---------------------------------------------------------------------
def _dense_order(shape, strides) -> tuple | None:
    """The order of a dense tensor's dims from outermost to innermost (size-1 dims left out), or
    None if its elements do not fill a contiguous block (a slice, an expand)."""
    if not isinstance(strides, (list, tuple)) or len(strides) != len(shape):
        return ()                                    # strides unknown: take it as contiguous
    dims = sorted((i for i, size in enumerate(shape) if size != 1), key=lambda i: -strides[i])
    expected = 1
    for i in reversed(dims):
        if strides[i] != expected:
            return None
        expected *= shape[i]
    return tuple(dims)


def broadcast_shape(shapes: Sequence[tuple[int, ...]]) -> tuple[int, ...]:
    ndim = max((len(s) for s in shapes), default=0)
    out = []
    for axis in range(ndim):
        sizes = {s[axis - ndim + len(s)] for s in shapes if axis - ndim + len(s) >= 0}
        sizes.discard(1)
        if len(sizes) > 1:
            raise Unpriced(f"shapes {list(shapes)} do not broadcast")
        out.append(sizes.pop() if sizes else 1)
    return tuple(out)


def promote(dtypes: Sequence[str]) -> str:
    """torch's type promotion over the tensors of one category ladder (no complex)."""
    floats = [d for d in dtypes if d in _FLOAT_RANK]
    if floats:
        top = max(_FLOAT_RANK[d] for d in floats)
        tops = sorted({d for d in floats if _FLOAT_RANK[d] == top})
        if top == 1 and len(tops) > 1:
            return "float32"  # bfloat16 with float16 promotes to float32
        return tops[0]
    ints = [d for d in dtypes if d in _INT_RANK]
    if ints:
        return max(ints, key=lambda d: _INT_RANK[d])
    return dtypes[0] if dtypes else "float32"


def result_dtype(tensors: Sequence[TensorSpec]) -> str:
    """Promotion as torch does it: dimensioned tensors decide; 0-dim tensors (wrapped Python
    numbers among them) only lift the category (an int tensor times 0.5 is float32)."""
    dimmed = [t.dtype for t in tensors if t.shape != ()]
    zero_dim = [t.dtype for t in tensors if t.shape == ()]
    if not dimmed:
        return promote(zero_dim)
    out = promote(dimmed)
    if out in _INT_RANK and any(d in _FLOAT_RANK for d in zero_dim):
        return "float32"
    return out


def _cost(reads: Sequence[TensorSpec], writes: Sequence[TensorSpec], flops: int = 0, *, dtype: str | None = None,
          tensor_core: bool = False, kernels: int = 1, loop: str | None = None, loop_elements: int = 0) -> OpCost:
    reads, writes = tuple(reads), tuple(writes)
    dtype = dtype or (writes[0].dtype if writes else reads[0].dtype if reads else "float32")
    return OpCost(bytes_read=sum(t.nbytes for t in reads), bytes_written=sum(t.nbytes for t in writes),
                  flops=int(flops), tensor_core=tensor_core, dtype=dtype, kernels=kernels,
                  loop=loop if loop_elements else None, loop_elements=int(loop_elements), reads=reads, writes=writes)


def _strided(a: "_Args", out: TensorSpec, tensors: Sequence[TensorSpec]) -> int:
    """Output elements if PyTorch runs this pointwise op through its generic strided loop: an
    operand of another shape than the output (broadcast; 0-dim scalars excepted: they are kernel
    arguments) or, where the record has strides, a non-contiguous operand."""
    broadcast = any(t.shape != out.shape and t.shape != () for t in tensors)
    return out.numel if broadcast or a.mixed_layouts() else 0


def _compute_dtype(dtype: str) -> str:
    """Pointwise math runs in fp32 for half types (PyTorch's opmath), fp64 for doubles."""
    return "float64" if dtype == "float64" else "float32"


# -- the rule table ------------------------------------------------------------------------------
Rule = Callable[[_Args, "str | None"], OpCost]
_RULES: dict[str, Rule] = {}


def rule(*names: str):
    def deco(fn: Rule) -> Rule:
        for n in names:
            _RULES[n if "::" in n else "aten::" + n] = fn
        return fn
    return deco


def _inplace_names(*names: str) -> tuple[str, ...]:
    return tuple(n for base in names for n in (base, base + "_"))


# Pointwise ops: FLOPs per output element (a rough count; these kernels are memory-bound, the
# FLOPs only matter for the roofline's compute side). Transcendentals count as one.
_UNARY_FLOPS = {
    "abs": 1, "neg": 1, "exp": 1, "exp2": 1, "expm1": 1, "log": 1, "log2": 1, "log10": 1, "log1p": 1,
    "sqrt": 1, "rsqrt": 1, "sin": 1, "cos": 1, "tan": 1, "tanh": 1, "sigmoid": 1, "relu": 1, "erf": 1,
    "erfinv": 1, "reciprocal": 1, "sign": 1, "floor": 1, "ceil": 1, "round": 1, "trunc": 1, "square": 1,
    "bitwise_not": 1, "logical_not": 1, "silu": 4, "gelu": 8, "mish": 6, "softplus": 4, "elu": 3,
    "leaky_relu": 2, "hardtanh": 2, "hardswish": 4, "hardsigmoid": 3, "relu6": 2, "nan_to_num": 2,
    "clamp": 2, "clamp_min": 1, "clamp_max": 1, "pow": 1, "frac": 1, "sgn": 1, "isnan": 1, "isinf": 1,
    "isfinite": 1, "logit": 3, "sinh": 1, "cosh": 1, "asin": 1, "acos": 1, "atan": 1, "digamma": 1,
}
_BINARY_FLOPS = {
    "add": 1, "sub": 1, "rsub": 1, "mul": 1, "div": 1, "maximum": 1, "minimum": 1, "fmax": 1, "fmin": 1,
    "remainder": 1, "fmod": 1, "atan2": 1, "copysign": 1, "hypot": 3, "xlogy": 2, "floor_divide": 1,
    "eq": 1, "ne": 1, "lt": 1, "le": 1, "gt": 1, "ge": 1, "logical_and": 1, "logical_or": 1,
    "logical_xor": 1, "bitwise_and": 1, "bitwise_or": 1, "bitwise_xor": 1, "where": 1, "addcmul": 2,
    "addcdiv": 2, "lerp": 2, "masked_fill": 1, "bitwise_left_shift": 1, "bitwise_right_shift": 1,
    # autograd's pointwise backward ops: (grad, saved) -> grad
    "gelu_backward": 12, "silu_backward": 6, "threshold_backward": 1, "sigmoid_backward": 2,
    "tanh_backward": 2, "hardtanh_backward": 2, "leaky_relu_backward": 2, "elu_backward": 3,
    "softplus_backward": 4, "mish_backward": 8, "hardswish_backward": 4, "hardsigmoid_backward": 2,
    "native_dropout_backward": 1, "logit_backward": 3,
}
_BOOL_RESULT = {"eq", "ne", "lt", "le", "gt", "ge", "logical_and", "logical_or", "logical_xor", "logical_not",
                "isnan", "isinf", "isfinite"}
_FLOAT_RESULT = {"div", "sqrt", "rsqrt", "exp", "log", "sin", "cos", "tanh", "sigmoid", "erf", "reciprocal",
                 "log2", "log10", "log1p", "expm1", "exp2", "tan", "atan2", "logit"}


def _pointwise(base: str, flops_per_element: int) -> Rule:
    inplace_fill = base in ("fill", "zero")

    def price(a: _Args, _hint: str | None) -> OpCost:
        inplace = a.op.short.endswith("_")
        tensors = a.tensors()
        if not tensors:
            raise Unpriced("no tensor argument recorded")
        # A Python number is recorded as a 0-dim double or long tensor; it reaches the kernel as an
        # argument and moves no bytes (a real 0-dim CUDA tensor, e.g. a float32 loss, is read).
        operands = [t for t in tensors if not (t.shape == () and t.dtype in ("float64", "int64"))] or tensors
        if inplace:
            out = tensors[0]
            reads = [] if inplace_fill else operands
        else:
            shape = broadcast_shape([t.shape for t in tensors])
            dtype = result_dtype(tensors if base != "where" else tensors[1:] or tensors)
            if base in _BOOL_RESULT:
                dtype = "bool"
            elif base in _FLOAT_RESULT and dtype in _INT_RANK:
                dtype = "float32"
            out = TensorSpec(shape, dtype)
            reads = operands
        return _cost(reads, [out], flops_per_element * out.numel, dtype=_compute_dtype(out.dtype),
                     loop="strided", loop_elements=_strided(a, out, tensors))
    return price


for _name, _f in _UNARY_FLOPS.items():
    rule(*_inplace_names(_name))(_pointwise(_name, _f))
for _name, _f in _BINARY_FLOPS.items():
    rule(*_inplace_names(_name))(_pointwise(_name, _f))
# fill_/zero_ and the in-place random generators write self and read nothing (masked_fill_,
# registered above, reads self and the mask).
rule("fill_", "zero_")(_pointwise("fill", 0))
rule("bernoulli_", "uniform_", "normal_", "random_", "exponential_")(_pointwise("fill", 4))


@rule("masked_fill")
def _masked_fill(a: _Args, hint: str | None) -> OpCost:
    # Out-of-place: clone(self) then masked_fill_ (two kernels): read self, write out; then read
    # out and the mask, write out.
    x, mask = a.tensor(0), a.tensor(1)
    out = TensorSpec(broadcast_shape([x.shape, mask.shape]), x.dtype)
    # The clone is a plain copy; the masked_fill_ runs the strided loop when the mask broadcasts.
    return _cost([x, out, mask], [out, out], out.numel, dtype=_compute_dtype(x.dtype), kernels=2,
                 loop="strided", loop_elements=_strided(a, out, [x, mask]))


# -- views: no kernel ----------------------------------------------------------------------------
_VIEWS = ("view", "_unsafe_view", "reshape", "_reshape_alias", "as_strided", "t", "transpose", "permute", "expand",
          "expand_as", "unsqueeze", "squeeze", "slice", "select", "narrow", "split", "split_with_sizes", "chunk",
          "unbind", "alias", "detach", "detach_", "view_as", "unflatten", "flatten", "movedim", "numpy_T",
          "empty", "empty_like", "empty_strided", "resize_", "lift_fresh", "result_type", "item", "diagonal",
          "real", "imag", "_unsafe_split", "unfold", "type_as")


@rule(*_VIEWS)
def _view(a: _Args, hint: str | None) -> OpCost:
    # Views and allocations launch no kernel. reshape/flatten of a non-contiguous tensor copies,
    # but then the copy appears as its own child op (clone/copy_) and is priced there;
    # type_as to another dtype runs a child to/_to_copy, likewise.
    return OpCost(0, 0, 0, kernels=0)


# -- copies and casts ----------------------------------------------------------------------------
@rule("copy_")
def _copy(a: _Args, hint: str | None) -> OpCost:
    dst, src = a.tensor(0), a.tensor(1)
    # Read src once, write dst once (a broadcast src is read at its own size). A transposing copy
    # runs the strided loop: visible only where the record has strides.
    return _cost([src], [dst], 0, dtype=_compute_dtype(dst.dtype), loop="strided",
                 loop_elements=_strided(a, dst, [src]))


@rule("clone", "contiguous")
def _clone(a: _Args, hint: str | None) -> OpCost:
    # As leaves they never appear (their child copy_ launches the kernel); as composites, one
    # copy. contiguous() of a contiguous tensor is free, but only strides would tell.
    x = a.tensor(0)
    order = _dense_order(a.dims[0], a.strides[0]) if a.strides else ()
    if a.op.short == "contiguous" and order is not None and order == tuple(sorted(order)):
        return OpCost(0, 0, 0, kernels=0)
    return _cost([x], [x], 0, dtype=_compute_dtype(x.dtype), loop="strided",
                 loop_elements=x.numel if order is None or order != tuple(sorted(order)) else 0)


@rule("_to_copy")
def _to_copy(a: _Args, hint: str | None) -> OpCost:
    x = a.tensor(0)
    out_dtype = a.scalar_type(1) or x.dtype
    return _cost([x], [TensorSpec(x.shape, out_dtype)], 0, dtype=_compute_dtype(out_dtype))


@rule("to")
def _to(a: _Args, hint: str | None) -> OpCost:
    # Overloads, told apart by their argument count: to.dtype(self, dtype, non_blocking, copy,
    # memory_format), to.other(self, other, ...copy at 3), to.device(self, device, dtype,
    # non_blocking, copy, memory_format), to.dtype_layout(self, dtype, layout, device,
    # pin_memory, non_blocking, copy, memory_format).
    x = a.tensor(0)
    copy_index = {6: 4, 8: 6}.get(len(a), 3)
    if a.is_tensor(1) and a.dims[1] != []:
        out_dtype = a.tensor(1).dtype
    else:
        out_dtype = a.scalar_type(2) if len(a) == 6 else a.scalar_type(1)
        if out_dtype is None:
            raise Unpriced("to(): the target dtype is not recorded (a device move?)")
    if out_dtype == x.dtype and not a.bool_value(copy_index):
        return OpCost(0, 0, 0, kernels=0)             # returns self: no kernel
    return _cost([x], [TensorSpec(x.shape, out_dtype)], 0, dtype=_compute_dtype(out_dtype))


@rule("cat", "stack")
def _cat(a: _Args, hint: str | None) -> OpCost:
    parts = a.tensor_list(0, hint)
    numel = sum(p.numel for p in parts)
    out = TensorSpec((numel,), parts[0].dtype)   # flat: cat's output shape is not needed for bytes
    return _cost(parts, [out], 0, dtype=_compute_dtype(out.dtype))


@rule("slice_backward", "select_backward")
def _slice_backward(a: _Args, hint: str | None) -> OpCost:
    # zeros(input_sizes) then copy grad into the slice: two kernels.
    grad = a.tensor(0)
    sizes = a.int_list(1)
    if sizes is None:
        raise Unpriced("input_sizes are not recorded")
    full = TensorSpec(tuple(sizes), grad.dtype)
    return _cost([grad], [full, grad], 0, dtype=_compute_dtype(grad.dtype), kernels=2)


@rule("arange")
def _arange(a: _Args, hint: str | None) -> OpCost:
    nums = []
    for i in range(len(a)):
        if a.type(i) != "Scalar":
            break
        nums.append(a.float_value(i))
    if not nums:
        raise Unpriced("arange's bounds are not recorded")
    start, end, step = (0.0, nums[0], 1.0) if len(nums) == 1 else (nums[0], nums[1], nums[2] if len(nums) > 2 else 1.0)
    n = max(0, math.ceil((end - start) / step))
    out_dtype = next((TRACE_DTYPES[t][0] for t in a.types if t in TRACE_DTYPES), "int64")
    out = TensorSpec((n,), out_dtype)
    return _cost([], [out], n, dtype=_compute_dtype(out_dtype))


# -- reductions ----------------------------------------------------------------------------------
# name -> (index of the dim argument, index of the dtype= argument or None, extra outputs)
_REDUCTIONS = {
    "sum": (1, 3), "mean": (1, 3), "nansum": (1, 3), "prod": (1, 3), "amax": (1, None), "amin": (1, None),
    "linalg_vector_norm": (2, 4), "norm": (2, None), "var": (1, None), "std": (1, None), "logsumexp": (1, None),
    "any": (1, None), "all": (1, None), "count_nonzero": (1, None), "var_mean": (1, None), "std_mean": (1, None),
    "max": (1, None), "min": (1, None), "argmax": (1, None), "argmin": (1, None),
}


def _reduction(base: str) -> Rule:
    dim_index, dtype_index = _REDUCTIONS[base]

    def price(a: _Args, hint: str | None) -> OpCost:
        x = a.tensor(0)
        if a.is_tensor(1) and a.dims[1] != []:       # max(a, b) / min(a, b): pointwise
            return _pointwise(base, 1)(a, hint)
        dims = a.int_list(dim_index)
        given_dtype = a.scalar_type(dtype_index) if dtype_index is not None else None
        if a.type(dim_index) == "Scalar" and dims is None:
            if base in ("max", "min", "argmax", "argmin", "var", "std"):
                dims = [a.int_value(dim_index)]                 # max.dim(self, int dim)
            elif dim_index == 1:
                given_dtype = a.scalar_type(1)                  # sum(self, dtype): no dim
        nd = len(x.shape)
        reduced = set(range(nd)) if not dims else {d % nd for d in dims} if nd else set()
        out_shape = tuple(s for i, s in enumerate(x.shape) if i not in reduced)
        out_dtype = given_dtype or x.dtype
        if base in ("any", "all"):
            out_dtype = "bool"
        elif base in ("argmax", "argmin", "count_nonzero"):
            out_dtype = "int64"
        elif base in ("sum", "prod", "nansum") and x.dtype in _INT_RANK and given_dtype is None:
            out_dtype = "int64"                                 # integer sums accumulate in int64
        outs = [TensorSpec(out_shape, out_dtype)]
        if base in ("max", "min") and dims:              # max.dim returns values and int64 indices
            outs.append(TensorSpec(out_shape, "int64"))
        if base in ("var_mean", "std_mean"):
            outs.append(TensorSpec(out_shape, out_dtype))
        # logsumexp runs amax, then exp/sum/log in a second pass: two reads of x.
        reads = [x, x] if base == "logsumexp" else [x]
        flops = x.numel * (3 if base in ("var", "std", "var_mean", "std_mean", "linalg_vector_norm", "norm") else 1)
        return _cost(reads, outs, flops, dtype=_compute_dtype(x.dtype), kernels=2 if base == "logsumexp" else 1)
    return price


for _name in _REDUCTIONS:
    rule(_name)(_reduction(_name))


@rule("cumsum", "cumprod")
def _scan(a: _Args, hint: str | None) -> OpCost:
    x = a.tensor(0)
    out = TensorSpec(x.shape, a.scalar_type(2) or ("int64" if x.dtype in _INT_RANK else x.dtype))
    return _cost([x], [out], x.numel, dtype=_compute_dtype(x.dtype))


# -- softmax -------------------------------------------------------------------------------------
@rule("_softmax", "_log_softmax")
def _softmax_fwd(a: _Args, hint: str | None) -> OpCost:
    x = a.tensor(0)
    out = TensorSpec(x.shape, "float32" if a.bool_value(2) else x.dtype)   # half_to_float
    # Two passes over each row (max, then exp-sum-normalise): element-rate bound in the H200
    # fixtures (bf16 and fp32 rows of 512 take the same time).
    return _cost([x], [out], 5 * x.numel, dtype=_compute_dtype(x.dtype), loop="softmax", loop_elements=x.numel)


@rule("softmax", "log_softmax")
def _softmax_composite(a: _Args, hint: str | None) -> OpCost:
    x = a.tensor(0)
    out = TensorSpec(x.shape, a.scalar_type(2) or x.dtype)      # dtype=
    return _cost([x], [out], 5 * x.numel, dtype=_compute_dtype(out.dtype), loop="softmax", loop_elements=x.numel)


@rule("_softmax_backward_data", "_log_softmax_backward_data")
def _softmax_bwd(a: _Args, hint: str | None) -> OpCost:
    grad, out = a.tensor(0), a.tensor(1)
    grad_in = TensorSpec(grad.shape, a.scalar_type(3) or grad.dtype)    # input_dtype
    return _cost([grad, out], [grad_in], 4 * grad.numel, dtype=_compute_dtype(grad.dtype))


# -- normalization -------------------------------------------------------------------------------
def _rows(x: TensorSpec, normalized: int) -> tuple[int, int]:
    """(M rows, N elements per row) for a norm over the last `normalized` dims."""
    n = math.prod(x.shape[len(x.shape) - normalized:]) if normalized else 1
    return (x.numel // n if n else 0), n


@rule("native_layer_norm", "layer_norm")
def _layer_norm(a: _Args, hint: str | None) -> OpCost:
    # One kernel: read x, weight, bias; write y and the per-row mean and rstd (fp32, saved for
    # backward; layer_norm's composite writes them too).
    x = a.tensor(0)
    normalized = a.int_list(1)
    m, _ = _rows(x, len(normalized) if normalized else 1)
    reads = [x] + [t for t in (a.optional_tensor(2), a.optional_tensor(3)) if t is not None]
    stats = TensorSpec((m,), "float32")
    # Element-rate bound in the H200 fixtures (bf16 and fp32 take about the same time).
    return _cost(reads, [TensorSpec(x.shape, x.dtype), stats, stats], 8 * x.numel, dtype=_compute_dtype(x.dtype),
                 loop="norm", loop_elements=x.numel)


@rule("native_layer_norm_backward")
def _layer_norm_backward(a: _Args, hint: str | None) -> OpCost:
    # Two kernels, each a pass over dy and x: grad_input (reads dy, x, mean, rstd, weight;
    # writes dx) and gamma/beta (reads dy, x, mean, rstd; writes dweight, dbias).
    dy, x, mean, rstd = a.tensor(0), a.tensor(1), a.tensor(3), a.tensor(4)
    weight, bias = a.optional_tensor(5), a.optional_tensor(6)
    mask = [v.strip() == "True" for v in a.value(7).strip("[]").split(",")] if a.value(7) else [True, True, True]
    mask += [True] * (3 - len(mask))
    reads, writes, kernels = [], [], 0
    if mask[0]:
        reads += [dy, x, mean, rstd] + ([weight] if weight is not None else [])
        writes.append(TensorSpec(x.shape, x.dtype))
        kernels += 1
    if (mask[1] and weight is not None) or (mask[2] and bias is not None):
        reads += [dy, x, mean, rstd]
        writes += [t for t, want in ((weight, mask[1]), (bias, mask[2])) if t is not None and want]
        kernels += 1
    return _cost(reads, writes, 10 * x.numel, dtype=_compute_dtype(x.dtype), kernels=max(kernels, 1),
                 loop="norm", loop_elements=kernels * x.numel)


@rule("_fused_rms_norm", "rms_norm")
def _rms_norm(a: _Args, hint: str | None) -> OpCost:
    # One kernel (torch >= 2.8 on CUDA): read x and weight; write y and the fp32 rstd per row.
    x = a.tensor(0)
    normalized = a.int_list(1)
    m, _ = _rows(x, len(normalized) if normalized else 1)
    reads = [x] + [t for t in (a.optional_tensor(2),) if t is not None]
    return _cost(reads, [TensorSpec(x.shape, x.dtype), TensorSpec((m,), "float32")], 4 * x.numel,
                 dtype=_compute_dtype(x.dtype))


@rule("_fused_rms_norm_backward")
def _rms_norm_backward(a: _Args, hint: str | None) -> OpCost:
    # Two passes like LayerNorm's: dx (reads dy, x, rstd, weight) and dweight (reads dy, x, rstd).
    dy, x, rstd = a.tensor(0), a.tensor(1), a.tensor(3)
    weight = a.optional_tensor(4)
    reads = [dy, x, rstd] + ([weight] if weight is not None else [])
    writes = [TensorSpec(x.shape, x.dtype)]
    kernels = 1
    if weight is not None:
        reads += [dy, x, rstd]
        writes.append(weight)
        kernels = 2
    return _cost(reads, writes, 8 * x.numel, dtype=_compute_dtype(x.dtype), kernels=kernels)


@rule("native_group_norm")
def _group_norm(a: _Args, hint: str | None) -> OpCost:
    x = a.tensor(0)
    n, groups = a.int_value(3), a.int_value(6)
    reads = [x] + [t for t in (a.optional_tensor(1), a.optional_tensor(2)) if t is not None]
    stats = TensorSpec((n, groups), x.dtype)
    return _cost(reads, [TensorSpec(x.shape, x.dtype), stats, stats], 8 * x.numel, dtype=_compute_dtype(x.dtype),
                 kernels=2)


@rule("native_batch_norm", "cudnn_batch_norm", "_native_batch_norm_legit", "_native_batch_norm_legit_no_training")
def _batch_norm(a: _Args, hint: str | None) -> OpCost:
    # Training: a statistics pass and a normalize pass, each reading x.
    x = a.tensor(0)
    c = x.shape[1] if len(x.shape) > 1 else 1
    params = [t for t in (a.optional_tensor(i) for i in range(1, 5)) if t is not None]
    stats = TensorSpec((c,), "float32")
    return _cost([x, x] + params, [TensorSpec(x.shape, x.dtype), stats, stats], 8 * x.numel,
                 dtype=_compute_dtype(x.dtype), kernels=2)


# -- matmul --------------------------------------------------------------------------------------
def _gemm(m: int, n: int, k: int, batch: int, reads: list[TensorSpec], out: TensorSpec, extra_flops: int = 0) -> OpCost:
    dtype = reads[0].dtype if reads else out.dtype
    # FP32 GEMMs run on CUDA cores unless torch.backends.cuda.matmul.allow_tf32 is set, which the
    # trace does not record; the kernel name tells (class "gemm", "tf32"/"xmma...tf32").
    return _cost(reads, [out], 2 * m * n * k * batch + extra_flops, dtype=dtype,
                 tensor_core=dtype in TENSOR_CORE_DTYPES)


@rule("mm")
def _mm(a: _Args, hint: str | None) -> OpCost:
    x, w = a.tensor(0), a.tensor(1)
    (m, k), (_, n) = x.shape, w.shape
    return _gemm(m, n, k, 1, [x, w], TensorSpec((m, n), x.dtype))


@rule("addmm")
def _addmm(a: _Args, hint: str | None) -> OpCost:
    bias, x, w = a.tensor(0), a.tensor(1), a.tensor(2)
    (m, k), (_, n) = x.shape, w.shape
    return _gemm(m, n, k, 1, [x, w, bias], TensorSpec((m, n), x.dtype), extra_flops=2 * m * n)


@rule("bmm")
def _bmm(a: _Args, hint: str | None) -> OpCost:
    x, w = a.tensor(0), a.tensor(1)
    (b, m, k), (_, _, n) = x.shape, w.shape
    return _gemm(m, n, k, b, [x, w], TensorSpec((b, m, n), x.dtype))


@rule("baddbmm")
def _baddbmm(a: _Args, hint: str | None) -> OpCost:
    c, x, w = a.tensor(0), a.tensor(1), a.tensor(2)
    (b, m, k), (_, _, n) = x.shape, w.shape
    return _gemm(m, n, k, b, [x, w, c], TensorSpec((b, m, n), x.dtype), extra_flops=2 * b * m * n)


@rule("linear")
def _linear(a: _Args, hint: str | None) -> OpCost:
    x, w = a.tensor(0), a.tensor(1)
    bias = a.optional_tensor(2)
    k = x.shape[-1]
    m = x.numel // k if k else 0
    n = w.shape[0]
    reads = [x, w] + ([bias] if bias is not None else [])
    return _gemm(m, n, k, 1, reads, TensorSpec(x.shape[:-1] + (n,), x.dtype),
                 extra_flops=m * n if bias is not None else 0)


@rule("matmul")
def _matmul(a: _Args, hint: str | None) -> OpCost:
    x, w = a.tensor(0), a.tensor(1)
    if len(x.shape) == 0 or len(w.shape) == 0:
        raise Unpriced("matmul of a 0-dim tensor")
    xs = x.shape if len(x.shape) > 1 else (1,) + x.shape
    ws = w.shape if len(w.shape) > 1 else w.shape + (1,)
    m, k, n = xs[-2], xs[-1], ws[-1]
    batch_shape = broadcast_shape([xs[:-2], ws[:-2]])
    out_shape = batch_shape + ((m,) if len(x.shape) > 1 else ()) + ((n,) if len(w.shape) > 1 else ())
    return _gemm(m, n, k, math.prod(batch_shape), [x, w], TensorSpec(out_shape, x.dtype))


@rule("mv", "addmv")
def _mv(a: _Args, hint: str | None) -> OpCost:
    off = 1 if a.op.short == "addmv" else 0
    mat, vec = a.tensor(off), a.tensor(off + 1)
    m, k = mat.shape
    reads = [mat, vec] + ([a.tensor(0)] if off else [])
    return _cost(reads, [TensorSpec((m,), mat.dtype)], 2 * m * k, dtype=mat.dtype)


# -- convolution ---------------------------------------------------------------------------------
def _conv_out(size: int, k: int, stride: int, pad: int, dil: int, transposed: bool, out_pad: int) -> int:
    if transposed:
        return (size - 1) * stride - 2 * pad + dil * (k - 1) + out_pad + 1
    return (size + 2 * pad - dil * (k - 1) - 1) // stride + 1


def _conv_geometry(a: _Args, stride_i: int, pad_i: int, dil_i: int, transposed: bool, out_pad_i: int | None,
                   groups_i: int, x: TensorSpec, w: TensorSpec) -> tuple[TensorSpec, int]:
    spatial = len(x.shape) - 2
    if spatial < 1 or len(w.shape) != spatial + 2:
        raise Unpriced(f"convolution shapes {x.shape} and {w.shape} are not N,C,spatial")
    def listed(i: int | None, default: int) -> list[int]:
        vals = a.int_list(i) if i is not None else None
        if not vals:
            return [default] * spatial
        return vals * spatial if len(vals) == 1 else vals
    stride, pad, dil = listed(stride_i, 1), listed(pad_i, 0), listed(dil_i, 1)
    out_pad = listed(out_pad_i, 0)
    groups = a.int_value(groups_i, 1)
    out_c = w.shape[1] * groups if transposed else w.shape[0]
    sizes = [_conv_out(x.shape[2 + i], w.shape[2 + i], stride[i], pad[i], dil[i], transposed, out_pad[i])
             for i in range(spatial)]
    out = TensorSpec((x.shape[0], out_c) + tuple(sizes), x.dtype)
    # MACs: every output (or, transposed, every input) element sums over C/groups x kernel.
    kernel_volume = math.prod(w.shape[2:])
    macs = (x.numel * w.shape[1] if transposed else out.numel * w.shape[1]) * kernel_volume
    return out, 2 * macs


@rule("convolution", "_convolution", "conv1d", "conv2d", "conv3d")
def _conv(a: _Args, hint: str | None) -> OpCost:
    x, w = a.tensor(0), a.tensor(1)
    bias = a.optional_tensor(2)
    short = a.op.short
    if short in ("conv1d", "conv2d", "conv3d"):          # (input, weight, bias, stride, padding, dilation, groups)
        out, flops = _conv_geometry(a, 3, 4, 5, False, None, 6, x, w)
    else:
        out, flops = _conv_geometry(a, 3, 4, 5, a.bool_value(6), 7, 8, x, w)
    reads = [x, w] + ([bias] if bias is not None else [])
    return _cost(reads, [out], flops, dtype=x.dtype, tensor_core=x.dtype in TENSOR_CORE_DTYPES)


@rule("cudnn_convolution", "cudnn_convolution_transpose")
def _cudnn_conv(a: _Args, hint: str | None) -> OpCost:
    x, w = a.tensor(0), a.tensor(1)
    if a.op.short == "cudnn_convolution":                # (self, weight, padding, stride, dilation, groups, ...)
        out, flops = _conv_geometry(a, 3, 2, 4, False, None, 5, x, w)
    else:                                                # (self, weight, padding, output_padding, stride, dilation, groups)
        out, flops = _conv_geometry(a, 4, 2, 5, True, 3, 6, x, w)
    return _cost([x, w], [out], flops, dtype=x.dtype, tensor_core=x.dtype in TENSOR_CORE_DTYPES)


@rule("convolution_backward")
def _conv_backward(a: _Args, hint: str | None) -> OpCost:
    dy, x, w = a.tensor(0), a.tensor(1), a.tensor(2)
    _, fwd_flops = _conv_geometry(a, 4, 5, 6, a.bool_value(7), 8, 9, x, w)
    text = a.value(10).strip("[]")
    mask = [v.strip() == "True" for v in text.split(",")] if text else [True, True, True]
    mask += [True] * (3 - len(mask))
    reads, writes, flops, kernels = [], [], 0, 0
    if mask[0]:                                          # dgrad: dy x W
        reads += [dy, w]
        writes.append(x)
        flops += fwd_flops
        kernels += 1
    if mask[1]:                                          # wgrad: dy x x
        reads += [dy, x]
        writes.append(w)
        flops += fwd_flops
        kernels += 1
    if mask[2]:                                          # dbias: a reduction of dy
        reads.append(dy)
        writes.append(TensorSpec((w.shape[0],), dy.dtype))
        kernels += 1
    return _cost(reads, writes, flops, dtype=x.dtype, tensor_core=x.dtype in TENSOR_CORE_DTYPES, kernels=max(kernels, 1))


# -- attention -----------------------------------------------------------------------------------
# name -> (layout of q/k/v: "bhsd" or "bshd", index of is_causal (bool) or of custom_mask_type
#          (int, 1 = causal) as ("bool"|"mask", index), backward?)
_ATTENTION = {
    "scaled_dot_product_attention": ("bhsd", ("bool", 5), False),
    "_scaled_dot_product_flash_attention": ("bhsd", ("bool", 4), False),
    "_scaled_dot_product_efficient_attention": ("bhsd", ("bool", 6), False),
    "_scaled_dot_product_cudnn_attention": ("bhsd", ("bool", 6), False),
    "_cudnn_attention_forward": ("bhsd", ("bool", 10), False),
    "_flash_attention_forward": ("bshd", ("bool", 8), False),
    "_efficient_attention_forward": ("bshd", ("mask", 9), False),
    "_scaled_dot_product_flash_attention_backward": ("bhsd", ("bool", 11), True),
    "_scaled_dot_product_efficient_attention_backward": ("bhsd", ("bool", 11), True),
    "_scaled_dot_product_cudnn_attention_backward": ("bhsd", ("bool", 14), True),
    "_cudnn_attention_backward": ("bhsd", ("bool", 14), True),
    "_flash_attention_backward": ("bshd", ("bool", 11), True),
    "_efficient_attention_backward": ("bshd", ("mask", 14), True),
}


def _attention(name: str) -> Rule:
    layout, (flag_kind, flag_i), backward = _ATTENTION[name]

    def price(a: _Args, hint: str | None) -> OpCost:
        off = 1 if backward else 0                     # backward ops take grad_out first
        q, k, v = a.tensor(off), a.tensor(off + 1), a.tensor(off + 2)
        if len(q.shape) != 4:
            raise Unpriced(f"attention query of rank {len(q.shape)}")
        if layout == "bhsd":
            b, h, sq, d = q.shape
            sk = k.shape[2]
        else:
            b, sq, h, d = q.shape
            sk = k.shape[1]
        dv = v.shape[-1]
        causal = a.bool_value(flag_i) if flag_kind == "bool" else a.int_value(flag_i, 0) == 1
        # Query-key pairs computed: all, or (causal, aligned top-left) row i sees min(i+1, sk) keys.
        if causal:
            full_rows = max(0, sq - sk)
            pairs = (min(sq, sk) * (min(sq, sk) + 1)) // 2 + full_rows * sk
        else:
            pairs = sq * sk
        fwd_flops = 2 * b * h * pairs * (d + dv)           # QK^T and PV
        lse = TensorSpec((b, h, sq), "float32")
        out = TensorSpec(q.shape[:-1] + (dv,), q.dtype)
        if not backward:
            return _cost([q, k, v], [out, lse], fwd_flops, dtype=q.dtype, tensor_core=q.dtype in TENSOR_CORE_DTYPES)
        # Backward recomputes QK^T and runs four more products (dV, dP, dQ, dK): 2.5x forward.
        dout = a.tensor(0)
        return _cost([dout, q, k, v, out, lse], [q, k, v], fwd_flops * 5 // 2, dtype=q.dtype,
                     tensor_core=q.dtype in TENSOR_CORE_DTYPES)
    return price


for _name in _ATTENTION:
    rule(_name)(_attention(_name))


# -- embedding, gather, dropout, loss ------------------------------------------------------------
@rule("embedding")
def _embedding(a: _Args, hint: str | None) -> OpCost:
    weight, idx = a.tensor(0), a.tensor(1)
    out = TensorSpec(idx.shape + weight.shape[1:], weight.dtype)
    # Reads the indices and one weight row per index (rows gathered: counted once per index).
    return _cost([idx, out], [out], 0, dtype=_compute_dtype(weight.dtype))


@rule("index_select")
def _index_select(a: _Args, hint: str | None) -> OpCost:
    x, idx = a.tensor(0), a.tensor(2)
    dim = a.int_value(1) % max(len(x.shape), 1)
    out = TensorSpec(x.shape[:dim] + (idx.numel,) + x.shape[dim + 1:], x.dtype)
    return _cost([idx, out], [out], 0, dtype=_compute_dtype(x.dtype))


@rule("gather")
def _gather(a: _Args, hint: str | None) -> OpCost:
    x, idx = a.tensor(0), a.tensor(2)
    out = TensorSpec(idx.shape, x.dtype)
    dim = a.int_value(1) % max(len(x.shape), 1)
    # index_select/embedding lower to gather along dim 0 with the index expanded over the other
    # dims (stride 0): the kernel reads one index per row. Otherwise every index is read.
    if dim == 0 and len(idx.shape) == len(x.shape) and idx.shape[1:] == x.shape[1:]:
        idx_read = TensorSpec((idx.shape[0],), idx.dtype)
    else:
        idx_read = idx
    return _cost([idx_read, out], [out], 0, dtype=_compute_dtype(x.dtype))


@rule("embedding_dense_backward", "embedding_backward")
def _embedding_backward(a: _Args, hint: str | None) -> OpCost:
    # Read the gradient rows and the indices; write the whole weight gradient (zeroed, then rows
    # accumulated). Large index counts add a radix sort of the indices (several more kernels, a
    # few passes over the int64 indices).
    grad, idx = a.tensor(0), a.tensor(1)
    num_weights = a.int_value(2)
    dw = TensorSpec((num_weights,) + grad.shape[len(idx.shape):], grad.dtype)
    return _cost([grad, idx], [dw], grad.numel, dtype=_compute_dtype(grad.dtype))


@rule("native_dropout", "dropout")
def _dropout(a: _Args, hint: str | None) -> OpCost:
    x = a.tensor(0)
    if a.value(2) == "False":                        # train=False: returns the input, no kernel
        return OpCost(0, 0, 0, kernels=0)
    # Read x; write y and the bool keep-mask (saved for backward).
    return _cost([x], [TensorSpec(x.shape, x.dtype), TensorSpec(x.shape, "bool")], 3 * x.numel,
                 dtype=_compute_dtype(x.dtype))


@rule("nll_loss_forward")
def _nll_loss(a: _Args, hint: str | None) -> OpCost:
    logp, target = a.tensor(0), a.tensor(1)
    weight = a.optional_tensor(2)
    rows = target.numel
    reduction = a.int_value(3, 1)
    picked = TensorSpec((rows,), logp.dtype)             # one gathered element per row
    reads = [target, picked] + ([TensorSpec((rows,), weight.dtype)] if weight is not None else [])
    out = TensorSpec((rows,) if reduction == 0 else (), logp.dtype)
    return _cost(reads, [out, TensorSpec((), logp.dtype)], 2 * rows, dtype=_compute_dtype(logp.dtype))


@rule("nll_loss_backward")
def _nll_loss_backward(a: _Args, hint: str | None) -> OpCost:
    # Writes one element per row of grad_input; zeroing the rest is a separate fill_ op.
    grad_out, logp, target = a.tensor(0), a.tensor(1), a.tensor(2)
    rows = target.numel
    return _cost([grad_out, target], [TensorSpec((rows,), logp.dtype)], rows, dtype=_compute_dtype(logp.dtype))


# -- what we do not price ------------------------------------------------------------------------
_NO_RULE_REASONS = [
    (re.compile(r"^aten::_foreach_"), "a multi-tensor (foreach) op: the profiler records no shapes inside its TensorLists"),
    (re.compile(r"^aten::_fused_adam"), "a fused optimizer step: the profiler records no shapes inside its TensorLists"),
    (re.compile(r"^aten::_local_scalar_dense$|^aten::item$"), "a device-to-host copy of one value: a synchronisation, priced by latency, not bytes"),
    (re.compile(r"^(nccl|c10d|_c10d)|::(all_reduce|allreduce|all_gather|reduce_scatter|broadcast)"), "a collective: priced by the interconnect, not HBM"),
    (re.compile(r"^triton_|CompiledFunction|torch_compile|Torch-Compiled"), "a compiled (torch.compile / Triton) kernel: its op has no recorded shapes"),
]


def _price(op: OpRecord, dtype_hint: str | None) -> OpCost | str:
    fn = _RULES.get(op.name) or _RULES.get("aten::" + op.name)
    if fn is None:
        for rx, why in _NO_RULE_REASONS:
            if rx.search(op.name):
                return why
        return f"no cost rule for {op.name}"
    try:
        return fn(_Args(op), dtype_hint)
    except Unpriced as exc:
        return f"{op.name}: {exc}"
    except (IndexError, ValueError, TypeError, KeyError, ZeroDivisionError) as exc:
        return f"{op.name}: recorded arguments do not fit its rule ({type(exc).__name__}: {exc})"


def op_cost(op: OpRecord, dtype_hint: str | None = None) -> OpCost | None:
    """Bytes and FLOPs of the kernel(s) `op` launches; None when there is no rule or the record
    lacks what the rule needs. `dtype_hint` is the dtype to assume where the trace records none
    (inside a TensorList: cat, stack); without it such ops are unknown."""
    cost = _price(op, dtype_hint)
    return cost if isinstance(cost, OpCost) else None


def unknown_reason(op: OpRecord, dtype_hint: str | None = None) -> str:
    """Why `op_cost(op)` is None ("" when it is not)."""
    cost = _price(op, dtype_hint)
    return "" if isinstance(cost, OpCost) else cost


def priced_ops() -> list[str]:
    """Names of every op with a rule."""
    return sorted(_RULES)
