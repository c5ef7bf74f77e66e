"""Bias + activation: y = act(x + bias), one Triton kernel each way.

Replaces `F.gelu(x + bias)` and its kin (GPT-2/BERT MLPs with the bias kept out of the matmul,
Megatron's bias_gelu), which eager PyTorch runs as 2 kernels forward (add, act) and 2 backward
(act backward, the bias grad's sum over rows). One kernel serves every activation in
activations.py (gelu, gelu_tanh, silu, relu, relu_squared, sigmoid, leaky_relu): the activation is
a compile-time constant, part of the pattern's params.

Bytes for x of M rows x N (element size e), bias of N (size b), output size o = max(e, b):
  unfused forward:  add reads x and bias, writes z; act reads z, writes y:  M*N*(e + 2*o + o) + N*b
  unfused backward: act backward reads dy and z, writes dz; sum reads dz:   M*N*4*o + N*b
  fused forward:    read x once, write y once:                             M*N*(e + o) + N*b
  fused backward:   read dy and x (z recomputed), write dx; per-program partial bias grads:
                    M*N*(o + 2*e) + N*b + 2*P*N*4  (P row programs, from `bwd_programs`)
`fused_bytes` returns exactly the fused numbers.
"""
from __future__ import annotations

import math
import torch
import triton
import triton.language as tl

from fusion_advisor.kernels import autocast, norm_core
from fusion_advisor.kernels.activations import (ACTIVATION_IDS, activation_grad, activation_id, apply_activation,
                                                torch_activation)
from fusion_advisor.kernels.common import (as_row_view, cdiv, check_device, check_dtype, elementwise_tile,
                                          gdc_launch_dependents, interpreting, pdl, sm_count)
from fusion_advisor.kernels.fused_op import fused_op
from fusion_advisor.kernels.registry import (Inputs, OpRecord, Rewrite, dtype_from_trace, dtype_name,
                                             param_dtype, register_pattern, training_shapes)


