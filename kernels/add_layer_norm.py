"""Residual add + LayerNorm: residual = x + residual; y = layer_norm(residual). Returns (y, residual).

Replaces the pre-norm transformer step (GPT-2, BERT, ViT: `x = x + attn(ln_1(x))`, then `ln_2(x)`),
which eager PyTorch runs as two kernels, add then native_layer_norm, with the sum going through
HBM in between; `reference` below. Gradients flow into both x and residual (both get d(residual)).

Bytes for M rows x N (element size e; weight and bias size w, each counted only when present;
P backward programs: norm_tiles.backward_programs_for):
  unfused forward:  add reads x, residual, writes the sum; LayerNorm reads the sum again, writes y,
                    mean, rstd: M*N*3e + M*N*2e + 2*N*w + 8*M = M*N*5e + 2*N*w + 8*M
  unfused backward: LayerNorm's two kernels (dx; dweight/dbias), each reading dy and the sum, then
                    an add of the gradient coming back through the returned residual:
                    M*N*5e + 16*M + 3*N*w + M*N*3e
  fused forward:    read x and residual, write the sum and y, and mean, rstd: M*N*4e + 2*N*w + 8*M
  fused backward:   read dy, the residual's incoming grad, the sum, mean, rstd, weight; write one
                    grad (both inputs take it); per parameter, write P partial rows in fp32, read
                    them back and write the grad: M*N*4e + 8*M + N*w + 2*(2*P*N*4 + N*w)
                    (M*N*3e when nothing flows back through the returned residual)
`fused_bytes` returns exactly the fused numbers; the cost model prices them.

The kernels are norm_core.py's (`_add_layer_norm_fwd_kernel`, `_add_layer_norm_bwd_kernel`): the
shared norm tiles with LayerNorm's and the residual's flags, under their own names in profiler traces.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from fusion_advisor.kernels import autocast
from fusion_advisor.kernels import layer_norm as ln
from fusion_advisor.kernels import norm_core
from fusion_advisor.kernels.common import check_device, check_dtype
from fusion_advisor.kernels.fused_op import fused_op
from fusion_advisor.kernels.registry import (Inputs, OpRecord, param_dtype, dtype_name, register_pattern,
                                             with_residual_add)


def add_layer_norm_fwd(x: torch.Tensor, residual: torch.Tensor, normalized_shape: Sequence[int],
                       weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                       eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launcher: (y, residual + x, mean, rstd)."""
    ln.check_layer_norm_args(x, normalized_shape, weight, bias, "add_layer_norm")
    check_dtype(residual, "add_layer_norm")
    check_device(residual, op="add_layer_norm")
    if residual.shape != x.shape:
        raise ValueError(f"add_layer_norm: residual shape {list(residual.shape)} is not x's {list(x.shape)}")
    x2 = ln.normalized_rows(x, normalized_shape, "add_layer_norm")
    r2 = ln.normalized_rows(residual, normalized_shape, "add_layer_norm")
    s_dtype = norm_core.sum_dtype(x, residual)
    y, s, mean, rstd = norm_core.norm_fwd(x2, r2, ln.flat_param(weight), ln.flat_param(bias), eps, rms=False,
                                          out_dtype=s_dtype, sum_dtype=s_dtype)
    return y.view(x.shape), s.view(x.shape), mean, rstd


