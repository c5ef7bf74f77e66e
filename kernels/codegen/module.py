"""The generated module as a whole: header, the runtime helpers, SPEC, the two kernels (emit.py),
the launch-plan cache, their launchers, the torch.library ops (kernels/fused_op.py's decorator, as
hand-written kernels register theirs), the autograd Function, `fused`, and the eager `reference`
(the traced aten ops, one call each).

The host path is kept short because it runs on every call, and on small tensors its CPU time,
not the kernel, sets the pace: an eager call builds a key from its inputs' shapes, dtypes and
devices, looks its LaunchPlan up (runtime.plan_launches computes one per new key), allocates and
launches. It enters the autograd Function only when an input needs a gradient, and the custom
ops only under torch.compile (which cannot trace a launch) or for tensors a launch cannot take
(fake, meta, subclasses).
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch

from fusion_advisor.kernels import fused_op as fused_op_module
from fusion_advisor.kernels.codegen import runtime
from fusion_advisor.kernels.codegen.emit import KernelWriter, Layout, partition, spec_of
from fusion_advisor.kernels.codegen.graph import Graph, eager_args
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
             fused_op_source(),
             _banner(f"this chain: {name}"),
             _spec_literal({**spec_of(graph, layout, name), "reduction": graph.reduction is not None,
                            "forward_constants": tuple(forward.consts), "backward_constants": tuple(backward.consts)}),
             *kernels,
             host.output(), host.plan(), host.forward(), host.backward(),
             host.fakes(), host.ops(), host.function(), host.fused(),
             reference_source(graph)]
    return GeneratedModule(name, "\n\n\n".join(p.strip("\n") for p in parts) + "\n", layout)


def runtime_source() -> str:
    text = inspect.getsource(runtime)
    return text[text.index(_RUNTIME_MARKER) + len(_RUNTIME_MARKER):]


def fused_op_source() -> str:
    """kernels/fused_op.py's decorator: generated kernels register and dispatch as hand-written ones."""
    text = inspect.getsource(fused_op_module)
    return text[text.index(_RUNTIME_MARKER) + len(_RUNTIME_MARKER):]


def reference_source(graph: Graph) -> str:
    """The eager chain: the traced aten ops, one call each, in order."""
    lines = [f"def reference({_signature(graph)}):",
             '    """The traced chain as eager PyTorch runs it: one aten op (one kernel) each."""']
    def operand(node, o):
        if o.kind not in ("value", "input", "scalar"):
            return o.value
        if node.autocast and o.kind != "scalar" and graph.dtype_of(o.ref) in (torch.float16, torch.bfloat16):
            return _Verbatim(f"{o.ref}.float()")      # autocast's cast, spelled out: the same outside autocast
        return _Verbatim(o.ref)

    for node in graph.nodes:
        pos, kw = eager_args(node, lambda o: operand(node, o))
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
    rest = "".join(f'    "{key}": {_literal(value)},\n' for key, value in spec.items() if key not in ("name", "inputs"))
    return f'SPEC = {{\n    "name": "{spec["name"]}",\n{rest}    "inputs": (\n{inputs}    ),\n}}'


