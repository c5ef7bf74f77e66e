"""Scaled, masked softmax over the last dim: y = softmax(scores * scale (+ mask) (causal -inf), -1).

Replaces the attention-score chain users write between two matmuls, e.g. GPT-2's
`att = (q @ k.T) * scale; att = att.masked_fill(~tril, -inf); F.softmax(att, -1)` (traced as
`mul masked_fill softmax`) or BERT's `scores / sqrt(d) + attention_mask` (`div add softmax`), which
eager PyTorch runs as 3 kernels forward and 3 backward. Here: one kernel each way.

A whole matmul -> scale -> mask -> softmax -> matmul chain is better replaced by
`F.scaled_dot_product_attention` (flash attention: the S x S scores never reach memory); this
kernel is for the softmax chain alone, where the matmuls must stay (e.g. the probabilities are
needed, or an unusual mask).

Semantics, exactly the reference's (`reference` below): `scores * scale` rounded to scores' dtype;
`+ mask` (any float mask broadcastable to scores, e.g. (B, 1, S, S) or (S, S)) rounded to the
promoted dtype; `causal` fills -inf above the diagonal of a square (S x S) score matrix, as
`masked_fill(~torch.tril(ones(S, S)), -inf)`; then softmax in fp32. A row whose every entry is -inf
gives NaN, as eager does (exp(-inf - -inf)); a mask of finfo.min instead gives a uniform row, as
eager does.

Bytes for scores of R rows x N (element size e; output/mask-promoted size o; mask of U elements of
size m; with `causal`, K = the number of kept entries, B*H*S*(S+1)/2, else K = R*N):
  unfused forward:  mul 2 R*N*e, masked_fill (or add) 2 R*N*e (+ U*m), softmax 2 R*N*o
  unfused backward: softmax_backward 3 R*N*o, masked_fill backward 2 R*N*e, mul backward 2 R*N*e
  fused forward:    read the kept scores, read the mask once, write y:   K*e + U*m + R*N*o
  fused backward:   read kept y and dy, write dx:                         2*K*o + R*N*e
                    (+ when the mask needs a grad: write dz, read it to sum over the broadcast
                    dims, write the mask grad: 2*R*N*o + U*m)
The mask is read once: programs run head-fastest, so the programs that share a mask row (a mask
broadcast over heads) run back to back and hit L2. With `causal`, the entries above the diagonal
are never read (their outputs and grads are exact zeros without them), forward and backward.
`fused_bytes` returns exactly the fused numbers.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from fusion_advisor.kernels.common import cdiv, check_device, check_dtype, interpreting, row_block
from fusion_advisor.kernels.fused_op import fused_op
from fusion_advisor.kernels.registry import (Inputs, OpRecord, dtype_from_trace, dtype_name, param_dtype,
                                             register_pattern)


CAUSAL_GROUP = tl.constexpr(8)   # elements: 16 bytes of bf16 / fp16, the widest load a thread issues


@triton.jit
def _causal_loads(in_row, cols, q):
    """The loads' mask for causal rows: the entries up to the diagonal, rounded up to whole groups
    of CAUSAL_GROUP. A mask at element granularity (cols <= q) leaves Triton no alignment to prove,
    and every load became a 2-byte one (16 ld.global.b16 a thread against 2 ld.global.v4 in the
    sm_90 PTX of a 4096-wide bf16 row); whole groups keep 16-byte loads. The entries loaded past
    the diagonal sit in sectors already read; the kernels drop them (`keep`)."""
    return in_row & ((cols[None, :] // CAUSAL_GROUP) <= (q[:, None] // CAUSAL_GROUP))


@triton.jit
def _softmax_fwd_kernel(X, MASK, Y, n_heads, n_q, n_cols, scale,
                        stride_xb, stride_xh, stride_xq, stride_mb, stride_mh, stride_mq, stride_mk,
                        HAS_MASK: tl.constexpr, CAUSAL: tl.constexpr, BLOCK_SIZE: tl.constexpr, ROWS: tl.constexpr):
    # ROWS consecutive query rows of one (b, h) per program, head-fastest across programs: the
    # programs that share (b, q-block), hence the mask rows when the mask broadcasts over heads,
    # run back to back. Several rows per program keep more loads in flight for short rows.
    pid = tl.program_id(0).to(tl.int64)
    n_qb = tl.cdiv(n_q, ROWS)
    h = pid % n_heads
    qb = (pid // n_heads) % n_qb
    b = pid // (n_heads * n_qb)
    qs = qb * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_SIZE)
    in_row = (qs < n_q)[:, None] & (cols < n_cols)[None, :]
    keep = in_row
    loaded = in_row
    if CAUSAL:
        keep = keep & (cols[None, :] <= qs[:, None])
        loaded = _causal_loads(in_row, cols, qs)
    x = tl.load(X + b * stride_xb + h * stride_xh + qs[:, None] * stride_xq + cols[None, :], mask=loaded, other=0.0)
    x = (x.to(tl.float32) * scale).to(X.dtype.element_ty).to(tl.float32)
    if HAS_MASK:
        m = tl.load(MASK + b * stride_mb + h * stride_mh + qs[:, None] * stride_mq + cols[None, :] * stride_mk,
                    mask=loaded, other=0.0)
        x = (x + m.to(tl.float32)).to(Y.dtype.element_ty).to(tl.float32)
    x = tl.where(keep, x, float("-inf"))
    e = tl.exp(x - tl.max(x, axis=1)[:, None])
    y = e / tl.sum(e, axis=1)[:, None]
    rows = (b * n_heads + h) * n_q + qs
    tl.store(Y + rows[:, None] * n_cols + cols[None, :], y.to(Y.dtype.element_ty), mask=in_row)


@triton.jit
def _softmax_bwd_kernel(DY, Y, DX, DZ, n_rows, n_q, n_cols, scale, stride_dy,
                        CAUSAL: tl.constexpr, WRITE_DZ: tl.constexpr, BLOCK_SIZE: tl.constexpr, ROWS: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_SIZE)
    in_row = (rows < n_rows)[:, None] & (cols < n_cols)[None, :]
    keep = in_row
    loaded = in_row
    if CAUSAL:
        keep = keep & (cols[None, :] <= (rows % n_q)[:, None])
        loaded = _causal_loads(in_row, cols, rows % n_q)
    y = tl.load(Y + rows[:, None] * n_cols + cols[None, :], mask=loaded, other=0.0).to(tl.float32)
    dy = tl.load(DY + rows[:, None] * stride_dy + cols[None, :], mask=loaded, other=0.0).to(tl.float32)
    y = tl.where(keep, y, 0.0)   # the loads' last group runs past the diagonal: those entries are dropped
    dy = tl.where(keep, dy, 0.0)
    # Rounded as eager rounds it: softmax_backward writes dz in y's dtype, the grad reaches
    # scores * scale in scores' dtype, and the mul's backward rounds dz * scale again.
    dz = (y * (dy - tl.sum(y * dy, axis=1)[:, None])).to(Y.dtype.element_ty)
    if WRITE_DZ:
        tl.store(DZ + rows[:, None] * n_cols + cols[None, :], dz, mask=in_row)
    dx = dz.to(DX.dtype.element_ty).to(tl.float32) * scale
    tl.store(DX + rows[:, None] * n_cols + cols[None, :], dx.to(DX.dtype.element_ty), mask=in_row)


# On a GPU the rows per program and warps are tuned once per (width, variant): short rows (1024
# bf16 = 2 KB) leave one row per program far from the copy bandwidth (seen on an H200: 1.9 TB/s of
# 4.2). The interpreter (CI) takes one fixed, small configuration.
_TUNE_CONFIGS = [triton.Config({"ROWS": r}, num_warps=w) for r in (1, 2, 4, 8, 16) for w in (4, 8)]


def _prune(configs, named_args, **kwargs):
    block = kwargs["BLOCK_SIZE"]
    kept = [c for c in configs if 1024 <= c.kwargs["ROWS"] * block <= 16384 or (c.kwargs["ROWS"] == 1 and block >= 16384)]
    return kept or configs[:1]


_softmax_fwd_tuned = triton.autotune(_TUNE_CONFIGS, key=["n_cols", "HAS_MASK", "CAUSAL"],
                                     prune_configs_by={"early_config_prune": _prune})(_softmax_fwd_kernel)
_softmax_bwd_tuned = triton.autotune(_TUNE_CONFIGS, key=["n_cols", "CAUSAL", "WRITE_DZ"],
                                     prune_configs_by={"early_config_prune": _prune}, reset_to_zero=[])(_softmax_bwd_kernel)
_INTERPRETER_ROWS = 2


def _out_dtype(scores: torch.Tensor, mask: torch.Tensor | None) -> torch.dtype:
    return scores.dtype if mask is None else torch.promote_types(scores.dtype, mask.dtype)


def _as_4d(t: torch.Tensor) -> torch.Tensor:
    """(B, H, Sq, Sk) view: leading 1s added; more than 4 dims merged into B where they flatten."""
    if t.dim() <= 4:
        return t.reshape((1,) * (4 - t.dim()) + tuple(t.shape))
    return t.reshape((-1,) + tuple(t.shape[-3:]))


def _check(scores: torch.Tensor, mask: torch.Tensor | None, causal: bool) -> None:
    check_dtype(scores, "softmax")
    check_device(scores, mask, op="softmax")
    if scores.dim() == 0:
        raise ValueError("softmax: expected scores with at least one dim, got a scalar")
    if causal and (scores.dim() < 2 or scores.shape[-1] != scores.shape[-2]):
        raise ValueError(f"softmax: causal masking needs square (..., S, S) scores, got {tuple(scores.shape)}")
    if mask is None:
        return
    if not mask.is_floating_point():
        raise TypeError(f"softmax: mask must be an additive float mask, got {mask.dtype} "
                        "(for a boolean keep-mask use mask=torch.zeros(m.shape).masked_fill(~m, -inf))")
    check_dtype(mask, "softmax mask")
    if mask.dim() > 4 or scores.dim() > 4:
        raise ValueError(f"softmax: a mask needs scores of at most 4 dims, got {tuple(scores.shape)}")
    try:
        broadcast = torch.broadcast_shapes(scores.shape, mask.shape)
    except RuntimeError:
        broadcast = None
    if broadcast != scores.shape:
        raise ValueError(f"softmax: mask {tuple(mask.shape)} does not broadcast to scores {tuple(scores.shape)}")


def softmax_fwd(scores: torch.Tensor, mask: torch.Tensor | None, scale: float, causal: bool) -> torch.Tensor:
    """Launcher: softmax(scores * scale (+ mask) (causal), -1), contiguous, dtype promote(scores, mask)."""
    _check(scores, mask, causal)
    x = scores if scores.stride(-1) == 1 else scores.contiguous()
    x4 = _as_4d(x)
    n_b, n_h, n_q, n_cols = x4.shape
    y = torch.empty(scores.shape, dtype=_out_dtype(scores, mask), device=scores.device)
    block, warps = row_block(n_cols)
    if mask is not None:
        m4 = mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape)).expand(x4.shape)
        mask_strides = m4.stride()
    else:
        m4, mask_strides = x4, (0, 0, 0, 0)
    if y.numel():
        args = (x4, m4, y, n_h, n_q, n_cols, scale, *x4.stride()[:3], *mask_strides)
        flags = dict(HAS_MASK=mask is not None, CAUSAL=causal, BLOCK_SIZE=block)
        if interpreting():
            rows = _INTERPRETER_ROWS
            _softmax_fwd_kernel[(n_b * n_h * cdiv(n_q, rows),)](*args, **flags, ROWS=rows, num_warps=warps)
        else:
            _softmax_fwd_tuned[lambda meta: (n_b * n_h * cdiv(n_q, meta["ROWS"]),)](*args, **flags)
    return y


def softmax_bwd(dy: torch.Tensor, y: torch.Tensor, scale: float, causal: bool, scores_dtype: torch.dtype,
                with_dz: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Launcher: (dscores, dz), dz = the grad reaching `scores * scale + mask` in y's dtype (what
    the mask's grad sums), written only `with_dz` (else an empty tensor)."""
    n_cols = y.shape[-1]
    dy2 = (dy if dy.stride(-1) == 1 else dy.contiguous()).to(y.dtype)
    try:
        dy2 = dy2.view(-1, n_cols)
    except RuntimeError:
        dy2 = dy2.contiguous().view(-1, n_cols)
    n_rows = dy2.shape[0]
    n_q = y.shape[-2] if y.dim() >= 2 else 1
    dx = torch.empty(y.shape, dtype=scores_dtype, device=y.device)
    dz = torch.empty(y.shape if with_dz else (0,), dtype=y.dtype, device=y.device)
    block, warps = row_block(n_cols)
    if dx.numel():
        args = (dy2, y, dx, dz, n_rows, n_q, n_cols, scale, dy2.stride(0))
        flags = dict(CAUSAL=causal, WRITE_DZ=with_dz, BLOCK_SIZE=block)
        if interpreting():
            rows = _INTERPRETER_ROWS
            _softmax_bwd_kernel[(cdiv(n_rows, rows),)](*args, **flags, ROWS=rows, num_warps=warps)
        else:
            _softmax_bwd_tuned[lambda meta: (cdiv(n_rows, meta["ROWS"]),)](*args, **flags)
    return dx, dz


