"""The supported aten ops: how to read each one's traced arguments, its forward as a Triton
expression, its local derivative, and its eager call.

A traced op lists its positional arguments in three parallel columns (Input Dims, Input type,
Concrete Inputs). Each argument is classified by `classify`:
  tensor   a tensor of a known dtype, with its dims (a 0-dim float tensor is a tensor too)
  number   a Python number passed where aten takes a Tensor (`y * 0.5` records `double`, dims [],
           no value): the profiler does not record its value, so it becomes a runtime scalar
           argument of the generated kernel
  scalar   an aten Scalar whose value the trace records (`clamp` bounds, `alpha`, `pow` exponents)
  none     an argument that is None, or a string (torch records neither)

An OpSpec names each positional slot: a *value* slot is an operand (tensor, number or scalar);
a *param* slot is a constant the op is specialised on (alpha, a slope, a dim, a dtype). Forward
expressions work in fp32 on operand expressions; `backward` returns, for each value slot, the
expression of d(out)/d(operand) * g (None where no gradient flows).
"""
from __future__ import annotations

import ast
import math
from dataclasses import dataclass
from typing import Any, Callable

import torch

from fusion_advisor.core.errors import AdvisorError
from fusion_advisor.kernels.registry import dtype_from_trace

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# c10::ScalarType codes as the profiler records a `dtype` argument.
_SCALAR_TYPE_CODES = {5: torch.float16, 6: torch.float32, 7: torch.float64, 15: torch.bfloat16,
                      0: torch.uint8, 1: torch.int8, 2: torch.int16, 3: torch.int32, 4: torch.int64,
                      11: torch.bool}
_NUMBER_TYPES = ("double", "long int", "bool")


class Unsupported(AdvisorError):
    """An op that cannot join a generated kernel; the message says why, in one line."""


@dataclass(frozen=True)
class Arg:
    kind: str                      # "tensor" | "number" | "scalar" | "none"
    dims: tuple = ()
    dtype: torch.dtype | None = None
    value: Any = None              # the parsed value of a "scalar"
    type_name: str = ""


def parse_literal(text: str) -> Any:
    """A Concrete Inputs string as a Python value: '1' -> 1, '3.' -> 3.0, '-inf' -> -inf,
    'False' -> False, '[-1]' -> [-1]."""
    text = text.strip()
    if text in ("True", "False"):
        return text == "True"
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        pass
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def classify(dims: Any, type_name: str, concrete: str) -> Arg:
    dims = tuple(dims) if isinstance(dims, (list, tuple)) else ()
    concrete = concrete or ""
    if type_name in ("Scalar", "ScalarList"):
        if concrete == "":
            return Arg("number", (), None, None, type_name)
        return Arg("scalar", (), None, parse_literal(concrete), type_name)
    if type_name in _NUMBER_TYPES and dims == ():
        return Arg("number", (), None, None, type_name)
    dtype = dtype_from_trace(type_name)
    if dtype is not None:
        return Arg("tensor", tuple(int(d) for d in dims), dtype, None, type_name)
    if concrete:                      # a string argument, if a profiler ever records one (gelu's "tanh")
        return Arg("scalar", (), None, parse_literal(concrete), type_name)
    return Arg("none", type_name=type_name)


def dtype_from_code(value: Any) -> torch.dtype:
    if isinstance(value, int) and value in _SCALAR_TYPE_CODES:
        return _SCALAR_TYPE_CODES[value]
    raise Unsupported(f"unknown dtype code {value!r}")


# -- Triton literal and expression helpers --------------------------------------------------------
def lit(value: float) -> str:
    """A constant as Triton source, parenthesised when negative."""
    value = float(value)
    if math.isnan(value):
        return 'float("nan")'
    if math.isinf(value):
        return '(-float("inf"))' if value < 0 else 'float("inf")'
    text = repr(value)
    return f"({text})" if value < 0 else text


def _clamp(x: str, lo: str | None, hi: str | None) -> str:
    if lo is not None:
        x = f"tl.maximum({x}, {lo})"
    if hi is not None:
        x = f"tl.minimum({x}, {hi})"
    return x


