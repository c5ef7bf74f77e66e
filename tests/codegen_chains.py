"""Random traced chains for the generic-fusion tests, as the profiler records them.

`random_chain(seed, dtype)` returns OpRecords (dims, types, concrete inputs in the profiler's
formats: `double` for a Python number, `Scalar` with its value for a recorded constant, in-place
variants, casts) of 4-8 supported ops over one odd loop shape, with broadcast operands of
several kinds, sometimes ending in a last-dim reduction (or, with `any_dim`, a reduction over any
dim or block of two, a softmax possibly followed by pointwise ops). It keeps every value in a range where
the ops are well conditioned: before an op that needs x > 0 (log, sqrt, rsqrt, reciprocal,
fractional pow, a divisor) it inserts abs and + 1; when values grow it squashes them (tanh,
hardtanh, clamp). The interval arithmetic assumes make_inputs' draws: N(0, 1) (taken as
[-4, 4]) and [0.5, 1.5] for inputs that feed a divisor or a log-like op.
"""
from __future__ import annotations

import math
import random

import torch

from fusion_advisor.core.records import OpRecord

TYPE_NAMES = {torch.float32: "float", torch.float16: "c10::Half", torch.bfloat16: "c10::BFloat16"}
CODES = {torch.float32: "6", torch.float16: "5", torch.bfloat16: "15"}
SHAPES = [(3, 5, 7, 11), (6, 42, 13), (4, 3, 9, 16), (2, 130)]
# An op whose backward reads its own output: the next op cannot modify that output in place (autograd
# would refuse, so a training trace never shows it).
SAVES_OUTPUT = {"sigmoid", "tanh", "exp", "relu", "sqrt", "rsqrt", "reciprocal", "softmax", "_log_softmax"}
INPLACE = {"add", "sub", "mul", "div", "clamp", "clamp_min", "relu", "sigmoid", "tanh", "hardtanh", "leaky_relu",
           "silu", "exp", "neg", "abs"}


def _operand_shape(rng: random.Random, shape: tuple) -> tuple:
    """A shape that broadcasts to `shape` (never equal to it: the link stays unambiguous)."""
    r = len(shape)
    choices = [
        (shape[-1],),                                                     # per feature
        tuple(d if i == 1 else 1 for i, d in enumerate(shape))[1:],       # per channel, (C, 1, 1)
        (),                                                               # 0-dim tensor
        tuple(d if i in (1, r - 1) else 1 for i, d in enumerate(shape)),  # (1, C, 1, W): mixed
        tuple(d if i == 0 else 1 for i, d in enumerate(shape)),           # per sample
        (shape[-2], 1),                                                   # per row
    ]
    out = rng.choice(choices)
    return out if out != shape else (shape[-1],)


