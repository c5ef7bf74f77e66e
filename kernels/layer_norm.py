"""LayerNorm: y = (x - mean(x)) * rsqrt(var(x) + eps) * weight + bias, over the normalized dims.

Replaces `F.layer_norm` (what `nn.LayerNorm` runs, `reference` below); weight and bias are each
optional (`elementwise_affine=False`, `bias=False`). Eager PyTorch is already one kernel forward
(native_layer_norm); its backward on CUDA is two kernels that both read dy and x (one for dx, one
for dweight/dbias). The gain here is that backward pass, and the add+LayerNorm fusion built on
the same kernels (add_layer_norm.py).

Bytes for x of M rows x N normalized elements (element size e; weight and bias size w, each
counted only when present; P backward programs: norm_tiles.backward_programs_for):
  unfused forward:  read x, weight, bias; write y, mean, rstd: M*N*2e + 2*N*w + 8*M
  unfused backward: dx kernel reads dy, x, mean, rstd, weight and writes dx; the dweight/dbias
                    kernel reads dy, x, mean, rstd again and writes them:
                    M*N*5e + 16*M + N*w + 2*N*w
  fused forward:    the same as unfused: M*N*2e + 2*N*w + 8*M
  fused backward:   read dy, x, mean, rstd, weight; write dx; per parameter, write P partial rows
                    in fp32, read them back to sum and write the grad:
                    M*N*3e + 8*M + N*w + 2*(2*P*N*4 + N*w)
`fused_bytes` returns exactly the fused numbers; the cost model prices them.

The kernels are norm_core.py's (`_layer_norm_fwd_kernel`, `_layer_norm_bwd_kernel`: the shared
norm tiles with LayerNorm's flags): several rows a program for short rows (a conv output normalised
over 64 channels), a persistent backward with per-program dweight/dbias partial sums.
"""
from __future__ import annotations

import math
import re
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from fusion_advisor.kernels import norm_core, norm_tiles
from fusion_advisor.kernels.channel_norm import ChannelsFirstLayerNorm
from fusion_advisor.kernels.common import as_rows, check_device, check_dtype
from fusion_advisor.kernels.fused_op import fused_op
from fusion_advisor.kernels.registry import (Inputs, OpRecord, param_dtype, dtype_from_trace,
                                             dtype_name, register_pattern, training_shapes)


# -- launchers --------------------------------------------------------------------------------------
def check_layer_norm_args(x: torch.Tensor, normalized_shape: Sequence[int], weight: Optional[torch.Tensor],
                          bias: Optional[torch.Tensor], op: str) -> None:
    check_dtype(x, op)
    check_device(x, weight, bias, op=op)
    shape = list(normalized_shape)   # (plain lists compared: the checks run on every eager call)
    if not shape or list(x.shape[x.dim() - len(shape):]) != shape:
        raise ValueError(f"{op}: normalized_shape {shape} is not the trailing shape of x {list(x.shape)}")
    for name, p in (("weight", weight), ("bias", bias)):
        if p is not None:
            check_dtype(p, op)
            if list(p.shape) != shape:
                raise ValueError(f"{op}: {name} shape {list(p.shape)} is not normalized_shape {shape}")


def normalized_rows(t: torch.Tensor, normalized_shape: Sequence[int], op: str) -> torch.Tensor:
    """View t as (rows, prod(normalized_shape))."""
    k = len(normalized_shape)
    return as_rows(t.flatten(t.dim() - k) if k > 1 else t, op)


