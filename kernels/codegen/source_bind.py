"""Read a traced chain's dataflow off the user's source: which argument of each op is an earlier
value of the chain, which is a tensor from outside (and the Python expression that names it), and
which Python number each runtime scalar is.

The trace alone cannot say (graph.py's linking rule guesses from shapes): in
`y * torch.sigmoid(1.702 * y)` both operands of the last mul have y's shape. The source can. Kineto
gives the function's `def` line; this module walks that function's straight-line statements with a
small symbolic evaluator (names, numbers, + - * / **, unary minus, torch.X / F.X calls, tensor
methods), lists the ops they call in order, and aligns the traced ops with a contiguous run of
them. What it returns is exact or it raises Unsupported with the reason; it never guesses:

  * every tensor argument of every op is bound (an earlier value, or a new external input whose
    source expression becomes an argument of the generated call);
  * a Python number the trace did not record becomes a runtime scalar, passed by its source
    expression (`scale`, `1.702`); a recorded constant that the source computes (`clamp(-lim, lim)`)
    becomes a runtime scalar too, so the kernel follows the user's value;
  * string arguments the profiler drops (F.gelu's approximate="tanh") are read from the source;
  * the statements holding the chain must contain nothing else, only the last one's value may be
    used after them, and the chain's output must be what that statement assigns or returns.
"""
from __future__ import annotations

import ast
import dataclasses
import math
import operator
from dataclasses import dataclass, field
from typing import Any, Sequence

from fusion_advisor.kernels.codegen import ops as op_table
from fusion_advisor.kernels.codegen.ops import Unsupported
from fusion_advisor.kernels.registry import OpRecord

_MODULE_PREFIXES = ("torch.nn.functional.", "nn.functional.", "functional.", "F.", "torch.")
_BINOPS = {ast.Add: "add", ast.Sub: "sub", ast.Mult: "mul", ast.Div: "div", ast.Pow: "pow"}
# Modules whose constants (pi, e...) and, but for torch, functions of Python numbers (sqrt, exp...)
# Python evaluates before any op runs: their results reach the trace as plain numbers.
_NUMBER_MODULES = ("math", "np", "numpy", "torch")
_PY_BINOPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
              ast.Pow: operator.pow}
_CASTS = {"float": "to", "half": "to", "bfloat16": "to", "double": "to", "to": "to", "type_as": "to"}
# Tensor methods that return a view or the tensor itself: no kernel, so not in the traced chain;
# their result is an external input expression (`self.bias.view(1, -1, 1, 1)`).
_VIEWS = {"view", "reshape", "unsqueeze", "squeeze", "expand", "expand_as", "view_as", "flatten", "t",
          "transpose", "permute", "detach", "contiguous"}


@dataclass
class SourceCall:
    """Where and how `apply` calls the generated kernel instead of the chain's statements."""

    path: str
    function: str
    def_line: int
    first_line: int            # the statements replaced, 1-based, inclusive
    last_line: int
    target: str | None         # the name the last statement assigns; None: it returns the value
    args: list[str]            # source expressions of the kernel's tensor inputs, in graph order
    scalars: dict[str, str]    # runtime scalar name ("s0") -> source expression
    text: str = ""             # those lines as they were read: apply rewrites them only if unchanged

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "SourceCall":
        return cls(**{f.name: d[f.name] for f in dataclasses.fields(cls) if f.name in d})

    def call_text(self, function_name: str) -> str:
        args = self.args + [f"{k}={v}" for k, v in self.scalars.items()]
        return f"{function_name}({', '.join(args)})"


@dataclass
class SourceChain:
    ops: list[OpRecord]                          # the traced ops, with string arguments from the source
    bind: dict[tuple[int, int], str]             # (op, value slot) -> "v<k>" | "in<k>"; all tensor slots
    externals: dict[tuple[int, int], str]        # (op, value slot) -> source expression, first uses
    scalar_exprs: dict[tuple[int, int], str]     # (op, value slot) -> expression of a runtime scalar
    scalar_values: dict[tuple[int, int], float]  # the literal ones' values
    call: SourceCall


@dataclass
class _Sym:
    kind: str                 # "op" (result of symbolic op `index`) | "ext" | "num" | "str"
    text: str                 # source expression that names it where the chain starts
    index: int = -1
    value: Any = None


