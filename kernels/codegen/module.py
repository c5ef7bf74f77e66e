"""The generated module as a whole: header, the runtime helpers, SPEC, the two kernels (emit.py),
their launchers, the torch.library ops, the autograd Function, `fused`, and the eager
`reference` (the traced aten ops, one call each).
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch

from fusion_advisor.kernels.codegen import runtime
from fusion_advisor.kernels.codegen.emit import KernelWriter, Layout, partition, spec_of
from fusion_advisor.kernels.codegen.graph import Graph, eager_args
from fusion_advisor.kernels.codegen.runtime import grad_kind
from fusion_advisor.kernels.registry import dtype_name

_RUNTIME_MARKER = "# ---- EMBED: everything below is copied into generated modules ----\n"
_WIDTH = 110


@dataclass
class GeneratedModule:
    name: str          # "g_1a2b3c4d5e"
    source: str
    layout: Layout


def module_source(graph: Graph, name: str, header: str) -> GeneratedModule:
    layout = partition(graph)
    forward, backward = KernelWriter(graph, layout), KernelWriter(graph, layout)
    kernels = [forward.forward_kernel(), backward.backward_kernel()]   # first: they record their constants
    host = _Host(graph, layout, name)
    parts = [f'"""{header}"""',
             _banner("shared helpers, the same in every generated module (fusion_advisor/kernels/codegen/runtime.py)"),
             runtime_source(),
             _banner(f"this chain: {name}"),
             _spec_literal(spec_of(graph, layout, name)),
             *kernels,
             host.output(), host.forward(forward.consts), host.backward(backward.consts),
             host.fakes(), host.registration(), host.function(), host.fused(), reference_source(graph)]
    return GeneratedModule(name, "\n\n\n".join(p.strip("\n") for p in parts) + "\n", layout)


def runtime_source() -> str:
    text = inspect.getsource(runtime)
    return text[text.index(_RUNTIME_MARKER) + len(_RUNTIME_MARKER):]


def reference_source(graph: Graph) -> str:
    """The eager chain: the traced aten ops, one call each, in order."""
    lines = [f"def reference({_signature(graph)}):",
             '    """The traced chain as eager PyTorch runs it: one aten op (one kernel) each."""']
    for node in graph.nodes:
        pos, kw = eager_args(node, lambda o: _Verbatim(o.ref) if o.kind in ("value", "input", "scalar") else o.value)
        args = [_py_value(a) for a in pos] + [f"{k}={_py_value(v)}" for k, v in kw.items()]
        cast = f".to(torch.{dtype_name(node.eager_cast)})" if node.eager_cast is not None else ""
        lines.append(f"    {node.name} = torch.ops.aten.{node.eager_name}({', '.join(args)}){cast}")
    lines.append(f"    return {graph.nodes[-1].name}")
    return "\n".join(lines)


class _Verbatim(str):
    """An argument that is a variable name in the generated code."""


def _py_value(value) -> str:
    if isinstance(value, _Verbatim):
        return str(value)
    if isinstance(value, torch.dtype):
        return f"torch.{dtype_name(value)}"
    if isinstance(value, float) and (value != value or value in (float("inf"), float("-inf"))):
        return f'float("{value}")'
    return repr(value)


def _signature(graph: Graph) -> str:
    scalars = [s.name for s in graph.scalars]
    return ", ".join(x.name for x in graph.inputs) + (", *, " + ", ".join(scalars) if scalars else "")


def _banner(text: str) -> str:
    rule = "# " + "-" * (_WIDTH - 2)
    return f"{rule}\n# {text}\n{rule}"


def _spec_literal(spec: dict) -> str:
    inputs = "".join(f'        ("{n}", torch.{dtype_name(d)}, {kept!r}),\n' for n, d, kept in spec["inputs"])
    return (f'SPEC = {{\n    "name": "{spec["name"]}",\n    "rank": {spec["rank"]},\n'
            f'    "groups": {spec["groups"]!r},\n    "inputs": (\n{inputs}    ),\n}}')


def _tuple(items: list[str]) -> str:
    return "(" + ", ".join(items) + ("," if len(items) == 1 else "") + ")"


def _call(head: str, args: list[str], indent: str) -> list[str]:
    """`head(args)` at `indent`, on one line if it fits, else wrapped under a hanging indent."""
    one = f"{indent}{head}({', '.join(args)})"
    if len(one) <= _WIDTH:
        return [one]
    lines, cur, inner = [f"{indent}{head}("], "", indent + "    "
    for a in args:
        piece = f"{cur}, {a}" if cur else a
        if cur and len(inner) + len(piece) + 1 > _WIDTH:
            lines.append(f"{inner}{cur},")
            cur = a
        else:
            cur = piece
    lines.append(f"{inner}{cur})")
    return lines


class _Host:
    """Writes the host-side functions of one generated module."""

    def __init__(self, graph: Graph, layout: Layout, name: str):
        self.graph, self.layout, self.name = graph, layout, name
        self.ins = [x.name for x in graph.inputs]
        self.scalars = [s.name for s in graph.scalars]
        self.grad_inputs = [k for k, x in enumerate(graph.inputs) if x.dtype != torch.bool]
        self.red = graph.reduction
        self.two_outputs = self.red is not None and self.red.reduction == "max"
        self.shapes = "[" + ", ".join(f"{a}.shape" for a in self.ins) + "]"
        self.floats = [f"float({s})" for s in self.scalars]

    def output(self) -> str:
        shape = "shape"
        if self.red is not None and self.red.reduction not in ("softmax", "log_softmax"):
            shape = "shape[:-1] + (1,)" if self.red.params.get("keepdim") else "shape[:-1]"
        out = f"torch.empty({shape}, dtype=torch.{dtype_name(self.graph.nodes[-1].dtype)}, device=device)"
        if self.two_outputs:
            out += f", torch.empty({shape}, dtype=torch.int64, device=device)"
        return f"def _output(shape, device):\n    return {out}"

    def _prologue(self) -> list[str]:
        return [f"    [{', '.join(self.ins)}] = prepare_inputs(SPEC, [{', '.join(self.ins)}])",
                f"    shape = loop_shape(SPEC, {self.shapes})"]

    def forward(self, consts: list[str]) -> str:
        tensors = ", ".join(f"{a}: torch.Tensor" for a in self.ins)
        scalars = "".join(f", {s}: float" for s in self.scalars)
        returns = "tuple[torch.Tensor, torch.Tensor]" if self.two_outputs else "torch.Tensor"
        lines = [f"def _forward({tensors}{scalars}) -> {returns}:", *self._prologue(),
                 f"    outputs = _output(shape, {self.ins[0]}.device)",
                 "    out = outputs[0]" if self.two_outputs else "    out = outputs"]
        kw = [f'{c}=c["{c}"]' for c in consts]
        if self.red is None:
            lines += [f"    c = index_constants(SPEC, shape, {self.shapes}, \"flat\")",
                      "    n = out.numel()",
                      "    block, warps = flat_block(n)",
                      "    if n:"]
            lines += _call("_forward_kernel[(triton.cdiv(n, block),)]",
                           [*self.ins, "out", *self.floats, "n", *kw, "BLOCK_SIZE=block", "INDEX_64=n >= 2**31",
                            "num_warps=warps"], "        ")
        else:
            indices = ["outputs[1]"] if self.two_outputs else []
            lines += [f"    c = index_constants(SPEC, shape, {self.shapes}, \"rows\")",
                      "    sizes = group_sizes(SPEC, shape)",
                      "    n_rows, n_cols = math.prod(sizes[:-1]), sizes[-1]",
                      "    block_r, block_c, warps = row_tile(n_rows, n_cols, whole_row=True)",
                      "    if n_rows * n_cols:"]
            lines += _call("_forward_kernel[(triton.cdiv(n_rows, block_r),)]",
                           [*self.ins, "out", *indices, *self.floats, "n_rows", "n_cols", *kw, "BLOCK_R=block_r",
                            "BLOCK_C=block_c", "INDEX_64=n_rows * n_cols >= 2**31", "num_warps=warps"], "        ")
        lines.append("    return outputs")
        return "\n".join(lines)

    def backward(self, consts: list[str]) -> str:
        tensors = ", ".join(f"{a}: torch.Tensor" for a in self.ins)
        scalars = "".join(f", {s}: float" for s in self.scalars)
        lines = [f"def _backward(dout: torch.Tensor, {tensors}{scalars}, wanted: list[bool]) -> list[torch.Tensor]:",
                 '    """Gradients of the inputs that `wanted` flags (the float inputs, in order)."""',
                 *self._prologue(),
                 "    dout = dout.contiguous()",
                 f"    c = index_constants(SPEC, shape, {self.shapes}, \"rows\")",
                 "    sizes = group_sizes(SPEC, shape)",
                 "    n_rows, n_cols = math.prod(sizes[:-1]), sizes[-1]",
                 f"    block_r, block_c, warps = row_tile(n_rows, n_cols, whole_row={self.red is not None})",
                 "    n_col_tiles = triton.cdiv(n_cols, block_c)",
                 "    programs, per_program = row_programs(triton.cdiv(n_rows, block_r), n_col_tiles, dout.device)"]
        bufs = []
        for j, k in enumerate(self.grad_inputs):
            x = self.graph.inputs[k]
            kind = grad_kind(self.layout.kept[k])
            lines.append(f"    buf{k} = grad_buffer(\"{kind}\", {x.name}.shape, torch.{dtype_name(x.dtype)}, sizes, programs, "
                         f"n_col_tiles, dout.device) if wanted[{j}] else dout")
            bufs.append(f"buf{k}")
        kw = [f'{c}=c["{c}"]' for c in consts]
        flags = [f"GRAD{k}=bool(wanted[{j}])" for j, k in enumerate(self.grad_inputs)]
        lines.append("    if n_rows * n_cols:")
        lines += _call("_backward_kernel[(n_col_tiles, programs)]",
                       ["dout", *self.ins, *bufs, *self.floats, "n_rows", "n_cols", "per_program", *kw, *flags,
                        "BLOCK_R=block_r", "BLOCK_C=block_c", "INDEX_64=n_rows * n_cols >= 2**31", "num_warps=warps"],
                       "        ")
        lines += ["    else:                      # an empty loop: partial sums of nothing",
                  f"        for buf, w in zip([{', '.join(bufs)}], wanted):",
                  "            if w:",
                  "                buf.zero_()",
                  "    grads = []"]
        for j, k in enumerate(self.grad_inputs):
            x = self.graph.inputs[k]
            lines += [f"    if wanted[{j}]:",
                      f"        grads.append(finish_grad(\"{grad_kind(self.layout.kept[k])}\", buf{k}, SPEC[\"inputs\"][{k}][2], "
                      f"sizes, {x.name}.shape, torch.{dtype_name(x.dtype)}))"]
        lines.append("    return grads")
        return "\n".join(lines)

    def fakes(self) -> str:
        args = ", ".join(self.ins + self.scalars)
        grads = ", ".join(self.graph.inputs[k].name for k in self.grad_inputs)
        return (f"def _forward_fake({args}):\n"
                f"    return _output(loop_shape(SPEC, {self.shapes}), {self.ins[0]}.device)\n\n\n"
                f"def _backward_fake(dout, {args}, wanted):\n"
                f"    return [torch.empty_like(t) for t, w in zip([{grads}], wanted) if w]")

    def registration(self) -> str:
        n = self.name
        return (f"# torch.library ops: a patched model still runs under torch.compile. A second import of this\n"
                f"# code (from another path) finds the ops registered and uses them.\n"
                f"if not hasattr(torch.ops.fusion_kernels, \"{n}_fwd\"):\n"
                f"    torch.library.custom_op(\"fusion_kernels::{n}_fwd\", _forward, mutates_args=()).register_fake(_forward_fake)\n"
                f"    torch.library.custom_op(\"fusion_kernels::{n}_bwd\", _backward, mutates_args=()).register_fake(_backward_fake)")

    def function(self) -> str:
        args = self.ins + self.scalars
        wanted = [f"ctx.needs_input_grad[{k}]" for k in self.grad_inputs]
        result, j = [], 0
        for x in self.graph.inputs:
            if x.dtype == torch.bool:
                result.append("None")
            else:
                result.append(f"next(grads) if wanted[{j}] else None")
                j += 1
        result += ["None"] * len(self.scalars)
        lines = ["class _Function(torch.autograd.Function):",
                 "    @staticmethod",
                 f"    def forward(ctx, {', '.join(args)}):",
                 f"        outputs = torch.ops.fusion_kernels.{self.name}_fwd({', '.join(args)})",
                 f"        ctx.save_for_backward({', '.join(self.ins)})   # the inputs only: backward recomputes the rest",
                 f"        ctx.scalars = {_tuple(self.scalars)}"]
        if self.two_outputs:
            lines.append("        ctx.mark_non_differentiable(outputs[1])")
        lines += ["        return outputs", "",
                  "    @staticmethod",
                  f"    def backward(ctx, {'dout, _dindices' if self.two_outputs else 'dout'}):",
                  f"        [{', '.join(self.ins)}] = ctx.saved_tensors",
                  f"        wanted = [{', '.join(wanted)}]",
                  "        if not any(wanted):",
                  f"            return {_tuple(['None'] * len(args))}",
                  f"        grads = iter(torch.ops.fusion_kernels.{self.name}_bwd(dout, {', '.join(self.ins)}, *ctx.scalars, wanted))"]
        if len(result) == 1:
            lines.append(f"        return ({result[0]},)")
        else:
            lines += _call("return ", result, "        ")
        return "\n".join(lines)

    def fused(self) -> str:
        args = self.ins + self.scalars
        return (f"def fused({_signature(self.graph)}):\n"
                f"    \"\"\"The whole chain as one Triton kernel each way (autograd-aware; see the module docstring).\"\"\"\n"
                f"    return _Function.apply({', '.join(args)})")
