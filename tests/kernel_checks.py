"""The one way every kernel test compares a fused op with the PyTorch code it replaces, and the
one way to check that kernels run by the interpreter also compile for the GPU."""
from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys

import torch

from fusion_advisor.kernels.registry import FusionPattern, Inputs, OpRecord
from fusion_advisor.kernels.tolerances import tolerance


def _clone(inputs: Inputs) -> Inputs:
    args = tuple(a.detach().clone().requires_grad_(a.requires_grad) if isinstance(a, torch.Tensor) else a
                 for a in inputs.args)
    return Inputs(args, dict(inputs.kwargs), inputs.grad_inputs)


_PRECISION = {torch.bfloat16: 0, torch.float16: 1, torch.float32: 2, torch.float64: 3}


def _tolerance_dtype(inputs: Inputs) -> torch.dtype:
    """The least precise float dtype among the inputs: its rounding bounds every comparison
    (an fp32 output computed from bf16 inputs still carries bf16 rounding)."""
    floats = [a.dtype for a in inputs.args if isinstance(a, torch.Tensor) and a.dtype in _PRECISION]
    return min(floats, key=_PRECISION.__getitem__) if floats else torch.float32


def _outputs(out) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    return [o for o in out if isinstance(o, torch.Tensor)]


def _in_float64(inputs: Inputs) -> Inputs:
    args = tuple(a.detach().to(torch.float64).requires_grad_(a.requires_grad)
                 if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in inputs.args)
    return Inputs(args, dict(inputs.kwargs), inputs.grad_inputs)


def _assert_close(fused: torch.Tensor, ref: torch.Tensor, truth, tol: dict, what: str) -> None:
    """fused equals ref within tol. Where the reference strays from its own float64 run (`truth()`,
    computed only when needed), that stray is added to the allowance, element by element: then the
    fused kernel is the more accurate one (seen: CPU F.layer_norm's bf16 weight grad over 252 rows
    is 0.8 off its float64 value; an fp32-accumulating kernel 0.12, and 0.75 off the reference)."""
    try:
        torch.testing.assert_close(fused, ref, **tol, msg=lambda m: f"{what}: {m}")
        return
    except AssertionError as err:
        if fused.isnan().any() or ref.isnan().any():
            raise
        first = err
    f, r, t = fused.detach().double(), ref.detach().double(), truth().detach().double()
    allowed = tol["atol"] + tol["rtol"] * r.abs() + (r - t).abs()
    bad = (f - r).abs() > allowed
    if bad.any():
        i = int(((f - r).abs() - allowed).argmax())
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {bad.numel()} elements differ from the reference by more than the "
            f"tolerance plus the reference's own error (worst at flat index {i}: fused {f.flatten()[i].item():.6g}, "
            f"reference {r.flatten()[i].item():.6g}, reference in float64 {t.flatten()[i].item():.6g})") from first


def check_against_reference(pattern: FusionPattern, params: dict, device: torch.device, seed: int = 0,
                            backward: bool = True, reduced_grads: tuple[int, ...] = (),
                            reduced_rows: int | None = None) -> None:
    """Forward outputs and every input gradient of `pattern.fused` equal `pattern.reference`'s,
    within the dtype's tolerance (plus, element by element, the reference's own error against a
    float64 run of the same reference, where it has one). `reduced_grads`: positions of grads
    summed over the rows of input 0 (all dims but the last), compared with the table's atol
    scaled by sqrt(rows); `reduced_rows` says how many terms those sums have when it is not that
    (e.g. GroupNorm's weight grad sums over batch x spatial positions)."""
    torch.manual_seed(seed)
    base = pattern.make_inputs(params, device, backward)
    ref_in, fused_in = _clone(base), _clone(base)
    tol_dtype = _tolerance_dtype(base)
    ref_out = _outputs(pattern.reference(*ref_in.args, **ref_in.kwargs))
    fused_out = _outputs(pattern.fused(*fused_in.args, **fused_in.kwargs))
    assert len(ref_out) == len(fused_out)
    truth: dict = {}

    def truth_run() -> tuple[list[torch.Tensor], Inputs]:
        if not truth:  # the reference on float64 copies of the inputs, run once, on demand
            inputs = _in_float64(base)
            out = _outputs(pattern.reference(*inputs.args, **inputs.kwargs))
            if grads_by_output:  # set once the backward checks start
                pairs = [(o, g) for o, g in zip(out, grads_by_output) if g is not None]
                torch.autograd.backward([o for o, _ in pairs], [g.to(o.dtype) for o, g in pairs])
            truth.update(out=out, inputs=inputs)
        return truth["out"], truth["inputs"]

    grads_by_output: list = []
    for k, (r, f) in enumerate(zip(ref_out, fused_out)):
        assert f.shape == r.shape and f.dtype == r.dtype, (f.shape, f.dtype, r.shape, r.dtype)
        _assert_close(f, r, lambda k=k: truth_run()[0][k], tolerance(tol_dtype), f"output {k}")
    if not backward:
        return
    torch.manual_seed(seed + 1)
    grads_by_output = [torch.randn_like(r) if r.requires_grad else None for r in ref_out]
    grads = [g for g in grads_by_output if g is not None]
    torch.autograd.backward([r for r in ref_out if r.requires_grad], grads)
    torch.autograd.backward([f for f in fused_out if f.requires_grad], grads)
    truth.clear()  # a truth run made for the forward checks has no grads
    for i in base.grad_inputs:
        gr, gf = ref_in.args[i].grad, fused_in.args[i].grad
        assert gr is not None and gf is not None, f"input {i} got no gradient"
        rows = 1
        if i in reduced_grads:
            rows = reduced_rows or base.args[0].numel() // max(base.args[0].shape[-1], 1)
        _assert_close(gf, gr, lambda i=i: truth_run()[1].args[i].grad, tolerance(tol_dtype, rows),
                      f"grad of input {i}")