def flat_param(p: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """A weight or bias over normalized_shape as the contiguous 1-D row the kernels index."""
    if p is None or (p.dim() == 1 and p.is_contiguous()):   # the usual case, without two more tensor ops
        return p
    return p.contiguous().view(-1)


def param_grads(dw: Optional[torch.Tensor], db: Optional[torch.Tensor], weight: Optional[torch.Tensor],
                bias: Optional[torch.Tensor], like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(dweight, dbias) in their parameters' shapes; empty for a missing one (a custom op returns
    tensors, never None)."""
    return (dw.view(weight.shape) if weight is not None else like.new_empty(0),
            db.view(bias.shape) if bias is not None else like.new_empty(0))


def layer_norm_fwd(x: torch.Tensor, normalized_shape: Sequence[int], weight: Optional[torch.Tensor],
                   bias: Optional[torch.Tensor], eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launcher: (y, mean, rstd); mean and rstd are fp32, one per row."""
    check_layer_norm_args(x, normalized_shape, weight, bias, "layer_norm")
    x2 = normalized_rows(x, normalized_shape, "layer_norm")
    y, _, mean, rstd = norm_core.norm_fwd(x2, None, flat_param(weight), flat_param(bias), eps, rms=False,
                                          out_dtype=x.dtype)
    return y.view(x.shape), mean, rstd


def layer_norm_bwd(dy: torch.Tensor, x: torch.Tensor, normalized_shape: Sequence[int], weight: Optional[torch.Tensor],
                   bias: Optional[torch.Tensor], mean: torch.Tensor,
                   rstd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launcher: (dx, dweight, dbias); dweight/dbias are empty when weight/bias is None."""
    dx, dw, db = norm_core.norm_bwd(normalized_rows(dy, normalized_shape, "layer_norm"), None,
                                    normalized_rows(x, normalized_shape, "layer_norm"), flat_param(weight),
                                    flat_param(bias), mean, rstd, rms=False)
    return (dx.view(x.shape), *param_grads(dw, db, weight, bias, mean))


# torch.library ops: a patched model still runs under torch.compile(fullgraph=True). Eager calls run
# the launchers directly (see fused_op).
def _forward_fake(x, normalized_shape, weight, bias, eps):
    rows = x.numel() // max(1, math.prod(normalized_shape))
    stats = x.new_empty((rows,), dtype=torch.float32)
    return x.new_empty(x.shape), stats, stats.new_empty((rows,))


_forward = fused_op("fusion_advisor::layer_norm_fwd", fake=_forward_fake)(layer_norm_fwd)
_backward = fused_op("fusion_advisor::layer_norm_bwd", fake=lambda dy, x, normalized_shape, weight, bias, mean, rstd: (
    x.new_empty(x.shape), *norm_core.fake_param_grads(mean, weight, bias)))(layer_norm_bwd)


LayerNormFunction = norm_core.affine_norm_function("LayerNormFunction", _forward, _backward)


def _shape_list(normalized_shape) -> list[int]:
    return [int(normalized_shape)] if isinstance(normalized_shape, int) else [int(d) for d in normalized_shape]


def layer_norm(x: torch.Tensor, normalized_shape, weight: Optional[torch.Tensor] = None,
               bias: Optional[torch.Tensor] = None, eps: float = 1e-5) -> torch.Tensor:
    """Fused LayerNorm with F.layer_norm's arguments, forward and backward; inside torch.autocast
    it casts where eager's autocast does."""
    return norm_core.apply_affine_norm(LayerNormFunction, "aten::layer_norm", x, _shape_list(normalized_shape), weight,
                                       bias, eps)


class LayerNorm(torch.nn.Module):
    """Drop-in for nn.LayerNorm (same parameters, eps, elementwise_affine and bias options)."""

    def __init__(self, normalized_shape, eps: float = 1e-5, elementwise_affine: bool = True, bias: bool = True,
                 device=None, dtype=None):
        super().__init__()
        self.normalized_shape = tuple(_shape_list(normalized_shape))
        self.eps = eps
        self.elementwise_affine = elementwise_affine
        kw = {"device": device, "dtype": dtype}
        self.weight = torch.nn.Parameter(torch.ones(self.normalized_shape, **kw)) if elementwise_affine else None
        self.bias = torch.nn.Parameter(torch.zeros(self.normalized_shape, **kw)) if elementwise_affine and bias else None

    @classmethod
    def from_module(cls, module: torch.nn.Module) -> "LayerNorm | ChannelsFirstLayerNorm":
        """Wrap an existing nn.LayerNorm's parameters (shared, not copied); a ChannelsFirstLayerNorm
        for one over dim 1 of (N, C, *spatial) (ConvNeXt's data_format="channels_first")."""
        if getattr(module, "data_format", None) == "channels_first":
            return ChannelsFirstLayerNorm.from_module(module)
        new = cls.__new__(cls)
        torch.nn.Module.__init__(new)
        new.normalized_shape = tuple(_shape_list(module.normalized_shape))
        new.eps = float(module.eps)
        new.elementwise_affine = getattr(module, "weight", None) is not None
        new.weight = getattr(module, "weight", None)
        new.bias = getattr(module, "bias", None)
        return new

    def forward(self, x):
        return layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)

    def extra_repr(self) -> str:
        return (f"{self.normalized_shape}, eps={self.eps}, elementwise_affine={self.elementwise_affine}, "
                f"bias={self.bias is not None} (fused Triton)")


class LayerNorm1P(LayerNorm):
    """Drop-in for a LayerNorm whose weight applies as (1 + weight), zeros at init (Nemotron's
    NemotronLayerNorm1P, Megatron's `apply_layernorm_1p`): the norm fused, the small (1 + weight) add
    left to PyTorch (its gradient is the weight's). As Nemotron's: under CUDA's torch.autocast (the
    flag it reads), input, weight and bias cast to autocast's dtype; the norm always runs autocast off."""

    def forward(self, x):
        weight, bias = self.weight + 1.0, self.bias
        device = x.device.type
        if torch.is_autocast_enabled():
            dtype = torch.get_autocast_dtype(device)
            x, weight, bias = (t.to(dtype) if t is not None and t.is_floating_point() else t
                               for t in (x, weight, bias))
        with torch.autocast(device, enabled=False):
            return layer_norm(x, self.normalized_shape, weight, bias, self.eps)

    def extra_repr(self) -> str:
        return super().extra_repr().replace(" (fused Triton)", ", 1 + weight (fused Triton)")


def reference(x: torch.Tensor, normalized_shape, weight: Optional[torch.Tensor] = None,
              bias: Optional[torch.Tensor] = None, eps: float = 1e-5) -> torch.Tensor:
    """nn.LayerNorm.forward, verbatim."""
    return F.layer_norm(x, normalized_shape, weight, bias, eps)


def liger(x: torch.Tensor, normalized_shape, weight: Optional[torch.Tensor] = None,
          bias: Optional[torch.Tensor] = None, eps: float = 1e-5) -> torch.Tensor:
    """Liger-Kernel's LayerNorm on the same inputs (it needs a weight and a bias over the last dim)."""
    from liger_kernel.ops.layer_norm import LigerLayerNormFunction
    if weight is None or bias is None or len(_shape_list(normalized_shape)) != 1:
        raise ValueError("liger's LayerNorm needs a weight and a bias over the last dim only")
    return LigerLayerNormFunction.apply(x, weight, bias, eps)


def make_inputs(params: dict, device: torch.device, requires_grad: bool = True) -> Inputs:
    """params: shape, dtype; optional normalized_shape (default: the last dim), weight and bias
    (bools, default True), weight_dtype (of both; default dtype), eps."""
    normalized_shape = list(params.get("normalized_shape", params["shape"][-1:]))
    return norm_core.affine_norm_inputs(params, device, requires_grad, normalized_shape, normalized_shape)


def fused_bytes(params: dict) -> dict:
    shape = params["shape"]
    n = math.prod(params.get("normalized_shape", shape[-1:]))
    m = math.prod(shape) // n
    e = param_dtype(params).itemsize
    w = param_dtype(params, "weight_dtype").itemsize
    n_params = int(params.get("weight", True)) + int(params.get("bias", True))
    weight_read = n * w if params.get("weight", True) else 0
    programs = norm_tiles.backward_programs_for(n, m, params.get("num_sms", 132), e)
    return {"forward": m * n * 2 * e + n_params * n * w + 8 * m,
            "backward": m * n * 3 * e + 8 * m + weight_read + n_params * (2 * programs * n * 4 + n * w)}


def _int_list(text: str) -> list[int]:
    return [int(v) for v in re.findall(r"-?\d+", text or "")]


def layer_norm_params(op: OpRecord) -> dict | None:
    """Params from one traced aten::layer_norm / aten::native_layer_norm op (same argument
    order: input, normalized_shape, weight, bias, eps). None if it is not readable."""
    if not op.dims or not op.dims[0] or not op.types:
        return None
    dtype = dtype_from_trace(op.types[0])
    if dtype is None:
        return None
    shape = [int(d) for d in op.dims[0]]
    dims = list(op.dims) + [()] * (4 - len(op.dims))
    types = list(op.types) + [""] * (4 - len(op.types))
    has_weight, has_bias = bool(dims[2]), bool(dims[3])
    normalized_shape = _int_list(op.concrete[1]) if len(op.concrete) > 1 else []
    if not normalized_shape:
        normalized_shape = [int(d) for d in (dims[2] or dims[3] or shape[-1:])]
    if shape[len(shape) - len(normalized_shape):] != normalized_shape:
        return None
    wdtype = dtype_from_trace(types[2] if has_weight else types[3]) or dtype
    eps = 1e-5
    if len(op.concrete) > 4:
        try:
            eps = float(op.concrete[4])
        except ValueError:
            pass
    params = {"shape": shape, "dtype": dtype_name(dtype), "eps": eps}
    if normalized_shape != shape[-1:]:
        params["normalized_shape"] = normalized_shape
    if not has_weight:
        params["weight"] = False
    if not has_bias:
        params["bias"] = False
    if (has_weight or has_bias) and wdtype != dtype:
        params["weight_dtype"] = dtype_name(wdtype)
    return params


def params_from_ops(ops: Sequence[OpRecord]) -> dict | None:
    """Shapes, dtypes, affine parameters and eps from the traced layer_norm op."""
    op = next((o for o in ops if o.short in ("layer_norm", "native_layer_norm")), None)
    return layer_norm_params(op) if op is not None else None


PATTERN = register_pattern(
    __name__,
    description="LayerNorm (F.layer_norm): one Triton kernel forward, one (not two) backward",
    autocast_op="aten::layer_norm",
    forward_signature=r"(?:^| )(?:native_)?layer_norm(?= |$)",
    modules=("LayerNorm",),
    module_import="fusion_advisor.kernels.layer_norm:LayerNorm",
    module_factory=LayerNorm.from_module,
    example_params={"shape": [6, 42, 431], "dtype": "float32", "eps": 1e-5},
    bench_params=training_shapes(lambda tokens, hidden: {"shape": [tokens, hidden], "dtype": "bfloat16", "eps": 1e-5}),
    liger=liger,
)
