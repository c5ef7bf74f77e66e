"""LayerNorm: y = (x - mean(x)) * rsqrt(var(x) + eps) * weight + bias, over the normalized dims.

Replaces `F.layer_norm` (what `nn.LayerNorm` runs, `reference` below); weight and bias are each
optional (`elementwise_affine=False`, `bias=False`). Eager PyTorch is already one kernel forward
(native_layer_norm); its backward on CUDA is two kernels that both read dy and x (one for dx, one
for dweight/dbias). The gain here is that backward pass, and the add+LayerNorm fusion built on
these row functions (add_layer_norm.py).

Bytes for x of M rows x N normalized elements (element size e; weight and bias size w, each
counted only when present; P programs in the backward, P <= number of SMs):
  unfused forward:  read x, weight, bias; write y, mean, rstd: M*N*2e + 2*N*w + 8*M
  unfused backward: dx kernel reads dy, x, mean, rstd, weight and writes dx; the dweight/dbias
                    kernel reads dy, x, mean, rstd again and writes them:
                    M*N*5e + 16*M + N*w + 2*N*w
  fused forward:    the same as unfused: M*N*2e + 2*N*w + 8*M
  fused backward:   read dy, x, mean, rstd, weight; write dx; per parameter, write P partial rows
                    in fp32, read them back to sum and write the grad:
                    M*N*3e + 8*M + N*w + 2*(2*P*N*4 + N*w)
`fused_bytes` returns exactly the fused numbers; the cost model prices them.
"""
from __future__ import annotations

import math
import re
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from fusion_advisor.kernels import autocast
from fusion_advisor.kernels.common import (as_rows, cdiv, check_device, check_dtype, eager_or_op, reduction_programs,
                                          row_block)
from fusion_advisor.kernels.registry import (FusionPattern, Inputs, OpRecord, dtype_from_name, dtype_from_trace,
                                             dtype_name, register)


# -- row functions, shared with add_layer_norm.py's kernels ---------------------------------------
@triton.jit
def _layer_norm_row(x, W, B, cols, mask, n_cols, eps, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr):
    """LayerNorm of one row held in registers (fp32, zero past n_cols): (y, mean, rstd)."""
    mean = tl.sum(x, axis=0) / n_cols
    # Two passes over registers, not E[x^2] - E[x]^2: no cancellation when |mean| >> std.
    xc = tl.where(mask, x - mean, 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=0) / n_cols + eps)
    y = xc * rstd
    if HAS_WEIGHT:
        y = y * tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        y = y + tl.load(B + cols, mask=mask, other=0.0).to(tl.float32)
    return y, mean, rstd


@triton.jit
def _layer_norm_row_weight(W, cols, mask, HAS_WEIGHT: tl.constexpr, BLOCK_SIZE: tl.constexpr):
    if HAS_WEIGHT:
        w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    else:
        w = tl.full((BLOCK_SIZE,), 1.0, tl.float32)
    return w