@dataclass
class _Op:
    name: str                 # "mul", "clamp_", "to", "<call>" (an opaque call: never matches)
    args: list[_Sym]
    kwargs: dict[str, _Sym]
    stmt: int
    binary: bool = False
    maybe: bool = False       # no operand comes from an op: Python numbers may be all it computes


@dataclass
class _Walk:
    ops: list[_Op] = field(default_factory=list)
    stmts: list[ast.stmt] = field(default_factory=list)
    env_after: list[dict[str, _Sym]] = field(default_factory=list)   # names after each statement
    reads: list[set[str]] = field(default_factory=list)              # names each statement reads
    assigns: list[str | None] = field(default_factory=list)          # the name it assigns (None: return/other)
    returned: dict[int, _Sym] = field(default_factory=dict)           # statement -> what it returns


class _Evaluator:
    def __init__(self, walk: _Walk, env: dict[str, _Sym], stmt: int):
        self.walk, self.env, self.stmt = walk, env, stmt

    def op(self, name: str, args: list[_Sym], kwargs: dict[str, _Sym], node: ast.AST, binary=False) -> _Sym:
        maybe = not any(a.kind == "op" for a in [*args, *kwargs.values()])
        self.walk.ops.append(_Op(name, args, kwargs, self.stmt, binary, maybe and not name.startswith("<")))
        return _Sym("op", ast.unparse(node), index=len(self.walk.ops) - 1)

    def eval(self, node: ast.AST) -> _Sym:
        if isinstance(node, ast.Constant):
            if isinstance(node.value, bool) or not isinstance(node.value, (int, float, str)):
                return _Sym("ext", ast.unparse(node))
            return _Sym("str" if isinstance(node.value, str) else "num", ast.unparse(node), value=node.value)
        if isinstance(node, ast.Name):
            sym = self.env.get(node.id)
            return dataclasses.replace(sym, text=node.id) if sym is not None else _Sym("ext", node.id)
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            inner = self.eval(node.operand)
            if inner.kind == "num":
                return _Sym("num", ast.unparse(node), value=-inner.value)
            return self.op("neg", [inner], {}, node)
        if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
            left, right = self.eval(node.left), self.eval(node.right)
            if left.kind == "num" and right.kind == "num":
                folded = _fold(_PY_BINOPS[type(node.op)], left.value, right.value)
                if folded is not None:
                    return _Sym("num", ast.unparse(node), value=folded)
            return self.op(_BINOPS[type(node.op)], [left, right], {}, node, binary=True)
        if isinstance(node, ast.Call):
            folded = self.math_call(node)
            return folded if folded is not None else self.call(node)
        constant = _math_constant(node)
        if constant is not None:
            return _Sym("num", ast.unparse(node), value=constant)
        if isinstance(node, (ast.Tuple, ast.List)):
            parts = [self.eval(e) for e in node.elts]
            return self.op("<tuple>", [], {}, node) if any(p.kind == "op" for p in parts) else _Sym("ext", ast.unparse(node))
        # Attribute, Subscript (views) and anything else: an opaque value; ops inside it are not
        # followed, so an opaque expression holding one of the chain's values breaks the chain.
        holds_chain = any(isinstance(n, ast.Name) and self.env.get(n.id, _Sym("ext", "")).kind == "op"
                          for n in ast.walk(node))
        return self.op("<opaque>", [], {}, node) if holds_chain else _Sym("ext", ast.unparse(node))

    def math_call(self, node: ast.Call) -> _Sym | None:
        """`math.sqrt(2.0 / math.pi)`: Python computes it before any op runs, so the trace holds
        only its value (a scalar argument of the op it feeds): a number here, not an op."""
        dotted = _dotted(node.func)
        module, _, name = (dotted or "").rpartition(".")
        if module not in _NUMBER_MODULES or module == "torch" or node.keywords:
            return None   # (torch.sqrt of a Python number raises: the user's code never does it)
        fn = getattr(math, name, None)      # np.sqrt(2 / np.pi) is math.sqrt's value too
        if not callable(fn):
            return None
        args = [self.eval(a) for a in node.args]
        if not args or any(a.kind != "num" for a in args):
            return None
        folded = _fold(fn, *(a.value for a in args))
        return _Sym("num", ast.unparse(node), value=folded) if folded is not None else None

    def call(self, node: ast.Call) -> _Sym:
        func = node.func
        dotted = _dotted(func)
        args = [self.eval(a) for a in node.args if not isinstance(a, ast.Starred)]
        kwargs = {k.arg: self.eval(k.value) for k in node.keywords if k.arg}
        if len(args) != len(node.args) or len(kwargs) != len(node.keywords):
            return self.op("<call>", [], {}, node)
        name = None
        if dotted is not None:
            name = next((dotted[len(p):] for p in _MODULE_PREFIXES if dotted.startswith(p) and "." not in dotted[len(p):]),
                        None)
        if name is not None:
            return self.op(name, args, kwargs, node)
        if isinstance(func, ast.Attribute):
            receiver = self.eval(func.value)
            method = func.attr
            if method in _VIEWS:
                if receiver.kind == "op":
                    return self.op("<view>", [], {}, node)
                return _Sym("ext", ast.unparse(node))
            if receiver.kind in ("op", "ext") and (method in _CASTS or _known(method)):
                return self.op(_CASTS.get(method, method), [receiver, *args], kwargs, node)
        if any(a.kind == "op" for a in [*args, *kwargs.values()]):
            return self.op("<call>", [], {}, node)
        return _Sym("ext", ast.unparse(node))