@triton.jit
def _bias_act_fwd_kernel(X, B, Y, stride_x, n_rows, n_cols, negative_slope, ACT: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rows < n_rows)[:, None] & (cols < n_cols)[None, :]
    x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    b = tl.load(B + cols, mask=cols < n_cols, other=0.0).to(tl.float32)
    # x + bias is rounded to the output dtype before the activation, as eager rounds it.
    z = (x + b[None, :]).to(Y.dtype.element_ty).to(tl.float32)
    y = apply_activation(z, ACT, negative_slope)
    tl.store(Y + rows[:, None] * n_cols + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _bias_act_bwd_kernel(DY, X, B, DX, DB_PARTIAL, stride_dy, stride_x, n_rows, n_cols, rows_per_program,
                         negative_slope, ACT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                         LAUNCH_DEPENDENTS: tl.constexpr):
    if LAUNCH_DEPENDENTS:   # the bias-grad sum may start now: it waits for this grid's end
        gdc_launch_dependents()
    pid_m = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < n_cols
    b = tl.load(B + cols, mask=col_mask, other=0.0).to(tl.float32)
    db_acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    row_start = pid_m * rows_per_program
    for start in range(row_start, row_start + rows_per_program, BLOCK_M):
        rows = (start + tl.arange(0, BLOCK_M)).to(tl.int64)
        mask = (rows < n_rows)[:, None] & col_mask[None, :]
        dy = tl.load(DY + rows[:, None] * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        z = (x + b[None, :]).to(DY.dtype.element_ty).to(tl.float32)
        # dz in the output dtype, as eager's activation backward writes it; the bias grad sums it.
        dz = (dy * activation_grad(z, ACT, negative_slope)).to(DY.dtype.element_ty).to(tl.float32)
        dz = tl.where(mask, dz, 0.0)
        tl.store(DX + rows[:, None] * n_cols + cols[None, :], dz.to(DX.dtype.element_ty), mask=mask)
        db_acc += tl.sum(dz, axis=0)
    tl.store(DB_PARTIAL + pid_m * n_cols + cols, db_acc, mask=col_mask)


def _out_dtype(x: torch.Tensor, bias: torch.Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, bias.dtype)


def bwd_programs(n_rows: int, n_cols: int, num_sms: int) -> tuple[int, int]:
    """(row programs P, rows per program) for the backward: about 4 programs per SM in all, each
    over whole BLOCK_M row tiles of one column block. Shared by the launcher and `fused_bytes`."""
    block_m, block_n, _ = elementwise_tile(n_cols)
    row_tiles = max(1, cdiv(n_rows, block_m))
    programs = max(1, min(row_tiles, cdiv(4 * num_sms, cdiv(n_cols, block_n))))
    return programs, cdiv(row_tiles, programs) * block_m


def _num_sms(device: torch.device) -> int:
    if interpreting() or device.type != "cuda":
        return 1
    return sm_count(device)


def _check(x: torch.Tensor, bias: torch.Tensor, activation: str) -> int:
    act = activation_id(activation)
    check_dtype(x, "bias_act")
    check_dtype(bias, "bias_act")
    check_device(x, bias, op="bias_act")
    if bias.shape != (x.shape[-1],):
        raise ValueError(f"bias_act: bias shape {tuple(bias.shape)} does not match x's last dim {x.shape[-1]}")
    return act


def bias_act_fwd(x: torch.Tensor, bias: torch.Tensor, activation: str, negative_slope: float = 0.01) -> torch.Tensor:
    """Launcher: act(x + bias), contiguous, x's shape, dtype promote(x, bias)."""
    act = _check(x, bias, activation)
    x2 = as_row_view(x, "bias_act")
    n_rows, n_cols = x2.shape
    y = torch.empty((n_rows, n_cols), dtype=_out_dtype(x, bias), device=x.device)
    block_m, block_n, warps = elementwise_tile(n_cols)
    if y.numel():
        grid = (cdiv(n_rows, block_m), cdiv(n_cols, block_n))
        _bias_act_fwd_kernel[grid](x2, bias.contiguous(), y, x2.stride(0), n_rows, n_cols, negative_slope, ACT=act,
                                   BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps)
    return y.view(x.shape)


def bias_act_bwd(dy: torch.Tensor, x: torch.Tensor, bias: torch.Tensor, activation: str,
                 negative_slope: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """Launcher: (dx, dbias)."""
    act = activation_id(activation)
    x2, dy2 = as_row_view(x, "bias_act"), as_row_view(dy.to(_out_dtype(x, bias)), "bias_act")
    n_rows, n_cols = x2.shape
    dx = torch.empty((n_rows, n_cols), dtype=x.dtype, device=x.device)
    block_m, block_n, warps = elementwise_tile(n_cols)
    programs, rows_per_program = bwd_programs(n_rows, n_cols, _num_sms(x.device))
    partial = torch.empty((programs, n_cols), dtype=torch.float32, device=x.device)
    dbias = torch.empty(n_cols, dtype=bias.dtype, device=x.device)
    if dx.numel():
        early = pdl(x.device)   # the bias-grad sum launched while the backward runs
        grid = (programs, cdiv(n_cols, block_n))
        _bias_act_bwd_kernel[grid](dy2, x2, bias.contiguous(), dx, partial, dy2.stride(0), x2.stride(0), n_rows,
                                   n_cols, rows_per_program, negative_slope, ACT=act, BLOCK_M=block_m,
                                   BLOCK_N=block_n, LAUNCH_DEPENDENTS=early, num_warps=warps)
        norm_core.sum_partial_rows(partial[None], [dbias], 256, early)
    else:
        dbias.zero_()
    return dx.view(x.shape), dbias


# torch.library ops: a patched model still runs under torch.compile(fullgraph=True). Eager calls run
# the launchers directly (see fused_op).
_forward = fused_op("fusion_advisor::bias_act_fwd", fake=lambda x, bias, activation, negative_slope: x.new_empty(
    x.shape, dtype=_out_dtype(x, bias)))(bias_act_fwd)
_backward = fused_op("fusion_advisor::bias_act_bwd", like=("x", "bias"))(bias_act_bwd)


class BiasActFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, bias, activation, negative_slope):
        y = _forward(x, bias, activation, negative_slope)
        ctx.save_for_backward(x, bias)
        ctx.activation, ctx.negative_slope = activation, negative_slope
        return y

    @staticmethod
    def backward(ctx, dy):
        x, bias = ctx.saved_tensors
        dx, db = _backward(dy, x, bias, ctx.activation, ctx.negative_slope)
        return dx, db, None, None


def bias_act(x: torch.Tensor, bias: torch.Tensor, activation: str = "gelu", negative_slope: float = 0.01) -> torch.Tensor:
    """Fused act(x + bias), numerically the eager expression's forward and backward.
    `negative_slope` is used by leaky_relu only. Like `+`, it takes the 1-D bias on either side
    (a source rewrite of `F.gelu(bias + x)` may bind them in that order)."""
    if bias.dim() != 1 and x.dim() == 1:
        x, bias = bias, x
    if activation == "relu_squared" and autocast.runs_in_fp32("aten::pow.Tensor_Scalar", x.device.type,
                                                               torch.promote_types(x.dtype, bias.dtype)):
        # Under CUDA autocast `.square()` (a pow) runs in fp32 on the rounded relu: autocast's cast.
        return BiasActFunction.apply(x, bias, "relu", float(negative_slope)).to(torch.float32).square()
    return BiasActFunction.apply(x, bias, activation, float(negative_slope))


def reference(x: torch.Tensor, bias: torch.Tensor, activation: str = "gelu", negative_slope: float = 0.01) -> torch.Tensor:
    """`act(x + bias)` as users write it, e.g. `F.gelu(x + bias)` (see activations.torch_activation)."""
    return torch_activation(x + bias, activation, negative_slope)


def make_inputs(params: dict, device: torch.device, requires_grad: bool = True) -> Inputs:
    dtype = param_dtype(params)
    bdtype = param_dtype(params, "bias_dtype")
    x = torch.randn(params["shape"], dtype=dtype, device=device, requires_grad=requires_grad)
    bias = (0.5 * torch.randn(params["shape"][-1], device=device)).to(bdtype).requires_grad_(requires_grad)
    return Inputs((x, bias), {"activation": params["activation"], "negative_slope": params.get("negative_slope", 0.01)},
                  grad_inputs=(0, 1) if requires_grad else ())


def fused_bytes(params: dict) -> dict:
    shape = params["shape"]
    n = shape[-1]
    m = math.prod(shape[:-1])
    e = param_dtype(params).itemsize
    b = param_dtype(params, "bias_dtype").itemsize
    o = max(e, b)
    programs, _ = bwd_programs(m, n, params.get("num_sms", 132))
    return {"forward": m * n * (e + o) + n * b,
            "backward": m * n * (o + 2 * e) + n * b + 2 * programs * n * 4}


# Traced op name -> activation. gelu's `approximate` is not in the trace (its Concrete Inputs entry
# is empty), so a traced gelu reads as exact GELU; both run at the same speed.
_TRACED_ACTIVATIONS = {"gelu": "gelu", "silu": "silu", "relu": "relu", "sigmoid": "sigmoid",
                       "leaky_relu": "leaky_relu"}


def params_from_ops(ops: list[OpRecord]) -> dict | None:
    """Shape, dtypes and activation from a traced `add(x, bias)` followed by the activation (a
    following `square`/`pow` of a relu makes it relu_squared). The add must have a 1-D operand of
    the other's last dim: a residual add of two full tensors is not a bias add."""
    for i, op in enumerate(ops):
        if op.short != "add" or len(op.dims) < 2 or not op.dims[0] or not op.dims[1]:
            continue
        a, b = tuple(op.dims[0]), tuple(op.dims[1])
        if len(b) == 1 and len(a) >= 1 and b[0] == a[-1]:
            x_shape, x_type, b_type = a, op.types[0], op.types[1]
        elif len(a) == 1 and len(b) >= 1 and a[0] == b[-1]:
            x_shape, x_type, b_type = b, op.types[1], op.types[0]
        else:
            continue
        act_op = next((o for o in ops[i + 1:] if o.short.rstrip("_") in _TRACED_ACTIVATIONS), None)
        x_dtype, b_dtype = dtype_from_trace(x_type), dtype_from_trace(b_type)
        if act_op is None or x_dtype is None or b_dtype is None or not act_op.dims \
                or tuple(act_op.dims[0] or ()) != x_shape:
            continue
        activation = _TRACED_ACTIVATIONS[act_op.short.rstrip("_")]
        params = {"shape": list(x_shape), "dtype": dtype_name(x_dtype), "activation": activation}
        if b_dtype != x_dtype:
            params["bias_dtype"] = dtype_name(b_dtype)
        rest = [o.short for o in ops[ops.index(act_op) + 1:]]
        if activation == "relu" and rest[:1] in (["square"], ["pow"]):
            params["activation"] = "relu_squared"
        if activation == "leaky_relu" and len(act_op.concrete) > 1 and act_op.concrete[1] not in ("", None):
            try:
                params["negative_slope"] = float(act_op.concrete[1])
            except ValueError:
                pass
        return params
    return None


PATTERN = register_pattern(
    __name__,
    description="bias add + activation (GELU, SiLU, ReLU, ...) as one Triton kernel each way",
    forward_signature=r"\badd (?:\S+ ){0,2}(?:gelu|silu|relu|sigmoid|leaky_relu)_?\b",
    rewrites=tuple(Rewrite(f"F.{fn}($x + $bias{kw})", f"bias_act($x, $bias, {act!r})",
                           ("from fusion_advisor.kernels.bias_act import bias_act",))
                   for fn, kw, act in (("gelu", "", "gelu"), ("gelu", ", approximate='tanh'", "gelu_tanh"),
                                       ("gelu", ', approximate="tanh"', "gelu_tanh"), ("silu", "", "silu"),
                                       ("relu", "", "relu"))),
    example_params={"shape": [6, 42, 431], "dtype": "float32", "activation": "gelu_tanh"},
    # GPT-style MLP widths (4 x hidden at the activation), then each other activation once.
    bench_params=training_shapes(lambda tokens, hidden:
                                 {"shape": [tokens, 4 * hidden], "dtype": "bfloat16", "activation": "gelu_tanh"})
    + tuple({"shape": [16384, 4096], "dtype": "bfloat16", "activation": act}
            for act in ACTIVATION_IDS if act != "gelu_tanh"),
)