# torch.library ops: a patched model still runs under torch.compile(fullgraph=True). Eager calls run
# the launchers directly (see fused_op).
_forward = fused_op("fusion_advisor::softmax_fwd", fake=lambda scores, mask, scale, causal: scores.new_empty(
    scores.shape, dtype=_out_dtype(scores, mask)))(softmax_fwd)
_backward = fused_op("fusion_advisor::softmax_bwd", fake=lambda dy, y, scale, causal, scores_dtype, with_dz: (
    y.new_empty(y.shape, dtype=scores_dtype), y.new_empty(y.shape if with_dz else (0,))))(softmax_bwd)


class SoftmaxFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, scores, mask, scale, causal):
        y = _forward(scores, mask, scale, causal)
        ctx.save_for_backward(y)
        ctx.scale, ctx.causal, ctx.scores_dtype = scale, causal, scores.dtype
        ctx.mask_shape, ctx.mask_dtype = (mask.shape, mask.dtype) if mask is not None else (None, None)
        return y

    @staticmethod
    def backward(ctx, dy):
        (y,) = ctx.saved_tensors
        mask_grad = ctx.needs_input_grad[1]
        dx, dz = _backward(dy, y, ctx.scale, ctx.causal, ctx.scores_dtype, mask_grad)
        dmask = dz.sum_to_size(ctx.mask_shape).to(ctx.mask_dtype) if mask_grad else None
        return dx, dmask, None, None


