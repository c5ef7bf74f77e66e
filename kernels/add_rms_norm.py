"""Residual add + RMSNorm: residual = x + residual; y = LlamaRMSNorm(residual). Returns (y, residual).

Replaces the pre-norm decoder step of Llama, Mistral, Qwen (`hidden_states = residual +
hidden_states`, then `post_attention_layernorm(hidden_states)`; `reference` below), which eager
PyTorch runs as an add kernel followed by RMSNorm's 6-8 (see rms_norm.py). Gradients flow into
both x and residual (both get d(residual)).

Bytes for M rows x N (x element size e, residual r, the sum s = the wider of the two, weight w,
output o = the wider of s and w; P backward programs: norm_tiles.backward_programs_for):
  unfused forward (bf16, the casts included): the add reads x and residual and writes the sum,
      M*N*3*2, then rms_norm.py's chain, about M*N*38: about M*N*44 bytes
  fused forward:  read x and residual; write the sum, y and rstd: M*N*(e + r + s + o) + N*w + 4*M
  fused backward: read dy, the returned residual's incoming grad, the sum, rstd, weight; write one
                  grad (both inputs take it) and P partial dweight rows in fp32, read them back and
                  write dweight: M*N*(o + s + s + s) + 4*M + N*w + 2*P*N*4 + N*w
                  (M*N*(o + s + s) when nothing flows back through the returned residual)
`fused_bytes` returns exactly the fused numbers; the cost model prices them.

The kernels are norm_core.py's (`_add_rms_norm_fwd_kernel`, `_add_rms_norm_bwd_kernel`): the
shared norm tiles with RMSNorm's and the residual's flags, under their own names in profiler traces.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

from fusion_advisor.kernels import norm_core, norm_tiles
from fusion_advisor.kernels import rms_norm as rms
from fusion_advisor.kernels.common import as_rows, check_device, check_dtype
from fusion_advisor.kernels.fused_op import fused_op
from fusion_advisor.kernels.registry import (Inputs, OpRecord, param_dtype, register_pattern,
                                             with_residual_add)


def add_rms_norm_fwd(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                     eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launcher: (y, residual + x, rstd). x may have any leading dims; weight is (x.shape[-1],)."""
    for t in (x, residual, weight):
        check_dtype(t, "add_rms_norm")
    check_device(x, residual, weight, op="add_rms_norm")
    if residual.shape != x.shape:
        raise ValueError(f"add_rms_norm: residual shape {list(residual.shape)} is not x's {list(x.shape)}")
    if weight.shape != (x.shape[-1],):
        raise ValueError(f"add_rms_norm: weight shape {list(weight.shape)} does not match x's last dim {x.shape[-1]}")
    x2, r2 = as_rows(x, "add_rms_norm"), as_rows(residual, "add_rms_norm")
    s_dtype = norm_core.sum_dtype(x, residual)
    y, s, _, rstd = norm_core.norm_fwd(x2, r2, weight.contiguous(), None, eps, rms=True,
                                       out_dtype=torch.promote_types(s_dtype, weight.dtype), sum_dtype=s_dtype)
    return y.view(x.shape), s.view(x.shape), rstd