def traced_ops(trace, rows) -> list[OpRecord]:
    """OpRecords for rows of a loaded Trace's ops frame, as a cluster hands them to a pattern."""
    def as_tuple(v):
        return tuple(as_tuple(e) for e in v) if isinstance(v, (list, tuple)) else v

    def field(v) -> tuple:  # ops without shapes (autograd engine ops) hold None there
        return as_tuple(v) if isinstance(v, (list, tuple)) else ()

    ops, modules = trace.ops, trace.modules
    records = []
    for r in rows:
        op = ops.loc[r]
        module = modules["class_path"].iloc[op["module_row"]] if op["module_row"] >= 0 else None
        records.append(OpRecord(op["name"], field(op["input_dims"]), field(op["input_types"]),
                                field(op["concrete"]), module))
    return records


@contextlib.contextmanager
def recorded_launches():
    """Record every Triton launch the interpreter runs inside the block: the kernel, each
    argument's type as Triton's JIT would specialise it on a GPU, and the constexpr values.
    Yields the list the records are appended to (for `hopper_compile_errors`)."""
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend
    from triton.runtime.interpreter import InterpretedFunction

    launches: list[dict] = []
    original = InterpretedFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        options = {k: kwargs[k] for k in ("num_warps",) if k in kwargs}
        bound = dict(zip(self.arg_names, args))
        bound.update({k: v for k, v in kwargs.items() if k in self.arg_names})
        spec = {}
        for name, value in bound.items():
            kind = native_specialize_impl(BaseBackend, value, False, True, True)[0]
            plain = value if isinstance(value, (bool, int, float, str)) or value is None else None
            spec[name] = [kind, plain]
        record = {"module": self.fn.__module__, "name": self.fn.__name__, "args": spec, **options}
        if record not in launches:
            launches.append(record)
        return original(self, *args, grid=grid, warmup=warmup, **kwargs)

    InterpretedFunction.run = run
    try:
        yield launches
    finally:
        InterpretedFunction.run = original


_COMPILE_TO_TTIR = r"""
import json, sys, importlib
from triton._C.libtriton import ir
from triton.backends.compiler import GPUTarget
from triton.compiler.compiler import ASTSource, make_backend

target = GPUTarget("cuda", 90, 32)  # H100 / H200
backend = make_backend(target)
errors = []
for launch in json.load(sys.stdin):
    fn = getattr(importlib.import_module(launch["module"]), launch["name"])
    signature, constexprs = {}, {}
    for param in fn.params:
        kind, value = launch["args"][param.name]
        if param.is_constexpr or kind == "constexpr":
            signature[param.name] = "constexpr"
            constexprs[param.name] = value
        else:
            signature[param.name] = kind
    options = backend.parse_options({"num_warps": launch.get("num_warps", 4)})
    context = ir.context()
    ir.load_dialects(context)
    backend.load_dialects(context)
    try:
        ASTSource(fn, signature, constexprs).make_ir(target, options, backend.get_codegen_implementation(options),
                                                     backend.get_module_map(), context)
    except Exception as e:
        errors.append(f"{launch['name']} {constexprs}: {e}")
json.dump(errors, sys.stdout)
"""


def hopper_compile_errors(launches: list[dict]) -> list[str]:
    """Generate each recorded launch's Triton IR for sm_90, outside the interpreter (in a
    subprocess: the interpreter is chosen at import). This is the compiler's front end, where a
    kernel that runs as plain Python can still fail (a name defined inside a loop and used after
    it, an op the compiler lacks). One error string per failing launch."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    done = subprocess.run([sys.executable, "-c", _COMPILE_TO_TTIR], input=json.dumps(launches), env=env,
                          capture_output=True, text=True, timeout=300)
    if done.returncode:
        return [f"the compile subprocess failed: {done.stderr[-3000:]}"]
    return json.loads(done.stdout)