def softmax(scores: torch.Tensor, scale: float = 1.0, mask: torch.Tensor | None = None,
            causal: bool = False) -> torch.Tensor:
    """Fused softmax(scores * scale (+ mask) (causal), dim=-1), numerically `reference`'s forward and
    backward (a grad for the mask too, when it requires one)."""
    return SoftmaxFunction.apply(scores, mask, float(scale), bool(causal))


def reference(scores: torch.Tensor, scale: float = 1.0, mask: torch.Tensor | None = None,
              causal: bool = False) -> torch.Tensor:
    """The attention-score chain as GPT-2 / BERT-style code writes it."""
    att = scores * scale
    if mask is not None:
        att = att + mask
    if causal:
        s = att.shape[-1]
        keep = torch.tril(torch.ones(s, s, dtype=torch.bool, device=att.device))
        att = att.masked_fill(~keep, float("-inf"))
    return F.softmax(att, dim=-1)


def liger(scores: torch.Tensor, scale: float = 1.0, mask: torch.Tensor | None = None,
          causal: bool = False) -> torch.Tensor:
    """What Liger-Kernel offers for this chain: it fuses the softmax alone, so the scale and mask
    run eagerly before its softmax kernel."""
    from liger_kernel.ops.softmax import LigerSoftmaxFunction
    att = scores * scale
    if mask is not None:
        att = att + mask
    if causal:
        s = att.shape[-1]
        att = att.masked_fill(~torch.tril(torch.ones(s, s, dtype=torch.bool, device=att.device)), float("-inf"))
    return LigerSoftmaxFunction.apply(att)


