"""The one way every kernel test compares a fused op with the PyTorch code it replaces."""
from __future__ import annotations

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


def check_against_reference(pattern: FusionPattern, params: dict, device: torch.device, seed: int = 0,
                            backward: bool = True, reduced_grads: tuple[int, ...] = (),
                            reduced_rows: int | None = None) -> None:
    """Forward outputs and every input gradient of `pattern.fused` equal `pattern.reference`'s,
    within the dtype's tolerance. `reduced_grads`: positions of grads summed over the rows of
    input 0 (all dims but the last), compared with the table's atol scaled by sqrt(rows);
    `reduced_rows` says how many terms those sums have when it is not that (e.g. GroupNorm's
    weight grad sums over batch x spatial positions)."""
    torch.manual_seed(seed)
    base = pattern.make_inputs(params, device, backward)
    ref_in, fused_in = _clone(base), _clone(base)
    tol_dtype = _tolerance_dtype(base)
    ref_out = _outputs(pattern.reference(*ref_in.args, **ref_in.kwargs))
    fused_out = _outputs(pattern.fused(*fused_in.args, **fused_in.kwargs))
    assert len(ref_out) == len(fused_out)
    for r, f in zip(ref_out, fused_out):
        assert f.shape == r.shape and f.dtype == r.dtype, (f.shape, f.dtype, r.shape, r.dtype)
        torch.testing.assert_close(f, r, **tolerance(tol_dtype))
    if not backward:
        return
    torch.manual_seed(seed + 1)
    grads = [torch.randn_like(r) for r in ref_out if r.requires_grad]
    torch.autograd.backward([r for r in ref_out if r.requires_grad], grads)
    torch.autograd.backward([f for f in fused_out if f.requires_grad], grads)
    for i in base.grad_inputs:
        gr, gf = ref_in.args[i].grad, fused_in.args[i].grad
        assert gr is not None and gf is not None, f"input {i} got no gradient"
        rows = 1
        if i in reduced_grads:
            rows = reduced_rows or base.args[0].numel() // max(base.args[0].shape[-1], 1)
        torch.testing.assert_close(gf, gr, **tolerance(tol_dtype, rows), msg=lambda m: f"grad of input {i}: {m}")


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
