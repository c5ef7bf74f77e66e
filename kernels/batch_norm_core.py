"""The Triton kernels and launchers of batch_norm_act.py (BatchNorm + activation); registers nothing.

x (N, C, *spatial) is read where it lies as (N, C, S) with strides (sN, sC, sS): S the spatial
positions, which must flatten to one stride (contiguous NCHW: sS = 1; channels_last: sC = 1; a
layout that is not dense or whose positions do not flatten is copied to a contiguous one first, as
eager's kernels copy it). Where (n, position)
flatten to one index too (channels_last, (N, C) inputs, N = 1), the view is (1, C, N*S): tiles then
run across samples. y, dy and dx share x's strides (y and dx are allocated `empty_like` x).

Tiles are [BLOCK_C, BLOCK_S] of TILE_ELEMENTS, the contiguous side the long one (`tile_shape`):
positions when sS == 1 (up to 1024 a channel row: 2 KB of bf16), channels when sC == 1 (up to 256).
Triton specialises a stride of 1 at compile time, so one kernel serves both layouts, each with
coalesced loads along its contiguous side.

Kernels, by pass over x:
  stats (training forward)  grid (channel blocks, SPLIT): each program loops over its run of tiles,
      per tile the mean and M2 (sum of squared deviations) in fp32, merged into its running
      (count, mean, M2) by Chan's parallel formula (no E[x^2] - E[x]^2 cancellation); writes one
      partial row. `_stats_finalize_kernel` merges the SPLIT rows per channel (the same formula over
      a chunk of rows at once), writes mean and rstd (fp32, kept for the backward) and updates the
      running statistics in place, as eager does (unbiased variance, the buffers' dtype).
  apply (forward)           one tile a program: y = act(round((x - mean) * rstd * w + b)); the
      normalised value rounded to x's dtype before the activation, as eager's BN writes it.
  grad sums (backward)      like stats: per channel sum(dz) and sum(dz * xhat), z recomputed from x,
      dz = round(dy * act'(z)) in the output dtype (what eager's activation backward writes).
      `_grad_finalize_kernel` sums the SPLIT rows into dweight and dbias and the two per-channel
      terms of dx.
  dx (backward)             one tile a program: (dz - sum(dz)/M - xhat * sum(dz xhat)/M) * rstd * w
      in training, dz * rstd * w in eval (TRAINING constexpr; eval takes running_mean and
      running_var and computes rstd = rsqrt(var + eps) in the kernel).
No atomics: every sum over programs is a second small kernel over the partial rows.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl

from fusion_advisor.kernels.activations import activation_grad, apply_activation
from fusion_advisor.kernels.common import cdiv, interpreting, next_power_of_2, sm_count

TILE_ELEMENTS = 4096      # a tile of every pass (16 elements a thread at 8 warps); read when called: tests shrink it
# NCHW rows shorter than this many positions take tiles of half TILE_ELEMENTS. Measured on an H100
# (benchmarks/bench_batch_norm.py --sweep, ResNet-50's shapes at batch 256, bf16 x, fp32 parameters;
# results/bench-batch-norm-sweep-h100.txt), BN + ReLU forward + backward: 14x14 positions ran 223 ->
# 140 us (256 channels) and 427 -> 285 us (512), 7x7 150 -> 124 us; at 28x28 and up, 4096 stays
# ahead (128 channels of 28x28: 177 us, 195 with 2048).
SMALL_ROW_POSITIONS = 512
TILE_WARPS = None         # warps a program: None = 8 for tiles of 4096 elements or more, else 4 (a sweep sets it)
MAX_CONTIGUOUS_S = 1024   # NCHW: positions of one channel row in a tile
MAX_CONTIGUOUS_C = 256    # channels_last: channels of one position row in a tile
PROGRAMS_PER_SM = 4       # the stats and grad-sums passes: programs in all, about this many an SM
FINALIZE_ELEMENTS = 4096  # partial rows x channels a finalize program holds at once


# -- tiles ----------------------------------------------------------------------------------------
@triton.jit
def _tile(t, c, c_mask, s_tiles, S, stride_n, stride_c, stride_s, BLOCK_S: tl.constexpr):
    """Offsets (int64), mask and valid position count of tile t (sample t // s_tiles, positions
    from (t % s_tiles) * BLOCK_S) for the channels c."""
    n = t // s_tiles
    s0 = (t % s_tiles) * BLOCK_S
    s = s0 + tl.arange(0, BLOCK_S)
    mask = c_mask[:, None] & (s < S)[None, :]
    offs = n.to(tl.int64) * stride_n + c.to(tl.int64)[:, None] * stride_c + s.to(tl.int64)[None, :] * stride_s
    return offs, mask, tl.minimum(S - s0, BLOCK_S).to(tl.float32)


@triton.jit
def _channel_stats(MEAN, SPREAD, c, c_mask, eps, TRAINING: tl.constexpr):
    """(mean, rstd) per channel in fp32: the batch statistics the stats pass wrote (TRAINING), or
    from the running mean and variance (eval), rstd computed here."""
    mean = tl.load(MEAN + c, mask=c_mask, other=0.0).to(tl.float32)
    if TRAINING:
        rstd = tl.load(SPREAD + c, mask=c_mask, other=0.0)
    else:
        rstd = 1.0 / tl.sqrt(tl.load(SPREAD + c, mask=c_mask, other=1.0).to(tl.float32) + eps)
    return mean, rstd


@triton.jit
def _channel_param(P, c, c_mask, absent: tl.constexpr, HAS: tl.constexpr, BLOCK_C: tl.constexpr):
    """A weight or bias per channel in fp32 (`absent` everywhere when there is none)."""
    if HAS:
        v = tl.load(P + c, mask=c_mask, other=absent).to(tl.float32)
    else:
        v = tl.full((BLOCK_C,), absent, tl.float32)
    return v


@triton.jit
def _channel_terms(c, MEAN, SPREAD, W, B, C, eps, TRAINING: tl.constexpr, HAS_WEIGHT: tl.constexpr,
                   HAS_BIAS: tl.constexpr, BLOCK_C: tl.constexpr):
    """(c_mask, mean, rstd, weight, bias) of the channels c, what every pass after the statistics reads."""
    c_mask = c < C
    mean, rstd = _channel_stats(MEAN, SPREAD, c, c_mask, eps, TRAINING)
    w = _channel_param(W, c, c_mask, 1.0, HAS_WEIGHT, BLOCK_C)
    b = _channel_param(B, c, c_mask, 0.0, HAS_BIAS, BLOCK_C)
    return c_mask, mean, rstd, w, b


@triton.jit
def _normalised(x, mean, rstd, w, b, OUT_DTYPE: tl.constexpr):
    """(xhat, z): x normalised, and the BN output z = xhat * w + b rounded to the output dtype as
    eager's batch_norm writes it (the activation reads that rounded value), back in fp32."""
    xhat = (x - mean[:, None]) * rstd[:, None]
    z = (xhat * w[:, None] + b[:, None]).to(OUT_DTYPE).to(tl.float32)
    return xhat, z