@triton.jit
def _layer_norm_row_grad(DY, X, MEAN, RSTD, row, cols, mask, w, stride_dy, stride_x, n_cols):
    """One row's backward in fp32: (dx, dy * x_hat, dy); the last two sum into dweight, dbias."""
    dy = tl.load(DY + row * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    mean = tl.load(MEAN + row)
    rstd = tl.load(RSTD + row)
    x_hat = tl.where(mask, (x - mean) * rstd, 0.0)
    g = dy * w
    dx = rstd * (g - tl.sum(g, axis=0) / n_cols - x_hat * (tl.sum(g * x_hat, axis=0) / n_cols))
    return dx, dy * x_hat, dy


@triton.jit
def _layer_norm_store_param_grads(DWB_PARTIAL, pid, cols, mask, n_cols, dw, db, HAS_WEIGHT: tl.constexpr,
                                  HAS_BIAS: tl.constexpr):
    """Partial dweight at DWB_PARTIAL[0, pid], dbias at [1, pid] (shape (2, programs, n_cols))."""
    if HAS_WEIGHT:
        tl.store(DWB_PARTIAL + pid * n_cols + cols, dw, mask=mask)
    if HAS_BIAS:
        tl.store(DWB_PARTIAL + (tl.num_programs(0) + pid) * n_cols + cols, db, mask=mask)


# -- kernels ----------------------------------------------------------------------------------------
@triton.jit
def _layer_norm_fwd_kernel(X, W, B, Y, MEAN, RSTD, stride_x, stride_y, n_cols, eps, HAS_WEIGHT: tl.constexpr,
                           HAS_BIAS: tl.constexpr, BLOCK_SIZE: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_SIZE)
    mask = cols < n_cols
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    y, mean, rstd = _layer_norm_row(x, W, B, cols, mask, n_cols, eps, HAS_WEIGHT, HAS_BIAS)
    tl.store(Y + row * stride_y + cols, y.to(Y.dtype.element_ty), mask=mask)
    tl.store(MEAN + row, mean)
    tl.store(RSTD + row, rstd)


@triton.jit
def _layer_norm_bwd_kernel(DY, X, W, MEAN, RSTD, DX, DWB_PARTIAL, stride_dy, stride_x, stride_dx, n_rows, n_cols,
                           rows_per_program, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
                           BLOCK_SIZE: tl.constexpr):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_SIZE)
    mask = cols < n_cols
    w = _layer_norm_row_weight(W, cols, mask, HAS_WEIGHT, BLOCK_SIZE)
    dw_acc = tl.zeros((BLOCK_SIZE,), dtype=tl.float32)
    db_acc = tl.zeros((BLOCK_SIZE,), dtype=tl.float32)
    row_start = pid * rows_per_program
    for i in range(0, rows_per_program):
        row = (row_start + i).to(tl.int64)
        if row < n_rows:
            dx, dw, db = _layer_norm_row_grad(DY, X, MEAN, RSTD, row, cols, mask, w, stride_dy, stride_x, n_cols)
            tl.store(DX + row * stride_dx + cols, dx.to(DX.dtype.element_ty), mask=mask)
            dw_acc += dw
            db_acc += db
    _layer_norm_store_param_grads(DWB_PARTIAL, pid, cols, mask, n_cols, dw_acc, db_acc, HAS_WEIGHT, HAS_BIAS)


# -- launchers --------------------------------------------------------------------------------------
def check_layer_norm_args(x: torch.Tensor, normalized_shape: Sequence[int], weight: Optional[torch.Tensor],
                          bias: Optional[torch.Tensor], op: str) -> None:
    check_dtype(x, op)
    check_device(x, weight, bias, op=op)
    shape = tuple(int(d) for d in normalized_shape)
    if not shape or tuple(x.shape[x.dim() - len(shape):]) != shape:
        raise ValueError(f"{op}: normalized_shape {list(shape)} is not the trailing shape of x {list(x.shape)}")
    for name, p in (("weight", weight), ("bias", bias)):
        if p is not None:
            check_dtype(p, op)
            if tuple(p.shape) != shape:
                raise ValueError(f"{op}: {name} shape {list(p.shape)} is not normalized_shape {list(shape)}")


def normalized_rows(t: torch.Tensor, normalized_shape: Sequence[int], op: str) -> torch.Tensor:
    """View t as (rows, prod(normalized_shape))."""
    k = len(normalized_shape)
    return as_rows(t.flatten(t.dim() - k) if k > 1 else t, op)