def add_rms_norm_bwd(dy: torch.Tensor, ds_out: Optional[torch.Tensor], s: torch.Tensor, weight: torch.Tensor,
                     rstd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Launcher: (d(residual + x), dweight); ds_out is the grad of the returned residual (None
    when nothing used it)."""
    dso2 = as_rows(ds_out, "add_rms_norm") if ds_out is not None else None
    ds, dw, _ = norm_core.norm_bwd(as_rows(dy, "add_rms_norm"), dso2, as_rows(s, "add_rms_norm"),
                                   weight.contiguous(), None, None, rstd, rms=True, residual=True)
    return ds.view(s.shape), dw


# torch.library ops: a patched model still runs under torch.compile(fullgraph=True). Eager calls run
# the launchers directly (see fused_op).
def _forward_fake(x, residual, weight, eps):
    rows = x.numel() // x.shape[-1] if x.dim() else 1
    s_dtype = norm_core.sum_dtype(x, residual)
    return (x.new_empty(x.shape, dtype=torch.promote_types(s_dtype, weight.dtype)), x.new_empty(x.shape, dtype=s_dtype),
            x.new_empty((rows,), dtype=torch.float32))


_forward = fused_op("fusion_advisor::add_rms_norm_fwd", fake=_forward_fake)(add_rms_norm_fwd)
_backward = fused_op("fusion_advisor::add_rms_norm_bwd", like=("s", "weight"))(add_rms_norm_bwd)


class AddRMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, residual, weight, eps):
        y, s, rstd = _forward(x, residual, weight, eps)
        ctx.save_for_backward(s, weight, rstd)
        # A returned residual nobody uses gets no zeros-filled grad: the kernel skips that read.
        ctx.set_materialize_grads(False)
        return y, s

    @staticmethod
    def backward(ctx, dy, ds_out):
        s, weight, rstd = ctx.saved_tensors
        if dy is None:  # only the returned residual was used: its grad passes straight through
            return ds_out, ds_out, None, None
        ds, dw = _backward(dy, ds_out, s, weight, rstd)
        return ds, ds, dw, None


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                 eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused `residual = x + residual; y = LlamaRMSNorm(residual)`: returns (y, residual)."""
    return AddRMSNormFunction.apply(x, residual, weight, eps)


class AddRMSNorm(rms.RMSNorm):
    """An RMSNorm's weight and eps, called as `y, residual = norm(x, residual)`. It replaces an
    RMSNorm *and* the add before it, so swapping it in is a source patch of the caller."""

    def forward(self, x, residual):
        return add_rms_norm(x, residual, self.weight, self.variance_epsilon)


def reference(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
              eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """The Llama decoder layer's residual add, then LlamaRMSNorm.forward, verbatim."""
    residual = x + residual
    input_dtype = residual.dtype
    hidden_states = residual.to(torch.float32)
    variance = hidden_states.pow(2).mean(-1, keepdim=True)
    hidden_states = hidden_states * torch.rsqrt(variance + eps)
    return weight * hidden_states.to(input_dtype), residual


def liger(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
          eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """Liger-Kernel's fused add + RMSNorm on the same inputs (llama casting mode)."""
    from liger_kernel.ops.fused_add_rms_norm import LigerFusedAddRMSNormFunction
    return LigerFusedAddRMSNormFunction.apply(x, residual, weight, eps, 0.0, "llama", False)


def make_inputs(params: dict, device: torch.device, requires_grad: bool = True) -> Inputs:
    """params: shape, dtype; optional residual_dtype, weight_dtype (default dtype), eps."""
    base = rms.make_inputs(params, device, requires_grad)
    x, weight = base.args
    rdtype = param_dtype(params, "residual_dtype")
    residual = torch.randn(params["shape"], dtype=rdtype, device=device, requires_grad=requires_grad)
    return Inputs((x, residual, weight), dict(base.kwargs), grad_inputs=(0, 1, 2) if requires_grad else ())


def fused_bytes(params: dict) -> dict:
    shape = params["shape"]
    n = shape[-1]
    m = math.prod(shape[:-1])
    x_dtype = param_dtype(params)
    r_dtype = param_dtype(params, "residual_dtype")
    w_dtype = param_dtype(params, "weight_dtype")
    s_dtype = torch.promote_types(x_dtype, r_dtype)
    e, r, s, w = x_dtype.itemsize, r_dtype.itemsize, s_dtype.itemsize, w_dtype.itemsize
    o = torch.promote_types(s_dtype, w_dtype).itemsize
    programs = norm_tiles.backward_programs_for(n, m, params.get("num_sms", 132), s)   # it normalises the sum
    residual_grad = s if params.get("residual_grad", True) else 0
    return {"forward": m * n * (e + r + s + o) + n * w + 4 * m,
            "backward": m * n * (o + residual_grad + s + s) + 4 * m + n * w + 2 * programs * n * 4 + n * w}


CAST_OPS = ("to", "_to_copy", "empty_strided", "copy_")


def params_from_ops(ops: Sequence[OpRecord]) -> dict | None:
    """The residual add's dtypes and the RMSNorm chain's params (rms_norm.params_from_ops on the
    ops after the add); None unless the add takes two tensors of the normalised shape with
    alpha 1 and only casts stand between it and the chain."""
    pow_at = next((i for i, o in enumerate(ops) if o.short == "pow"), None)
    if pow_at is None:
        return None
    add_at = pow_at - 1
    while add_at >= 0 and ops[add_at].short in CAST_OPS:
        add_at -= 1
    if add_at < 0 or ops[add_at].short != "add":
        return None
    add = ops[add_at]
    params = rms.params_from_ops(list(ops[add_at + 1:]))
    return with_residual_add(add, params)


PATTERN = register_pattern(
    __name__,
    description="residual add + RMSNorm (LlamaRMSNorm-style) as one Triton kernel each way (returns the new residual too)",
    forward_signature=r"(?:^| )add (?:(?:to|_to_copy|empty_strided|copy_) )*pow mean add rsqrt mul",
    # No module swap (no `modules`): the add lives in the caller's forward, so this needs a source patch.
    example_params=rms.PATTERN.example_params,  # the norm's shapes
    bench_params=rms.PATTERN.bench_params,
    liger=liger,
)