def _in_range(x: str, lo: str | None, hi: str | None, inclusive: bool) -> str | None:
    ge, le = (">=", "<=") if inclusive else (">", "<")
    terms = [f"({x} {ge} {lo})" if lo is not None else None, f"({x} {le} {hi})" if hi is not None else None]
    terms = [t for t in terms if t]
    return " & ".join(terms) if terms else None


def pow_expr(x: str, e: float) -> str:
    """x ** e in fp32: products for small integer exponents, exp2/log2 otherwise (torch gives nan
    for a negative base with a fractional exponent, and so does log2)."""
    if e == 0:
        return f"({x} * 0.0 + 1.0)"
    if e == 0.5:
        return f"tl.sqrt({x})"
    if e == -0.5:
        return f"tl.rsqrt({x})"
    if float(e).is_integer() and abs(e) <= 4:
        prod = " * ".join([x] * int(abs(e)))
        return f"({prod})" if e > 0 else f"(1.0 / ({prod}))"
    if float(e).is_integer():
        odd = int(e) % 2 == 1
        mag = f"tl.exp2({lit(e)} * tl.log2(tl.abs({x})))"
        return f"tl.where({x} < 0.0, -{mag}, {mag})" if odd else mag
    return f"tl.exp2({lit(e)} * tl.log2({x}))"


# -- the table ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Slot:
    name: str
    role: str                  # "value" | "param" | "ignore"
    default: Any = None
    kwonly: bool = False       # passed by keyword in the eager call


# Table shorthands: V(name) an operand slot, P(name, default) a param slot, IGNORE an argument
# (non_blocking, memory_format...) that changes nothing the kernel computes.
V = lambda name: Slot(name, "value")                                    # noqa: E731
P = lambda name, default=None, kwonly=False: Slot(name, "param", default, kwonly)  # noqa: E731
IGNORE = Slot("_", "ignore")

Forward = Callable[[list[str], dict], str]
Backward = Callable[[list[str], str, str, dict], list[str | None]]


@dataclass(frozen=True)
class OpSpec:
    name: str
    slots: tuple[Slot, ...]
    forward: Forward | None = None        # None for reductions (emitted by the kernel writer)
    backward: Backward | None = None
    kind: str = "pointwise"               # "pointwise" | "cast" | "reduction"
    check: Callable[[list[Arg], dict], str | None] | None = None   # (all args, params) -> why unsupported
    positive_operands: tuple[int, ...] = ()  # value slots whose domain is x > 0 (make_inputs draws them so)


def _unary(name, fwd, bwd, **kw) -> OpSpec:
    return OpSpec(name, (V("self"),), lambda x, p: fwd(x[0]), lambda x, y, g, p: [bwd(x[0], y, g)], **kw)


_SPECS: dict[str, OpSpec] = {}


def _add(spec: OpSpec) -> None:
    _SPECS[spec.name] = spec


def _alpha(p: dict, expr: str) -> str:
    a = p.get("alpha", 1)
    return expr if a == 1 else f"{lit(a)} * {expr}"


def _no_div_mode(args: list[Arg], p: dict) -> str | None:
    return "div with a rounding_mode (torch does not record which)" if len(args) > 2 else None


_add(OpSpec("add", (V("self"), V("other"), P("alpha", 1, kwonly=True)),
            lambda x, p: f"{x[0]} + {_alpha(p, x[1])}",
            lambda x, y, g, p: [g, _alpha(p, g)]))
_add(OpSpec("sub", (V("self"), V("other"), P("alpha", 1, kwonly=True)),
            lambda x, p: f"{x[0]} - {_alpha(p, x[1])}",
            lambda x, y, g, p: [g, f"-{_alpha(p, g)}"]))
_add(OpSpec("rsub", (V("self"), V("other"), P("alpha", 1, kwonly=True)),
            lambda x, p: f"{x[1]} - {_alpha(p, x[0])}",
            lambda x, y, g, p: [f"-{_alpha(p, g)}", g]))
_add(OpSpec("mul", (V("self"), V("other")),
            lambda x, p: f"{x[0]} * {x[1]}",
            lambda x, y, g, p: [f"{g} * {x[1]}", f"{g} * {x[0]}"]))