# -- forward --------------------------------------------------------------------------------------
@triton.jit
def _stats_kernel(X, PARTIAL, C, S, s_tiles, n_tiles, tiles_per_program, n_splits, stride_n, stride_c, stride_s,
                  BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
    """PARTIAL (3, n_splits, C) fp32: count, mean and M2 of this program's tiles per channel."""
    split = tl.program_id(1)
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < C
    count = 0.0
    mean = tl.zeros((BLOCK_C,), tl.float32)
    m2 = tl.zeros((BLOCK_C,), tl.float32)
    first = split * tiles_per_program
    for t in range(first, tl.minimum(first + tiles_per_program, n_tiles)):
        offs, mask, n_valid = _tile(t, c, c_mask, s_tiles, S, stride_n, stride_c, stride_s, BLOCK_S)
        x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
        tile_mean = tl.sum(x, axis=1) / n_valid
        dev = tl.where(mask, x - tile_mean[:, None], 0.0)
        total = count + n_valid
        delta = tile_mean - mean
        mean += delta * (n_valid / total)
        m2 += tl.sum(dev * dev, axis=1) + delta * delta * (count * n_valid / total)
        count = total
    row = split * C + c
    tl.store(PARTIAL + row, tl.zeros((BLOCK_C,), tl.float32) + count, mask=c_mask)
    tl.store(PARTIAL + n_splits * C + row, mean, mask=c_mask)
    tl.store(PARTIAL + 2 * n_splits * C + row, m2, mask=c_mask)


@triton.jit
def _stats_finalize_kernel(PARTIAL, MEAN, RSTD, RUNNING_MEAN, RUNNING_VAR, C, n_splits, momentum, eps,
                           HAS_RUNNING: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < C
    count = tl.zeros((BLOCK_C,), tl.float32)
    mean = tl.zeros((BLOCK_C,), tl.float32)
    m2 = tl.zeros((BLOCK_C,), tl.float32)
    for p0 in range(0, n_splits, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        mask = (p < n_splits)[:, None] & c_mask[None, :]
        offs = p[:, None] * C + c[None, :]
        n_p = tl.load(PARTIAL + offs, mask=mask, other=0.0)
        mean_p = tl.load(PARTIAL + n_splits * C + offs, mask=mask, other=0.0)
        m2_p = tl.load(PARTIAL + 2 * n_splits * C + offs, mask=mask, other=0.0)
        # The chunk's rows merged at once: each row's deviation from the chunk mean, weighted by its count.
        n_chunk = tl.sum(n_p, axis=0)
        mean_chunk = tl.sum(n_p * mean_p, axis=0) / tl.maximum(n_chunk, 1.0)
        dev = mean_p - mean_chunk[None, :]
        m2_chunk = tl.sum(m2_p + n_p * dev * dev, axis=0)
        total = tl.maximum(count + n_chunk, 1.0)
        delta = mean_chunk - mean
        mean += delta * (n_chunk / total)
        m2 += m2_chunk + delta * delta * (count * n_chunk / total)
        count += n_chunk
    n = tl.maximum(count, 1.0)
    tl.store(MEAN + c, mean, mask=c_mask)
    tl.store(RSTD + c, 1.0 / tl.sqrt(m2 / n + eps), mask=c_mask)
    if HAS_RUNNING:
        # As eager: running = (1 - momentum) * running + momentum * batch, the variance unbiased.
        running_mean = tl.load(RUNNING_MEAN + c, mask=c_mask, other=0.0).to(tl.float32)
        running_var = tl.load(RUNNING_VAR + c, mask=c_mask, other=0.0).to(tl.float32)
        unbiased = m2 / tl.maximum(count - 1.0, 1.0)
        tl.store(RUNNING_MEAN + c, (running_mean * (1.0 - momentum) + mean * momentum).to(
            RUNNING_MEAN.dtype.element_ty), mask=c_mask)
        tl.store(RUNNING_VAR + c, (running_var * (1.0 - momentum) + unbiased * momentum).to(
            RUNNING_VAR.dtype.element_ty), mask=c_mask)


@triton.jit
def _apply_kernel(X, Y, MEAN, SPREAD, W, B, C, S, s_tiles, stride_n, stride_c, stride_s, eps, negative_slope,
                  ACT: tl.constexpr, TRAINING: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
                  BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask, mean, rstd, w, b = _channel_terms(c, MEAN, SPREAD, W, B, C, eps, TRAINING, HAS_WEIGHT, HAS_BIAS, BLOCK_C)
    offs, mask, _ = _tile(tl.program_id(0), c, c_mask, s_tiles, S, stride_n, stride_c, stride_s, BLOCK_S)
    x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    _, z = _normalised(x, mean, rstd, w, b, Y.dtype.element_ty)
    tl.store(Y + offs, apply_activation(z, ACT, negative_slope).to(Y.dtype.element_ty), mask=mask)


# -- backward -------------------------------------------------------------------------------------
@triton.jit
def _grad_sums_kernel(DY, X, MEAN, SPREAD, W, B, PARTIAL, C, S, s_tiles, n_tiles, tiles_per_program, n_splits,
                      stride_n, stride_c, stride_s, eps, negative_slope, ACT: tl.constexpr, TRAINING: tl.constexpr,
                      HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_C: tl.constexpr,
                      BLOCK_S: tl.constexpr):
    """PARTIAL (2, n_splits, C) fp32: sum(dz) and sum(dz * xhat) of this program's tiles per channel."""
    split = tl.program_id(1)
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask, mean, rstd, w, b = _channel_terms(c, MEAN, SPREAD, W, B, C, eps, TRAINING, HAS_WEIGHT, HAS_BIAS, BLOCK_C)
    sum_dz = tl.zeros((BLOCK_C,), tl.float32)
    sum_dz_xhat = tl.zeros((BLOCK_C,), tl.float32)
    first = split * tiles_per_program
    for t in range(first, tl.minimum(first + tiles_per_program, n_tiles)):
        offs, mask, _ = _tile(t, c, c_mask, s_tiles, S, stride_n, stride_c, stride_s, BLOCK_S)
        x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
        xhat, z = _normalised(x, mean, rstd, w, b, DY.dtype.element_ty)
        dz = (dy * activation_grad(z, ACT, negative_slope)).to(DY.dtype.element_ty).to(tl.float32)
        dz = tl.where(mask, dz, 0.0)
        sum_dz += tl.sum(dz, axis=1)
        sum_dz_xhat += tl.sum(dz * xhat, axis=1)
    row = split * C + c
    tl.store(PARTIAL + row, sum_dz, mask=c_mask)
    tl.store(PARTIAL + n_splits * C + row, sum_dz_xhat, mask=c_mask)


@triton.jit
def _grad_finalize_kernel(PARTIAL, TERMS, DW, DB, C, n_splits, inv_count, TRAINING: tl.constexpr,
                          HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_P: tl.constexpr,
                          BLOCK_C: tl.constexpr):
    """dweight = sum(dz * xhat), dbias = sum(dz) in the parameters' dtypes; TERMS (2, C) fp32: their
    means over the M = N*S positions, the dx kernel's per-channel terms (training only)."""
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < C
    sum_dz = tl.zeros((BLOCK_C,), tl.float32)
    sum_dz_xhat = tl.zeros((BLOCK_C,), tl.float32)
    for p0 in range(0, n_splits, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        mask = (p < n_splits)[:, None] & c_mask[None, :]
        offs = p[:, None] * C + c[None, :]
        sum_dz += tl.sum(tl.load(PARTIAL + offs, mask=mask, other=0.0), axis=0)
        sum_dz_xhat += tl.sum(tl.load(PARTIAL + n_splits * C + offs, mask=mask, other=0.0), axis=0)
    if HAS_WEIGHT:
        tl.store(DW + c, sum_dz_xhat.to(DW.dtype.element_ty), mask=c_mask)
    if HAS_BIAS:
        tl.store(DB + c, sum_dz.to(DB.dtype.element_ty), mask=c_mask)
    if TRAINING:
        tl.store(TERMS + c, sum_dz * inv_count, mask=c_mask)
        tl.store(TERMS + C + c, sum_dz_xhat * inv_count, mask=c_mask)


@triton.jit
def _dx_kernel(DY, X, DX, MEAN, SPREAD, W, B, TERMS, C, S, s_tiles, stride_n, stride_c, stride_s, eps,
               negative_slope, ACT: tl.constexpr, TRAINING: tl.constexpr, HAS_WEIGHT: tl.constexpr,
               HAS_BIAS: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask, mean, rstd, w, b = _channel_terms(c, MEAN, SPREAD, W, B, C, eps, TRAINING, HAS_WEIGHT, HAS_BIAS, BLOCK_C)
    offs, mask, _ = _tile(tl.program_id(0), c, c_mask, s_tiles, S, stride_n, stride_c, stride_s, BLOCK_S)
    x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
    xhat, z = _normalised(x, mean, rstd, w, b, DY.dtype.element_ty)
    dz = (dy * activation_grad(z, ACT, negative_slope)).to(DY.dtype.element_ty).to(tl.float32)
    scale = rstd * w
    if TRAINING:
        mean_dz = tl.load(TERMS + c, mask=c_mask, other=0.0)
        mean_dz_xhat = tl.load(TERMS + C + c, mask=c_mask, other=0.0)
        dx = (dz - mean_dz[:, None] - xhat * mean_dz_xhat[:, None]) * scale[:, None]
    else:
        dx = dz * scale[:, None]
    tl.store(DX + offs, dx.to(DX.dtype.element_ty), mask=mask)


# -- views and plans ------------------------------------------------------------------------------
class ChannelView(NamedTuple):
    """x as (outer, channels, positions) with strides: outer is N, or 1 where (n, position) flatten
    to one index (then positions = N * S and stride_n is unused)."""
    outer: int
    channels: int
    positions: int
    stride_n: int
    stride_c: int
    stride_s: int


class Plan(NamedTuple):
    view: ChannelView
    block_c: int
    block_s: int
    num_warps: int
    s_tiles: int          # tiles along the positions of one outer index
    n_tiles: int          # tiles of one channel block: outer * s_tiles
    c_blocks: int
    splits: int           # programs a channel block in the stats and grad-sums passes
    tiles_per_program: int


def dense(x: torch.Tensor) -> torch.Tensor:
    """x itself where the kernels read it in place, else a contiguous copy (as eager's kernels make
    one): in place when it is dense (contiguous, channels_last, a transposed (N, L, C) -> (N, C, L)
    ...: then `empty_like` gives y and dx its very strides) and its spatial dims flatten to one stride."""
    if x.is_contiguous() or (x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)):
        return x     # (the usual two asked first: the test below allocates a meta tensor)
    if torch.empty_like(x, device="meta").stride() != x.stride():   # overlapping or with gaps: not dense
        return x.contiguous()
    try:
        channel_view(x)
    except ValueError:
        return x.contiguous()
    return x


def channel_view(x: torch.Tensor) -> ChannelView:
    """The (outer, C, positions) view of a dense (N, C, *spatial) tensor (see `dense`)."""
    n, c = x.shape[0], x.shape[1]
    spatial = [(d, st) for d, st in zip(x.shape[2:], x.stride()[2:]) if d != 1]   # size-1 dims: any stride
    s = math.prod(d for d, _ in spatial)
    if any(st0 != st1 * d1 for (_, st0), (d1, st1) in zip(spatial, spatial[1:])):
        raise ValueError(f"batch_norm_act: the spatial dims of strides {x.stride()} do not flatten to one stride")
    stride_s = spatial[-1][1] if spatial else 1
    if s == 1:                       # (N, C): the samples are the positions
        return ChannelView(1, c, n, 0, x.stride(1), x.stride(0))
    if n == 1 or x.stride(0) == s * stride_s:
        return ChannelView(1, c, n * s, 0, x.stride(1), stride_s)
    return ChannelView(n, c, s, x.stride(0), x.stride(1), stride_s)


def tile_shape(view: ChannelView) -> tuple[int, int, int]:
    """(BLOCK_C, BLOCK_S, num_warps): TILE_ELEMENTS a tile (half that for NCHW rows of fewer than
    SMALL_ROW_POSITIONS positions), the contiguous side the long one."""
    elements = TILE_ELEMENTS
    positions = next_power_of_2(max(view.positions, 1))
    channels = next_power_of_2(max(view.channels, 1))
    channels_last = view.stride_s != 1 and view.stride_c == 1
    if not channels_last and view.positions < SMALL_ROW_POSITIONS:
        elements = max(1, TILE_ELEMENTS // 2)
    if channels_last:                                 # a tile row is a position's channels
        block_c = min(channels, MAX_CONTIGUOUS_C, elements)
        block_s = min(positions, max(1, elements // block_c))
    else:                                             # NCHW (or neither stride 1): a row is a channel's positions
        block_s = min(positions, MAX_CONTIGUOUS_S, elements)
        block_c = min(channels, max(1, elements // block_s))
    return block_c, block_s, TILE_WARPS or (8 if block_c * block_s >= 4096 else 4)


def num_sms(device: torch.device) -> int:
    """SMs to size the grids by: 1 in the interpreter (a handful of programs: each is slow there)."""
    if interpreting() or device.type != "cuda":
        return 1
    return sm_count(device)


def plan(view: ChannelView, sms: int) -> Plan:
    """Tiles and the SPLIT of the reducing passes: about PROGRAMS_PER_SM programs an SM in all,
    each over a run of whole tiles of one channel block. Shared by the launchers and fused_bytes."""
    block_c, block_s, warps = tile_shape(view)
    s_tiles = cdiv(view.positions, block_s)
    n_tiles = max(1, view.outer * s_tiles)
    c_blocks = max(1, cdiv(view.channels, block_c))
    wanted = min(n_tiles, max(1, cdiv(PROGRAMS_PER_SM * sms, c_blocks)))
    per_program = cdiv(n_tiles, wanted)
    return Plan(view, block_c, block_s, warps, s_tiles, n_tiles, c_blocks, cdiv(n_tiles, per_program), per_program)


def _finalize_blocks(channels: int, splits: int) -> tuple[int, int]:
    """(BLOCK_P, BLOCK_C) of a finalize program: up to 128 channels, partial rows filling the rest."""
    block_c = min(next_power_of_2(max(channels, 1)), 128)
    return min(next_power_of_2(splits), max(1, FINALIZE_ELEMENTS // block_c)), block_c


def _strides(p: Plan) -> tuple[int, int, int]:
    return p.view.stride_n, p.view.stride_c, p.view.stride_s


# -- launchers ------------------------------------------------------------------------------------
def forward(x: torch.Tensor, running_mean: Optional[torch.Tensor], running_var: Optional[torch.Tensor],
            weight: Optional[torch.Tensor], bias: Optional[torch.Tensor], training: bool, momentum: float,
            eps: float, act: int, negative_slope: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y, mean, rstd): y in x's dtype and memory format; mean and rstd the fp32 batch statistics
    (training), empty in eval. Updates running_mean / running_var in place in training."""
    x = dense(x)
    y = torch.empty_like(x)
    channels = x.shape[1]
    mean = torch.empty(channels if training else 0, dtype=torch.float32, device=x.device)
    rstd = torch.empty_like(mean)
    if x.numel() == 0:
        return y, mean.zero_(), rstd.zero_()
    p = plan(channel_view(x), num_sms(x.device))
    if training:
        partial = torch.empty((3, p.splits, channels), dtype=torch.float32, device=x.device)
        _stats_kernel[(p.c_blocks, p.splits)](
            x, partial, channels, p.view.positions, p.s_tiles, p.n_tiles, p.tiles_per_program, p.splits,
            *_strides(p), BLOCK_C=p.block_c, BLOCK_S=p.block_s, num_warps=p.num_warps)
        has_running = running_mean is not None and running_var is not None
        block_p, block_c = _finalize_blocks(channels, p.splits)
        _stats_finalize_kernel[(cdiv(channels, block_c),)](
            partial, mean, rstd, running_mean if has_running else mean, running_var if has_running else rstd,
            channels, p.splits, momentum, eps, HAS_RUNNING=has_running, BLOCK_P=block_p, BLOCK_C=block_c,
            num_warps=4)
        center, spread = mean, rstd
    else:
        center, spread = running_mean, running_var
    _apply_kernel[(p.n_tiles, p.c_blocks)](
        x, y, center, spread, x if weight is None else weight, x if bias is None else bias, channels,
        p.view.positions, p.s_tiles, *_strides(p), eps, negative_slope, ACT=act, TRAINING=training,
        HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, BLOCK_C=p.block_c, BLOCK_S=p.block_s,
        num_warps=p.num_warps)
    return y, mean, rstd


def backward(dy: torch.Tensor, x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
             center: torch.Tensor, spread: torch.Tensor, training: bool, eps: float, act: int, negative_slope: float,
             param_grads: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dweight, dbias). center / spread: the forward's mean and rstd (training), or the running
    mean and variance (eval). The sums pass runs in training, and in eval only for param_grads
    (then a missing parameter's gradient is an empty tensor, and one not asked for zeros)."""
    x = dense(x)
    if dy.stride() != x.stride():    # the kernels index dy with x's strides
        dy = torch.empty_like(x).copy_(dy)
    channels = x.shape[1]
    dx = torch.empty_like(x)
    sums = x.numel() > 0 and (training or (param_grads and (weight is not None or bias is not None)))
    # the sums' finalize writes every channel of dweight and dbias; without that pass, zeros
    new_grad = torch.empty_like if sums else torch.zeros_like
    dw = new_grad(weight) if weight is not None else x.new_empty(0)
    db = new_grad(bias) if bias is not None else x.new_empty(0)
    if x.numel() == 0:
        return dx, dw, db
    p = plan(channel_view(x), num_sms(x.device))
    flags = dict(ACT=act, TRAINING=training, HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None,
                 BLOCK_C=p.block_c, BLOCK_S=p.block_s, num_warps=p.num_warps)
    w, b = x if weight is None else weight, x if bias is None else bias
    terms = torch.empty((2, channels) if training else (0,), dtype=torch.float32, device=x.device)
    if sums:
        partial = torch.empty((2, p.splits, channels), dtype=torch.float32, device=x.device)
        _grad_sums_kernel[(p.c_blocks, p.splits)](
            dy, x, center, spread, w, b, partial, channels, p.view.positions, p.s_tiles, p.n_tiles,
            p.tiles_per_program, p.splits, *_strides(p), eps, negative_slope, **flags)
        block_p, block_c = _finalize_blocks(channels, p.splits)
        _grad_finalize_kernel[(cdiv(channels, block_c),)](
            partial, terms if training else partial, dw if weight is not None else partial,
            db if bias is not None else partial, channels, p.splits, 1.0 / (x.numel() // channels),
            TRAINING=training, HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, BLOCK_P=block_p,
            BLOCK_C=block_c, num_warps=4)
    _dx_kernel[(p.n_tiles, p.c_blocks)](
        dy, x, dx, center, spread, w, b, terms if training else x, channels, p.view.positions, p.s_tiles,
        *_strides(p), eps, negative_slope, **flags)
    return dx, dw, db
