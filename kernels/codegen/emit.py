"""Triton source for a Graph: one forward kernel, one backward kernel, their launchers, the
custom_op / autograd glue and the eager reference, as one standalone Python module.

Kernel layouts (see runtime.py for the words):
  forward, pointwise chain   1-D blocks over the flattened loop shape. Inputs of the loop's shape
                             load contiguously (vectorised); a broadcast input loads through
                             per-group index arithmetic by compile-time constants; an input
                             broadcast everywhere loads once per program. Every op runs in fp32
                             registers; only the output is written.
  forward, reduction tail    (rows, whole row) tiles: the chain, then the reduction over the row.
  backward                   (rows, cols) tiles. It reloads the inputs, recomputes every forward
                             value (nothing but the inputs is saved), then runs each op's local
                             derivative in reverse. Gradients of inputs with the loop's shape are
                             stored directly; those of broadcast inputs are summed in the kernel
                             into small fp32 partial buffers, and a second small torch reduction
                             (runtime.finish_grad) sums those to the input's shape.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch

from fusion_advisor.kernels.codegen import runtime
from fusion_advisor.kernels.codegen.graph import Graph, Node, Operand, eager_args
from fusion_advisor.kernels.codegen.runtime import grad_kind, padded
from fusion_advisor.kernels.registry import dtype_name

_TL = {torch.float32: "tl.float32", torch.float16: "tl.float16", torch.bfloat16: "tl.bfloat16"}
_NEG_INF = '-float("inf")'
# Rows past the end hold -inf only: their max is made 0 so that no nan is computed (and stored nowhere).
_ROW_MAX = "row_max = tl.where(row_mask, tl.max(masked, axis=1), 0.0)"


@dataclass
class Layout:
    rank: int
    groups: list[tuple[int, ...]]
    kept: list[tuple[bool, ...]]      # per input, per group


def partition(graph: Graph) -> Layout:
    """Cut the loop shape's dims into groups (runtime.py). Size-1 dims join the next group; a
    reduction's last dim is a group of its own."""
    shape = graph.loop_shape
    rank = max(1, len(shape))
    full = padded(shape, rank)
    shapes = [padded(x.shape, rank) for x in graph.inputs]
    flags = [tuple(s[d] == full[d] for s in shapes) for d in range(rank)]
    alone = rank - 1 if graph.reduction is not None else None
    core = [d for d in range(rank) if full[d] != 1 or d == alone]
    groups: list[list[int]] = []
    for d in core:
        if groups and d != alone and groups[-1][-1] != alone and flags[d] == flags[groups[-1][-1]]:
            groups[-1].append(d)
        else:
            groups.append([d])
    if not groups:
        groups = [[rank - 1]]
    for d in range(rank):
        if not any(d in g for g in groups):
            target = next((g for g in groups if g[0] > d), groups[-1])
            target.append(d)
            target.sort()
    kept = [tuple(all(s[d] == full[d] for d in g) for g in groups) for s in shapes]
    return Layout(rank, [tuple(g) for g in groups], kept)


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
    def _values(self) -> list[str]:
        lines = []
        for node in self.graph.pointwise:
            x = [o.ref for o in node.operands]
            if node.spec.kind == "cast":
                expr = {torch.float32: x[0], torch.bfloat16: f"round_to_bf16({x[0]})",
                        torch.float16: f"{x[0]}.to(tl.float16).to(tl.float32)"}[node.dtype]
            else:
                expr = node.spec.forward(x, node.params)
            lines.append(f"{node.name} = {expr}  # {describe(node)}")
        return lines

    def _reverse(self) -> list[str]:
        """Reverse-mode through the pointwise nodes, from g_<last pointwise value>."""
        lines, defined = [], {f"g_{self.graph.pointwise[-1].name}"}
        differentiable = {x.name for x in self.graph.inputs if x.dtype != torch.bool}
        for node in reversed(self.graph.pointwise):
            g = f"g_{node.name}"
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
            body += _tile_lines("tl.arange(0, BLOCK_C)")
            body += self._loads("rows") + self._values() + _reduction_forward(red, self._pre_reduction())
            params += ["n_rows", "N_COLS"]
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
        kinds = {k: grad_kind(self.layout.kept[k]) for k in grad_inputs}
        body = ["pid_c = tl.program_id(0)", "pid_r = tl.program_id(1)",
                "cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)", "col_mask = cols < N_COLS"]
        body += [f"acc{k} = tl.zeros((BLOCK_C,), dtype=tl.float32)  # in{k}: column partial sums"
                 for k in grad_inputs if kinds[k] == "cols"]
        loop = ["tile = pid_r * tiles_per_program + t", "if INDEX_64:",
                "    rows = tile.to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)", "else:",
                "    rows = tile * BLOCK_R + tl.arange(0, BLOCK_R)"]
        loop += _tile_lines(None) + self._loads("rows") + self._values()
        top = g.pointwise[-1].name if g.pointwise else None
        if red is None:
            loop.append(f"g_{top} = tl.load(DOUT + offs, mask=mask, other=0.0).to(tl.float32)")
        else:
            loop += _reduction_backward(red, self._pre_reduction())
            top = self._pre_reduction()
        if g.pointwise:
            loop += self._reverse()
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


