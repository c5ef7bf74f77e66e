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
                            backward: bool = True, reduced_grads: tuple[int, ...] = ()) -> None:
    """Forward outputs and every input gradient of `pattern.fused` equal `pattern.reference`'s,
    within the dtype's tolerance. `reduced_grads`: positions of grads summed over the rows of
    input 0 (all dims but the last), compared with the table's atol scaled by sqrt(rows)."""
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
        rows = base.args[0].numel() // max(base.args[0].shape[-1], 1) if i in reduced_grads else 1
        torch.testing.assert_close(gf, gr, **tolerance(tol_dtype, rows), msg=lambda m: f"grad of input {i}: {m}")


def round_like_kernel(values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """fp32 `values` rounded to `dtype` as a Triton kernel's `.to(dtype)` rounds them, for tests that
    expect a kernel to be bitwise its PyTorch reference: to nearest even on the GPU, as PyTorch does;
    under the Triton interpreter (triton 3.x) fp32 -> bf16 truncates toward zero instead."""
    from fusion_advisor.kernels.common import interpreting
    values = values.float()
    if dtype == torch.bfloat16 and interpreting():
        return (values.view(torch.int32) & -65536).view(torch.float32).to(torch.bfloat16)
    return values.to(dtype)


_TRACES: dict = {}


def traced_ops(path, first: str, last: str, max_depth: int | None = 0) -> list[OpRecord]:
    """Forward ops of a real trace's first profiled step, as the OpRecords a pattern is handed: the
    first op named `last` and the ops before it back to the nearest one named `first` (full names,
    "aten::embedding"), nested ops down to `max_depth` (0: top-level ops only; None: all)."""
    from fusion_advisor.analyzers.trace import Trace
    key = str(path)
    if key not in _TRACES:
        _TRACES[key] = Trace.load(key)
    trace = _TRACES[key]
    ops = trace.ops
    sel = ops[(ops["step"] == trace.step_ids[0]) & ~ops["backward"].astype(bool)]
    if max_depth is not None:
        sel = sel[sel["depth"] <= max_depth]
    names = sel["name"].tolist()
    end = names.index(last)
    start = max(i for i in range(end + 1) if names[i] == first)
    rows = sel.iloc[start:end + 1]

    def as_tuple(v):
        return tuple(tuple(d) if isinstance(d, list) else d for d in v) if isinstance(v, list) else ()

    return [OpRecord(name, as_tuple(dims), as_tuple(types), as_tuple(concrete))
            for name, dims, types, concrete in zip(rows["name"], rows["input_dims"], rows["input_types"],
                                                   rows["concrete"])]