def _fold(fn, *values) -> int | float | None:
    """fn(*values) when it is a real number (None for an error or a complex/other result)."""
    try:
        value = fn(*values)
    except (ArithmeticError, ValueError, TypeError):
        return None
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _math_constant(node: ast.AST) -> float | None:
    """math.pi, math.e, math.tau, math.inf (or numpy's, torch's): their value."""
    module, _, name = (_dotted(node) or "").rpartition(".")
    if module not in _NUMBER_MODULES:
        return None
    value = getattr(math, name, None)
    return value if isinstance(value, float) else None


def _known(name: str) -> bool:
    try:
        op_table.lookup(name)
        return True
    except Unsupported:
        return False


def _dotted(node: ast.AST) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = _dotted(node.value)
        return f"{base}.{node.attr}" if base else None
    return None


def find_function(tree: ast.Module, line: int) -> ast.FunctionDef | ast.AsyncFunctionDef:
    """The function whose `def` (or first decorator) is on `line`; else the innermost one holding
    it (Kineto gives a frame that was running when recording began its current line)."""
    holding = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            first = min([node.lineno] + [d.lineno for d in node.decorator_list])
            if line in (node.lineno, first):
                return node
            if first <= line <= (node.end_lineno or node.lineno):
                holding.append(node)
    if holding:
        return max(holding, key=lambda n: n.lineno)
    raise Unsupported(f"no function at line {line}")


def _walk(fn: ast.FunctionDef) -> _Walk:
    walk = _Walk()
    env: dict[str, _Sym] = {}
    for i, stmt in enumerate(fn.body):
        walk.stmts.append(stmt)
        ev = _Evaluator(walk, env, i)
        assigned = None
        if isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 and isinstance(stmt.targets[0], ast.Name):
            env[stmt.targets[0].id] = ev.eval(stmt.value)
            assigned = stmt.targets[0].id
        elif isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name) and stmt.value is not None:
            env[stmt.target.id] = ev.eval(stmt.value)
            assigned = stmt.target.id
        elif isinstance(stmt, ast.AugAssign) and isinstance(stmt.target, ast.Name) and type(stmt.op) in _BINOPS:
            target = ev.eval(stmt.target)
            value = ev.eval(stmt.value)
            if target.kind == "op" or value.kind == "op":
                env[stmt.target.id] = ev.op(_BINOPS[type(stmt.op)] + "_", [target, value], {}, stmt, binary=True)
            else:
                env[stmt.target.id] = _Sym("ext", stmt.target.id)
            assigned = stmt.target.id
        elif isinstance(stmt, ast.Return) and stmt.value is not None:
            walk.returned[i] = ev.eval(stmt.value)
        elif isinstance(stmt, ast.Expr):
            ev.eval(stmt.value)
        else:
            # Control flow, with-blocks, tuple targets...: not followed. Whatever they assign is
            # opaque from here on, and no chain runs through them.
            ev.op("<statement>", [], {}, stmt)
            for n in ast.walk(stmt):
                if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store):
                    env[n.id] = _Sym("ext", n.id)
        walk.env_after.append(dict(env))
        walk.assigns.append(assigned)
        walk.reads.append({n.id for n in ast.walk(stmt) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)})
    return walk


