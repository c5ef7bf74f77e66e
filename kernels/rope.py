"""Rotary position embedding on q and k, both in ONE Triton launch each way.

Replaces Hugging Face's `apply_rotary_pos_emb(q, k, cos, sin)` with `rotate_half` (Llama, Mistral,
Qwen, ...: `reference` below, verbatim from examples/llama_train.py), which eager PyTorch runs per
tensor as mul, neg, cat, mul, add: 10 kernels forward for q and k (the slices are views), and about
as many backward (mul, neg, two slice_backward, adds).

q is (B, H, S, D) and k (B, Hk, S, D) (Hk may differ: grouped-query attention); cos and sin are
(B, S, D) or (1, S, D) (unsqueezed at dim 1 by the reference). q and k are read in place through
their strides, which is how they usually arrive: `view(B, S, H, D).transpose(1, 2)` of a
projection. The outputs take q's and k's layout (dense strides preserved), as eager's do.
One program per (b, s) position: it loads that position's cos and sin once and rotates every head
of q and of k. The backward is the same kernel with the rotation reversed (sin halves swapped and
negated): dq = dy * cos + rotate_half^T(dy * sin).

The kernels round where eager rounds (q*cos and rotate_half(q)*sin to the output dtype, then their
sum), so bf16 results match eager bf16.

Bytes for q (B*H*S*D elements) and k (B*Hk*S*D), element size e, output size o = max(e, size of
cos), cos and sin of C = Bc*S*D elements each of size c:
  unfused forward, per tensor of N elements: mul 2N*e (+cos), neg N*e, cat 2N*e, mul 2N*e (+sin),
                   add 3N*e: about 10 N*e each for q and k
  fused forward:   read q and k, write both outputs, read cos and sin once:
                   B*(H+Hk)*S*D*(e + o) + 2*C*c
  fused backward:  read dq_out and dk_out, write dq and dk, read cos and sin once:
                   B*(H+Hk)*S*D*(o + e) + 2*C*c
`fused_bytes` returns exactly the fused numbers.
"""
from __future__ import annotations

import inspect
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from fusion_advisor.kernels.common import check_device, check_dtype, next_power_of_2
from fusion_advisor.kernels.fused_op import fused_op
from fusion_advisor.kernels.registry import (FunctionPatch, Inputs, OpRecord, Rewrite, dtype_from_trace,
                                             dtype_name, param_dtype, register_pattern, training_shapes)


@triton.jit
def _pair_offsets(d, half, INTERLEAVED: tl.constexpr):
    """Where the two elements of rotation pair d sit in a head: (d, d + half) for rotate_half
    (Llama), (2d, 2d + 1) for the interleaved layout (Cohere, GPT-J)."""
    if INTERLEAVED:
        return 2 * d, 2 * d + 1
    else:
        return d, d + half


@triton.jit
def _cos_offsets(d, first, second, COS_PAIR: tl.constexpr):
    """Where pair d's angle sits in cos and sin: beside its two elements (Llama's cat(freqs, freqs),
    Cohere's repeat_interleave), or once per pair at d (COS_PAIR: GPT-OSS's half-width cos, and
    Ernie's / Helium's first half of a full one)."""
    if COS_PAIR:
        return d, d
    else:
        return first, second