def _literal(value) -> str:
    """repr, with strings in double quotes as in the rest of the module."""
    if isinstance(value, tuple):
        return _tuple([_literal(v) for v in value])
    return f'"{value}"' if isinstance(value, str) else repr(value)


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
            a, b = self.graph.reduced_block     # counted from the end: a call may have fewer leading dims
            rank = len(self.graph.loop_shape)
            head, tail = f"shape[:{a - rank}]", f"shape[{b + 1 - rank}:]" if b + 1 < rank else "()"
            ones = f" + {(1,) * (b - a + 1)!r}" if self.red.params.get("keepdim") else ""
            shape = f"{head}{ones} + {tail}"
        out = f"torch.empty({shape}, dtype=torch.{dtype_name(self.graph.nodes[-1].dtype)}, device=device)"
        if self.two_outputs:
            out += f", torch.empty({shape}, dtype=torch.int64, device=device)"
        return f"def _output(shape, device):\n    return {out}"

    def plan(self) -> str:
        args = ", ".join(self.ins)
        fields = [f"{a}.{field}" for field in ("shape", "dtype", "device") for a in self.ins]
        return "\n".join([
            "PLANS = {}   # LaunchPlan by the inputs' (shapes, dtypes, devices): see plan_launches", "", "",
            f"def _plan({args}):",
            '    """The launch plan for these inputs: computed (and the inputs checked) on the first call with',
            '    their shapes, dtypes and devices, looked up after that."""',
            "    try:", *_call("key = ", fields, "        "),
            "    except AttributeError:     # not a tensor: plan_launches says which",
            "        key = None",
            "    plan = PLANS.get(key)",
            "    if plan is None:",
            f"        plan = PLANS[key] = plan_launches(SPEC, [{args}])",
            "    return plan"])

    def _contiguous(self) -> list[str]:
        # self when it already is: no copy. A broadcast input of a reduction over a dim that is not
        # the last is laid out in the kernels' logical order (runtime.to_logical).
        if self.layout.reduce_dims is None:
            return [f"{a}.contiguous()" for a in self.ins]
        return [f"{a}.contiguous()" if all(kept) else f"to_logical(SPEC, {a})"
                for a, kept in zip(self.ins, self.layout.kept)]

    def forward(self) -> str:
        tensors = ", ".join(f"{a}: torch.Tensor" for a in self.ins)
        scalars = "".join(f", {s}: float" for s in self.scalars)
        returns = "tuple[torch.Tensor, torch.Tensor]" if self.two_outputs else "torch.Tensor"
        outs = ["outputs[0]", "outputs[1]"] if self.two_outputs else ["outputs"]
        lines = [f"def _forward({tensors}{scalars}) -> {returns}:",
                 f"    plan = _plan({', '.join(self.ins)})",
                 f"    outputs = _output(plan.shape, {self.ins[0]}.device)",
                 "    if not plan.empty:"]
        lines += _call("_forward_kernel[plan.forward_grid]",
                       [*self._contiguous(), *outs, *self.floats, "*plan.forward_sizes", "**plan.forward_meta"],
                       "        ")
        lines.append("    return outputs")
        return "\n".join(lines)

    def backward(self) -> str:
        tensors = ", ".join(f"{a}: torch.Tensor" for a in self.ins)
        scalars = "".join(f", {s}: float" for s in self.scalars)
        lines = [f"def _backward(dout: torch.Tensor, {tensors}{scalars}, wanted: list[bool]) -> list[torch.Tensor]:",
                 '    """Gradients of the inputs that `wanted` flags (the float inputs, in order)."""',
                 f"    plan = _plan({', '.join(self.ins)})",
                 "    dout = dout.contiguous()"]
        bufs = []
        for j, k in enumerate(self.grad_inputs):
            lines.append(f"    buf{k} = grad_buffer(plan, {k}, dout.device) if wanted[{j}] else dout")
            bufs.append(f"buf{k}")
        flags = [f"GRAD{k}=bool(wanted[{j}])" for j, k in enumerate(self.grad_inputs)]
        lines.append("    if not plan.empty:")
        lines += _call("_backward_kernel[plan.backward_grid]",
                       ["dout", *self._contiguous(), *bufs, *self.floats, "*plan.backward_sizes", *flags,
                        "**plan.backward_meta"], "        ")
        lines += ["    else:                      # an empty loop: partial sums of nothing",
                  f"        for buf, w in zip([{', '.join(bufs)}], wanted):",
                  "            if w:",
                  "                buf.zero_()",
                  "    grads = []"]
        for j, k in enumerate(self.grad_inputs):
            lines += [f"    if wanted[{j}]:", f"        grads.append(finish_grad(plan, {k}, buf{k}))"]
        lines.append("    return grads")
        return "\n".join(lines)

    def fakes(self) -> str:
        args = ", ".join(self.ins + self.scalars)
        grads = ", ".join(self.graph.inputs[k].name for k in self.grad_inputs)
        return (f"def _forward_fake({args}):\n"
                f"    return _output(loop_shape(SPEC, {self.shapes}), {self.ins[0]}.device)\n\n\n"
                f"def _backward_fake(dout, {args}, wanted):\n"
                f"    return [torch.empty_like(t) for t, w in zip([{grads}], wanted) if w]")

    def ops(self) -> str:
        n = self.name
        counted = "generic:" + n[2:] if n.startswith("g_") else n
        return (f"# torch.library ops: a patched model still runs under torch.compile, the fakes telling the compiler\n"
                f"# the outputs' shapes. Eager calls launch directly, the forward counted for `apply --verify`.\n"
                f"_run_forward = fused_op(\"fusion_kernels::{n}_fwd\", fake=_forward_fake, counted_as=\"{counted}\")(_forward)\n"
                f"_run_backward = fused_op(\"fusion_kernels::{n}_bwd\", fake=_backward_fake)(_backward)")

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
                 f"        outputs = _run_forward({', '.join(args)})",
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
                  f"        grads = iter(_run_backward(dout, {', '.join(self.ins)}, *ctx.scalars, wanted))"]
        if len(result) == 1:
            lines.append(f"        return ({result[0]},)")
        else:
            lines += _call("return ", result, "        ")
        return "\n".join(lines)

    def fused(self) -> str:
        args = ", ".join(self.ins + self.scalars)
        differentiable = [f'getattr({self.graph.inputs[k].name}, "requires_grad", False)' for k in self.grad_inputs]
        lines = [f"def fused({_signature(self.graph)}):",
                 '    """The whole chain as one Triton kernel each way (autograd-aware; see the module docstring)."""']
        if differentiable:
            lines += _call("if torch.is_grad_enabled() and ", [" or ".join(differentiable)], "    ")
            lines[-1] += ":"
            lines.append(f"        return _Function.apply({args})")
        lines.append(f"    return _run_forward({args})   # nothing to differentiate: no autograd node")
        return "\n".join(lines)
