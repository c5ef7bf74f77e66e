"""GroupNorm over (N, C, *): each sample's C channels split into G groups of C/G channels; every
group is normalised over its channels and positions, then scaled and shifted per channel:
y = (x - mean_group) * rsqrt(var_group + eps) * weight[c] + bias[c]. Replaces `F.group_norm`
(what `nn.GroupNorm` runs, `reference` below); weight and bias are optional (affine=False).
In LLM training it appears as the per-head norm over (tokens, hidden) of RWKV and RetNet-style
blocks (G = heads, nothing spatial); in vision and diffusion over (N, C, H, W).

Four plans. Channels only (no positions: (tokens, hidden)) in groups of a power-of-two size (any
group count: 12 heads of 64 run as 16 segments, the last 4 empty):
  rows         norm_core.py's row kernels with one segment per group (`uses_row_kernels`): several
      samples a program forward, a persistent backward with per-program dweight/dbias partials.
Otherwise, by whether one sample (C x positions, padded to powers of two) fits a tile of
TILE_ELEMENTS:
  whole-sample (tokens x hidden, small images): one program per sample forward; backward, one
      program per SM loops over samples and keeps the per-channel dweight/dbias sums in registers.
  per-group (large images): one program per (sample, group) loops over the group in chunks,
      once for the statistics and once to normalise; backward likewise (sums, then dx). The second
      pass re-reads the group, from L2 when it is still there; the bytes below count it as HBM.
  sliced (large images, too few groups to fill the GPU: PoolFormer's one group a sample): the
      per-group plan with each group cut into slices of whole channels across programs, its sums
      finished by a second kernel each way (group_norm_slices.py; the same bytes, 16 more a slice).

Bytes for x of N samples, C channels, S positions (M = N*C*S elements, element size e; weight
and bias size w, each counted only when present; G groups; P backward programs, P <= SMs):
  unfused (eager CUDA): forward a statistics kernel reads x, an apply kernel reads x and writes y:
      about M*3e; backward a per-channel-sums kernel reads dy and x, a dx kernel reads them again
      and writes dx: about M*5e (plus small (N, C) intermediates)
  fused forward:   rows and whole-sample M*2e + 2*C*w + 8*N*G;  per-group M*3e + 2*N*C*w + 8*N*G
  fused backward:  rows and whole-sample: read dy, x, mean, rstd, weight; write dx; per parameter P partial
                   rows of C in fp32 written and read back, and the grad written:
                   M*3e + 8*N*G + C*w + 2*(2*P*C*4 + C*w)
                   per-group: dy and x read twice, the weight once per sample, partial rows per
                   sample: M*5e + 8*N*G + N*C*w + 2*(2*N*C*4 + C*w)
`fused_bytes` returns exactly the fused numbers; the cost model prices them.
"""
from __future__ import annotations

import re
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from fusion_advisor.kernels import group_norm_slices, norm_core
from fusion_advisor.kernels.group_norm_slices import channel_values
from fusion_advisor.kernels.common import (cdiv, check_device, check_dtype, next_power_of_2,
                                          reduction_programs)
from fusion_advisor.kernels.fused_op import fused_op
from fusion_advisor.kernels.registry import (Inputs, OpRecord, param_dtype, dtype_from_trace,
                                             dtype_name, register_pattern, training_shapes)

TILE_ELEMENTS = 8192   # the whole-sample plan's tile, padded dims multiplied (fp32 registers)
CHUNK_ELEMENTS = 4096  # the per-group plan's chunk


@triton.jit
def _group_tile(gi, g_mask, c0, h0, cpg, HW, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr):
    """Offsets and mask of a [groups, channels, positions] tile: channels c0.. and positions h0..
    of the group rows gi (a group row = one sample's group, cpg * HW contiguous elements)."""
    ci = c0 + tl.arange(0, BLOCK_C)
    hi = h0 + tl.arange(0, BLOCK_HW)
    offs = (gi.to(tl.int64) * cpg * HW)[:, None, None] + (ci * HW)[None, :, None] + hi[None, None, :]
    mask = g_mask[:, None, None] & (ci < cpg)[None, :, None] & (hi < HW)[None, None, :]
    return offs, mask, ci


