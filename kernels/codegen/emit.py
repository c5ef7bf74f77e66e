"""Triton source for a Graph: the forward kernel and the backward kernel (module.py writes the
rest of the generated module around them).

Kernel layouts (see runtime.py for the words):
  forward, pointwise chain   1-D blocks over the flattened loop shape. Inputs of the loop's shape
                             load contiguously (vectorised); a broadcast input loads through
                             per-group index arithmetic by compile-time constants; an input
                             broadcast everywhere loads once per program. Every op runs in fp32
                             registers; only the output is written.
  forward, reduction         (rows, whole row) tiles: the chain, then the reduction over the row (the
                             reduced dims), then, after a softmax, the pointwise ops that follow it.
                             Reduced dims that are not the last are read in place (NCHW stays NCHW):
                             a row is an (outer, inner) pair, its elements RED_INNER apart.
  backward                   (rows, cols) tiles. It reloads the inputs, recomputes every forward
                             value (nothing but the inputs is saved), then runs each op's local
                             derivative in reverse. Gradients of inputs with the loop's shape are
                             stored directly; those of broadcast inputs are summed in the kernel
                             into small fp32 partial buffers, and a second small torch reduction
                             (runtime.finish_grad) sums those to the input's shape.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from fusion_advisor.kernels.codegen.graph import Graph, Node, Operand
from fusion_advisor.kernels.codegen.ops import Unsupported
from fusion_advisor.kernels.codegen.runtime import grad_kind, logical, padded
from fusion_advisor.kernels.registry import dtype_name

_TL = {torch.float32: "tl.float32", torch.float16: "tl.float16", torch.bfloat16: "tl.bfloat16"}
_NEG_INF = '-float("inf")'
# Rows past the end hold -inf only: their max is made 0 so that no nan is computed (and stored nowhere).
_ROW_MAX = "row_max = tl.where(row_mask, tl.max(masked, axis=1), 0.0)"


@dataclass
class Layout:
    rank: int
    groups: list[tuple[int, ...]]     # of the logical dims (the reduced dim moved last)
    kept: list[tuple[bool, ...]]      # per input, per group
    reduce_dims: tuple[int, int] | None = None   # the reduced block when not at the end (graph.reduce_dims)


def partition(graph: Graph) -> Layout:
    """Cut the loop shape's dims into groups (runtime.py), in the logical order (runtime.logical:
    a reduced block not at the end moved last). Size-1 dims join the next group; a reduction's
    dims are one group of their own, the last (the columns)."""
    shape = graph.loop_shape
    rank = max(1, len(shape))
    block = graph.reduce_dims
    full = logical(padded(shape, rank), block)
    shapes = [logical(padded(x.shape, rank), block) for x in graph.inputs]
    flags = [tuple(s[d] == full[d] for s in shapes) for d in range(rank)]
    reduced = graph.reduced_block
    # The reduced dims are the logical order's last ones, one group (the kernels' columns).
    first_reduced = rank - (reduced[1] - reduced[0] + 1) if reduced is not None else rank
    core = [d for d in range(first_reduced) if full[d] != 1]
    groups: list[list[int]] = []
    for d in core:
        if groups and flags[d] == flags[groups[-1][-1]]:
            groups[-1].append(d)
        else:
            groups.append([d])
    if reduced is not None:
        groups.append(list(range(first_reduced, rank)))
        for k, x in enumerate(graph.inputs):
            if len({shapes[k][d] == full[d] for d in groups[-1] if full[d] != 1}) > 1:
                raise Unsupported(f"{x.name} {_shape(x.shape)} is kept along some of the reduced dims and broadcast "
                                  f"along others")
    if not groups:
        groups = [[rank - 1]]
    for d in range(rank):
        if not any(d in g for g in groups):
            target = next((g for g in groups if g[0] > d), groups[-1])
            target.append(d)
            target.sort()
    kept = [tuple(all(s[d] == full[d] for d in g) for g in groups) for s in shapes]
    if block is not None:
        for x, k in zip(graph.inputs, kept):
            if x.dtype != torch.bool and grad_kind(k) == "elements":
                raise Unsupported(f"{x.name} {_shape(x.shape)} broadcasts over the loop in a way a reduction over dims "
                                  f"{list(range(block[0], block[1] + 1))} (not the last) cannot take")
    return Layout(rank, [tuple(g) for g in groups], kept, block)


def _load_kind(kept: tuple[bool, ...]) -> str:
    if all(kept):
        return "full"
    if not any(kept):
        return "scalar"
    if not kept[-1]:
        return "rows"
    return "cols" if not any(kept[:-1]) else "mixed"


class KernelWriter:
    """Writes the body lines of the kernels; records the constexpr names it uses."""

    def __init__(self, graph: Graph, layout: Layout):
        self.graph, self.layout = graph, layout
        self.consts: list[str] = []

    def _const(self, name: str) -> str:
        if name not in self.consts:
            self.consts.append(name)
        return name

    # -- index arithmetic ---------------------------------------------------------------------
    def _group_index(self, var: str, g: int, n: int) -> str:
        """Index along group g of `var` (offs over n groups, or rows over n row groups)."""
        if n == 1:
            return var
        if g == 0:
            return f"{var} // {self._const(f'G{g}_INNER')}"
        if g == n - 1:
            return f"{var} % {self._const(f'G{g}_SIZE')}"
        return f"{var} // {self._const(f'G{g}_INNER')} % {self._const(f'G{g}_SIZE')}"

    def _offset(self, k: int, var: str, groups: range, n_groups_total: int) -> str:
        terms = []
        for g in groups:
            if self.layout.kept[k][g]:
                last = g == n_groups_total - 1
                terms.append(f"{var[0]}{g}" if last else f"{var[0]}{g} * {self._const(f'IN{k}_STRIDE{g}')}")
        return " + ".join(terms)

    def _loads(self, layout: str) -> list[str]:
        lines, needed = [], set()
        n = len(self.layout.groups)
        rows_only = range(n - 1)
        body = []
        for k, x in enumerate(self.graph.inputs):
            kind = _load_kind(self.layout.kept[k])
            ptr = f"IN{k}"
            convert = " != 0" if x.dtype == torch.bool else ".to(tl.float32)"
            other = "0" if x.dtype == torch.bool else "0.0"
            if kind == "scalar":
                body.append(f"{x.name} = tl.load({ptr}){convert}  # {_shape(x.shape)}: one value per program")
                continue
            if kind == "full":
                where, mask = ("offs", "mask")
            elif layout == "flat":
                needed |= {g for g in range(n) if self.layout.kept[k][g]}
                where, mask = (self._offset(k, "i", range(n), n), "mask")
            else:
                needed |= {g for g in rows_only if self.layout.kept[k][g]}
                row_part = self._offset(k, "r", rows_only, n)
                if kind == "cols":
                    body.append(f"{x.name} = tl.load({ptr} + cols, mask=col_mask, other={other})[None, :]{convert}"
                                f"  # {_shape(x.shape)}")
                    continue
                if kind == "rows":
                    body.append(f"{x.name} = tl.load({ptr} + {row_part}, mask=row_mask, other={other})[:, None]{convert}"
                                f"  # {_shape(x.shape)}")
                    continue
                where, mask = (f"({row_part})[:, None] + cols[None, :]", "mask")
            body.append(f"{x.name} = tl.load({ptr} + {where}, mask={mask}, other={other}){convert}  # {_shape(x.shape)}")
        var = "offs" if layout == "flat" else "rows"
        count = n if layout == "flat" else n - 1
        for g in sorted(needed):
            lines.append(f"{'i' if layout == 'flat' else 'r'}{g} = {self._group_index(var, g, count)}")
        return lines + body

    # -- values and their derivatives ---------------------------------------------------------
    def _values(self, nodes: list[Node] | None = None) -> list[str]:
        lines = []
        for node in self.graph.prologue if nodes is None else nodes:
            x = [o.ref for o in node.operands]
            if node.spec.kind == "cast":
                expr = {torch.float32: x[0], torch.bfloat16: f"round_to_bf16({x[0]})",
                        torch.float16: f"{x[0]}.to(tl.float16).to(tl.float32)"}[node.dtype]
            else:
                expr = node.spec.forward(x, node.params)
            lines.append(f"{node.name} = {expr}  # {describe(node)}")
        return lines

    def _reverse(self, nodes: list[Node], defined: set[str]) -> list[str]:
        """Reverse-mode through `nodes` (pointwise), from the gradients in `defined` (which it
        extends: a value read on both sides of a softmax sums its two gradients)."""
        lines = []
        differentiable = {x.name for x in self.graph.inputs if x.dtype != torch.bool}
        for node in reversed(nodes):
            g = f"g_{node.name}"
            if g not in defined:
                continue   # a value nothing after it reads (`y = x * 2` beside the output): no gradient
            x = [o.ref for o in node.operands]
            if node.spec.kind == "cast" or node.spec.backward is None:
                grads = [g]
            else:
                grads = node.spec.backward(x, node.name, g, node.params)
            for operand, expr in zip(node.operands, grads):
                if expr is None or not (operand.kind == "value" or operand.ref in differentiable):
                    continue
                target = f"g_{operand.ref}"
                lines.append(f"{target} {'+=' if target in defined else '='} {expr}  # through {node.name}")
                defined.add(target)
        return lines

    # -- kernels ------------------------------------------------------------------------------
    def forward_kernel(self) -> str:
        red = self.graph.reduction
        params = [f"IN{k}" for k in range(len(self.graph.inputs))] + ["OUT"]
        if red is not None and red.reduction == "max":
            params.append("INDICES")
        params += [s.name for s in self.graph.scalars]
        if red is None:
            body = ["if INDEX_64:", "    start = tl.program_id(0).to(tl.int64) * BLOCK_SIZE", "else:",
                    "    start = tl.program_id(0) * BLOCK_SIZE",
                    "offs = start + tl.arange(0, BLOCK_SIZE)", "mask = offs < n_elements"]
            body += self._loads("flat") + self._values()
            last = self.graph.nodes[-1].name
            body.append(f"tl.store(OUT + offs, {last}.to(OUT.dtype.element_ty), mask=mask)")
            params += ["n_elements"]
            tail = ["BLOCK_SIZE: tl.constexpr", "INDEX_64: tl.constexpr"]
        else:
            body = ["if INDEX_64:", "    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)",
                    "else:", "    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)"]
            body += _tile_lines("tl.arange(0, BLOCK_C)", self.layout.reduce_dims is not None)
            body += self._loads("rows") + self._values() + _reduction_forward(red, self._pre_reduction())
            epilogue = self.graph.epilogue
            if epilogue:   # the softmax's rows stay in registers through the pointwise ops after it
                body = body[:-1] + self._values(epilogue)
                body.append(f"tl.store(OUT + offs, {epilogue[-1].name}.to(OUT.dtype.element_ty), mask=mask)")
            params += ["n_rows", "N_COLS"] + (["RED_INNER"] if self.layout.reduce_dims is not None else [])
            tail = ["BLOCK_R: tl.constexpr", "BLOCK_C: tl.constexpr", "INDEX_64: tl.constexpr"]
        consts = [f"{c}: tl.constexpr" for c in self.consts]
        return _jit("_forward_kernel", params + consts + tail, body)

    def _pre_reduction(self) -> str:
        return self.graph.reduction.operands[0].ref

    def backward_kernel(self) -> str:
        g, red = self.graph, self.graph.reduction
        grad_inputs = [k for k, x in enumerate(g.inputs) if x.dtype != torch.bool]
        params = ["DOUT"] + [f"IN{k}" for k in range(len(g.inputs))] + [f"G_IN{k}" for k in grad_inputs]
        params += [s.name for s in g.scalars] + ["n_rows", "N_COLS", "tiles_per_program"]
        if self.layout.reduce_dims is not None:
            params.append("RED_INNER")
        kinds = {k: grad_kind(self.layout.kept[k]) for k in grad_inputs}
        body = ["pid_c = tl.program_id(0)", "pid_r = tl.program_id(1)",
                "cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)", "col_mask = cols < N_COLS"]
        body += [f"acc{k} = tl.zeros((BLOCK_C,), dtype=tl.float32)  # in{k}: column partial sums"
                 for k in grad_inputs if kinds[k] == "cols"]
        loop = ["tile = pid_r * tiles_per_program + t", "if INDEX_64:",
                "    rows = tile.to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)", "else:",
                "    rows = tile * BLOCK_R + tl.arange(0, BLOCK_R)"]
        loop += _tile_lines(None, self.layout.reduce_dims is not None) + self._loads("rows") + self._values()
        defined: set[str] = set()
        if red is None:
            top = g.pointwise[-1].name
            loop.append(f"g_{top} = tl.load(DOUT + offs, mask=mask, other=0.0).to(tl.float32)")
            defined.add(f"g_{top}")
        elif g.epilogue:
            last = g.epilogue[-1].name
            loop += _softmax_recompute(red, self._pre_reduction()) + self._values(g.epilogue)
            loop.append(f"g_{last} = tl.load(DOUT + offs, mask=mask, other=0.0).to(tl.float32)")
            defined.add(f"g_{last}")
            loop += self._reverse(g.epilogue, defined)
            loop.append(f"dy = tl.where(mask, g_{red.name}, 0.0)")
            loop += _softmax_grad(red, self._pre_reduction(), defined)
        else:
            loop += _reduction_backward(red, self._pre_reduction())
            defined.add(f"g_{self._pre_reduction()}")
        if g.prologue:
            loop += self._reverse(g.prologue, defined)
        for k in grad_inputs:
            name, kind = g.inputs[k].name, kinds[k]
            grad = f"g_{name}"
            if kind == "full":
                store = f"tl.store(G_IN{k} + offs, {grad}.to(G_IN{k}.dtype.element_ty), mask=mask)"
            elif kind == "cols":
                store = f"acc{k} += tl.sum(tl.where(mask, {grad}, 0.0), axis=0)"
            elif kind == "rows":
                store = (f"tl.store(G_IN{k} + pid_c * n_rows + rows, tl.sum(tl.where(mask, {grad}, 0.0), axis=1), "
                         f"mask=row_mask)")
            else:
                store = f"tl.store(G_IN{k} + offs, tl.where(mask, {grad}, 0.0), mask=mask)"
            loop += [f"if GRAD{k}:  # {name}: {kind}", f"    {store}"]
        body += ["for t in range(0, tiles_per_program):"] + ["    " + line for line in loop]
        for k in grad_inputs:
            if kinds[k] == "cols":
                body += [f"if GRAD{k}:", f"    tl.store(G_IN{k} + pid_r * N_COLS + cols, acc{k}, mask=col_mask)"]
        consts = [f"{c}: tl.constexpr" for c in self.consts]
        flags = [f"GRAD{k}: tl.constexpr" for k in grad_inputs]
        tail = ["BLOCK_R: tl.constexpr", "BLOCK_C: tl.constexpr", "INDEX_64: tl.constexpr"]
        return _jit("_backward_kernel", params + consts + flags + tail, body)


def _tile_lines(cols: str | None, strided: bool = False) -> list[str]:
    """Tile indices. `strided`: the reduced dim (the columns) is not the tensors' last: row r is
    (outer o, inner i) = (r // RED_INNER, r % RED_INNER), column c sits RED_INNER elements apart, and
    full-size tensors are read and written in their own (NCHW) layout, neither copied nor permuted."""
    lines = [f"cols = {cols}", "col_mask = cols < N_COLS"] if cols else []
    offs = ("offs = ((rows // RED_INNER) * (N_COLS * RED_INNER) + rows % RED_INNER)[:, None] + cols[None, :] * RED_INNER"
            if strided else "offs = rows[:, None] * N_COLS + cols[None, :]")
    return lines + ["row_mask = rows < n_rows", "mask = row_mask[:, None] & col_mask[None, :]", offs]


def _reduction_forward(node: Node, x: str) -> list[str]:
    kind, out = node.reduction, node.name
    store_rows = f"tl.store(OUT + rows, {out}.to(OUT.dtype.element_ty), mask=row_mask)"
    if kind in ("sum", "mean"):
        scale = " / N_COLS" if kind == "mean" else ""
        return [f"{out} = tl.sum(tl.where(mask, {x}, 0.0), axis=1){scale}  # {describe(node)}", store_rows]
    lines = [f"masked = tl.where(mask, {x}, {_NEG_INF})", _ROW_MAX]
    if kind == "amax":
        return lines + [f"{out} = row_max  # {describe(node)}", store_rows]
    if kind == "max":
        return lines + [f"{out} = row_max  # {describe(node)}", store_rows,
                        "tl.store(INDICES + rows, tl.argmax(masked, axis=1).to(tl.int64), mask=row_mask)"]
    lines.append("shifted = masked - row_max[:, None]")
    if kind == "softmax":
        lines += ["e = tl.exp(shifted)", f"{out} = e / tl.sum(e, axis=1)[:, None]  # {describe(node)}"]
    else:
        lines.append(f"{out} = shifted - tl.log(tl.sum(tl.exp(shifted), axis=1))[:, None]  # {describe(node)}")
    return lines + [f"tl.store(OUT + offs, {out}.to(OUT.dtype.element_ty), mask=mask)"]


def _reduction_backward(node: Node, x: str) -> list[str]:
    """g_<x>: the gradient at the reduction's input, from DOUT (per row, or per element)."""
    kind, g = node.reduction, f"g_{x}"
    per_row = "dy = tl.load(DOUT + rows, mask=row_mask, other=0.0).to(tl.float32)"
    if kind in ("sum", "mean"):
        scale = " / N_COLS" if kind == "mean" else ""
        return [per_row, f"{g} = tl.where(mask, dy[:, None]{scale}, 0.0)  # through {describe(node)}"]
    lines = [f"masked = tl.where(mask, {x}, {_NEG_INF})", _ROW_MAX]
    if kind == "amax":   # ties share the gradient equally, as torch's amax backward does
        return lines + [per_row, "hit = (masked == row_max[:, None]) & mask",
                        "count = tl.maximum(tl.sum(hit.to(tl.float32), axis=1), 1.0)",
                        f"{g} = tl.where(hit, (dy / count)[:, None], 0.0)  # through {describe(node)}"]
    if kind == "max":
        return lines + [per_row, "index = tl.argmax(masked, axis=1)",
                        f"{g} = tl.where(cols[None, :] == index[:, None], dy[:, None], 0.0)  # through {describe(node)}"]
    lines += ["shifted = masked - row_max[:, None]", "e = tl.exp(shifted)", "y = e / tl.sum(e, axis=1)[:, None]",
              "dy = tl.load(DOUT + offs, mask=mask, other=0.0).to(tl.float32)"]
    if kind == "softmax":
        return lines + [f"{g} = y * (dy - tl.sum(dy * y, axis=1)[:, None])  # through {describe(node)}"]
    return lines + [f"{g} = dy - y * tl.sum(dy, axis=1)[:, None]  # through {describe(node)}"]


def _softmax_recompute(node: Node, x: str) -> list[str]:
    """The softmax / log_softmax output (named as its node) and y = softmax, recomputed from x."""
    lines = [f"masked = tl.where(mask, {x}, {_NEG_INF})", _ROW_MAX, "shifted = masked - row_max[:, None]",
             "e = tl.exp(shifted)", "y = e / tl.sum(e, axis=1)[:, None]"]
    if node.reduction == "softmax":
        return lines + [f"{node.name} = y  # {describe(node)}"]
    return lines + [f"{node.name} = shifted - tl.log(tl.sum(e, axis=1))[:, None]  # {describe(node)}"]


def _softmax_grad(node: Node, x: str, defined: set[str]) -> list[str]:
    """g_<x> from `dy`, the gradient at the softmax's output (masked to the row)."""
    g = f"g_{x}"
    op = "+=" if g in defined else "="
    defined.add(g)
    if node.reduction == "softmax":
        return [f"{g} {op} y * (dy - tl.sum(dy * y, axis=1)[:, None])  # through {describe(node)}"]
    return [f"{g} {op} dy - y * tl.sum(dy, axis=1)[:, None]  # through {describe(node)}"]


def _jit(name: str, params: list[str], body: list[str]) -> str:
    head = f"@triton.jit\ndef {name}(" + _wrap(params, len(name) + 5) + "):"
    return head + "\n" + "\n".join("    " + line for line in body) + "\n"


def _wrap(items: list[str], indent: int, width: int = 110) -> str:
    lines, cur = [], ""
    for item in items:
        piece = item if not cur else cur + ", " + item
        if len(piece) + indent > width and cur:
            lines.append(cur + ",")
            cur = item
        else:
            cur = piece
    lines.append(cur)
    return ("\n" + " " * indent).join(lines)


def _shape(shape) -> str:
    return "(" + ", ".join(str(d) for d in shape) + ("," if len(shape) == 1 else "") + ")"


def describe(node: Node) -> str:
    args = ", ".join(_operand_text(o) for o in node.operands)
    params = ", ".join(f"{k}={_param_text(v)}" for k, v in node.params.items())
    return f"{node.record.name}({args}{', ' if args and params else ''}{params})"


def _operand_text(o: Operand) -> str:
    return repr(o.value) if o.kind == "const" else o.ref


def _param_text(value) -> str:
    if isinstance(value, torch.dtype):
        return dtype_name(value)
    return repr(value)


def spec_of(graph: Graph, layout: Layout, name: str) -> dict:
    """The static facts the runtime helpers check shapes against (the module's SPEC)."""
    spec = {"name": name, "rank": layout.rank, "groups": tuple(layout.groups),
            "inputs": tuple((x.name, x.dtype, tuple(layout.kept[k])) for k, x in enumerate(graph.inputs))}
    if layout.reduce_dims is not None:
        spec["reduce_dims"] = layout.reduce_dims
    return spec