@triton.jit
def _rope_rotate(X, Y, b, s, n_heads, half, pass_len, stride_xb, stride_xh, stride_xs, stride_yb, stride_yh,
                 stride_ys, c1, c2, s1, s2, INTERLEAVED: tl.constexpr, FP32_MATH: tl.constexpr,
                 BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_P: tl.constexpr):
    """Rotate every head of one (b, s) position of X into Y: y1 = x1 c1 - x2 s1, y2 = x2 c2 + x1 s2,
    each product and the sum rounded to Y's dtype as eager rounds them (FP32_MATH: as Cohere's
    `q.float()` code, in fp32 and rounded once). The rotation covers the first 2 * half elements of
    a head; partial rotary (BLOCK_P > 0: GPT-NeoX, Phi, GLM) copies the pass_len after them, cast to
    Y's dtype as eager's `cat([embed, pass])` promotes them."""
    heads = tl.arange(0, BLOCK_H)
    d = tl.arange(0, BLOCK_D)
    first, second = _pair_offsets(d, half, INTERLEAVED)
    mask = (heads < n_heads)[:, None] & (d < half)[None, :]
    x_base = b * stride_xb + s * stride_xs + heads[:, None].to(tl.int64) * stride_xh
    x1 = tl.load(X + x_base + first[None, :], mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(X + x_base + second[None, :], mask=mask, other=0.0).to(tl.float32)
    out_ty = Y.dtype.element_ty
    if FP32_MATH:
        y1 = x1 * c1[None, :] - x2 * s1[None, :]
        y2 = x2 * c2[None, :] + x1 * s2[None, :]
    else:
        y1 = (x1 * c1[None, :]).to(out_ty).to(tl.float32) + (-x2 * s1[None, :]).to(out_ty).to(tl.float32)
        y2 = (x2 * c2[None, :]).to(out_ty).to(tl.float32) + (x1 * s2[None, :]).to(out_ty).to(tl.float32)
    y_base = b * stride_yb + s * stride_ys + heads[:, None].to(tl.int64) * stride_yh
    tl.store(Y + y_base + first[None, :], y1.to(out_ty), mask=mask)
    tl.store(Y + y_base + second[None, :], y2.to(out_ty), mask=mask)
    if BLOCK_P > 0:
        p = 2 * half + tl.arange(0, BLOCK_P)
        pass_mask = (heads < n_heads)[:, None] & (p < 2 * half + pass_len)[None, :]
        x_pass = tl.load(X + x_base + p[None, :], mask=pass_mask, other=0.0)
        tl.store(Y + y_base + p[None, :], x_pass.to(out_ty), mask=pass_mask)


@triton.jit
def _rope_kernel(Q, K, COS, SIN, QO, KO, seq_len, n_q_heads, n_k_heads, half, pass_len,
                 stride_qb, stride_qh, stride_qs, stride_kb, stride_kh, stride_ks,
                 stride_qob, stride_qoh, stride_qos, stride_kob, stride_koh, stride_kos,
                 stride_cb, stride_cs, BACKWARD: tl.constexpr, INTERLEAVED: tl.constexpr, FP32_MATH: tl.constexpr,
                 COS_PAIR: tl.constexpr, BLOCK_QH: tl.constexpr, BLOCK_KH: tl.constexpr, BLOCK_D: tl.constexpr,
                 BLOCK_P: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    b = pid // seq_len
    s = pid % seq_len
    d = tl.arange(0, BLOCK_D)
    dmask = d < half
    first, second = _pair_offsets(d, half, INTERLEAVED)
    c_first, c_second = _cos_offsets(d, first, second, COS_PAIR)
    c_base = b * stride_cb + s * stride_cs
    c1 = tl.load(COS + c_base + c_first, mask=dmask, other=0.0).to(tl.float32)
    c2 = tl.load(COS + c_base + c_second, mask=dmask, other=0.0).to(tl.float32)
    s1 = tl.load(SIN + c_base + c_first, mask=dmask, other=0.0).to(tl.float32)
    s2 = tl.load(SIN + c_base + c_second, mask=dmask, other=0.0).to(tl.float32)
    if BACKWARD:
        # The transpose of the rotation: dx1 = dy1 c1 + dy2 s2, dx2 = dy2 c2 - dy1 s1.
        s1, s2 = -s2, -s1
    _rope_rotate(Q, QO, b, s, n_q_heads, half, pass_len, stride_qb, stride_qh, stride_qs, stride_qob, stride_qoh,
                 stride_qos, c1, c2, s1, s2, INTERLEAVED, FP32_MATH, BLOCK_QH, BLOCK_D, BLOCK_P)
    _rope_rotate(K, KO, b, s, n_k_heads, half, pass_len, stride_kb, stride_kh, stride_ks, stride_kob, stride_koh,
                 stride_kos, c1, c2, s1, s2, INTERLEAVED, FP32_MATH, BLOCK_KH, BLOCK_D, BLOCK_P)


def _out_dtype(q: torch.Tensor, cos: torch.Tensor, fp32_math: bool = False) -> torch.dtype:
    """Eager's: q * cos promotes; Cohere's fp32 code casts back to q's dtype."""
    return q.dtype if fp32_math else torch.promote_types(q.dtype, cos.dtype)


def _check(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cos_pair: bool = False,
           rotary_dim: int = 0) -> None:
    check_dtype(q, "rope")
    check_dtype(cos, "rope")
    check_device(q, k, cos, sin, op="rope")
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(f"rope: q and k must be (B, H, S, D), got {tuple(q.shape)} and {tuple(k.shape)}")
    b, _, s, d = q.shape
    if k.shape[0] != b or k.shape[2:] != q.shape[2:]:
        raise ValueError(f"rope: k {tuple(k.shape)} does not match q {tuple(q.shape)} outside the head dim")
    if d % 2:
        raise ValueError(f"rope: head dim must be even, got {d}")
    rotary_dim = rotary_dim or d
    if rotary_dim % 2 or not 0 < rotary_dim <= d:
        raise ValueError(f"rope: rotary_dim must be even and within the head dim {d}, got {rotary_dim}")
    if q.dtype != k.dtype or cos.dtype != sin.dtype:
        raise TypeError(f"rope: q/k dtypes ({q.dtype}, {k.dtype}) and cos/sin dtypes ({cos.dtype}, {sin.dtype}) "
                        "must match pairwise")
    widths = (rotary_dim, rotary_dim // 2) if cos_pair else (rotary_dim,)
    if (cos.shape != sin.shape or cos.dim() != 3 or cos.shape[0] not in (1, b) or cos.shape[1] != s
            or cos.shape[2] not in widths):
        raise ValueError(f"rope: cos and sin must be ({b} or 1, {s}, {' or '.join(map(str, widths))}), got "
                         f"{tuple(cos.shape)} and {tuple(sin.shape)}")


def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _launch(q, k, cos, sin, q_out, k_out, backward: bool, interleaved: bool, fp32_math: bool, cos_pair: bool,
            rotary_dim: int) -> None:
    b, hq, s, d = q.shape
    rotary_dim = rotary_dim or d
    hk = k.shape[1]
    # One set of strides serves cos and sin; a batch of 1 broadcasts over B through stride 0.
    if cos.stride() != sin.stride() or cos.stride(-1) != 1:
        cos, sin = cos.contiguous(), sin.contiguous()
    cos, sin = cos.expand(b, s, cos.shape[-1]), sin.expand(b, s, sin.shape[-1])
    block_qh, block_kh = next_power_of_2(hq), next_power_of_2(hk)
    block_d = next_power_of_2(rotary_dim // 2)
    block_p = next_power_of_2(d - rotary_dim) if d > rotary_dim else 0
    warps = 4 if max(block_qh, block_kh) * max(block_d, block_p) <= 2048 else 8
    if q.numel() and k.numel():
        _rope_kernel[(b * s,)](q, k, cos, sin, q_out, k_out, s, hq, hk, rotary_dim // 2, d - rotary_dim,
                               q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
                               q_out.stride(0), q_out.stride(1), q_out.stride(2),
                               k_out.stride(0), k_out.stride(1), k_out.stride(2), cos.stride(0), cos.stride(1),
                               BACKWARD=backward, INTERLEAVED=interleaved, FP32_MATH=fp32_math, COS_PAIR=cos_pair,
                               BLOCK_QH=block_qh, BLOCK_KH=block_kh, BLOCK_D=block_d, BLOCK_P=block_p,
                               num_warps=warps)


def _out_like(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A new tensor of t's shape: t's strides where t is dense with a contiguous last dim (eager's
    outputs take its layout too), else contiguous. The fake kernels use it as well."""
    if t.stride(-1) == 1:
        return torch.empty_like(t, dtype=dtype)
    return torch.empty(t.shape, dtype=dtype, device=t.device)


def rope_fwd(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool,
             fp32_math: bool, cos_pair: bool, rotary_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Launcher: (q_embed, k_embed) in q's and k's layout, dtype promote(q, cos) (q's with fp32_math).
    rotary_dim: the leading elements of a head that rotate (0: all of them)."""
    _check(q, k, cos, sin, cos_pair, rotary_dim)
    out = _out_dtype(q, cos, fp32_math)
    q_out, k_out = _out_like(q, out), _out_like(k, out)
    q, k = _last_dim_contiguous(q), _last_dim_contiguous(k)
    _launch(q, k, cos, sin, q_out, k_out, False, interleaved, fp32_math, cos_pair, rotary_dim)
    return q_out, k_out


def rope_bwd(dq_out: torch.Tensor, dk_out: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
             dtype: torch.dtype, interleaved: bool, fp32_math: bool, cos_pair: bool,
             rotary_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Launcher: (dq, dk) of `dtype` (q's), in the incoming grads' layout."""
    dq, dk = _out_like(dq_out, dtype), _out_like(dk_out, dtype)
    dq_out, dk_out = _last_dim_contiguous(dq_out), _last_dim_contiguous(dk_out)
    _launch(dq_out, dk_out, cos, sin, dq, dk, True, interleaved, fp32_math, cos_pair, rotary_dim)
    return dq, dk


# torch.library ops: a patched model still runs under torch.compile(fullgraph=True). Eager calls run
# the launchers directly (see fused_op).
_forward = fused_op("fusion_advisor::rope_fwd", fake=lambda q, k, cos, sin, interleaved, fp32_math, cos_pair, rotary_dim: (
    _out_like(q, _out_dtype(q, cos, fp32_math)), _out_like(k, _out_dtype(q, cos, fp32_math))))(rope_fwd)
_backward = fused_op("fusion_advisor::rope_bwd", fake=lambda dq_out, dk_out, cos, sin, dtype, interleaved, fp32_math, cos_pair, rotary_dim: (
    _out_like(dq_out, dtype), _out_like(dk_out, dtype)))(rope_bwd)


class RoPEFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, cos, sin, interleaved, fp32_math, cos_pair, rotary_dim):
        q_embed, k_embed = _forward(q, k, cos, sin, interleaved, fp32_math, cos_pair, rotary_dim)
        ctx.save_for_backward(cos, sin)
        ctx.q_dtype, ctx.form = q.dtype, (interleaved, fp32_math, cos_pair, rotary_dim)
        return q_embed, k_embed

    @staticmethod
    def backward(ctx, dq_out, dk_out):
        cos, sin = ctx.saved_tensors
        dq, dk = _backward(dq_out, dk_out, cos, sin, ctx.q_dtype, *ctx.form)
        return dq, dk, None, None, None, None, None, None


def rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool = False,
         fp32_math: bool = False, cos_pair: bool = False, rotary_dim: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused `apply_rotary_pos_emb(q, k, cos, sin)`, numerically the reference's forward and
    backward: Llama's rotate_half by default; `interleaved` rotates the pairs (2i, 2i + 1) as
    Cohere's and GPT-J's rotate_half do, and `fp32_math` computes in fp32 and rounds once to q's
    dtype, as Cohere's `q.float()` code does (`reference_interleaved`); `cos_pair` reads pair i's
    angle once, at cos[..., i] (GPT-OSS's half-width cos; Ernie's and Helium's first half of a
    full one, repeated per pair in their code). `rotary_dim` < the head dim is partial rotary
    (GPT-NeoX, Phi, StableLM, GLM: `q[..., :rotary_dim]` rotates, the rest passes through, then
    `cat`); cos is then rotary_dim wide (half that with cos_pair). cos and sin get no gradient
    (HF computes them under no_grad): passing ones that require grad is refused rather than
    silently given none."""
    if cos.requires_grad or sin.requires_grad:
        raise ValueError("rope: cos/sin that require grad are not supported (compute them under torch.no_grad, "
                         "as Hugging Face's rotary embedding does)")
    rotary_dim = int(rotary_dim or 0)
    return RoPEFunction.apply(q, k, cos, sin, bool(interleaved), bool(fp32_math), bool(cos_pair),
                              0 if rotary_dim == q.shape[-1] else rotary_dim)


def rotate_half(x):
    x1 = x[..., : x.shape[-1] // 2]
    x2 = x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


def reference(q, k, cos, sin, interleaved=False, fp32_math=False, cos_pair=False, rotary_dim=None):
    """Hugging Face apply_rotary_pos_emb (unsqueeze_dim=1), verbatim: Llama's, or with the first two
    flags Cohere's (`reference_interleaved`); the other forms as `_eager_variant` writes them.
    rotary_dim < the head dim: GPT-NeoX's partial rotary (`reference_partial`)."""
    if rotary_dim and rotary_dim < q.shape[-1]:
        return reference_partial(q, k, cos, sin, rotary_dim, interleaved, fp32_math, cos_pair)
    if interleaved or fp32_math or cos_pair:
        if interleaved and fp32_math and not cos_pair:
            return reference_interleaved(q, k, cos, sin)
        if cos_pair and not (interleaved or fp32_math) and cos.shape[-1] * 2 == q.shape[-1]:
            return reference_half_cos(q, k, cos, sin)
        return _eager_variant(q, k, cos, sin, interleaved, fp32_math, cos_pair)
    cos = cos.unsqueeze(1)
    sin = sin.unsqueeze(1)
    q_embed = (q * cos) + (rotate_half(q) * sin)
    k_embed = (k * cos) + (rotate_half(k) * sin)
    return q_embed, k_embed


def reference_partial(q, k, cos, sin, rotary_dim, interleaved=False, fp32_math=False, cos_pair=False):
    """GPT-NeoX's apply_rotary_pos_emb (and Phi's, StableLM's, GLM's with their forms): the first
    rotary_dim elements of each head rotate, the rest pass through, `cat` puts them back."""
    q_rot, q_pass = q[..., :rotary_dim], q[..., rotary_dim:]
    k_rot, k_pass = k[..., :rotary_dim], k[..., rotary_dim:]
    q_embed, k_embed = reference(q_rot, k_rot, cos, sin, interleaved, fp32_math, cos_pair)
    return torch.cat([q_embed, q_pass], dim=-1), torch.cat([k_embed, k_pass], dim=-1)


def rotate_pairs(x):
    """Cohere's rotate_half, verbatim: the interleaved pairs (2i, 2i + 1)."""
    x1 = x[..., ::2]
    x2 = x[..., 1::2]
    return torch.stack([-x2, x1], dim=-1).flatten(-2)


def reference_interleaved(q, k, cos, sin):
    """Cohere's apply_rotary_pos_emb (unsqueeze_dim=1), verbatim: `rope(..., interleaved=True, fp32_math=True)`."""
    dtype = q.dtype
    q = q.float()
    k = k.float()
    cos = cos.unsqueeze(1)
    sin = sin.unsqueeze(1)
    q_embed = (q * cos) + (rotate_pairs(q) * sin)
    k_embed = (k * cos) + (rotate_pairs(k) * sin)
    return q_embed.to(dtype=dtype), k_embed.to(dtype=dtype)


def reference_half_cos(q, k, cos, sin):
    """GPT-OSS's apply_rotary_pos_emb (a half-width cos and sin), verbatim: `rope(..., cos_pair=True)`."""
    cos = cos.unsqueeze(1)
    sin = sin.unsqueeze(1)

    def rotate(x):
        first_half, second_half = torch.chunk(x, 2, dim=-1)
        first_ = first_half * cos - second_half * sin
        second_ = second_half * cos + first_half * sin
        return torch.cat((first_, second_), dim=-1)

    return rotate(q), rotate(k)


def _eager_variant(q, k, cos, sin, interleaved: bool, fp32_math: bool, cos_pair: bool = False):
    """apply_rotary_pos_emb in any of the (layout, precision, angle layout) forms models write.
    cos_pair: pair i's angle is cos[..., i] (Ernie / Helium: `cos[..., :D // 2].repeat_interleave(2)`;
    GPT-OSS: a half-width cos on both halves, `first * cos - second * sin`, the same products)."""
    rotate = rotate_pairs if interleaved else rotate_half
    dtype = q.dtype
    if cos_pair:
        half = q.shape[-1] // 2
        cos, sin = cos[..., :half], sin[..., :half]
        cos, sin = ((t.repeat_interleave(2, dim=-1) if interleaved else torch.cat((t, t), dim=-1)) for t in (cos, sin))
    if fp32_math:
        q, k = q.float(), k.float()
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    out = [(x * cos) + (rotate(x) * sin) for x in (q, k)]
    return tuple(o.to(dtype) for o in out) if fp32_math else tuple(out)


LLAMA_FORM = (False, False, False)
# (interleaved, fp32_math, cos_pair), the forms seen in transformers: Llama's first, Cohere's, Ernie's,
# Helium's, GPT-OSS's; then the rest.
_FORMS = (LLAMA_FORM, (True, True, False), (True, True, True), (True, False, True), (False, False, True),
          (True, False, False), (False, True, False), (False, True, True))


class RopeForm(NamedTuple):
    interleaved: bool
    fp32_math: bool
    cos_pair: bool
    widths: frozenset   # the cos widths, as fractions of the head dim (1.0, 0.5), it computes this form at
    partial: bool = False   # a narrower cos rotates that many leading elements, the rest pass (GPT-NeoX)


def rope_variant(original) -> RopeForm:
    """The form of an `apply_rotary_pos_emb`, read off what it computes: it runs on small bf16 CPU
    probes, with a full-width cos and with a half-width one (GPT-OSS's takes that), and the first
    eager form it equals bit for bit is its form, at the widths where it does. A width where it
    computes something else is left to the original at run time, unless it is partial rotary in the
    form found (GPT-NeoX, GLM: a narrower cos rotates that many leading elements of the head, the rest
    pass through; probed at half and a quarter of the head). Llama's form at full width where none
    matches: patch's numerics check then decides."""
    gen = torch.Generator().manual_seed(0)
    q, k = (torch.randn(1, 2, 3, 8, generator=gen).to(torch.bfloat16) for _ in range(2))
    cos, sin = (torch.randn(1, 3, 8, generator=gen).to(torch.bfloat16) for _ in range(2))
    found, widths = None, set()
    for width in (8, 4):
        c, s = cos[..., :width], sin[..., :width]
        try:
            with torch.no_grad():
                want = original(q, k, c, s)
        except Exception:  # noqa: BLE001 (a function that cannot take this probe: the next, or the check decides)
            continue
        for form in _FORMS:
            if width < 8 and not form[2]:
                continue   # a half-width cos is read once per pair
            if _bitwise_equal(want, _eager_variant(q, k, c, s, *form)):
                found = found or form
                if form == found:
                    widths.add(width / 8)
                break
    if not found:
        return RopeForm(*LLAMA_FORM, frozenset({1.0}))
    partial = 0.5 not in widths and all(
        _computes(original, (q, k, cos[..., :w], sin[..., :w]), reference_partial(q, k, cos[..., :w], sin[..., :w], w, *found))
        for w in (4, 2))
    return RopeForm(*found, frozenset(widths), partial)


def _computes(fn, args, want) -> bool:
    """fn(*args) equals `want` bit for bit (a probe it cannot take computes nothing)."""
    try:
        with torch.no_grad():
            got = fn(*args)
    except Exception:  # noqa: BLE001 (a function that cannot take this probe is not this form)
        return False
    return _bitwise_equal(got, want)


def _bitwise_equal(got, want) -> bool:
    """Two (q_embed, k_embed) results, the same dtypes, shapes and bits."""
    return (isinstance(got, (tuple, list)) and len(got) == len(want)
            and all(isinstance(g, torch.Tensor) and g.dtype == w.dtype and g.shape == w.shape and torch.equal(g, w)
                    for g, w in zip(got, want)))


def liger(q, k, cos, sin):
    """Liger-Kernel's RoPE on the same inputs."""
    from liger_kernel.ops.rope import LigerRopeFunction
    return LigerRopeFunction.apply(q, k, cos, sin)


def make_inputs(params: dict, device: torch.device, requires_grad: bool = True) -> Inputs:
    """params: q_shape (B, H, S, D), k_heads, dtype, cos_batch (1 or B, default 1), cos_dtype,
    rotary_dim (partial rotary: cos and sin that wide).
    q and k are built as Llama builds them, `view(B, S, H, D).transpose(1, 2)` (strided), unless
    params["layout"] == "contiguous"; cos/sin as LlamaRotaryEmbedding makes them (`interleaved`: as
    Cohere's does; `cos_pair`: half-width, as GPT-OSS's), the form passed on to reference and fused."""
    dtype = param_dtype(params)
    b, h, s, d = params["q_shape"]
    hk = params.get("k_heads", h)
    rotary_dim = params.get("rotary_dim") or d

    def heads(n):
        if params.get("layout", "bshd") == "contiguous":
            return torch.randn(b, n, s, d, device=device).to(dtype)
        return torch.randn(b, s, n, d, device=device).to(dtype).transpose(1, 2)

    q, k = heads(h).requires_grad_(requires_grad), heads(hk).requires_grad_(requires_grad)
    cos_batch = params.get("cos_batch", 1)
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, rotary_dim, 2, dtype=torch.float32, device=device) / rotary_dim))
    pos = torch.arange(s, device=device, dtype=torch.float32)[None].expand(cos_batch, s)
    freqs = pos[:, :, None] * inv_freq[None, None, :]
    form = {name: bool(params.get(name)) for name in ("interleaved", "fp32_math", "cos_pair")}
    # Cohere's rotary embedding repeats each pair's angle in place, Llama's concatenates two halves;
    # with cos_pair, GPT-OSS's half-width angles, one per pair
    if form["cos_pair"]:
        emb = freqs
    else:
        emb = torch.repeat_interleave(freqs, 2, dim=-1) if form["interleaved"] else torch.cat((freqs, freqs), dim=-1)
    cdtype = param_dtype(params, "cos_dtype")
    kwargs = form if any(form.values()) else {}
    if rotary_dim < d:
        kwargs = {**kwargs, "rotary_dim": rotary_dim}
    return Inputs((q, k, emb.cos().to(cdtype), emb.sin().to(cdtype)), kwargs, grad_inputs=(0, 1) if requires_grad else ())


def fused_bytes(params: dict) -> dict:
    b, h, s, d = params["q_shape"]
    hk = params.get("k_heads", h)
    e = param_dtype(params).itemsize
    c = param_dtype(params, "cos_dtype").itemsize
    o = max(e, c)
    qk = b * (h + hk) * s * d
    cos_width = params.get("rotary_dim") or d   # partial rotary reads a narrower table
    cos_sin = 2 * params.get("cos_batch", 1) * s * cos_width * c
    return {"forward": qk * (e + o) + cos_sin, "backward": qk * (o + e) + cos_sin}


def params_from_ops(ops: list[OpRecord]) -> dict | None:
    """q/k shapes, dtypes and cos batch from the traced chain per tensor
    `mul(x, cos) slice slice neg cat mul(rot, sin) add`, q's first, then k's; Cohere's interleaved
    rotate_half stacks the pairs (`neg stack flatten`): `interleaved` in the params. GPT-OSS's
    halves on a half-width cos (`mul mul sub mul mul add cat`): `cos_pair`."""
    if any(o.short == "sub" for o in ops) and not any(o.short == "neg" for o in ops):
        return _half_cos_params(ops)
    shapes = []
    for i, op in enumerate(ops):
        if op.short != "neg" or not op.dims or not op.dims[0]:
            continue
        mul = next((o for o in reversed(ops[:i]) if o.short == "mul" and len(o.dims) == 2
                    and len(o.dims[0]) == 4 and len(o.dims[1]) == 4), None)
        if mul is None or tuple(op.dims[0]) != tuple(mul.dims[0][:3]) + (mul.dims[0][3] // 2,):
            continue
        shapes.append((tuple(mul.dims[0]), tuple(mul.dims[1]), mul.types))
    if not any(o.short in ("cat", "stack") for o in ops):
        return None
    form = {"interleaved": True} if any(o.short == "stack" for o in ops) else {}
    params = _params(shapes, 1, form)
    return params and {**params, **_partial_head(ops, params["q_shape"])}


def _partial_head(ops: list[OpRecord], rotated: list) -> dict:
    """GPT-NeoX's partial rotary ends each tensor with `cat([embed, pass])`: a (B, H, S, R) rotated
    part beside the (B, H, S, P) one that passed; the head is then R + P wide, R of it rotated."""
    b, h, s, r = rotated
    for op in ops:
        parts = op.dims[0] if op.short == "cat" and op.dims else None
        if parts and len(parts) == 2 and all(isinstance(p, (list, tuple)) and len(p) == 4 for p in parts):
            first, second = tuple(parts[0]), tuple(parts[1])
            if first == (b, h, s, r) and second[:3] == (b, h, s) and second[3] > 0:
                return {"q_shape": [b, h, s, r + second[3]], "rotary_dim": r}
    return {}


def _half_cos_params(ops: list[OpRecord]) -> dict | None:
    """GPT-OSS's `first * cos - second * sin`, `second * cos + first * sin`, `cat` per tensor: the
    first mul of each (a (B, H, S, D/2) half times a (B or 1, 1, S, D/2) cos) gives the shapes."""
    firsts = []
    for i, op in enumerate(ops):
        if op.short == "sub" and i >= 2 and ops[i - 2].short == "mul" and len(ops[i - 2].dims) == 2:
            half, cos = (tuple(d) for d in ops[i - 2].dims)
            if len(half) == 4 and len(cos) == 4:
                firsts.append((half, cos, ops[i - 2].types))
    if not any(o.short == "cat" for o in ops):
        return None
    return _params(firsts, 2, {"cos_pair": True})


def _params(muls: list, widen: int, form: dict) -> dict | None:
    """The pattern's params from q's and k's first traced mul, (x shape, cos shape, input types) each,
    x (B, H, S, W) and cos (B or 1, 1, S, W); the head dim is W * widen (2 where x is a half)."""
    if len(muls) != 2:
        return None
    (q_shape, cos_shape, types), (k_shape, _, _) = muls
    b, h, s, width = q_shape
    if k_shape[0] != b or k_shape[2:] != (s, width) or cos_shape[1] != 1 or cos_shape[2:] != (s, width):
        return None
    dtype = dtype_from_trace(types[0]) if types else None
    cdtype = dtype_from_trace(types[1]) if len(types) > 1 else None
    if dtype is None or cdtype is None:
        return None
    params = {"q_shape": [b, h, s, width * widen], "k_heads": k_shape[1], "dtype": dtype_name(dtype),
              "cos_batch": cos_shape[0]}
    if cdtype != dtype:
        params["cos_dtype"] = dtype_name(cdtype)
    return {**params, **form}


# -- runtime patch of Hugging Face's module-level apply_rotary_pos_emb ---------------------------------
def _parameter_names(fn) -> list[str]:
    """fn's parameter names. transformers >= 5.2x makes apply_rotary_pos_emb an nn.Module (a `Func`
    that hub kernels can replace) whose instance signature is (*args, **kwargs): its class's forward
    carries the real one."""
    if isinstance(fn, torch.nn.Module):
        fn = type(fn).forward
    try:
        names = list(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        return []
    return names[1:] if names[:1] == ["self"] else names


def is_hf_apply_rotary_pos_emb(fn) -> bool:
    """HF's `apply_rotary_pos_emb(q, k, cos, sin, ...)` (its numerics are checked before any swap)."""
    return callable(fn) and _parameter_names(fn)[:4] == ["q", "k", "cos", "sin"]


def hf_apply_rotary_pos_emb(original):
    """A drop-in for HF's `apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1)` that runs `rope`
    for the call Llama-style attention makes: (B, H, S, D) q and k, (B or 1, S, D) cos and sin
    that need no grad, heads on dim 1, in the form `rope_variant` reads off `original` (Llama's
    rotate_half, or Cohere's interleaved pairs in fp32; partial rotary where the form has it). Any other call (unsqueeze_dim=2, an old
    position_ids argument, 4-D cos) goes to `original` unchanged."""
    fifth = (_parameter_names(original) + [None] * 5)[4]
    form = rope_variant(original)

    def apply_rotary_pos_emb(q, k, cos, sin, *args, **kwargs):
        if args or kwargs:
            heads_on_dim_1 = ((not kwargs and len(args) == 1 and fifth == "unsqueeze_dim" and args[0] == 1)
                              or (not args and kwargs == {"unsqueeze_dim": 1}))
            if not heads_on_dim_1:
                return original(q, k, cos, sin, *args, **kwargs)
        if (q.dim() != 4 or k.dim() != 4 or cos.dim() != 3 or cos.requires_grad or sin.requires_grad
                or q.dtype != k.dtype or cos.dtype != sin.dtype):
            return original(q, k, cos, sin, *args, **kwargs)
        width, head_dim = cos.shape[-1], q.shape[-1]
        if width / head_dim in form.widths:
            rotary_dim = head_dim
        elif form.partial and width < head_dim and width % 2 == 0:
            rotary_dim = width
        else:
            return original(q, k, cos, sin, *args, **kwargs)
        return rope(q, k, cos, sin, form.interleaved, form.fp32_math, form.cos_pair, rotary_dim)

    apply_rotary_pos_emb.fused_original = original
    apply_rotary_pos_emb.form = form
    return apply_rotary_pos_emb


def hf_rope_example_inputs(model, replacement=None) -> list[Inputs]:
    """Random q, k (B=2, 3 heads, 7 positions, the model's head dim) and cos/sin as HF builds them,
    in the model's dtype and device; GQA-shaped k (1 head) too. Where the replacement serves a
    half-width cos (GPT-OSS's form: `replacement.form.widths`), the cos and sin are that width: the
    check must see the calls the kernel takes, not only those it hands back to the original."""
    ref = next(p for p in model.parameters() if p.is_floating_point())
    config = getattr(model, "config", None)
    head_dim = getattr(config, "head_dim", None)
    if not head_dim and getattr(config, "num_attention_heads", None):
        head_dim = config.hidden_size // config.num_attention_heads
    params = {"q_shape": [2, 3, 7, int(head_dim or 16)], "dtype": dtype_name(ref.dtype)}
    form = getattr(replacement, "form", None)
    examples = []
    for width in sorted(form.widths if form is not None else {1.0}, reverse=True):
        for extra in ({}, {"k_heads": 1}):
            q, k, cos, sin = make_inputs({**params, **extra}, ref.device, True).args
            n = int(cos.shape[-1] * width)   # cat(freqs, freqs)[:D/2] is GPT-OSS's half-width cos
            examples.append(Inputs((q, k, cos[..., :n].contiguous(), sin[..., :n].contiguous()), grad_inputs=(0, 1)))
    if form is not None and form.partial:
        rotary_dim = _partial_rotary_dim(config, params["q_shape"][-1])
        for extra in ({}, {"k_heads": 1}):
            q, k, cos, sin = make_inputs({**params, **extra, "rotary_dim": rotary_dim}, ref.device, True).args
            examples.append(Inputs((q, k, cos, sin), grad_inputs=(0, 1)))
    return examples


def _partial_rotary_dim(config, head_dim: int) -> int:
    """The rotated elements of a head under the config's partial rotary (transformers 5's
    `rope_parameters["partial_rotary_factor"]`, 4's `partial_rotary_factor` or GPT-NeoX's
    `rotary_pct`), even; half the head where the config names none."""
    rope_parameters = getattr(config, "rope_parameters", None)
    factor = (rope_parameters.get("partial_rotary_factor") if isinstance(rope_parameters, dict) else None) \
        or getattr(config, "partial_rotary_factor", None) or getattr(config, "rotary_pct", None) or 0.5
    return max(2, int(head_dim * factor) // 2 * 2)


PATTERN = register_pattern(
    __name__,
    description="rotary position embedding (rotate_half) on q and k in one Triton launch each way",
    forward_signature=r"\bmul (?:\S+ ){0,4}neg (?:cat|stack) (?:\S+ ){0,2}mul add\b|\bmul mul sub mul mul add cat\b",
    example_params={"q_shape": [2, 4, 9, 16], "k_heads": 2, "dtype": "float32"},
    # tokens = B * S in 4k-32k at S = 4096; hidden = H * 128 in 1k-8k; 8 kv heads (GQA, Llama-3).
    bench_params=training_shapes(lambda tokens, hidden:
                                 {"q_shape": [tokens // 4096, hidden // 128, 4096, 128], "k_heads": 8,
                                  "dtype": "bfloat16"}),
    liger=liger,
    # The traced chain is HF's apply_rotary_pos_emb itself: its calls are what change.
    rewrites=(Rewrite("apply_rotary_pos_emb($q, $k, $cos, $sin)", "rope($q, $k, $cos, $sin)",
                      ("from fusion_advisor.kernels.rope import rope",), scope="file"),),
    function_patches=(FunctionPatch("apply_rotary_pos_emb", "module_global", is_hf_apply_rotary_pos_emb,
                                    hf_apply_rotary_pos_emb, hf_rope_example_inputs),),
)