def add_layer_norm_bwd(dy: torch.Tensor, ds_out: Optional[torch.Tensor], s: torch.Tensor,
                       normalized_shape: Sequence[int], weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                       mean: torch.Tensor, rstd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launcher: (d(residual + x), dweight, dbias); ds_out is the grad of the returned residual
    (None when nothing used it)."""
    rows = ln.normalized_rows
    dso2 = rows(ds_out, normalized_shape, "add_layer_norm") if ds_out is not None else None
    ds, dw, db = norm_core.norm_bwd(rows(dy, normalized_shape, "add_layer_norm"), dso2,
                                    rows(s, normalized_shape, "add_layer_norm"), ln.flat_param(weight),
                                    ln.flat_param(bias), mean, rstd, rms=False, residual=True)
    return (ds.view(s.shape), *ln.param_grads(dw, db, weight, bias, mean))


# torch.library ops: a patched model still runs under torch.compile(fullgraph=True). Eager calls run
# the launchers directly (see fused_op).
def _forward_fake(x, residual, normalized_shape, weight, bias, eps):
    rows = x.numel() // max(1, math.prod(normalized_shape))
    s = x.new_empty(x.shape, dtype=norm_core.sum_dtype(x, residual))
    return s.new_empty(x.shape), s, x.new_empty((rows,), dtype=torch.float32), x.new_empty((rows,), dtype=torch.float32)


_forward = fused_op("fusion_advisor::add_layer_norm_fwd", fake=_forward_fake)(add_layer_norm_fwd)
_backward = fused_op("fusion_advisor::add_layer_norm_bwd", fake=lambda dy, ds_out, s, normalized_shape, weight, bias,
                     mean, rstd: (s.new_empty(s.shape), *norm_core.fake_param_grads(mean, weight, bias)))(add_layer_norm_bwd)


class AddLayerNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, residual, normalized_shape, weight, bias, eps):
        y, s, mean, rstd = _forward(x, residual, normalized_shape, weight, bias, eps)
        ctx.save_for_backward(s, weight, bias, mean, rstd)
        ctx.normalized_shape = normalized_shape
        # A returned residual nobody uses gets no zeros-filled grad: the kernel skips that read.
        ctx.set_materialize_grads(False)
        return y, s

    @staticmethod
    def backward(ctx, dy, ds_out):
        s, weight, bias, mean, rstd = ctx.saved_tensors
        if dy is None:  # only the returned residual was used: its grad passes straight through
            return ds_out, ds_out, None, None, None, None
        ds, dw, db = _backward(dy, ds_out, s, ctx.normalized_shape, weight, bias, mean, rstd)
        return ds, ds, None, dw if weight is not None else None, db if bias is not None else None, None


def add_layer_norm(x: torch.Tensor, residual: torch.Tensor, normalized_shape, weight: Optional[torch.Tensor] = None,
                   bias: Optional[torch.Tensor] = None, eps: float = 1e-5) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused `residual = x + residual; y = F.layer_norm(residual, ...)`: returns (y, residual).
    Where torch.autocast would run the norm of a bf16/fp16 sum in fp32 (CUDA), the add and the norm
    run apart, as eager runs them there: the kernel writes y in the sum's dtype."""
    if autocast.runs_in_fp32("aten::layer_norm", x.device.type, norm_core.sum_dtype(x, residual)):
        residual = x + residual
        return ln.layer_norm(residual, normalized_shape, weight, bias, eps), residual
    return AddLayerNormFunction.apply(x, residual, ln._shape_list(normalized_shape), weight, bias, eps)


class AddLayerNorm(ln.LayerNorm):
    """nn.LayerNorm's parameters, called as `y, residual = norm(x, residual)`. It replaces a
    LayerNorm *and* the add before it, so swapping it in is a source patch of the caller."""

    def forward(self, x, residual):
        return add_layer_norm(x, residual, self.normalized_shape, self.weight, self.bias, self.eps)


def reference(x: torch.Tensor, residual: torch.Tensor, normalized_shape, weight: Optional[torch.Tensor] = None,
              bias: Optional[torch.Tensor] = None, eps: float = 1e-5) -> tuple[torch.Tensor, torch.Tensor]:
    """The pre-norm block step, verbatim: the residual add, then nn.LayerNorm.forward."""
    residual = x + residual
    return F.layer_norm(residual, normalized_shape, weight, bias, eps), residual


def make_inputs(params: dict, device: torch.device, requires_grad: bool = True) -> Inputs:
    """layer_norm's params, plus residual_dtype (default dtype)."""
    base = ln.make_inputs(params, device, requires_grad)
    x, normalized_shape, weight, bias = base.args
    rdtype = param_dtype(params, "residual_dtype")
    residual = torch.randn(params["shape"], dtype=rdtype, device=device, requires_grad=requires_grad)
    grads = tuple(i for i, t in ((0, x), (1, residual), (3, weight), (4, bias)) if t is not None) if requires_grad \
        else ()
    return Inputs((x, residual, normalized_shape, weight, bias), dict(base.kwargs), grad_inputs=grads)


def fused_bytes(params: dict) -> dict:
    """layer_norm's bytes plus the residual's read and the sum's write forward, and the grad of
    the returned residual read backward (`residual_grad`: False when nothing uses it)."""
    x_dtype = param_dtype(params)
    r_dtype = param_dtype(params, "residual_dtype")
    s_dtype = torch.promote_types(x_dtype, r_dtype)  # the sum's, and so y's and the grads'
    norm = ln.fused_bytes({**params, "dtype": dtype_name(s_dtype)})
    m_n = math.prod(params["shape"])
    # Forward: the norm's read of its input becomes the sum's write, plus the reads of x and residual.
    return {"forward": norm["forward"] + m_n * (x_dtype.itemsize + r_dtype.itemsize),
            "backward": norm["backward"] + (m_n * s_dtype.itemsize if params.get("residual_grad", True) else 0)}


def params_from_ops(ops: Sequence[OpRecord]) -> dict | None:
    """The residual add's dtypes and the layer_norm op's params; None unless the add takes two
    tensors of the normalised input's shape (a broadcast add, e.g. token + position embeddings,
    is not a residual add) with alpha 1."""
    norm_at = next((i for i, o in enumerate(ops) if o.short in ("layer_norm", "native_layer_norm")), None)
    if norm_at is None:
        return None
    add = next((o for o in reversed(ops[:norm_at]) if o.short == "add"), None)
    params = ln.layer_norm_params(ops[norm_at])
    return with_residual_add(add, params)


PATTERN = register_pattern(
    __name__,
    description="residual add + LayerNorm as one Triton kernel each way (returns the new residual too)",
    autocast_op="aten::layer_norm",
    forward_signature=r"(?:^| )add (?:native_)?layer_norm(?= |$)",
    # No module swap (no `modules`): the add lives in the caller's forward, so this needs a source patch.
    example_params=ln.PATTERN.example_params,  # the norm's shapes
    bench_params=ln.PATTERN.bench_params,
    liger=None,  # Liger-Kernel 0.8.5 has fused add + RMSNorm, not add + LayerNorm
)