@triton.jit
def _group_channels(gi, g_mask, ci, groups, cpg):
    """Channel index and mask of channels ci of the group rows gi, as [groups, channels]."""
    channel = (gi % groups)[:, None] * cpg + ci[None, :]
    return channel, g_mask[:, None] & (ci < cpg)[None, :]


@triton.jit
def _group_channel_param(P, channel, c_mask, absent: tl.constexpr, HAS: tl.constexpr):
    """A per-channel parameter as a [groups, channels, 1] fp32 tile (`absent` when there is none)."""
    return channel_values(P, channel, c_mask, absent, HAS)[:, :, None]


@triton.jit
def _group_norm_fwd_kernel(X, W, B, Y, MEAN, RSTD, n_group_rows, groups, cpg, HW, eps,
                           GROUPS_PER_PROGRAM: tl.constexpr, ONE_TILE: tl.constexpr, HAS_WEIGHT: tl.constexpr,
                           HAS_BIAS: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_C: tl.constexpr,
                           BLOCK_HW: tl.constexpr):
    gl = tl.arange(0, BLOCK_G)
    gi = tl.program_id(0) * GROUPS_PER_PROGRAM + gl
    g_mask = (gl < GROUPS_PER_PROGRAM) & (gi < n_group_rows)
    group_size = cpg * HW
    if ONE_TILE:  # whole groups in registers: x read once
        offs, mask, ci = _group_tile(gi, g_mask, 0, 0, cpg, HW, BLOCK_C, BLOCK_HW)
        x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
        mean = tl.sum(tl.sum(x, axis=2), axis=1) / group_size
        xc = tl.where(mask, x - mean[:, None, None], 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(tl.sum(xc * xc, axis=2), axis=1) / group_size + eps)
        channel, c_mask = _group_channels(gi, g_mask, ci, groups, cpg)
        w = _group_channel_param(W, channel, c_mask, 1.0, HAS_WEIGHT)
        b = _group_channel_param(B, channel, c_mask, 0.0, HAS_BIAS)
        tl.store(Y + offs, (xc * rstd[:, None, None] * w + b).to(Y.dtype.element_ty), mask=mask)
    else:  # one group in chunks: statistics, then normalise
        # Sums of x - (the group's first element): no cancellation in E[x^2] - E[x]^2 when
        # |mean| >> std, in one pass.
        shift = tl.load(X + gi.to(tl.int64) * group_size, mask=g_mask, other=0.0).to(tl.float32)
        acc = tl.zeros((BLOCK_G, BLOCK_C, BLOCK_HW), dtype=tl.float32)
        acc_sq = tl.zeros((BLOCK_G, BLOCK_C, BLOCK_HW), dtype=tl.float32)
        for c0 in range(0, cpg, BLOCK_C):
            for h0 in range(0, HW, BLOCK_HW):
                offs, mask, ci = _group_tile(gi, g_mask, c0, h0, cpg, HW, BLOCK_C, BLOCK_HW)
                xs = tl.where(mask, tl.load(X + offs, mask=mask, other=0.0).to(tl.float32) - shift[:, None, None], 0.0)
                acc += xs
                acc_sq += xs * xs
        mean_shifted = tl.sum(tl.sum(acc, axis=2), axis=1) / group_size
        var = tl.maximum(tl.sum(tl.sum(acc_sq, axis=2), axis=1) / group_size - mean_shifted * mean_shifted, 0.0)
        mean = shift + mean_shifted
        rstd = 1.0 / tl.sqrt(var + eps)
        for c0 in range(0, cpg, BLOCK_C):
            for h0 in range(0, HW, BLOCK_HW):
                offs, mask, ci = _group_tile(gi, g_mask, c0, h0, cpg, HW, BLOCK_C, BLOCK_HW)
                x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
                channel, c_mask = _group_channels(gi, g_mask, ci, groups, cpg)
                w = _group_channel_param(W, channel, c_mask, 1.0, HAS_WEIGHT)
                b = _group_channel_param(B, channel, c_mask, 0.0, HAS_BIAS)
                y = (x - mean[:, None, None]) * rstd[:, None, None] * w + b
                tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=mask)
    tl.store(MEAN + gi, mean, mask=g_mask)
    tl.store(RSTD + gi, rstd, mask=g_mask)