def _skippable(op: _Op) -> bool:
    """A source op that may have launched nothing: a cast (to the dtype a tensor has), or
    arithmetic on Python numbers and attributes only (`self.scale * 2`)."""
    return op.name == "to" or op.maybe


def _names_match(source: str, traced: str) -> bool:
    return source == traced or (source, traced) in {("sub", "rsub"), ("to", "_to_copy")}


def _align(walk: _Walk, traced: Sequence[str]) -> list[int]:
    """Indices into walk.ops matching the traced op names in order: a contiguous run, except casts
    in the source that launched nothing (a `to` to the dtype a tensor already has)."""
    for start in range(len(walk.ops)):
        picked, j = [], start
        for name in traced:
            while j < len(walk.ops) and _skippable(walk.ops[j]) and not _names_match(walk.ops[j].name, name):
                j += 1
            if j >= len(walk.ops) or not _names_match(walk.ops[j].name, name):
                break
            picked.append(j)
            j += 1
        if len(picked) == len(traced):
            return picked
    found = " ".join(o.name for o in walk.ops if not o.name.startswith("<")) or "none"
    raise Unsupported(f"the traced ops ({' '.join(traced)}) are not a run of the ops this function calls ({found})")


def chain_from_source(records: Sequence[OpRecord], path: str, def_line: int) -> SourceChain:
    """The exact dataflow of `records` (a chain's forward ops, trace order) from the function
    defined at path:def_line. Raises Unsupported with the reason when it cannot be read exactly."""
    try:
        text = open(path, encoding="utf-8").read()
        tree = ast.parse(text)
    except (OSError, SyntaxError, UnicodeDecodeError) as exc:
        raise Unsupported(f"cannot read {path}: {exc}") from None
    fn = find_function(tree, def_line)
    walk = _walk(fn)
    records = list(records)
    picked = _align(walk, [r.short for r in records])
    chain_of = {sym_index: k for k, sym_index in enumerate(picked)}
    stmts = sorted({walk.ops[i].stmt for i in picked})
    first, last = stmts[0], stmts[-1]
    if stmts != list(range(first, last + 1)):
        raise Unsupported("the chain's statements are not consecutive")
    for i, op in enumerate(walk.ops):
        if first <= op.stmt <= last and i not in chain_of and not _skippable(op):
            raise Unsupported(f"statement {ast.unparse(walk.stmts[op.stmt]).splitlines()[0]!r} also runs "
                              f"{op.name.strip('<>')}, which is not part of the chain")
    out_ops, bind, externals, scalar_exprs, scalar_values = [], {}, {}, {}, {}
    seen_ext: dict[str, str] = {}   # source expression -> input name, for a tensor read twice
    n_inputs = 0
    for k, (record, i) in enumerate(zip(records, picked)):
        op = walk.ops[i]
        record, slots = _bind_op(k, record, op, chain_of)
        for pos, (role, sym) in slots.items():
            if role == "tensor":
                if sym.kind == "op" and sym.index in chain_of:
                    bind[(k, pos)] = f"v{chain_of[sym.index]}"
                elif sym.text in seen_ext:
                    bind[(k, pos)] = seen_ext[sym.text]
                else:
                    seen_ext[sym.text] = f"in{n_inputs}"
                    externals[(k, pos)] = sym.text
                    n_inputs += 1
            elif role == "number":
                scalar_exprs[(k, pos)] = sym.text
                if sym.kind == "num":
                    scalar_values[(k, pos)] = sym.value
        out_ops.append(record)
    _check_names(walk, first, last)
    final = picked[-1]
    if last in walk.returned:
        target = None
        if walk.returned[last].index != final:
            raise Unsupported("the returned value is not the chain's output")
    else:
        target = walk.assigns[last]
        if target is None or walk.env_after[last].get(target, _Sym("ext", "")).index != final:
            raise Unsupported("the last statement of the chain does not assign the chain's output")
    first_line, last_line = walk.stmts[first].lineno, walk.stmts[last].end_lineno or walk.stmts[last].lineno
    call = SourceCall(path=path, function=fn.name, def_line=def_line, first_line=first_line, last_line=last_line,
                      target=target, args=[], scalars={}, text=lines_of(text, first_line, last_line))
    return SourceChain(out_ops, bind, externals, scalar_exprs, scalar_values, call)