_add(OpSpec("div", (V("self"), V("other"), IGNORE),
            lambda x, p: f"{x[0]} / {x[1]}",
            lambda x, y, g, p: [f"{g} / {x[1]}", f"-{g} * {x[0]} / ({x[1]} * {x[1]})"],
            check=_no_div_mode, positive_operands=(1,)))
# Ties split the gradient in halves, as torch's minimum/maximum backward does.
_add(OpSpec("minimum", (V("self"), V("other")),
            lambda x, p: f"tl.minimum({x[0]}, {x[1]})",
            lambda x, y, g, p: [f"tl.where({x[0]} == {x[1]}, 0.5 * {g}, tl.where({x[0]} < {x[1]}, {g}, 0.0))",
                                f"tl.where({x[0]} == {x[1]}, 0.5 * {g}, tl.where({x[1]} < {x[0]}, {g}, 0.0))"]))
_add(OpSpec("maximum", (V("self"), V("other")),
            lambda x, p: f"tl.maximum({x[0]}, {x[1]})",
            lambda x, y, g, p: [f"tl.where({x[0]} == {x[1]}, 0.5 * {g}, tl.where({x[0]} > {x[1]}, {g}, 0.0))",
                                f"tl.where({x[0]} == {x[1]}, 0.5 * {g}, tl.where({x[1]} > {x[0]}, {g}, 0.0))"]))
_add(OpSpec("where", (V("condition"), V("self"), V("other")),
            lambda x, p: f"tl.where({x[0]}, {x[1]}, {x[2]})",
            lambda x, y, g, p: [None, f"tl.where({x[0]}, {g}, 0.0)", f"tl.where({x[0]}, 0.0, {g})"]))
_add(OpSpec("masked_fill", (V("self"), V("mask"), V("value")),
            lambda x, p: f"tl.where({x[1]}, {x[2]}, {x[0]})",
            lambda x, y, g, p: [f"tl.where({x[1]}, 0.0, {g})", None, f"tl.where({x[1]}, {g}, 0.0)"]))


def _bounds(x: list[str]) -> tuple[str | None, str | None]:
    return (None if x[1] == "None" else x[1]), (None if x[2] == "None" else x[2])


def _scalar_bounds(args: list[Arg], p: dict) -> str | None:
    if any(a.kind == "tensor" for a in args[1:]):
        return "clamp with tensor bounds"
    return None


_add(OpSpec("clamp", (V("self"), V("min"), V("max")),
            lambda x, p: _clamp(x[0], *_bounds(x)),
            lambda x, y, g, p: [_masked(g, _in_range(x[0], *_bounds(x), inclusive=True)), None, None],
            check=_scalar_bounds))
_add(OpSpec("clamp_min", (V("self"), V("min")),
            lambda x, p: _clamp(x[0], x[1], None),
            lambda x, y, g, p: [_masked(g, _in_range(x[0], x[1], None, inclusive=True)), None],
            check=_scalar_bounds))
_add(OpSpec("clamp_max", (V("self"), V("max")),
            lambda x, p: _clamp(x[0], None, x[1]),
            lambda x, y, g, p: [_masked(g, _in_range(x[0], None, x[1], inclusive=True)), None],
            check=_scalar_bounds))


def _masked(g: str, cond: str | None) -> str:
    return g if cond is None else f"tl.where({cond}, {g}, 0.0)"


_add(OpSpec("hardtanh", (V("self"), P("min_val", -1.0), P("max_val", 1.0)),
            lambda x, p: _clamp(x[0], lit(p["min_val"]), lit(p["max_val"])),
            # torch's hardtanh_backward passes the gradient strictly inside the bounds (clamp: inclusive).
            lambda x, y, g, p: [_masked(g, _in_range(x[0], lit(p["min_val"]), lit(p["max_val"]), inclusive=False))]))
_add(OpSpec("leaky_relu", (V("self"), P("negative_slope", 0.01)),
            lambda x, p: f"tl.where({x[0]} > 0.0, {x[0]}, {x[0]} * {lit(p['negative_slope'])})",
            lambda x, y, g, p: [f"tl.where({x[0]} > 0.0, {g}, {g} * {lit(p['negative_slope'])})"]))