def make_inputs(params: dict, device: torch.device, requires_grad: bool = True) -> Inputs:
    """params: shape, dtype, scale, mask ("none" | "causal" | "additive"), for "additive" also
    mask_shape and mask_dtype (default: scores' dtype) and mask_grad (default False). An additive
    mask is random (a learned bias) with its last quarter of keys at finfo.min (padding, HF style)."""
    dtype = param_dtype(params)
    shape = params["shape"]
    scores = (2.0 * torch.randn(shape, device=device)).to(dtype).requires_grad_(requires_grad)
    kind = params.get("mask", "none")
    mask = None
    if kind == "additive":
        mdtype = param_dtype(params, "mask_dtype")
        mask = torch.randn(params["mask_shape"], device=device)
        mask[..., 3 * shape[-1] // 4:] = torch.finfo(mdtype).min
        mask = mask.to(mdtype).requires_grad_(requires_grad and params.get("mask_grad", False))
    elif kind not in ("none", "causal"):
        raise ValueError(f"softmax: unknown mask kind {kind!r} (none, causal, additive)")
    grads = (0, 2) if mask is not None and mask.requires_grad else (0,)
    return Inputs((scores, params.get("scale", 1.0), mask, kind == "causal"), grad_inputs=grads if requires_grad else ())


def _kept(shape: list[int], causal: bool) -> int:
    rows = math.prod(shape[:-1])
    n = shape[-1]
    if not causal:
        return rows * n
    return rows // n * n * (n + 1) // 2  # square S x S: row q keeps q + 1 entries


def fused_bytes(params: dict) -> dict:
    shape = params["shape"]
    total = math.prod(shape)
    e = param_dtype(params).itemsize
    kind = params.get("mask", "none")
    kept = _kept(shape, kind == "causal")
    mask_bytes, o = 0, e
    if kind == "additive":
        m = param_dtype(params, "mask_dtype").itemsize
        mask_bytes, o = math.prod(params["mask_shape"]) * m, max(e, m)
    backward = 2 * kept * o + total * e
    if kind == "additive" and params.get("mask_grad", False):
        backward += 2 * total * o + mask_bytes
    return {"forward": kept * e + mask_bytes + total * o, "backward": backward}


def params_from_ops(ops: list[OpRecord]) -> dict | None:
    """Shape, dtype, scale and mask from a traced [mul | div] [masked_fill | add] (_)softmax chain
    over the last dim (at least one of the two before the softmax). A masked_fill with -inf and a square (S, S) bool mask is taken as causal (the
    tril buffer GPT-2 code keeps); the trace holds shapes, not the mask's values. The scale is read
    where the trace records it (a double scalar usually is not: then 1.0, which times the same)."""
    i_sm = next((i for i, o in enumerate(ops) if o.short in ("softmax", "_softmax")), None)
    if i_sm is None:
        return None
    sm = ops[i_sm]
    if not sm.dims or not sm.dims[0] or not sm.types:
        return None
    shape = list(sm.dims[0])
    dim = sm.concrete[1] if len(sm.concrete) > 1 else ""
    if dim not in ("-1", str(len(shape) - 1)):
        return None
    before = [o for o in ops[:i_sm] if o.dims and o.dims[0] and list(o.dims[0]) == shape]
    scale_op = next((o for o in before if o.short in ("mul", "div")), None)
    fill = next((o for o in before if o.short in ("masked_fill", "masked_fill_")), None)
    add = next((o for o in before if o.short in ("add", "add_") and len(o.dims) > 1 and o.dims[1]), None)
    first = scale_op or fill or add
    if first is None:  # a lone softmax: nothing to fuse it with
        return None
    dtype = dtype_from_trace(first.types[0]) if first.types else None
    if dtype is None:
        return None
    scale = _traced_scale(scale_op) if scale_op is not None else 1.0
    params = {"shape": shape, "dtype": dtype_name(dtype), "scale": scale, "mask": "none"}
    if fill is not None:
        mask_shape = list(fill.dims[1]) if len(fill.dims) > 1 else []
        value = fill.concrete[2] if len(fill.concrete) > 2 else ""
        if len(shape) < 2 or mask_shape != shape[-2:] or shape[-1] != shape[-2] or value != "-inf":
            return None
        params["mask"] = "causal"
    elif add is not None:
        mask_dtype = dtype_from_trace(add.types[1]) if len(add.types) > 1 else None
        if mask_dtype is None or not mask_dtype.is_floating_point:
            return None
        params.update(mask="additive", mask_shape=list(add.dims[1]), mask_dtype=dtype_name(mask_dtype))
    return params


def _traced_scale(op: OpRecord) -> float:
    raw = op.concrete[1] if len(op.concrete) > 1 else ""
    try:
        value = float(raw)
    except (TypeError, ValueError):
        return 1.0
    if op.short == "div":
        return 1.0 / value if value else 1.0
    return value


PATTERN = register_pattern(
    __name__,
    description="scaled, masked attention softmax (scale, mask or causal fill, softmax) as one Triton kernel each way",
    forward_signature=(r"\b(?:mul|div) (?:\S+ ){0,3}(?:(?:masked_fill_?|add) (?:\S+ ){0,2})?_?softmax\b"
                       r"|\b(?:masked_fill_?|add) (?:\S+ ){0,2}_?softmax\b"),
    example_params={"shape": [2, 3, 37, 37], "dtype": "float32", "scale": 0.125, "mask": "causal"},
    # Attention scores (B, H, S, S) of tokens = B * S in 4k-16k, H = hidden / 128 for hidden 1k and
    # 4k; sequence 1k and 4k. Causal (GPT-2), then a padding mask (B, 1, S, S) (BERT, HF).
    bench_params=tuple({"shape": [tokens // seq, heads, seq, seq], "dtype": "bfloat16", "scale": 0.125,
                        "mask": "causal"}
                       for tokens in (4096, 16384) for seq in (1024, 4096) for heads in (8, 32))
    + tuple({"shape": [tokens // seq, 16, seq, seq], "dtype": "bfloat16", "scale": 0.125, "mask": "additive",
             "mask_shape": [tokens // seq, 1, seq, seq]}
            for tokens, seq in ((4096, 1024), (16384, 1024), (8192, 4096))),
)