def _bind_op(k: int, record: OpRecord, op: _Op, chain_of: dict[int, int]) -> tuple[OpRecord, dict]:
    """The traced record (string arguments filled from the source; computed constants made
    runtime scalars) and, per value slot position, (role, source symbol)."""
    short = record.short
    spec, _ = op_table.lookup(short)
    args = list(op.args)
    if op.binary and short == "rsub":
        args = args[::-1]
    elif op.binary and short.rstrip("_") in ("add", "mul") and args[0].kind == "num" and args[1].kind != "num":
        args = args[::-1]                      # `2 * y` is traced as mul(y, 2)
    elif op.binary and short.rstrip("_") in ("add", "mul") and args[0].kind == "ext" and args[1].kind == "op":
        kinds = [op_table.classify(_at(record.dims, j), _at(record.types, j, ""), _at(record.concrete, j, "")).kind
                 for j in range(2)]
        if kinds[1] != "tensor":
            args = args[::-1]                  # `scale * y`: y.__rmul__(scale)
    positional = {j: s for j, s in enumerate(args)}
    names = [s.name for s in spec.slots]
    for key, sym in op.kwargs.items():
        if key in names:
            positional[names.index(key)] = sym
        elif key != "inplace":
            raise Unsupported(f"op {k} {short}: keyword {key}= is not an argument of aten::{short}")
    concrete = list(record.concrete) + [""] * max(0, len(spec.slots) - len(record.concrete))
    types = list(record.types)
    slots: dict[int, tuple[str, _Sym]] = {}
    value_pos = 0
    for j, slot in enumerate(spec.slots):
        sym = positional.get(j)
        arg = op_table.classify(_at(record.dims, j), _at(record.types, j, ""), _at(record.concrete, j, ""))
        if slot.role == "value":
            if arg.kind == "tensor":
                if sym is None or sym.kind in ("num", "str"):
                    raise Unsupported(f"op {k} {short}: the source gives no tensor for {slot.name}")
                slots[value_pos] = ("tensor", sym)
            elif arg.kind == "number":
                if sym is None or sym.kind == "str" or (sym.kind == "op" and sym.index in chain_of):
                    raise Unsupported(f"op {k} {short}: the source gives no number for {slot.name}")
                slots[value_pos] = ("number", sym)
            elif arg.kind == "scalar" and sym is not None and not (sym.kind == "num" and sym.value == arg.value):
                if sym.kind == "str" or (sym.kind == "op" and sym.index in chain_of):
                    raise Unsupported(f"op {k} {short}: {slot.name} is a constant in the trace but not in the source")
                concrete[j] = ""               # computed in the source: a runtime scalar, not compiled in
                slots[value_pos] = ("number", sym)
            value_pos += 1
        elif slot.role == "param" and sym is not None:
            if sym.kind == "str":
                concrete[j] = sym.value
                while len(types) <= j:
                    types.append("")
            elif spec.kind != "cast" and not (sym.kind == "num" and arg.kind == "scalar" and sym.value == arg.value):
                raise Unsupported(f"op {k} {short}: {slot.name} `{sym.text}` is compiled into the kernel as the traced "
                                  f"{arg.value!r}; write it as a literal")
    return dataclasses.replace(record, concrete=tuple(concrete[:max(len(record.concrete), len(types))]),
                               types=tuple(types)), slots


def lines_of(text: str, first: int, last: int) -> str:
    """Lines first..last (1-based, inclusive) of a file's text."""
    return "".join(text.splitlines(True)[first - 1:last])


def _check_names(walk: _Walk, first: int, last: int) -> None:
    """Nothing but the last statement's value may be read after the chain's statements (every
    statement between first and last is made of chain ops only, so the externals the call passes
    mean there what they meant where the chain read them)."""
    assigned_inside = {walk.assigns[s] for s in range(first, last + 1) if walk.assigns[s]}
    later_reads = set().union(*walk.reads[last + 1:]) if last + 1 < len(walk.reads) else set()
    for name in sorted(assigned_inside - {walk.assigns[last]}):
        if name in later_reads:
            raise Unsupported(f"`{name}`, an intermediate of the chain, is read after it")


def _at(seq, j: int, default: Any = ()) -> Any:
    if seq is None or j >= len(seq):
        return default
    return seq[j] if seq[j] is not None else default