def row_norm_param_grads(partial: torch.Tensor, weight: Optional[torch.Tensor],
                         bias: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(dweight, dbias) from the (2, programs, n_cols) fp32 partials; empty for a missing one
    (a custom op returns tensors, never None)."""
    # One sum per parameter: a custom op's outputs may not be views of one tensor.
    dw = partial[0].sum(0).to(weight.dtype).view(weight.shape) if weight is not None else partial.new_empty(0)
    db = partial[1].sum(0).to(bias.dtype).view(bias.shape) if bias is not None else partial.new_empty(0)
    return dw, db


def layer_norm_fwd(x: torch.Tensor, normalized_shape: Sequence[int], weight: Optional[torch.Tensor],
                   bias: Optional[torch.Tensor], eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launcher: (y, mean, rstd); mean and rstd are fp32, one per row."""
    check_layer_norm_args(x, normalized_shape, weight, bias, "layer_norm")
    x2 = normalized_rows(x, normalized_shape, "layer_norm")
    n_rows, n_cols = x2.shape
    y = torch.empty((n_rows, n_cols), dtype=x.dtype, device=x.device)
    mean = torch.empty(n_rows, dtype=torch.float32, device=x.device)
    rstd = torch.empty(n_rows, dtype=torch.float32, device=x.device)
    block, warps = row_block(n_cols)
    if n_rows:
        # A missing weight or bias is never read (HAS_* is constexpr): x stands in as the pointer.
        _layer_norm_fwd_kernel[(n_rows,)](
            x2, x2 if weight is None else weight.contiguous(), x2 if bias is None else bias.contiguous(),
            y, mean, rstd, x2.stride(0), y.stride(0), n_cols, eps,
            HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, BLOCK_SIZE=block, num_warps=warps)
    return y.view(x.shape), mean, rstd


def layer_norm_bwd(dy: torch.Tensor, x: torch.Tensor, normalized_shape: Sequence[int], weight: Optional[torch.Tensor],
                   bias: Optional[torch.Tensor], mean: torch.Tensor,
                   rstd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launcher: (dx, dweight, dbias); dweight/dbias are empty when weight/bias is None."""
    x2 = normalized_rows(x, normalized_shape, "layer_norm")
    dy2 = normalized_rows(dy, normalized_shape, "layer_norm")
    n_rows, n_cols = x2.shape
    dx = torch.empty_like(x2)
    programs = reduction_programs(n_rows, x.device)
    rows_per_program = cdiv(n_rows, programs) if n_rows else 0
    partial = torch.empty((2, programs, n_cols), dtype=torch.float32, device=x.device)
    block, warps = row_block(n_cols)
    if n_rows:
        _layer_norm_bwd_kernel[(programs,)](
            dy2, x2, x2 if weight is None else weight.contiguous(), mean, rstd, dx, partial,
            dy2.stride(0), x2.stride(0), dx.stride(0), n_rows, n_cols, rows_per_program,
            HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, BLOCK_SIZE=block, num_warps=warps)
    else:
        partial.zero_()
    dw, db = row_norm_param_grads(partial, weight, bias)
    return dx.view(x.shape), dw, db


# torch.library registration: a patched model still runs under torch.compile(fullgraph=True).
@torch.library.custom_op("fusion_advisor::layer_norm_fwd", mutates_args=())
def _layer_norm_fwd_op(x: torch.Tensor, normalized_shape: list[int], weight: Optional[torch.Tensor],
                       bias: Optional[torch.Tensor], eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return layer_norm_fwd(x, normalized_shape, weight, bias, eps)


@_layer_norm_fwd_op.register_fake
def _(x, normalized_shape, weight, bias, eps):
    rows = x.numel() // max(1, math.prod(normalized_shape))
    stats = x.new_empty((rows,), dtype=torch.float32)
    return x.new_empty(x.shape), stats, stats.new_empty((rows,))


@torch.library.custom_op("fusion_advisor::layer_norm_bwd", mutates_args=())
def _layer_norm_bwd_op(dy: torch.Tensor, x: torch.Tensor, normalized_shape: list[int],
                       weight: Optional[torch.Tensor], bias: Optional[torch.Tensor], mean: torch.Tensor,
                       rstd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return layer_norm_bwd(dy, x, normalized_shape, weight, bias, mean, rstd)


@_layer_norm_bwd_op.register_fake
def _(dy, x, normalized_shape, weight, bias, mean, rstd):
    return x.new_empty(x.shape), *fake_param_grads(mean, weight, bias)


def fake_param_grads(like: torch.Tensor, weight: Optional[torch.Tensor],
                     bias: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """What row_norm_param_grads returns, as fakes."""
    dw = weight.new_empty(weight.shape) if weight is not None else like.new_empty(0)
    db = bias.new_empty(bias.shape) if bias is not None else like.new_empty(0)
    return dw, db



# Eager calls run the launchers directly; traced code calls the registered ops (see eager_or_op).
_forward = eager_or_op(layer_norm_fwd, torch.ops.fusion_advisor.layer_norm_fwd)
_backward = eager_or_op(layer_norm_bwd, torch.ops.fusion_advisor.layer_norm_bwd)


class LayerNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, normalized_shape, weight, bias, eps):
        y, mean, rstd = _forward(x, normalized_shape, weight, bias, eps)
        ctx.save_for_backward(x, weight, bias, mean, rstd)
        ctx.normalized_shape = normalized_shape
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, bias, mean, rstd = ctx.saved_tensors
        dx, dw, db = _backward(dy, x, ctx.normalized_shape, weight, bias, mean, rstd)
        return dx, None, dw if weight is not None else None, db if bias is not None else None, None


def _shape_list(normalized_shape) -> list[int]:
    return [int(normalized_shape)] if isinstance(normalized_shape, int) else [int(d) for d in normalized_shape]


def layer_norm(x: torch.Tensor, normalized_shape, weight: Optional[torch.Tensor] = None,
               bias: Optional[torch.Tensor] = None, eps: float = 1e-5) -> torch.Tensor:
    """Fused LayerNorm with F.layer_norm's arguments, forward and backward. Inside torch.autocast
    it casts where eager's autocast does (on CUDA: a bf16/fp16 input runs, and returns, in fp32)."""
    if autocast.upcasts("aten::layer_norm", x, weight, bias):
        x, weight, bias = autocast.to_fp32(x, weight, bias)
    return LayerNormFunction.apply(x, _shape_list(normalized_shape), weight, bias, eps)


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
    def from_module(cls, module: torch.nn.Module) -> "LayerNorm":
        """Wrap an existing nn.LayerNorm's parameters (shared, not copied)."""
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
    dtype = dtype_from_name(params["dtype"])
    wdtype = dtype_from_name(params.get("weight_dtype", params["dtype"]))
    normalized_shape = list(params.get("normalized_shape", params["shape"][-1:]))
    x = torch.randn(params["shape"], dtype=dtype, device=device, requires_grad=requires_grad)
    weight = bias = None
    if params.get("weight", True):
        weight = (1.0 + 0.1 * torch.randn(normalized_shape, device=device)).to(wdtype).requires_grad_(requires_grad)
    if params.get("bias", True):
        bias = (0.1 * torch.randn(normalized_shape, device=device)).to(wdtype).requires_grad_(requires_grad)
    grads = tuple(i for i, t in ((0, x), (2, weight), (3, bias)) if t is not None) if requires_grad else ()
    return Inputs((x, normalized_shape, weight, bias), {"eps": params.get("eps", 1e-5)}, grad_inputs=grads)


def fused_bytes(params: dict) -> dict:
    shape = params["shape"]
    n = math.prod(params.get("normalized_shape", shape[-1:]))
    m = math.prod(shape) // n
    e = dtype_from_name(params["dtype"]).itemsize
    w = dtype_from_name(params.get("weight_dtype", params["dtype"])).itemsize
    n_params = int(params.get("weight", True)) + int(params.get("bias", True))
    weight_read = n * w if params.get("weight", True) else 0
    programs = min(m, params.get("num_sms", 132))
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


PATTERN = register(FusionPattern(
    name="layer_norm",
    description="LayerNorm (F.layer_norm): one Triton kernel forward, one (not two) backward",
    reference=reference,
    fused=layer_norm,
    make_inputs=make_inputs,
    fused_bytes=fused_bytes,
    forward_signature=r"(?:^| )(?:native_)?layer_norm(?= |$)",
    params_from_ops=params_from_ops,
    modules=("LayerNorm",),
    module_import="fusion_advisor.kernels.layer_norm:LayerNorm",
    module_factory=LayerNorm.from_module,
    example_params={"shape": [6, 42, 431], "dtype": "float32", "eps": 1e-5},
    bench_params=tuple({"shape": [tokens, hidden], "dtype": "bfloat16", "eps": 1e-5}
                       for tokens in (4096, 16384, 32768) for hidden in (1024, 4096, 8192)),
    liger=liger,
))
