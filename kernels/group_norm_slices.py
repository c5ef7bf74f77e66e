"""GroupNorm's sliced plan: each group split across several programs, for inputs with too few groups
to fill the GPU (kernels and launchers; group_norm.py chooses the plan and owns the pattern).

PoolFormer normalises each sample as one group: at batch 256 the per-group plan (one program per
sample's group, looping over it) launches 256 programs of 64 x 3,136 elements on an H100's 132 SMs,
and ran level with eager (295.3 against 294.3 µs forward + backward; torch.compile 203.0), which has
the same shape of parallelism (`benchmarks/results/zoo-h100-b6cef0a/poolformer-autocast/profile.log`).
Here each group is cut into SLICES slices of whole channels (all of their positions), one program a
slice, and the group's statistics are finished from the slices' partial sums by the next kernel:

  forward:   _slice_stats_kernel   each slice's sums of x - shift and (x - shift)^2, shift the group's
                                   first element (as the per-group plan: no cancellation when
                                   |mean| >> std);
             _slice_apply_kernel   the group's mean and rstd from its slices' sums, then y of the slice.
  backward:  _slice_sums_kernel    each slice's sums of g = dy * weight and g * x_hat, and its channels'
                                   dweight / dbias sums over the sample (whole channels: complete);
             _slice_dx_kernel      c1 and c2 from the slices' sums, then dx of the slice.

Bytes are the per-group plan's (x read twice forward, dy and x twice backward) plus 16 bytes a slice
each way. Two launches each way where the per-group plan has one.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from fusion_advisor.kernels.common import cdiv, interpreting, next_power_of_2, sm_count

CHUNK_ELEMENTS = 4096          # a program's tile: channels x positions
PROGRAMS_PER_SM = 4            # slice until the launch has this many programs an SM
PROGRAMS_INTERPRETED = 0       # the interpreter's target (tests set it; 0: never slice)


def slices_for(n_group_rows: int, cpg: int, device: torch.device) -> int:
    """How many slices each group is cut into: 1 where the groups alone fill the GPU, else enough
    slices (of equal whole-channel counts, at most one channel each) for PROGRAMS_PER_SM an SM."""
    target = PROGRAMS_INTERPRETED if interpreting() or device.type != "cuda" else PROGRAMS_PER_SM * sm_count(device)
    if n_group_rows <= 0 or n_group_rows >= target or cpg < 2:
        return 1
    wanted = min(cpg, cdiv(target, n_group_rows))
    return cdiv(cpg, cdiv(cpg, wanted))   # equal slices: no slice left empty


def _blocks(cpg: int, slices: int, positions: int) -> tuple[dict, int]:
    """The kernels' block sizes and warps, and the channels of a slice."""
    slice_c = cdiv(cpg, slices)
    block_hw = min(next_power_of_2(positions), CHUNK_ELEMENTS)
    block_c = min(next_power_of_2(slice_c), max(1, CHUNK_ELEMENTS // block_hw))
    return {"BLOCK_C": block_c, "BLOCK_HW": block_hw, "num_warps": 8 if block_c * block_hw >= 2048 else 4}, slice_c


@triton.jit
def _slice_of(pid, cpg, slice_c, SLICES: tl.constexpr):
    """(group row, first channel, end channel) of program pid's slice."""
    row = pid // SLICES
    c_lo = (pid % SLICES) * slice_c
    return row, c_lo, tl.minimum(c_lo + slice_c, cpg)


@triton.jit
def _chunk(base, c0, c_hi, h0, HW, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr):
    """Offsets, mask and channel offsets (within the group) of channels c0.. x positions h0.."""
    c = c0 + tl.arange(0, BLOCK_C)
    h = h0 + tl.arange(0, BLOCK_HW)
    offs = base + (c * HW)[:, None] + h[None, :]
    return offs, (c < c_hi)[:, None] & (h < HW)[None, :], c


@triton.jit
def channel_values(P, channel, c_mask, absent: tl.constexpr, HAS: tl.constexpr):
    """A per-channel parameter at the channel indices `channel` (any shape), fp32 (`absent` when there
    is none); group_norm.py's plans read theirs with it too."""
    if HAS:
        v = tl.load(P + channel, mask=c_mask, other=0.0).to(tl.float32)
    else:
        v = tl.full(channel.shape, absent, tl.float32)
    return v


@triton.jit
def _group_sums(SUMS, row, n_programs, SLICES: tl.constexpr, BLOCK_S: tl.constexpr):
    """The two sums of a group's slices, added (SUMS: (2, n_programs) fp32, program-major)."""
    si = tl.arange(0, BLOCK_S)
    s_mask = si < SLICES
    first = tl.sum(tl.load(SUMS + row * SLICES + si, mask=s_mask, other=0.0), axis=0)
    second = tl.sum(tl.load(SUMS + n_programs + row * SLICES + si, mask=s_mask, other=0.0), axis=0)
    return first, second


@triton.jit
def _slice_stats_kernel(X, SUMS, n_programs, cpg, HW, slice_c, SLICES: tl.constexpr, BLOCK_C: tl.constexpr,
                        BLOCK_HW: tl.constexpr):
    pid = tl.program_id(0)
    row, c_lo, c_hi = _slice_of(pid, cpg, slice_c, SLICES)
    base = row.to(tl.int64) * cpg * HW
    shift = tl.load(X + base).to(tl.float32)
    acc = tl.zeros((BLOCK_C, BLOCK_HW), dtype=tl.float32)
    acc_sq = tl.zeros((BLOCK_C, BLOCK_HW), dtype=tl.float32)
    for c0 in range(c_lo, c_hi, BLOCK_C):
        for h0 in range(0, HW, BLOCK_HW):
            offs, mask, c = _chunk(base, c0, c_hi, h0, HW, BLOCK_C, BLOCK_HW)
            xs = tl.where(mask, tl.load(X + offs, mask=mask, other=0.0).to(tl.float32) - shift, 0.0)
            acc += xs
            acc_sq += xs * xs
    tl.store(SUMS + pid, tl.sum(tl.sum(acc, axis=1), axis=0))
    tl.store(SUMS + n_programs + pid, tl.sum(tl.sum(acc_sq, axis=1), axis=0))


@triton.jit
def _slice_apply_kernel(X, W, B, Y, SUMS, MEAN, RSTD, n_programs, groups, cpg, HW, slice_c, eps,
                        SLICES: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
                        BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr):
    pid = tl.program_id(0)
    row, c_lo, c_hi = _slice_of(pid, cpg, slice_c, SLICES)
    group_size = cpg * HW
    base = row.to(tl.int64) * group_size
    total, total_sq = _group_sums(SUMS, row, n_programs, SLICES, BLOCK_S)
    mean_shifted = total / group_size
    var = tl.maximum(total_sq / group_size - mean_shifted * mean_shifted, 0.0)
    mean = tl.load(X + base).to(tl.float32) + mean_shifted
    rstd = 1.0 / tl.sqrt(var + eps)
    first = c_lo == 0
    tl.store(MEAN + row, mean, mask=first)
    tl.store(RSTD + row, rstd, mask=first)
    for c0 in range(c_lo, c_hi, BLOCK_C):
        for h0 in range(0, HW, BLOCK_HW):
            offs, mask, c = _chunk(base, c0, c_hi, h0, HW, BLOCK_C, BLOCK_HW)
            channel = (row % groups) * cpg + c
            w = channel_values(W, channel, c < c_hi, 1.0, HAS_WEIGHT)[:, None]
            b = channel_values(B, channel, c < c_hi, 0.0, HAS_BIAS)[:, None]
            x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
            tl.store(Y + offs, ((x - mean) * rstd * w + b).to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _slice_sums_kernel(DY, X, W, MEAN, RSTD, SUMS, PARTIAL, n_programs, n_samples, groups, cpg, HW, slice_c,
                       SLICES: tl.constexpr, HAS_WEIGHT: tl.constexpr, BLOCK_C: tl.constexpr,
                       BLOCK_HW: tl.constexpr):
    """PARTIAL is (2, n_samples, C) fp32: each sample's per-channel sums of dy * x_hat and dy."""
    pid = tl.program_id(0)
    row, c_lo, c_hi = _slice_of(pid, cpg, slice_c, SLICES)
    base = row.to(tl.int64) * cpg * HW
    n = row // groups
    n_channels = groups * cpg
    mean = tl.load(MEAN + row)
    rstd = tl.load(RSTD + row)
    acc_g = tl.zeros((BLOCK_C, BLOCK_HW), dtype=tl.float32)
    acc_gx = tl.zeros((BLOCK_C, BLOCK_HW), dtype=tl.float32)
    for c0 in range(c_lo, c_hi, BLOCK_C):
        # Defined before the inner loop: a compiled Triton loop keeps its own names to itself.
        c = c0 + tl.arange(0, BLOCK_C)
        channel = (row % groups) * cpg + c
        w = channel_values(W, channel, c < c_hi, 1.0, HAS_WEIGHT)[:, None]
        dw_c = tl.zeros((BLOCK_C,), dtype=tl.float32)
        db_c = tl.zeros((BLOCK_C,), dtype=tl.float32)
        for h0 in range(0, HW, BLOCK_HW):
            offs, mask, _ = _chunk(base, c0, c_hi, h0, HW, BLOCK_C, BLOCK_HW)
            dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
            x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
            x_hat = tl.where(mask, (x - mean) * rstd, 0.0)
            g = dy * w
            acc_g += g
            acc_gx += g * x_hat
            dw_c += tl.sum(dy * x_hat, axis=1)
            db_c += tl.sum(dy, axis=1)
        tl.store(PARTIAL + n * n_channels + channel, dw_c, mask=c < c_hi)
        tl.store(PARTIAL + (n_samples + n) * n_channels + channel, db_c, mask=c < c_hi)
    tl.store(SUMS + pid, tl.sum(tl.sum(acc_g, axis=1), axis=0))
    tl.store(SUMS + n_programs + pid, tl.sum(tl.sum(acc_gx, axis=1), axis=0))


@triton.jit
def _slice_dx_kernel(DY, X, W, MEAN, RSTD, SUMS, DX, n_programs, groups, cpg, HW, slice_c, SLICES: tl.constexpr,
                     HAS_WEIGHT: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr,
                     BLOCK_HW: tl.constexpr):
    pid = tl.program_id(0)
    row, c_lo, c_hi = _slice_of(pid, cpg, slice_c, SLICES)
    group_size = cpg * HW
    base = row.to(tl.int64) * group_size
    mean = tl.load(MEAN + row)
    rstd = tl.load(RSTD + row)
    sum_g, sum_gx = _group_sums(SUMS, row, n_programs, SLICES, BLOCK_S)
    c1 = sum_g / group_size
    c2 = sum_gx / group_size
    for c0 in range(c_lo, c_hi, BLOCK_C):
        for h0 in range(0, HW, BLOCK_HW):
            offs, mask, c = _chunk(base, c0, c_hi, h0, HW, BLOCK_C, BLOCK_HW)
            w = channel_values(W, (row % groups) * cpg + c, c < c_hi, 1.0, HAS_WEIGHT)[:, None]
            dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
            x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
            x_hat = (x - mean) * rstd
            dx = rstd * (dy * w - c1 - x_hat * c2)
            tl.store(DX + offs, dx.to(DX.dtype.element_ty), mask=mask)


def forward(x: torch.Tensor, num_groups: int, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
            eps: float, slices: int, positions: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x contiguous (N, C, *), non-empty: (y, mean, rstd), mean and rstd (N, num_groups) fp32."""
    n_rows, cpg = x.shape[0] * num_groups, x.shape[1] // num_groups
    programs = n_rows * slices
    y = torch.empty_like(x)
    mean = torch.empty((x.shape[0], num_groups), dtype=torch.float32, device=x.device)
    rstd = torch.empty_like(mean)
    sums = torch.empty((2, programs), dtype=torch.float32, device=x.device)
    blocks, slice_c = _blocks(cpg, slices, positions)
    _slice_stats_kernel[(programs,)](x, sums, programs, cpg, positions, slice_c, SLICES=slices, **blocks)
    _slice_apply_kernel[(programs,)](
        x, x if weight is None else weight, x if bias is None else bias, y, sums, mean, rstd, programs, num_groups,
        cpg, positions, slice_c, eps, SLICES=slices, HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None,
        BLOCK_S=next_power_of_2(slices), **blocks)
    return y, mean, rstd


def backward(dy: torch.Tensor, x: torch.Tensor, num_groups: int, weight: Optional[torch.Tensor], mean: torch.Tensor,
             rstd: torch.Tensor, slices: int, positions: int) -> tuple[torch.Tensor, torch.Tensor]:
    """dy, x contiguous (N, C, *), non-empty: (dx, partial), partial the (2, N, C) fp32 per-sample
    dweight / dbias sums (group_norm.py adds them up)."""
    n_samples, channels = x.shape[0], x.shape[1]
    n_rows, cpg = n_samples * num_groups, channels // num_groups
    programs = n_rows * slices
    dx = torch.empty_like(x)
    sums = torch.empty((2, programs), dtype=torch.float32, device=x.device)
    partial = torch.empty((2, n_samples, channels), dtype=torch.float32, device=x.device)
    blocks, slice_c = _blocks(cpg, slices, positions)
    w = x if weight is None else weight
    _slice_sums_kernel[(programs,)](dy, x, w, mean, rstd, sums, partial, programs, n_samples, num_groups, cpg,
                                    positions, slice_c, SLICES=slices, HAS_WEIGHT=weight is not None, **blocks)
    _slice_dx_kernel[(programs,)](dy, x, w, mean, rstd, sums, dx, programs, num_groups, cpg, positions, slice_c,
                                  SLICES=slices, HAS_WEIGHT=weight is not None, BLOCK_S=next_power_of_2(slices),
                                  **blocks)
    return dx, partial