_add(OpSpec("softplus", (V("self"), P("beta", 1.0), P("threshold", 20.0)),
            lambda x, p: f"softplus_f32({x[0]}, {lit(p['beta'])}, {lit(p['threshold'])})",
            lambda x, y, g, p: [f"tl.where({x[0]} * {lit(p['beta'])} > {lit(p['threshold'])}, {g}, "
                                f"{g} * tl.sigmoid({x[0]} * {lit(p['beta'])}))"]))


def _gelu_approximate(args: list[Arg], p: dict) -> str | None:
    if p.get("approximate") not in ("none", "tanh"):
        return f"gelu approximate={p.get('approximate')!r}"
    return None


_add(OpSpec("gelu", (V("self"), P("approximate", "none", kwonly=True)),
            lambda x, p: f"gelu_{'tanh' if p['approximate'] == 'tanh' else 'erf'}({x[0]})",
            lambda x, y, g, p: [f"{g} * gelu_{'tanh' if p['approximate'] == 'tanh' else 'erf'}_grad({x[0]})"],
            check=_gelu_approximate))
_add(OpSpec("pow", (V("self"), P("exponent")),
            lambda x, p: pow_expr(x[0], p["exponent"]),
            lambda x, y, g, p: ["0.0 * " + g if p["exponent"] == 0 else
                                f"{g} * {lit(p['exponent'])} * {pow_expr(x[0], p['exponent'] - 1)}"],
            check=lambda a, p: None if isinstance(p.get("exponent"), (int, float)) and not isinstance(p["exponent"], bool)
            else f"pow with exponent {p.get('exponent')!r}", positive_operands=(0,)))

_add(OpSpec("clone", (V("self"), IGNORE), lambda x, p: x[0], lambda x, y, g, p: [g]))
_add(_unary("neg", lambda x: f"-{x}", lambda x, y, g: f"-{g}"))
_add(_unary("abs", lambda x: f"tl.abs({x})", lambda x, y, g: f"tl.where({x} > 0.0, {g}, tl.where({x} < 0.0, -{g}, 0.0))"))
_add(_unary("reciprocal", lambda x: f"1.0 / {x}", lambda x, y, g: f"-{g} * {y} * {y}", positive_operands=(0,)))
_add(_unary("relu", lambda x: f"tl.maximum({x}, 0.0)", lambda x, y, g: f"tl.where({y} > 0.0, {g}, 0.0)"))
_add(_unary("sigmoid", lambda x: f"tl.sigmoid({x})", lambda x, y, g: f"{g} * {y} * (1.0 - {y})"))
_add(_unary("tanh", lambda x: f"tanh_f32({x})", lambda x, y, g: f"{g} * (1.0 - {y} * {y})"))
_add(_unary("silu", lambda x: f"{x} * tl.sigmoid({x})", lambda x, y, g: f"{g} * silu_grad({x})"))
_add(_unary("mish", lambda x: f"{x} * tanh_f32(softplus_f32({x}, 1.0, 20.0))", lambda x, y, g: f"{g} * mish_grad({x})"))
_add(_unary("hardswish", lambda x: f"{x} * tl.minimum(tl.maximum({x} + 3.0, 0.0), 6.0) / 6.0",
            # as torch's hardswish_backward: 0 up to -3 inclusive, the slope strictly below 3, then g
            lambda x, y, g: f"tl.where({x} <= -3.0, 0.0, tl.where({x} < 3.0, {g} * ({x} / 3.0 + 0.5), {g}))"))
_add(_unary("hardsigmoid", lambda x: f"tl.minimum(tl.maximum({x} + 3.0, 0.0), 6.0) / 6.0",
            lambda x, y, g: f"tl.where(({x} > -3.0) & ({x} < 3.0), {g} / 6.0, 0.0)"))