@triton.jit
def _group_norm_bwd_kernel(DY, X, W, MEAN, RSTD, DX, PARTIAL, n_samples, groups, cpg, HW, partial_rows,
                           samples_per_program, ONE_TILE: tl.constexpr, HAS_WEIGHT: tl.constexpr,
                           BLOCK_G: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr):
    """PARTIAL is (2, partial_rows, C) fp32: per-channel sums of dy * x_hat (dweight) and dy
    (dbias); a row per program (whole-sample plan) or per sample (per-group plan)."""
    pid = tl.program_id(0)
    gl = tl.arange(0, BLOCK_G)
    group_size = cpg * HW
    n_channels = groups * cpg
    if ONE_TILE:  # one program per SM loops over whole samples
        dw_acc = tl.zeros((BLOCK_G, BLOCK_C), dtype=tl.float32)
        db_acc = tl.zeros((BLOCK_G, BLOCK_C), dtype=tl.float32)
        for i in range(0, samples_per_program):
            n = pid * samples_per_program + i
            gi = n * groups + gl
            g_mask = (gl < groups) & (gi < n_samples * groups)
            offs, mask, ci = _group_tile(gi, g_mask, 0, 0, cpg, HW, BLOCK_C, BLOCK_HW)
            dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
            x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
            mean = tl.load(MEAN + gi, mask=g_mask, other=0.0)
            rstd = tl.load(RSTD + gi, mask=g_mask, other=0.0)
            x_hat = tl.where(mask, (x - mean[:, None, None]) * rstd[:, None, None], 0.0)
            channel, c_mask = _group_channels(gi, g_mask, ci, groups, cpg)
            g = dy * _group_channel_param(W, channel, c_mask, 1.0, HAS_WEIGHT)
            c1 = tl.sum(tl.sum(g, axis=2), axis=1) / group_size
            c2 = tl.sum(tl.sum(g * x_hat, axis=2), axis=1) / group_size
            dx = rstd[:, None, None] * (g - c1[:, None, None] - x_hat * c2[:, None, None])
            tl.store(DX + offs, dx.to(DX.dtype.element_ty), mask=mask)
            dw_acc += tl.sum(dy * x_hat, axis=2)
            db_acc += tl.sum(dy, axis=2)
        channel, c_mask = _group_channels(gl, gl < groups, tl.arange(0, BLOCK_C), groups, cpg)
        tl.store(PARTIAL + pid * n_channels + channel, dw_acc, mask=c_mask)
        tl.store(PARTIAL + (partial_rows + pid) * n_channels + channel, db_acc, mask=c_mask)
    else:  # one program per (sample, group), in chunks: sums, then dx
        gi = pid + gl  # BLOCK_G == 1
        g_mask = gl < 1
        n = pid // groups
        mean = tl.load(MEAN + gi)
        rstd = tl.load(RSTD + gi)
        acc_g = tl.zeros((BLOCK_G, BLOCK_C, BLOCK_HW), dtype=tl.float32)
        acc_gx = tl.zeros((BLOCK_G, BLOCK_C, BLOCK_HW), dtype=tl.float32)
        for c0 in range(0, cpg, BLOCK_C):
            # Defined before the inner loop: a compiled Triton loop keeps its own names to itself.
            channel, c_mask = _group_channels(gi, g_mask, c0 + tl.arange(0, BLOCK_C), groups, cpg)
            w = _group_channel_param(W, channel, c_mask, 1.0, HAS_WEIGHT)
            dw_c = tl.zeros((BLOCK_G, BLOCK_C), dtype=tl.float32)
            db_c = tl.zeros((BLOCK_G, BLOCK_C), dtype=tl.float32)
            for h0 in range(0, HW, BLOCK_HW):
                offs, mask, ci = _group_tile(gi, g_mask, c0, h0, cpg, HW, BLOCK_C, BLOCK_HW)
                dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
                x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
                x_hat = tl.where(mask, (x - mean[:, None, None]) * rstd[:, None, None], 0.0)
                g = dy * w
                acc_g += g
                acc_gx += g * x_hat
                dw_c += tl.sum(dy * x_hat, axis=2)
                db_c += tl.sum(dy, axis=2)
            tl.store(PARTIAL + n * n_channels + channel, dw_c, mask=c_mask)
            tl.store(PARTIAL + (partial_rows + n) * n_channels + channel, db_c, mask=c_mask)
        c1 = tl.sum(tl.sum(acc_g, axis=2), axis=1) / group_size
        c2 = tl.sum(tl.sum(acc_gx, axis=2), axis=1) / group_size
        for c0 in range(0, cpg, BLOCK_C):
            for h0 in range(0, HW, BLOCK_HW):
                offs, mask, ci = _group_tile(gi, g_mask, c0, h0, cpg, HW, BLOCK_C, BLOCK_HW)
                dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
                x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
                x_hat = (x - mean[:, None, None]) * rstd[:, None, None]
                channel, c_mask = _group_channels(gi, g_mask, ci, groups, cpg)
                w = _group_channel_param(W, channel, c_mask, 1.0, HAS_WEIGHT)
                dx = rstd[:, None, None] * (dy * w - c1[:, None, None] - x_hat * c2[:, None, None])
                tl.store(DX + offs, dx.to(DX.dtype.element_ty), mask=mask)