class _Chain:
    def __init__(self, rng: random.Random, dtype: torch.dtype, shape: tuple):
        self.rng, self.dtype, self.shape = rng, dtype, shape
        self.lo, self.hi = -4.0, 4.0
        self.ops: list[OpRecord] = []
        self.rounded = dtype != torch.float32      # some value was rounded to bf16/fp16

    @property
    def t(self) -> str:
        return TYPE_NAMES[self.dtype]

    @property
    def mag(self) -> float:
        return max(abs(self.lo), abs(self.hi))

    def emit(self, name: str, dims, types, concrete, lo: float, hi: float, inplace_ok: bool = True) -> None:
        previous = self.ops[-1].short.rstrip("_") if self.ops else None
        # In-place ops save their output; `to` may return its input itself.
        after_inplace = bool(self.ops) and (self.ops[-1].short.endswith("_") or self.ops[-1].short == "to")
        if inplace_ok and name in INPLACE and previous not in SAVES_OUTPUT and not after_inplace \
                and self.rng.random() < 0.25:
            name += "_"
        self.ops.append(OpRecord(f"aten::{name}", tuple(dims), tuple(types), tuple(concrete)))
        self.lo, self.hi = min(lo, hi), max(lo, hi)

    def unary(self, name: str, lo: float, hi: float) -> None:
        self.emit(name, [self.shape], [self.t], [""], lo, hi)

    # -- keeping values in range ------------------------------------------------------------
    def make_positive(self) -> None:
        if self.lo >= 0.25:
            return
        self.unary("abs", 0.0, self.mag)
        self.emit("add", [self.shape, ()], [self.t, "double"], ["", ""], self.lo + 1.0, self.hi + 1.0)  # + 1 (placeholder)

    def squash(self, limit: float) -> None:
        if self.mag <= limit:
            return
        kind = self.rng.choice(["tanh", "hardtanh", "clamp"])
        if kind == "tanh":
            self.unary("tanh", math.tanh(self.lo), math.tanh(self.hi))
        elif kind == "hardtanh":
            self.emit("hardtanh", [self.shape, (), ()], [self.t, "Scalar", "Scalar"], ["", "-2.", "2."],
                      max(self.lo, -2), min(self.hi, 2))
        else:
            self.emit("clamp", [self.shape, (), ()], [self.t, "Scalar", "Scalar"], ["", "-1.5", "2"],
                      max(self.lo, -1.5), min(self.hi, 2))

    # -- one random op ----------------------------------------------------------------------
    def step(self) -> None:
        rng, s, t = self.rng, self.shape, self.t
        kind = rng.choice(["binary_tensor", "binary_number", "unary", "unary", "param", "domain", "where",
                           "cast", "rsub"])
        m = self.mag
        if kind == "binary_tensor":
            op = rng.choice(["add", "sub", "mul", "div", "minimum", "maximum"])
            other = _operand_shape(rng, s)
            ot = t if rng.random() < 0.8 or self.dtype == torch.float32 else "float"   # sometimes promotes
            if op == "div":
                self.emit("div", [s, other], [t, ot], ["", ""], -2 * m, 2 * m)
            elif op in ("add", "sub"):
                alpha = rng.choice(["1", "0.5"])
                swap = rng.random() < 0.3 and op == "add"
                dims = [other, s] if swap else [s, other]
                types = [ot, t] if swap else [t, ot]
                self.emit(op, dims + [()], types + ["Scalar"], ["", "", alpha], -m - 4, m + 4, inplace_ok=not swap)
            elif op == "mul":
                self.emit("mul", [s, other], [t, ot], ["", ""], -4 * m, 4 * m)
            else:
                self.emit(op, [s, other], [t, ot], ["", ""], min(self.lo, -4), max(self.hi, 4), inplace_ok=False)
            if ot == "float" and other != () and not self.ops[-1].name.endswith("_"):
                self.dtype = torch.float32      # a 0-dim tensor does not promote; in place keeps self's dtype
        elif kind == "binary_number":
            op, (lo, hi) = rng.choice([("mul", (self.lo * 0.5, self.hi * 0.5)), ("div", (self.lo / 2, self.hi / 2)),
                                       ("add", (self.lo + 1, self.hi + 1)), ("sub", (self.lo - 1, self.hi - 1))])
            number = rng.choice(["double", "long int"])
            if number == "long int":      # placeholders: mul 2, div 2, add/sub 1
                lo, hi = {"mul": (self.lo * 2, self.hi * 2), "div": (lo, hi)}.get(op, (lo, hi))
            extra = ([()], ["Scalar"], ["1"]) if op in ("add", "sub") else ([], [], [])
            self.emit(op, [s, ()] + extra[0], [t, number] + extra[1], ["", ""] + extra[2], lo, hi)
        elif kind == "rsub":
            self.emit("rsub", [s, (), ()], [t, "Scalar", "Scalar"], ["", "3", "1"], 3 - self.hi, 3 - self.lo,
                      inplace_ok=False)
        elif kind == "unary":
            op = rng.choice(["neg", "abs", "relu", "sigmoid", "tanh", "silu", "mish", "hardswish", "hardsigmoid",
                             "gelu", "gelu_tanh", "exp", "clone"])
            if op == "exp":
                self.squash(3.0)
                self.unary("exp", math.exp(self.lo), math.exp(self.hi))
            elif op.startswith("gelu"):
                self.emit("gelu", [s, ()], [t, ""], ["", "tanh" if op == "gelu_tanh" else ""], -0.2, max(self.hi, 0))
            else:
                lo, hi = {"neg": (-self.hi, -self.lo), "abs": (0, m), "relu": (max(self.lo, 0), max(self.hi, 0)),
                          "sigmoid": (0, 1), "tanh": (-1, 1), "hardsigmoid": (0, 1)}.get(op, (min(self.lo, -0.4), max(self.hi, 0)))
                self.emit(op, [s], [t], [""], lo, hi)
        elif kind == "param":
            op = rng.choice(["clamp", "clamp_min", "clamp_max", "leaky_relu", "hardtanh", "softplus", "pow2", "pow3"])
            if op == "clamp":
                self.emit("clamp", [s, (), ()], [t, "Scalar", "Scalar"], ["", "-1", "2."], max(self.lo, -1), min(self.hi, 2))
            elif op == "clamp_min":
                self.emit("clamp_min", [s, ()], [t, "Scalar"], ["", "-0.5"], max(self.lo, -0.5), max(self.hi, -0.5))
            elif op == "clamp_max":
                self.emit("clamp_max", [s, ()], [t, "Scalar"], ["", "1.5"], min(self.lo, 1.5), min(self.hi, 1.5))
            elif op == "leaky_relu":
                self.emit("leaky_relu", [s, ()], [t, "Scalar"], ["", "0.2"], self.lo * 0.2, self.hi)
            elif op == "hardtanh":
                self.emit("hardtanh", [s, (), ()], [t, "Scalar", "Scalar"], ["", "-2.", "2."], max(self.lo, -2), min(self.hi, 2))
            elif op == "softplus":
                self.emit("softplus", [s, (), ()], [t, "Scalar", "Scalar"], ["", "2.", "10."], 0, max(self.hi, 0) + 1)
            else:
                e = 2 if op == "pow2" else 3
                self.squash(2.0)
                mm = self.mag
                self.emit("pow", [s, ()], [t, "Scalar"], ["", str(e)], -mm ** 3 if e == 3 else 0, mm ** e)
        elif kind == "domain":
            op = rng.choice(["log", "sqrt", "rsqrt", "reciprocal", "pow_half", "pow_neg", "div_by_chain"])
            self.make_positive()
            self.squash(6.0)
            self.make_positive()
            lo, hi = self.lo, self.hi
            if op == "pow_half":
                self.emit("pow", [s, ()], [t, "Scalar"], ["", "1.5"], lo ** 1.5, hi ** 1.5)
            elif op == "pow_neg":
                self.emit("pow", [s, ()], [t, "Scalar"], ["", "-1"], 1 / hi, 1 / lo)
            elif op == "div_by_chain":   # an external numerator over the (positive) chain value
                self.emit("div", [(s[-1],), s], [t, t], ["", ""], -4 / lo, 4 / lo, inplace_ok=False)
            else:
                bounds = {"log": (math.log(lo), math.log(hi)), "sqrt": (math.sqrt(lo), math.sqrt(hi)),
                          "rsqrt": (hi ** -0.5, lo ** -0.5), "reciprocal": (1 / hi, 1 / lo)}[op]
                self.unary(op, *bounds)
        elif kind == "where":
            cond = rng.choice([s, (s[-1],), s[1:]])
            if rng.random() < 0.5:
                self.emit("where", [cond, s, _operand_shape(rng, s)], ["bool", t, t], ["", "", ""],
                          min(self.lo, -4), max(self.hi, 4), inplace_ok=False)
            else:
                self.emit("masked_fill", [s, cond, ()], [t, "bool", "Scalar"], ["", "", "-1.5"],
                          min(self.lo, -1.5), max(self.hi, -1.5), inplace_ok=False)
        elif kind == "cast":
            target = rng.choice([torch.float32, torch.bfloat16, torch.float16])
            name = rng.choice(["to", "_to_copy"])
            if name == "to":
                self.emit("to", [s, (), (), (), ()], [t, "Scalar", "Scalar", "Scalar", ""],
                          ["", CODES[target], "False", "False", ""], self.lo, self.hi, inplace_ok=False)
            else:
                self.emit("_to_copy", [s, (), (), (), (), (), ()], [t, "Scalar", "", "", "", "Scalar", ""],
                          ["", CODES[target], "", "", "", "False", ""], self.lo, self.hi, inplace_ok=False)
            self.dtype = target
            self.rounded |= target != torch.float32
        self.squash(12.0)

    def add_noise(self) -> None:
        """+ a full-shape N(0, 1) tensor: clamps and saturating ops leave exact ties, which make the
        argmax (and amax's gradient split) depend on last-bit differences."""
        self.emit("add", [self.shape, self.shape, ()], [self.t, self.t, "Scalar"], ["", "", "1"],
                  self.lo - 4, self.hi + 4, inplace_ok=False)

    def reduction(self, exact_ties_ok: bool, any_dim: bool = False) -> None:
        """A last-dim reduction; `any_dim`: over a random dim (sum and mean: sometimes a block of two
        adjacent dims), and a softmax may get a few pointwise ops after it."""
        s, t = self.shape, self.t
        kinds = ["sum", "mean", "softmax", "log_softmax"] + (["amax", "max"] if exact_ties_ok else [])
        kind = self.rng.choice(kinds)
        keep = self.rng.choice(["True", "False"])
        dim = str(self.rng.randrange(len(s)) - len(s)) if any_dim else "-1"
        dims = f"[{dim}]"
        if any_dim and kind in ("sum", "mean") and int(dim) < -1 and self.rng.random() < 0.5:
            dims = f"[{dim}, {int(dim) + 1}]"
        if kind in ("sum", "mean"):
            self.squash(4.0)
            self.emit(kind, [s, (), (), ()], [t, "ScalarList", "Scalar", ""], ["", dims, keep, ""], 0, 0, False)
        elif kind == "amax":
            self.add_noise()
            self.emit("amax", [s, (), ()], [t, "ScalarList", "Scalar"], ["", dims, keep], 0, 0, False)
        elif kind == "max":
            self.add_noise()
            self.emit("max", [s, (), ()], [t, "Scalar", "Scalar"], ["", dim, keep], 0, 0, False)
        elif kind == "softmax":
            self.emit("softmax", [s, (), ()], [t, "Scalar", ""], ["", dim, ""], 0, 1, False)
        else:
            self.emit("_log_softmax", [s, (), ()], [t, "Scalar", "Scalar"], ["", dim, "False"], -30, 0, False)
        if any_dim and kind in ("softmax", "log_softmax"):
            self.squash(4.0)
            for _ in range(self.rng.randint(0, 3)):
                self.step()


def random_chain(seed: int, dtype: torch.dtype, with_reduction: bool | None = None,
                 any_dim: bool = False) -> list[OpRecord]:
    rng = random.Random(seed)
    chain = _Chain(rng, dtype, rng.choice(SHAPES))
    for _ in range(rng.randint(4, 7)):
        chain.step()
    if with_reduction if with_reduction is not None else rng.random() < 0.25:
        # amax / max ties: eager rounds each op's output to bf16/fp16 and creates ties the fp32
        # kernel does not see; those are compared in fp32 only.
        chain.reduction(exact_ties_ok=not chain.rounded, any_dim=any_dim)
    return chain.ops