def _tile_lines(cols: str | None) -> list[str]:
    lines = [f"cols = {cols}", "col_mask = cols < N_COLS"] if cols else []
    return lines + ["row_mask = rows < n_rows", "mask = row_mask[:, None] & col_mask[None, :]",
                    "offs = rows[:, None] * N_COLS + cols[None, :]"]


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


# -- the module ---------------------------------------------------------------------------------
def _py_value(value) -> str:
    if isinstance(value, torch.dtype):
        return f"torch.{dtype_name(value)}"
    if isinstance(value, float) and (value != value or value in (float("inf"), float("-inf"))):
        return f'float("{value}")'
    return repr(value)


def reference_source(graph: Graph) -> str:
    """The eager chain: the traced aten ops, one call each, in order."""
    args = [x.name for x in graph.inputs]
    sig = ", ".join(args) + (", *, " + ", ".join(s.name for s in graph.scalars) if graph.scalars else "")
    lines = [f"def reference({sig}):",
             '    """The traced chain as eager PyTorch runs it: one aten op (one kernel) each."""']
    for node in graph.nodes:
        pos, kw = eager_args(node, lambda o: _Verbatim(o.ref) if o.kind in ("value", "input", "scalar") else o.value)
        text = [repr(a) if isinstance(a, _Verbatim) else _py_value(a) for a in pos]
        text += [f"{k}={_py_value(v)}" for k, v in kw.items()]
        cast = f".to(torch.{dtype_name(node.eager_cast)})" if node.eager_cast is not None else ""
        lines.append(f"    {node.name} = torch.ops.aten.{node.eager_name}({', '.join(text)}){cast}")
    lines.append(f"    return {graph.nodes[-1].name}")
    return "\n".join(lines) + "\n"


class _Verbatim(str):
    def __repr__(self) -> str:
        return str(self)


def runtime_source() -> str:
    text = inspect.getsource(runtime)
    marker = "# ---- EMBED: everything below is copied into generated modules ----\n"
    return text[text.index(marker) + len(marker):]


@dataclass
class GeneratedModule:
    name: str          # "g_1a2b3c4d5e"
    source: str
    layout: Layout


def module_source(graph: Graph, name: str, header: str) -> GeneratedModule:
    layout = partition(graph)
    forward = KernelWriter(graph, layout)
    fwd_kernel = forward.forward_kernel()
    backward = KernelWriter(graph, layout)
    bwd_kernel = backward.backward_kernel()
    parts = [f'"""{header}"""', runtime_source().rstrip() + "\n", "# " + "-" * 97,
             f"# The generated kernels for {name}", "# " + "-" * 97,
             _spec_literal(spec_of(graph, layout, name)), fwd_kernel, bwd_kernel,
             _launchers(graph, layout, name, forward.consts, backward.consts), reference_source(graph)]
    return GeneratedModule(name, "\n\n".join(p.rstrip("\n") for p in parts) + "\n", layout)


def spec_of(graph: Graph, layout: Layout, name: str) -> dict:
    """The static facts the runtime helpers check shapes against (the module's SPEC)."""
    return {"name": name, "rank": layout.rank, "groups": tuple(layout.groups),
            "inputs": tuple((x.name, x.dtype, tuple(layout.kept[k])) for k, x in enumerate(graph.inputs))}


def _spec_literal(spec: dict) -> str:
    inputs = ",\n".join(f"        ({n!r}, torch.{dtype_name(d)}, {kept!r})" for n, d, kept in spec["inputs"])
    return (f"SPEC = {{\n    \"name\": {spec['name']!r},\n    \"rank\": {spec['rank']},\n"
            f"    \"groups\": {spec['groups']!r},\n    \"inputs\": (\n{inputs},\n    ),\n}}")