# -- launchers --------------------------------------------------------------------------------------
def plan(channels: int, positions: int, groups: int) -> dict:
    """Block sizes and plan for a (N, channels, positions) input in `groups` groups (reads
    TILE_ELEMENTS and CHUNK_ELEMENTS when called: tests shrink them)."""
    cpg = channels // groups
    block_g, block_c, block_hw = (next_power_of_2(d) for d in (groups, cpg, positions))
    if block_g * block_c * block_hw <= TILE_ELEMENTS:
        tile = block_g * block_c * block_hw
        return {"ONE_TILE": True, "BLOCK_G": block_g, "BLOCK_C": block_c, "BLOCK_HW": block_hw,
                "num_warps": 4 if tile <= 1024 else 8 if tile <= 4096 else 16}
    block_hw = min(block_hw, CHUNK_ELEMENTS)
    block_c = min(block_c, max(1, CHUNK_ELEMENTS // block_hw))
    return {"ONE_TILE": False, "BLOCK_G": 1, "BLOCK_C": block_c, "BLOCK_HW": block_hw, "num_warps": 8}


def uses_row_kernels(channels: int, positions: int, groups: int) -> bool:
    """The rows plan: no positions, groups of a power-of-two size (norm_core.segmentable)."""
    return positions == 1 and norm_core.segmentable(channels, groups)


def _check(x: torch.Tensor, num_groups: int, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor]) -> None:
    check_dtype(x, "group_norm")
    check_device(x, weight, bias, op="group_norm")
    if x.dim() < 2:
        raise ValueError(f"group_norm: expected an (N, C, *) input, got shape {list(x.shape)}")
    if num_groups <= 0 or x.shape[1] % num_groups:
        raise ValueError(f"group_norm: {x.shape[1]} channels do not split into {num_groups} groups")
    for name, p in (("weight", weight), ("bias", bias)):
        if p is not None:
            check_dtype(p, "group_norm")
            if tuple(p.shape) != (x.shape[1],):
                raise ValueError(f"group_norm: {name} shape {list(p.shape)} is not ({x.shape[1]},)")


def _contiguous(p: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return p.contiguous() if p is not None else None


def _positions(x: torch.Tensor) -> int:
    return x[0, 0].numel() if x.numel() else 1


def _plan_and_slices(x: torch.Tensor, num_groups: int) -> tuple[dict, int]:
    """The whole-sample / per-group plan of a contiguous (N, C, *) input, and the slices each group is
    cut into (more than 1: the sliced plan, group_norm_slices.py)."""
    channels = x.shape[1]
    p = plan(channels, _positions(x), num_groups)
    if p["ONE_TILE"] or not x.numel():
        return p, 1
    return p, group_norm_slices.slices_for(x.shape[0] * num_groups, channels // num_groups, x.device)


def group_norm_fwd(x: torch.Tensor, num_groups: int, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                   eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launcher: (y, mean, rstd); mean and rstd are (N, num_groups) fp32."""
    _check(x, num_groups, weight, bias)
    x = x.contiguous()
    n_samples, channels, positions = x.shape[0], x.shape[1], _positions(x)
    if uses_row_kernels(channels, positions, num_groups):
        y, _, mean, rstd = norm_core.norm_fwd(x.view(n_samples, channels), None, _contiguous(weight),
                                              _contiguous(bias), eps, rms=False, out_dtype=x.dtype,
                                              segments=num_groups)
        return y.view(x.shape), mean.view(n_samples, num_groups), rstd.view(n_samples, num_groups)
    p, slices = _plan_and_slices(x, num_groups)
    if slices > 1:   # too few groups to fill the GPU: each one cut across programs
        return group_norm_slices.forward(x, num_groups, _contiguous(weight), _contiguous(bias), eps, slices,
                                         positions)
    y = torch.empty_like(x)
    mean = torch.empty((n_samples, num_groups), dtype=torch.float32, device=x.device)
    rstd = torch.empty_like(mean)
    groups_per_program = num_groups if p["ONE_TILE"] else 1
    if x.numel():
        _group_norm_fwd_kernel[(cdiv(n_samples * num_groups, groups_per_program),)](
            x, x if weight is None else weight.contiguous(), x if bias is None else bias.contiguous(), y, mean, rstd,
            n_samples * num_groups, num_groups, channels // num_groups, positions, eps,
            GROUPS_PER_PROGRAM=groups_per_program, HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, **p)
    return y, mean, rstd


def group_norm_bwd(dy: torch.Tensor, x: torch.Tensor, num_groups: int, weight: Optional[torch.Tensor],
                   bias: Optional[torch.Tensor], mean: torch.Tensor, rstd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launcher: (dx, dweight, dbias); dweight/dbias are empty when weight/bias is None."""
    x, dy = x.contiguous(), dy.contiguous()
    n_samples, channels, positions = x.shape[0], x.shape[1], _positions(x)
    if uses_row_kernels(channels, positions, num_groups):
        dx, dw, db = norm_core.norm_bwd(dy.view(n_samples, channels), None, x.view(n_samples, channels),
                                        _contiguous(weight), _contiguous(bias), mean.contiguous().view(-1),
                                        rstd.contiguous().view(-1), rms=False, segments=num_groups)
        return (dx.view(x.shape), dw if dw is not None else mean.new_empty(0),
                db if db is not None else mean.new_empty(0))
    p, slices = _plan_and_slices(x, num_groups)
    if slices > 1:
        dx, partial = group_norm_slices.backward(dy, x, num_groups, _contiguous(weight), mean.contiguous(),
                                                 rstd.contiguous(), slices, positions)
        return dx, *_param_grads(partial, weight, bias)
    dx = torch.empty_like(x)
    if p["ONE_TILE"]:
        programs = reduction_programs(n_samples, x.device)
        samples_per_program = cdiv(n_samples, programs) if n_samples else 0
        partial_rows = programs
    else:
        programs, samples_per_program, partial_rows = n_samples * num_groups, 1, n_samples
    partial = torch.empty((2, max(partial_rows, 1), channels), dtype=torch.float32, device=x.device)
    if x.numel():
        _group_norm_bwd_kernel[(programs,)](
            dy, x, x if weight is None else weight.contiguous(), mean, rstd, dx, partial, n_samples, num_groups,
            channels // num_groups, positions, partial_rows, samples_per_program, HAS_WEIGHT=weight is not None, **p)
    else:
        partial.zero_()
    return dx, *_param_grads(partial, weight, bias)


def _param_grads(partial: torch.Tensor, weight: Optional[torch.Tensor],
                 bias: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(dweight, dbias) from the (2, rows, C) partial sums; empty for a missing parameter. One sum
    per parameter: a custom op's outputs may not be views of one tensor."""
    dw = partial[0].sum(0).to(weight.dtype) if weight is not None else partial.new_empty(0)
    db = partial[1].sum(0).to(bias.dtype) if bias is not None else partial.new_empty(0)
    return dw, db


# torch.library ops: a patched model still runs under torch.compile(fullgraph=True). Eager calls run
# the launchers directly (see fused_op).
def _forward_fake(x, num_groups, weight, bias, eps):
    stats = x.new_empty((x.shape[0], num_groups), dtype=torch.float32)
    return x.new_empty(x.shape), stats, stats.new_empty(stats.shape)


_forward = fused_op("fusion_advisor::group_norm_fwd", fake=_forward_fake)(group_norm_fwd)
_backward = fused_op("fusion_advisor::group_norm_bwd", fake=lambda dy, x, num_groups, weight, bias, mean, rstd: (
    x.new_empty(x.shape), *norm_core.fake_param_grads(mean, weight, bias)))(group_norm_bwd)


GroupNormFunction = norm_core.affine_norm_function("GroupNormFunction", _forward, _backward)


def group_norm(x: torch.Tensor, num_groups: int, weight: Optional[torch.Tensor] = None,
               bias: Optional[torch.Tensor] = None, eps: float = 1e-5) -> torch.Tensor:
    """Fused GroupNorm with F.group_norm's arguments, forward and backward; inside torch.autocast
    it casts where eager's autocast does."""
    return norm_core.apply_affine_norm(GroupNormFunction, "aten::group_norm", x, int(num_groups), weight, bias, eps)


class GroupNorm(torch.nn.Module):
    """Drop-in for nn.GroupNorm (same parameters, eps and affine option)."""

    def __init__(self, num_groups: int, num_channels: int, eps: float = 1e-5, affine: bool = True, device=None,
                 dtype=None):
        super().__init__()
        self.num_groups, self.num_channels, self.eps, self.affine = num_groups, num_channels, eps, affine
        kw = {"device": device, "dtype": dtype}
        self.weight = torch.nn.Parameter(torch.ones(num_channels, **kw)) if affine else None
        self.bias = torch.nn.Parameter(torch.zeros(num_channels, **kw)) if affine else None

    @classmethod
    def from_module(cls, module: torch.nn.Module) -> "GroupNorm":
        """Wrap an existing nn.GroupNorm's parameters (shared, not copied)."""
        new = cls.__new__(cls)
        torch.nn.Module.__init__(new)
        new.num_groups, new.num_channels = int(module.num_groups), int(module.num_channels)
        new.eps = float(module.eps)
        new.weight, new.bias = getattr(module, "weight", None), getattr(module, "bias", None)
        new.affine = new.weight is not None
        return new

    def forward(self, x):
        return group_norm(x, self.num_groups, self.weight, self.bias, self.eps)

    def extra_repr(self) -> str:
        return f"{self.num_groups}, {self.num_channels}, eps={self.eps}, affine={self.affine} (fused Triton)"


def reference(x: torch.Tensor, num_groups: int, weight: Optional[torch.Tensor] = None,
              bias: Optional[torch.Tensor] = None, eps: float = 1e-5) -> torch.Tensor:
    """nn.GroupNorm.forward, verbatim."""
    return F.group_norm(x, num_groups, weight, bias, eps)


def liger(x: torch.Tensor, num_groups: int, weight: Optional[torch.Tensor] = None,
          bias: Optional[torch.Tensor] = None, eps: float = 1e-5) -> torch.Tensor:
    """Liger-Kernel's GroupNorm on the same inputs (it needs a weight and a bias)."""
    from liger_kernel.ops.group_norm import LigerGroupNormFunction
    if weight is None or bias is None:
        raise ValueError("liger's GroupNorm needs a weight and a bias")
    return LigerGroupNormFunction.apply(x, weight, bias, x.shape[1], num_groups, eps)


def make_inputs(params: dict, device: torch.device, requires_grad: bool = True) -> Inputs:
    """params: shape (N, C, *), dtype, num_groups; optional weight, bias (bools, default True),
    weight_dtype (of both; default dtype), eps."""
    return norm_core.affine_norm_inputs(params, device, requires_grad, params["num_groups"], params["shape"][1])


def fused_bytes(params: dict) -> dict:
    shape = params["shape"]
    n_samples, channels, groups = shape[0], shape[1], params["num_groups"]
    positions = 1
    for d in shape[2:]:
        positions *= d
    m = n_samples * channels * positions
    e = param_dtype(params).itemsize
    w = param_dtype(params, "weight_dtype").itemsize
    has_weight, has_bias = params.get("weight", True), params.get("bias", True)
    n_params = int(has_weight) + int(has_bias)
    stats = 8 * n_samples * groups
    if uses_row_kernels(channels, positions, groups) or plan(channels, positions, groups)["ONE_TILE"]:
        programs = min(n_samples, params.get("num_sms", 132))
        return {"forward": m * 2 * e + n_params * channels * w + stats,
                "backward": m * 3 * e + stats + (channels * w if has_weight else 0)
                + n_params * (2 * programs * channels * 4 + channels * w)}
    return {"forward": m * 3 * e + n_params * n_samples * channels * w + stats,
            "backward": m * 5 * e + stats + (n_samples * channels * w if has_weight else 0)
            + n_params * (2 * n_samples * channels * 4 + channels * w)}


def _scalar(text) -> str:
    return text if isinstance(text, str) else ""


def params_from_ops(ops: Sequence[OpRecord]) -> dict | None:
    """Shapes, groups, affine parameters and eps from a traced aten::group_norm (input,
    num_groups, weight, bias, eps, cudnn) or aten::native_group_norm (input, weight, bias, N, C,
    HxW, group, eps) op."""
    op = next((o for o in ops if o.short in ("group_norm", "native_group_norm")), None)
    if op is None or not op.dims or not op.dims[0] or not op.types:
        return None
    dtype = dtype_from_trace(op.types[0])
    shape = [int(d) for d in op.dims[0]]
    # Where each argument sits: (weight, bias, groups, eps) positions in the op's inputs.
    at = (2, 3, 1, 4) if op.short == "group_norm" else (1, 2, 6, 7)
    dims = list(op.dims) + [()] * 8
    types = list(op.types) + [""] * 8
    concrete = [_scalar(c) for c in op.concrete] + [""] * 8
    if dtype is None or len(shape) < 2 or not re.fullmatch(r"\d+", concrete[at[2]]):
        return None
    groups = int(concrete[at[2]])
    has_weight, has_bias = bool(dims[at[0]]), bool(dims[at[1]])
    eps = 1e-5
    try:
        eps = float(concrete[at[3]])
    except ValueError:
        pass
    params = {"shape": shape, "dtype": dtype_name(dtype), "num_groups": groups, "eps": eps}
    if not has_weight:
        params["weight"] = False
    if not has_bias:
        params["bias"] = False
    wdtype = dtype_from_trace(types[at[0]] if has_weight else types[at[1]]) or dtype
    if (has_weight or has_bias) and wdtype != dtype:
        params["weight_dtype"] = dtype_name(wdtype)
    return params


PATTERN = register_pattern(
    __name__,
    description="GroupNorm (F.group_norm) as one Triton kernel each way",
    autocast_op="aten::group_norm",
    forward_signature=r"(?:^| )(?:native_)?group_norm(?= |$)",
    modules=("GroupNorm",),
    # nn.GroupNorm's subclasses under their own names (PoolFormer's, BiT's): the check decides
    module_shape=lambda module: isinstance(module, torch.nn.GroupNorm),
    module_import="fusion_advisor.kernels.group_norm:GroupNorm",
    module_factory=GroupNorm.from_module,
    example_params={"shape": [6, 42, 431], "dtype": "float32", "num_groups": 6, "eps": 1e-5},
    # LLM-training shapes: the per-head GroupNorm of RWKV / RetNet-style blocks over (tokens,
    # hidden), head size 64.
    bench_params=training_shapes(lambda tokens, hidden:
                                 {"shape": [tokens, hidden], "dtype": "bfloat16", "num_groups": hidden // 64,
                                  "eps": 1e-5})
    # Images (`--only kind=image`): PoolFormer-S12's one group a sample at batch 256 (its first and
    # last stages; fp32, as autocast runs group_norm), and a diffusion UNet's 32 groups at 64 x 64.
    + tuple({"shape": shape, "dtype": dtype, "num_groups": groups, "eps": 1e-5, "kind": "image"}
            for shape, groups, dtype in (([256, 64, 56, 56], 1, "float32"), ([256, 512, 7, 7], 1, "float32"),
                                         ([256, 64, 56, 56], 1, "bfloat16"), ([8, 320, 64, 64], 32, "bfloat16"))),
    liger=liger,
)