_add(_unary("exp", lambda x: f"tl.exp({x})", lambda x, y, g: f"{g} * {y}"))
# erf: hand-written exact GELU, x * 0.5 * (1 + erf(x / sqrt(2))); d/dx = 2 / sqrt(pi) * exp(-x^2)
_add(_unary("erf", lambda x: f"tl.erf({x})", lambda x, y, g: f"{g} * 1.1283791670955126 * tl.exp(-{x} * {x})"))
_add(_unary("log", lambda x: f"tl.log({x})", lambda x, y, g: f"{g} / {x}", positive_operands=(0,)))
_add(_unary("sqrt", lambda x: f"tl.sqrt({x})", lambda x, y, g: f"{g} / (2.0 * {y})", positive_operands=(0,)))
_add(_unary("rsqrt", lambda x: f"tl.rsqrt({x})", lambda x, y, g: f"-0.5 * {g} * {y} * {y} * {y}", positive_operands=(0,)))

# Casts: the value is rounded to the target dtype, as eager does; the gradient is rounded back
# to the source dtype (ToCopyBackward). The kernel writer emits both from the node's dtypes.
_add(OpSpec("to", (V("self"), P("dtype"), IGNORE, IGNORE, IGNORE), kind="cast"))
_add(OpSpec("_to_copy", (V("self"), P("dtype", None, kwonly=True), IGNORE, IGNORE, IGNORE, IGNORE, IGNORE), kind="cast"))

# Reductions over one dim or a block of adjacent dims: the kernel writer emits them (they need the
# whole row, the reduced dims, in one tile).
_add(OpSpec("sum", (V("self"), P("dim"), P("keepdim", False), P("dtype", None, kwonly=True)), kind="reduction"))
_add(OpSpec("mean", (V("self"), P("dim"), P("keepdim", False), P("dtype", None, kwonly=True)), kind="reduction"))
_add(OpSpec("amax", (V("self"), P("dim", ()), P("keepdim", False)), kind="reduction"))
_add(OpSpec("max", (V("self"), P("dim"), P("keepdim", False)), kind="reduction"))
_add(OpSpec("softmax", (V("self"), P("dim"), P("dtype")), kind="reduction"))
_add(OpSpec("_softmax", (V("self"), P("dim"), P("half_to_float", False)), kind="reduction"))
_add(OpSpec("log_softmax", (V("self"), P("dim"), P("dtype")), kind="reduction"))
_add(OpSpec("_log_softmax", (V("self"), P("dim"), P("half_to_float", False)), kind="reduction"))

REDUCTION_KINDS = {"sum": "sum", "mean": "mean", "amax": "amax", "max": "max", "softmax": "softmax",
                   "_softmax": "softmax", "log_softmax": "log_softmax", "_log_softmax": "log_softmax"}


def lookup(short_name: str) -> tuple[OpSpec, bool]:
    """(spec, in_place) for 'add' / 'add_'; Unsupported if neither is in the table."""
    inplace = short_name.endswith("_") and not short_name.startswith("_")
    base = short_name[:-1] if inplace else short_name
    if base not in _SPECS:
        raise Unsupported(f"{short_name} is not a supported pointwise op or reduction")
    spec = _SPECS[base]
    if inplace and spec.kind != "pointwise":
        raise Unsupported(f"in-place {short_name}")
    return spec, inplace


def supported_names() -> list[str]:
    return sorted(_SPECS)


def parse_args(spec: OpSpec, args: list[Arg]) -> tuple[list[Arg], dict]:
    """Split a traced op's arguments into value operands and params (defaults filled in)."""
    if len(args) > len(spec.slots):
        raise Unsupported(f"{spec.name} with {len(args)} arguments (expected at most {len(spec.slots)})")
    values, params = [], {}
    for i, slot in enumerate(spec.slots):
        arg = args[i] if i < len(args) else Arg("none")
        if slot.role == "value":
            values.append(arg)
        elif slot.role == "param":
            params[slot.name] = _param_value(spec, slot, arg)
    return values, params


def _param_value(spec: OpSpec, slot: Slot, arg: Arg) -> Any:
    if arg.kind == "none":
        return slot.default
    if slot.name == "dtype" and arg.kind == "tensor" and spec.name == "to":
        return arg.dtype                       # to(other): the other tensor's dtype
    if arg.kind == "tensor":
        raise Unsupported(f"{spec.name} with a tensor {slot.name}")
    if arg.kind != "scalar":
        raise Unsupported(f"{spec.name}: argument {slot.name} is not a recorded constant ({arg.type_name or 'none'})")
    if slot.name == "dtype":
        return dtype_from_code(arg.value)
    return arg.value