def _launchers(graph: Graph, layout: Layout, name: str, fwd_consts: list[str], bwd_consts: list[str]) -> str:
    ins = [x.name for x in graph.inputs]
    scalars = [s.name for s in graph.scalars]
    grad_inputs = [k for k, x in enumerate(graph.inputs) if x.dtype != torch.bool]
    red = graph.reduction
    out_node = graph.nodes[-1]
    out_dtype = f"torch.{dtype_name(out_node.dtype)}"
    two_outputs = red is not None and red.reduction == "max"
    tensor_args = ", ".join(f"{a}: torch.Tensor" for a in ins)
    scalar_args = "".join(f", {s}: float" for s in scalars)
    scalar_vals = "".join(f", float({s})" for s in scalars)
    returns = "tuple[torch.Tensor, torch.Tensor]" if two_outputs else "torch.Tensor"
    consts_f = "".join(f", {c}=c[{c!r}]" for c in fwd_consts)
    consts_b = "".join(f", {c}=c[{c!r}]" for c in bwd_consts)
    lst = ", ".join(ins)
    shapes = f"[{', '.join(a + '.shape' for a in ins)}]"
    out_shape = "shape"
    if red is not None and red.reduction != "softmax" and red.reduction != "log_softmax":
        keep = bool(red.params.get("keepdim"))
        out_shape = "shape[:-1] + (1,)" if keep else "shape[:-1]"
    L = []
    L.append(f"def _output(shape, device):\n    out = torch.empty({out_shape}, dtype={out_dtype}, device=device)")
    if two_outputs:
        L[-1] += f"\n    return out, torch.empty({out_shape}, dtype=torch.int64, device=device)"
    else:
        L[-1] += "\n    return out"
    fwd = [f"def _forward({tensor_args}{scalar_args}) -> {returns}:",
           f"    {lst}, = prepare_inputs(SPEC, [{lst}])",
           f"    shape = loop_shape(SPEC, {shapes})",
           f"    outputs = _output(shape, {ins[0]}.device)",
           f"    out = outputs[0] if isinstance(outputs, tuple) else outputs"]
    if red is None:
        fwd += [f"    c = index_constants(SPEC, shape, {shapes}, 'flat')",
                "    n = out.numel()",
                "    block, warps = flat_block(n)",
                "    if n:",
                f"        _forward_kernel[(triton.cdiv(n, block),)]({lst}, out{scalar_vals}, n{consts_f},",
                "                                                   BLOCK_SIZE=block, INDEX_64=n >= 2**31, num_warps=warps)"]
    else:
        idx = ", outputs[1]" if two_outputs else ""
        fwd += [f"    c = index_constants(SPEC, shape, {shapes}, 'rows')",
                "    sizes = group_sizes(SPEC, shape)",
                "    n_cols = sizes[-1]",
                "    n_rows = math.prod(sizes[:-1])",
                "    block_r, block_c, warps = row_tile(n_rows, n_cols, whole_row=True)",
                "    if n_rows * n_cols:",
                f"        _forward_kernel[(triton.cdiv(n_rows, block_r),)]({lst}, out{idx}{scalar_vals}, n_rows, n_cols"
                f"{consts_f},",
                "                                                        BLOCK_R=block_r, BLOCK_C=block_c,",
                "                                                        INDEX_64=n_rows * n_cols >= 2**31, num_warps=warps)"]
    fwd.append("    return outputs")
    L.append("\n".join(fwd))
    # backward launcher
    wanted = [f"wanted[{j}]" for j in range(len(grad_inputs))]
    bufs = []
    for j, k in enumerate(grad_inputs):
        x = graph.inputs[k]
        kind = grad_kind(layout.kept[k])
        bufs.append(f"    buf{k} = grad_buffer({kind!r}, {x.name}.shape, torch.{dtype_name(x.dtype)}, sizes, programs, "
                    f"n_col_tiles, dout.device) if wanted[{j}] else dout")
    bwd = [f"def _backward(dout: torch.Tensor, {tensor_args}{scalar_args}, wanted: list[bool]) -> list[torch.Tensor]:",
           f"    {lst}, = prepare_inputs(SPEC, [{lst}])",
           "    dout = dout.contiguous()",
           f"    shape = loop_shape(SPEC, {shapes})",
           f"    c = index_constants(SPEC, shape, {shapes}, 'rows')",
           "    sizes = group_sizes(SPEC, shape)",
           "    n_cols = sizes[-1]",
           "    n_rows = math.prod(sizes[:-1])",
           f"    block_r, block_c, warps = row_tile(n_rows, n_cols, whole_row={red is not None})",
           "    n_col_tiles = triton.cdiv(n_cols, block_c)",
           "    programs, per_program = row_programs(triton.cdiv(n_rows, block_r), n_col_tiles, dout.device)"]
    bwd += bufs
    buf_args = ", ".join(f"buf{k}" for k in grad_inputs)
    flags = "".join(f", GRAD{k}=bool(wanted[{j}])" for j, k in enumerate(grad_inputs))
    bwd += ["    if n_rows * n_cols:",
            f"        _backward_kernel[(n_col_tiles, programs)](dout, {lst}, {buf_args}{scalar_vals}, n_rows, n_cols, "
            f"per_program{consts_b}{flags},",
            "                                                  BLOCK_R=block_r, BLOCK_C=block_c,",
            "                                                  INDEX_64=n_rows * n_cols >= 2**31, num_warps=warps)",
            "    else:"]
    bwd += ["        for buf, w in zip([" + ", ".join(f"buf{k}" for k in grad_inputs) + "], wanted):",
            "            if w:",
            "                buf.zero_()"]
    bwd.append("    grads = []")
    for j, k in enumerate(grad_inputs):
        x = graph.inputs[k]
        bwd += [f"    if wanted[{j}]:",
                f"        grads.append(finish_grad({grad_kind(layout.kept[k])!r}, buf{k}, SPEC['inputs'][{k}][2], sizes, "
                f"{x.name}.shape, torch.{dtype_name(x.dtype)}))"]
    bwd.append("    return grads")
    L.append("\n".join(bwd))
    # fakes, registration, autograd
    grad_names = [graph.inputs[k].name for k in grad_inputs]
    L.append(f"def _forward_fake({', '.join(ins + scalars)}):\n"
             f"    return _output(loop_shape(SPEC, {shapes}), {ins[0]}.device)")
    L.append(f"def _backward_fake(dout, {', '.join(ins + scalars)}, wanted):\n"
             f"    return [torch.empty_like(t) for t, w in zip([{', '.join(grad_names)}], wanted) if w]")
    L.append(f"# torch.library registration: a patched model still runs under torch.compile. A second import of\n"
             f"# this code (from another path) finds the ops registered and uses them.\n"
             f"if not hasattr(torch.ops.fusion_kernels, \"{name}_fwd\"):\n"
             f"    torch.library.custom_op(\"fusion_kernels::{name}_fwd\", _forward, mutates_args=()).register_fake(_forward_fake)\n"
             f"    torch.library.custom_op(\"fusion_kernels::{name}_bwd\", _backward, mutates_args=()).register_fake(_backward_fake)")
    all_args = ins + scalars
    saved = ", ".join(ins)
    needs = ", ".join(f"ctx.needs_input_grad[{k}]" for k in grad_inputs)
    ret = []
    it = 0
    for k, x in enumerate(graph.inputs):
        if x.dtype == torch.bool:
            ret.append("None")
        else:
            ret.append(f"next(grads) if wanted[{it}] else None")
            it += 1
    ret += ["None"] * len(scalars)
    bwd_sig = "dout, _dindices" if two_outputs else "dout"
    fn = [f"class _Function(torch.autograd.Function):",
          "    @staticmethod",
          f"    def forward(ctx, {', '.join(all_args)}):",
          f"        outputs = torch.ops.fusion_kernels.{name}_fwd({', '.join(all_args)})",
          f"        ctx.save_for_backward({saved})",
          f"        ctx.scalars = ({''.join(s + ', ' for s in scalars)})"]
    if two_outputs:
        fn.append("        ctx.mark_non_differentiable(outputs[1])")
    fn += ["        return outputs", "",
           "    @staticmethod",
           f"    def backward(ctx, {bwd_sig}):",
           f"        {saved}, = ctx.saved_tensors",
           f"        wanted = [{needs}]",
           f"        if not any(wanted):",
           f"            return ({'None, ' * len(all_args)})",
           f"        grads = iter(torch.ops.fusion_kernels.{name}_bwd(dout, {saved}, *ctx.scalars, wanted))",
           f"        return ({', '.join(ret)},)"]
    L.append("\n".join(fn))
    sig = ", ".join(ins) + (", *, " + ", ".join(scalars) if scalars else "")
    L.append(f"def fused({sig}):\n"
             f"    \"\"\"The whole chain as one Triton kernel each way (autograd-aware; see the module docstring).\"\"\"\n"
             f"    return _Function.apply({', '.join(all_args)})")
    return "\n\n\n".join(L) + "\n"
