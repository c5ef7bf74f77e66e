"""The one row-norm kernel family: RMSNorm and LayerNorm, with or without a residual add before the
norm, with or without a weight and a bias, forward and backward. rms_norm.py, add_rms_norm.py,
layer_norm.py and add_layer_norm.py keep their public names, custom ops and autograd Functions and
call the launchers here (`norm_fwd`, `norm_bwd`).

Tiles, for every row length (`fwd_config`, `bwd_config`: a small table, cached per shape):
  forward   a tile of BLOCK_M rows x BLOCK_N columns (BLOCK_N = the row padded to a power of two):
            many rows per program for short rows (N = 64: 64 rows), one row for long ones; one
            program per tile, or (stages > 1) persistent programs looping over the tiles. fp32
            statistics; mean (LayerNorm) and rstd saved per row for the backward.
  backward  persistent: P programs (programs_per_sm on every SM) each loop over the row tiles pid,
            pid + P, pid + 2P, ..., computing dx in the same pass and keeping dweight / dbias
            partial sums in fp32 registers; each writes one partial row per parameter, and a second
            small kernel (`_norm_param_grads_kernel`, launched while the first runs where the GPU
            allows: common.pdl) sums the P rows into the parameter's dtype. No
            M x N temporary, no atomics. Rows of ACC_IN_MEMORY_COLS+ leave no registers for the
            dweight sums: each program adds them to its own partial row every tile (L2 traffic, not
            spills); the dbias sums go there too only from DB_IN_MEMORY_COLS (norm_tiles.py says
            what each cost). From RELOAD_COLS (opt-in until timed) a tile is read twice instead,
            the row sums from the first read, dx and both parameter sums from the second, so the
            sums fit in registers beside a tile that only streams through.
  in flight a loop must keep tiles loading while it reduces (Little's law: ~3 TB/s x ~1 us is ~25 KB
            an SM). stages > 1: Triton pipelines the loop (`tl.range(num_stages=)`: cp.async copies
            into shared memory, stages - 1 tiles ahead); else the backward's PREFETCH holds the next
            tile in registers. On an H100, add + LayerNorm's backward at 65,536 x 768 bf16: 152.4 us
            pipelined in 4 stages, 169.2 us with register prefetch on the same tile, 204.6 us with
            neither (168.3 us the best tile without pipelining: 4 rows, no prefetch).
  segments  GroupNorm over channels: LayerNorm's tiles with statistics per group of columns.
  tiles     norm_tiles.py: the tile for each row length (`fwd_config`, `bwd_config`), searched per
            GPU by norm_tune.py and shipped for the H100 in tiles/.

Bytes moved by one fused launch (M rows x N; x element size e, residual r, the sum s, output o,
weight/bias w each only when present; the pattern files' `fused_bytes` give these numbers):
  forward:  read x (and the residual), write y (and the sum), rstd (and mean) per row, read the
            weight and bias once per program (L2 hits after the first): M*N*(e [+ r + s] + o)
            + N*w per parameter + 4*M per statistic
  backward: read dy, x (the sum), the statistics (and the returned residual's grad); write dx;
            per parameter write P partial rows in fp32 and read them back, then write the grad:
            M*N*(o + e + e [+ s]) + 4*M per statistic + N*w + per parameter (2*P*N*4 + N*w)
  (`fused_bytes` takes P from `backward_programs_for`, the count the heuristic's tiles give on a GPU
  of that many SMs: twice the SMs for rows up to 2048, the SMs above, never more than row tiles.)
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from fusion_advisor.kernels import autocast, norm_tiles
from fusion_advisor.kernels.registry import Inputs, param_dtype
from fusion_advisor.kernels.common import cdiv, gdc_launch_dependents, gdc_wait, next_power_of_2, pdl
# The launchers call these through this module's names: a test forces a tile by replacing them here.
from fusion_advisor.kernels.norm_tiles import (MAX_BLOCK_N, TileConfig, _sm_programs, bwd_config,  # noqa: F401
                                               bwd_programs, fwd_config, gpu_name)


# -- row-tile math ------------------------------------------------------------------------------------
@triton.jit
def _tile(row0, n_rows, n_cols, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, EVEN: tl.constexpr):
    """Rows (int64), columns, the row mask and the element mask of the tile starting at row0.
    EVEN: n_cols == BLOCK_N, so the columns need no mask (a constant the compiler folds away)."""
    rows = row0 + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    row_mask = rows < n_rows
    mask = row_mask[:, None] & (cols < (BLOCK_N if EVEN else n_cols))[None, :]
    return rows.to(tl.int64), cols, row_mask, mask


@triton.jit
def _segment_stats(rows, row_mask, n_cols, BLOCK_N: tl.constexpr, SEGMENTS: tl.constexpr):
    """The (rows, segments) offsets of per-segment statistics and their mask (real segments only)."""
    segment = tl.arange(0, SEGMENTS)
    n_segments = n_cols // (BLOCK_N // SEGMENTS)
    return rows[:, None] * n_segments + segment[None, :], row_mask[:, None] & (segment < n_segments)[None, :]


@triton.jit
def _param_row(P, cols, n_cols, absent: tl.constexpr, HAS: tl.constexpr, BLOCK_N: tl.constexpr,
               EVICT: tl.constexpr, EVEN: tl.constexpr):
    """A weight or bias as a [1, BLOCK_N] fp32 row (`absent` everywhere when there is none)."""
    if HAS:
        v = tl.load(P + cols, mask=cols < (BLOCK_N if EVEN else n_cols), other=0.0,
                    eviction_policy=EVICT).to(tl.float32)
    else:
        v = tl.full((BLOCK_N,), absent, tl.float32)
    return v[None, :]


@triton.jit
def _weight_row(W, cols, n_cols, HAS_WEIGHT: tl.constexpr, BLOCK_N: tl.constexpr, GEMMA: tl.constexpr,
                EVICT: tl.constexpr, EVEN: tl.constexpr):
    """The weight as it multiplies: (1 + weight) for GEMMA, else the weight (1 where there is none)."""
    w = _param_row(W, cols, n_cols, 1.0, HAS_WEIGHT, BLOCK_N, EVICT, EVEN)
    if GEMMA:
        w = w + 1.0
    return w


@triton.jit
def _norm_fwd_tile(X, R, S, W, B, Y, MEAN, RSTD, stride_x, stride_r, stride_s, stride_y, n_rows, n_cols, eps, row0,
                   IS_RMS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, HAS_WEIGHT: tl.constexpr,
                   HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SEGMENTS: tl.constexpr,
                   GEMMA: tl.constexpr):
    """SEGMENTS > 1 (GroupNorm over channels, LayerNorm flags): statistics per segment of
    BLOCK_N // SEGMENTS columns, stored (rows, n_cols // that). SEGMENTS is the segment count
    padded to a power of two: the padding segments lie past n_cols, load zeros, store nothing.
    GEMMA (RMSNorm flags): the weight applies as (1 + weight) to the unrounded normalised value, in
    fp32, one rounding at the end, as GemmaRMSNorm computes it."""
    rows, cols, row_mask, mask = _tile(row0, n_rows, n_cols, BLOCK_M, BLOCK_N, False)
    x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        r = tl.load(R + rows[:, None] * stride_r + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        # Rounded to the sum's dtype before the norm, as `x + residual` in eager PyTorch is.
        s = (x + r).to(S.dtype.element_ty)
        tl.store(S + rows[:, None] * stride_s + cols[None, :], s, mask=mask)
        x = s.to(tl.float32)
    if IS_RMS:
        rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / n_cols + eps)
        # Round the normalised value to the input's dtype before the weight, as LlamaRMSNorm does.
        if GEMMA:
            y = x * rstd[:, None]
        elif HAS_RESIDUAL:
            y = (x * rstd[:, None]).to(S.dtype.element_ty).to(tl.float32)
        else:
            y = (x * rstd[:, None]).to(X.dtype.element_ty).to(tl.float32)
    elif SEGMENTS == 1:
        mean = tl.sum(x, axis=1) / n_cols
        # Two passes over registers, not E[x^2] - E[x]^2: no cancellation when |mean| >> std.
        xc = tl.where(mask, x - mean[:, None], 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=1) / n_cols + eps)
        y = xc * rstd[:, None]
        tl.store(MEAN + rows, mean, mask=row_mask)
    else:
        xs = tl.reshape(x, (BLOCK_M, SEGMENTS, BLOCK_N // SEGMENTS))
        mean = tl.sum(xs, axis=2) / (BLOCK_N // SEGMENTS)
        xc = xs - mean[:, :, None]
        rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=2) / (BLOCK_N // SEGMENTS) + eps)
        y = tl.reshape(xc * rstd[:, :, None], (BLOCK_M, BLOCK_N))
        stats, stat_mask = _segment_stats(rows, row_mask, n_cols, BLOCK_N, SEGMENTS)
        tl.store(MEAN + stats, mean, mask=stat_mask)
        tl.store(RSTD + stats, rstd, mask=stat_mask)
    if HAS_WEIGHT:
        y = y * _weight_row(W, cols, n_cols, HAS_WEIGHT, BLOCK_N, GEMMA, "", False)
    if HAS_BIAS:
        y = y + _param_row(B, cols, n_cols, 0.0, HAS_BIAS, BLOCK_N, "", False)
    tl.store(Y + rows[:, None] * stride_y + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)
    if SEGMENTS == 1:
        tl.store(RSTD + rows, rstd, mask=row_mask)


@triton.jit
def _norm_fwd_tiles(X, R, S, W, B, Y, MEAN, RSTD, stride_x, stride_r, stride_s, stride_y, n_rows, n_cols, eps,
                    IS_RMS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, HAS_WEIGHT: tl.constexpr,
                    HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SEGMENTS: tl.constexpr,
                    GEMMA: tl.constexpr, STAGES: tl.constexpr):
    """STAGES == 1: this program's one tile. STAGES > 1: a persistent program over the row tiles pid,
    pid + P, ..., the loop pipelined by Triton into STAGES stages (cp.async copies into shared memory
    issued STAGES - 1 tiles ahead), so a program keeps tiles in flight without holding them in
    registers."""
    if STAGES > 1:
        for tile in tl.range(tl.program_id(0), tl.cdiv(n_rows, BLOCK_M), tl.num_programs(0), num_stages=STAGES):
            _norm_fwd_tile(X, R, S, W, B, Y, MEAN, RSTD, stride_x, stride_r, stride_s, stride_y, n_rows, n_cols, eps,
                           tile * BLOCK_M, IS_RMS, HAS_RESIDUAL, HAS_WEIGHT, HAS_BIAS, BLOCK_M, BLOCK_N, SEGMENTS,
                           GEMMA)
    else:
        _norm_fwd_tile(X, R, S, W, B, Y, MEAN, RSTD, stride_x, stride_r, stride_s, stride_y, n_rows, n_cols, eps,
                       tl.program_id(0) * BLOCK_M, IS_RMS, HAS_RESIDUAL, HAS_WEIGHT, HAS_BIAS, BLOCK_M, BLOCK_N,
                       SEGMENTS, GEMMA)


@triton.jit
def _bwd_loads(DY, DS_OUT, X, MEAN, RSTD, tile, stride_dy, stride_dso, stride_x, n_rows, n_cols,
               IS_RMS: tl.constexpr, HAS_DS_OUT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
               SEGMENTS: tl.constexpr, EVICT: tl.constexpr, EVEN: tl.constexpr):
    """What one backward tile reads, as loaded (dy, x and ds_out in their dtypes; rstd and mean per
    row, or per row and segment): a tile past the last row loads nothing (all masked). Where a
    tensor is absent (ds_out, an RMSNorm's mean) another loaded value stands in, never used."""
    rows, cols, row_mask, mask = _tile(tile * BLOCK_M, n_rows, n_cols, BLOCK_M, BLOCK_N, EVEN)
    dy = tl.load(DY + rows[:, None] * stride_dy + cols[None, :], mask=mask, other=0.0, eviction_policy=EVICT)
    x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0, eviction_policy=EVICT)
    if HAS_DS_OUT:
        dso = tl.load(DS_OUT + rows[:, None] * stride_dso + cols[None, :], mask=mask, other=0.0)
    else:
        dso = dy
    if SEGMENTS == 1:
        rstd = tl.load(RSTD + rows, mask=row_mask, other=0.0)
        mean = rstd if IS_RMS else tl.load(MEAN + rows, mask=row_mask, other=0.0)
    else:
        stats, stat_mask = _segment_stats(rows, row_mask, n_cols, BLOCK_N, SEGMENTS)
        rstd = tl.load(RSTD + stats, mask=stat_mask, other=0.0)
        mean = tl.load(MEAN + stats, mask=stat_mask, other=0.0)
    return dy, x, dso, rstd, mean


@triton.jit
def _add_to_partial_row(row, col_mask, tile, HAS: tl.constexpr):
    """A program's partial row in memory += the tile summed over its rows. The same thread reads and
    writes each column, so program order is enough."""
    if HAS:
        tl.store(row, tl.load(row, mask=col_mask, other=0.0) + tl.sum(tile, axis=0), mask=col_mask)


@triton.jit
def _bwd_terms(dy, x, w, rstd_in, mean_in, mask, n_cols, IS_RMS: tl.constexpr, BLOCK_M: tl.constexpr,
               BLOCK_N: tl.constexpr, SEGMENTS: tl.constexpr):
    """A backward tile's fp32 terms from dy and x (fp32) and the weight row: g = dy * weight, x_hat,
    and each row's (segment's) c1 = mean(g) (LayerNorm only) and c2 = mean(g * x_hat). Segments
    keep [rows, segments, segment] shapes (x_hat, g, c1, c2, rstd); rows [rows, cols]."""
    g = dy * w
    if IS_RMS:
        rstd = rstd_in[:, None]
        x_hat = x * rstd
        c2 = tl.sum(g * x_hat, axis=1)[:, None] / n_cols
        c1 = c2
    elif SEGMENTS == 1:
        rstd = rstd_in[:, None]
        x_hat = tl.where(mask, (x - mean_in[:, None]) * rstd, 0.0)
        c1 = tl.sum(g, axis=1)[:, None] / n_cols
        c2 = tl.sum(g * x_hat, axis=1)[:, None] / n_cols
    else:  # per segment, in [rows, segments, segment] views of the tile
        rstd = rstd_in[:, :, None]
        x_hat = (tl.reshape(x, (BLOCK_M, SEGMENTS, BLOCK_N // SEGMENTS)) - mean_in[:, :, None]) * rstd
        g = tl.reshape(g, (BLOCK_M, SEGMENTS, BLOCK_N // SEGMENTS))
        c1 = tl.sum(g, axis=2)[:, :, None] / (BLOCK_N // SEGMENTS)
        c2 = tl.sum(g * x_hat, axis=2)[:, :, None] / (BLOCK_N // SEGMENTS)
    return g, x_hat, c1, c2, rstd


@triton.jit
def _norm_bwd_tiles(DY, DS_OUT, X, W, MEAN, RSTD, DX, DW_PARTIAL, DB_PARTIAL, stride_dy, stride_dso, stride_x,
                    stride_dx, n_rows, n_cols, IS_RMS: tl.constexpr, HAS_DS_OUT: tl.constexpr,
                    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr,
                    BLOCK_N: tl.constexpr, SEGMENTS: tl.constexpr, DW_IN_MEMORY: tl.constexpr,
                    DB_IN_MEMORY: tl.constexpr,
                    PREFETCH: tl.constexpr, GEMMA: tl.constexpr, STAGES: tl.constexpr,
                    LAUNCH_DEPENDENTS: tl.constexpr, RELOAD: tl.constexpr,
                    EVEN: tl.constexpr):
    """One persistent program: row tiles pid, pid + P, ...; dx stored per tile; the program's
    dweight / dbias sums in fp32 as row pid of DW_PARTIAL / DB_PARTIAL, each (P, n_cols): kept
    per tile element in registers and reduced over rows once at the end, or (DW_IN_MEMORY /
    DB_IN_MEMORY, for rows too long for registers to hold them besides the tile) added to that row
    every tile, where it stays in L2, rather than spilled.

    RELOAD (long rows): a tile's dy and x are read twice, once for the row sums and again (from L1)
    for dx and the dweight / dbias sums, so no thread holds the tile in fp32 across the row
    reduction beside both sums: registers hold the sums, and the tile only while it streams through.

    PREFETCH: the next tile's loads are issued before this tile's reductions and stores, so a
    program always has a tile's bytes in flight. Without it each program waits out a full memory
    latency per tile, and two programs an SM keep too few bytes in flight to reach the bandwidth
    (Little's law: ~3.3 TB/s x ~1 us is ~25 KB an SM; two 8-warp programs of 2048-element bf16
    tiles hold at most 16 KB, and only while loading)."""
    if LAUNCH_DEPENDENTS:   # the parameter-grad kernel may start now: it waits for this grid's end
        gdc_launch_dependents()
    pid = tl.program_id(0)
    programs = tl.num_programs(0)
    cols = tl.arange(0, BLOCK_N)
    col_mask = cols < n_cols
    w = _weight_row(W, cols, n_cols, HAS_WEIGHT, BLOCK_N, GEMMA, "", False)
    dw_acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    db_acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if DW_IN_MEMORY and HAS_WEIGHT:
        tl.store(DW_PARTIAL + pid * n_cols + cols, tl.zeros((BLOCK_N,), dtype=tl.float32), mask=col_mask)
    if DB_IN_MEMORY and HAS_BIAS:
        tl.store(DB_PARTIAL + pid * n_cols + cols, tl.zeros((BLOCK_N,), dtype=tl.float32), mask=col_mask)
    n_tiles = tl.cdiv(n_rows, BLOCK_M)
    if PREFETCH:
        dy_next, x_next, dso_next, rstd_next, mean_next = _bwd_loads(
            DY, DS_OUT, X, MEAN, RSTD, pid, stride_dy, stride_dso, stride_x, n_rows, n_cols, IS_RMS, HAS_DS_OUT,
            BLOCK_M, BLOCK_N, SEGMENTS, "", False)
    # STAGES > 1: Triton pipelines the loop's loads (dy, x, the statistics) STAGES - 1 tiles ahead
    # through shared memory (cp.async), in place of PREFETCH's registers; never with sums in memory,
    # whose partial rows are read back the tile after they are written (the launcher checks).
    for tile in tl.range(pid, n_tiles, programs, num_stages=STAGES):
        rows, _, row_mask, mask = _tile(tile * BLOCK_M, n_rows, n_cols, BLOCK_M, BLOCK_N, EVEN)
        if PREFETCH:
            dy_in, x_in, dso_in, rstd_in, mean_in = dy_next, x_next, dso_next, rstd_next, mean_next
            dy_next, x_next, dso_next, rstd_next, mean_next = _bwd_loads(
                DY, DS_OUT, X, MEAN, RSTD, tile + programs, stride_dy, stride_dso, stride_x, n_rows, n_cols, IS_RMS,
                HAS_DS_OUT, BLOCK_M, BLOCK_N, SEGMENTS, "", False)
        elif RELOAD:   # the sums from a first read (kept in L1 for the second), then the tile again
            dy_in, x_in, _, rstd_in, mean_in = _bwd_loads(
                DY, DS_OUT, X, MEAN, RSTD, tile, stride_dy, stride_dso, stride_x, n_rows, n_cols, IS_RMS,
                False, BLOCK_M, BLOCK_N, SEGMENTS, "evict_last", EVEN)
            _, _, c1, c2, _ = _bwd_terms(dy_in.to(tl.float32), x_in.to(tl.float32),
                                         _weight_row(W, cols, n_cols, HAS_WEIGHT, BLOCK_N, GEMMA, "evict_last",
                                                     EVEN),
                                         rstd_in, mean_in,
                                         mask, n_cols, IS_RMS, BLOCK_M, BLOCK_N, SEGMENTS)
            # a different load (its eviction hint) from the first: the compiler cannot merge the two
            dy_in, x_in, dso_in, rstd_in, mean_in = _bwd_loads(
                DY, DS_OUT, X, MEAN, RSTD, tile, stride_dy, stride_dso, stride_x, n_rows, n_cols, IS_RMS,
                HAS_DS_OUT, BLOCK_M, BLOCK_N, SEGMENTS, "evict_first", EVEN)
        else:
            dy_in, x_in, dso_in, rstd_in, mean_in = _bwd_loads(
                DY, DS_OUT, X, MEAN, RSTD, tile, stride_dy, stride_dso, stride_x, n_rows, n_cols, IS_RMS,
                HAS_DS_OUT, BLOCK_M, BLOCK_N, SEGMENTS, "", EVEN)
        dy = dy_in.to(tl.float32)
        x = x_in.to(tl.float32)
        if DW_IN_MEMORY or RELOAD:  # the weight from L1/L2 every tile: registers are short
            w_tile = _weight_row(W, cols, n_cols, HAS_WEIGHT, BLOCK_N, GEMMA, "", EVEN)
        else:
            w_tile = w
        g, x_hat, c1_here, c2_here, rstd = _bwd_terms(dy, x, w_tile, rstd_in, mean_in, mask, n_cols, IS_RMS,
                                                      BLOCK_M, BLOCK_N, SEGMENTS)
        if not RELOAD:   # (reading twice, the sums came from the first read; these go unused and unbuilt)
            c1, c2 = c1_here, c2_here
        if IS_RMS:
            dx = rstd * (g - x_hat * c2)
            # dweight sees the normalised value rounded as the forward rounded it.
            dw_t = dy * x_hat if GEMMA else dy * x_hat.to(X.dtype.element_ty).to(tl.float32)
        else:
            dx = tl.reshape(rstd * (g - c1 - x_hat * c2), (BLOCK_M, BLOCK_N))
            dw_t = dy * tl.reshape(x_hat, (BLOCK_M, BLOCK_N))
        if HAS_DS_OUT:  # the grad that reached the returned residual directly
            dx += dso_in.to(tl.float32)
        tl.store(DX + rows[:, None] * stride_dx + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)
        if DW_IN_MEMORY:
            _add_to_partial_row(DW_PARTIAL + pid * n_cols + cols, col_mask, dw_t, HAS_WEIGHT)
        else:
            dw_acc += dw_t
        if DB_IN_MEMORY:
            _add_to_partial_row(DB_PARTIAL + pid * n_cols + cols, col_mask, dy, HAS_BIAS)
        else:
            db_acc += dy
    if HAS_WEIGHT and not DW_IN_MEMORY:
        tl.store(DW_PARTIAL + pid * n_cols + cols, tl.sum(dw_acc, axis=0), mask=col_mask)
    if HAS_BIAS and not DB_IN_MEMORY:
        tl.store(DB_PARTIAL + pid * n_cols + cols, tl.sum(db_acc, axis=0), mask=col_mask)


# -- kernels: one name per pattern, so profiler traces say which norm ran ------------------------------
@triton.jit
def _rms_norm_fwd_kernel(X, R, S, W, B, Y, MEAN, RSTD, stride_x, stride_r, stride_s, stride_y, n_rows, n_cols, eps,
                         HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr,
                         BLOCK_N: tl.constexpr, GEMMA: tl.constexpr, STAGES: tl.constexpr):
    _norm_fwd_tiles(X, R, S, W, B, Y, MEAN, RSTD, stride_x, stride_r, stride_s, stride_y, n_rows, n_cols, eps,
                    True, False, HAS_WEIGHT, HAS_BIAS, BLOCK_M, BLOCK_N, 1, GEMMA, STAGES)


@triton.jit
def _add_rms_norm_fwd_kernel(X, R, S, W, B, Y, MEAN, RSTD, stride_x, stride_r, stride_s, stride_y, n_rows, n_cols,
                             eps, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr,
                             BLOCK_N: tl.constexpr, STAGES: tl.constexpr):
    _norm_fwd_tiles(X, R, S, W, B, Y, MEAN, RSTD, stride_x, stride_r, stride_s, stride_y, n_rows, n_cols, eps,
                    True, True, HAS_WEIGHT, HAS_BIAS, BLOCK_M, BLOCK_N, 1, False, STAGES)


@triton.jit
def _layer_norm_fwd_kernel(X, R, S, W, B, Y, MEAN, RSTD, stride_x, stride_r, stride_s, stride_y, n_rows, n_cols,
                           eps, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr,
                           BLOCK_N: tl.constexpr, STAGES: tl.constexpr):
    _norm_fwd_tiles(X, R, S, W, B, Y, MEAN, RSTD, stride_x, stride_r, stride_s, stride_y, n_rows, n_cols, eps,
                    False, False, HAS_WEIGHT, HAS_BIAS, BLOCK_M, BLOCK_N, 1, False, STAGES)


@triton.jit
def _add_layer_norm_fwd_kernel(X, R, S, W, B, Y, MEAN, RSTD, stride_x, stride_r, stride_s, stride_y, n_rows,
                               n_cols, eps, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr,
                               BLOCK_N: tl.constexpr, STAGES: tl.constexpr):
    _norm_fwd_tiles(X, R, S, W, B, Y, MEAN, RSTD, stride_x, stride_r, stride_s, stride_y, n_rows, n_cols, eps,
                    False, True, HAS_WEIGHT, HAS_BIAS, BLOCK_M, BLOCK_N, 1, False, STAGES)


@triton.jit
def _rms_norm_bwd_kernel(DY, DS_OUT, X, W, MEAN, RSTD, DX, DW_PARTIAL, DB_PARTIAL, stride_dy, stride_dso, stride_x,
                         stride_dx, n_rows, n_cols, HAS_DS_OUT: tl.constexpr, HAS_WEIGHT: tl.constexpr,
                         HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                         DW_IN_MEMORY: tl.constexpr,
                         DB_IN_MEMORY: tl.constexpr, PREFETCH: tl.constexpr, GEMMA: tl.constexpr,
                         STAGES: tl.constexpr, LAUNCH_DEPENDENTS: tl.constexpr, RELOAD: tl.constexpr,
                    EVEN: tl.constexpr):
    _norm_bwd_tiles(DY, DS_OUT, X, W, MEAN, RSTD, DX, DW_PARTIAL, DB_PARTIAL, stride_dy, stride_dso, stride_x,
                    stride_dx, n_rows, n_cols, True, HAS_DS_OUT, HAS_WEIGHT, HAS_BIAS, BLOCK_M, BLOCK_N, 1,
                    DW_IN_MEMORY, DB_IN_MEMORY, PREFETCH, GEMMA, STAGES, LAUNCH_DEPENDENTS, RELOAD, EVEN)


@triton.jit
def _add_rms_norm_bwd_kernel(DY, DS_OUT, X, W, MEAN, RSTD, DX, DW_PARTIAL, DB_PARTIAL, stride_dy, stride_dso,
                             stride_x, stride_dx, n_rows, n_cols, HAS_DS_OUT: tl.constexpr, HAS_WEIGHT: tl.constexpr,
                             HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                             DW_IN_MEMORY: tl.constexpr,
                             DB_IN_MEMORY: tl.constexpr, PREFETCH: tl.constexpr, STAGES: tl.constexpr,
                             LAUNCH_DEPENDENTS: tl.constexpr, RELOAD: tl.constexpr,
                    EVEN: tl.constexpr):
    _norm_bwd_tiles(DY, DS_OUT, X, W, MEAN, RSTD, DX, DW_PARTIAL, DB_PARTIAL, stride_dy, stride_dso, stride_x,
                    stride_dx, n_rows, n_cols, True, HAS_DS_OUT, HAS_WEIGHT, HAS_BIAS, BLOCK_M, BLOCK_N, 1,
                    DW_IN_MEMORY, DB_IN_MEMORY, PREFETCH, False, STAGES, LAUNCH_DEPENDENTS, RELOAD, EVEN)


@triton.jit
def _layer_norm_bwd_kernel(DY, DS_OUT, X, W, MEAN, RSTD, DX, DW_PARTIAL, DB_PARTIAL, stride_dy, stride_dso, stride_x,
                           stride_dx, n_rows, n_cols, HAS_DS_OUT: tl.constexpr, HAS_WEIGHT: tl.constexpr,
                           HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                           DW_IN_MEMORY: tl.constexpr,
                           DB_IN_MEMORY: tl.constexpr, PREFETCH: tl.constexpr, STAGES: tl.constexpr,
                           LAUNCH_DEPENDENTS: tl.constexpr, RELOAD: tl.constexpr,
                    EVEN: tl.constexpr):
    _norm_bwd_tiles(DY, DS_OUT, X, W, MEAN, RSTD, DX, DW_PARTIAL, DB_PARTIAL, stride_dy, stride_dso, stride_x,
                    stride_dx, n_rows, n_cols, False, HAS_DS_OUT, HAS_WEIGHT, HAS_BIAS, BLOCK_M, BLOCK_N, 1,
                    DW_IN_MEMORY, DB_IN_MEMORY, PREFETCH, False, STAGES, LAUNCH_DEPENDENTS, RELOAD, EVEN)


@triton.jit
def _add_layer_norm_bwd_kernel(DY, DS_OUT, X, W, MEAN, RSTD, DX, DW_PARTIAL, DB_PARTIAL, stride_dy, stride_dso,
                               stride_x, stride_dx, n_rows, n_cols, HAS_DS_OUT: tl.constexpr,
                               HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr,
                               BLOCK_N: tl.constexpr, DW_IN_MEMORY: tl.constexpr,
                               DB_IN_MEMORY: tl.constexpr, PREFETCH: tl.constexpr,
                               STAGES: tl.constexpr, LAUNCH_DEPENDENTS: tl.constexpr, RELOAD: tl.constexpr,
                    EVEN: tl.constexpr):
    _norm_bwd_tiles(DY, DS_OUT, X, W, MEAN, RSTD, DX, DW_PARTIAL, DB_PARTIAL, stride_dy, stride_dso, stride_x,
                    stride_dx, n_rows, n_cols, False, HAS_DS_OUT, HAS_WEIGHT, HAS_BIAS, BLOCK_M, BLOCK_N, 1,
                    DW_IN_MEMORY, DB_IN_MEMORY, PREFETCH, False, STAGES, LAUNCH_DEPENDENTS, RELOAD, EVEN)


@triton.jit
def _group_norm_rows_fwd_kernel(X, R, S, W, B, Y, MEAN, RSTD, stride_x, stride_r, stride_s, stride_y, n_rows,
                                n_cols, eps, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
                                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SEGMENTS: tl.constexpr,
                                STAGES: tl.constexpr):
    _norm_fwd_tiles(X, R, S, W, B, Y, MEAN, RSTD, stride_x, stride_r, stride_s, stride_y, n_rows, n_cols, eps,
                    False, False, HAS_WEIGHT, HAS_BIAS, BLOCK_M, BLOCK_N, SEGMENTS, False, STAGES)


@triton.jit
def _group_norm_rows_bwd_kernel(DY, DS_OUT, X, W, MEAN, RSTD, DX, DW_PARTIAL, DB_PARTIAL, stride_dy, stride_dso,
                                stride_x, stride_dx, n_rows, n_cols, HAS_DS_OUT: tl.constexpr,
                                HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr,
                                BLOCK_N: tl.constexpr, SEGMENTS: tl.constexpr, DW_IN_MEMORY: tl.constexpr,
                                DB_IN_MEMORY: tl.constexpr,
                                PREFETCH: tl.constexpr, STAGES: tl.constexpr, LAUNCH_DEPENDENTS: tl.constexpr, RELOAD: tl.constexpr,
                    EVEN: tl.constexpr):
    _norm_bwd_tiles(DY, DS_OUT, X, W, MEAN, RSTD, DX, DW_PARTIAL, DB_PARTIAL, stride_dy, stride_dso, stride_x,
                    stride_dx, n_rows, n_cols, False, HAS_DS_OUT, HAS_WEIGHT, HAS_BIAS, BLOCK_M, BLOCK_N, SEGMENTS,
                    DW_IN_MEMORY, DB_IN_MEMORY, PREFETCH, False, STAGES, LAUNCH_DEPENDENTS, RELOAD, EVEN)


@triton.jit
def _norm_param_grads_kernel(DW_PARTIAL, DB_PARTIAL, DW, DB, n_partials, n_cols, HAS_WEIGHT: tl.constexpr,
                             HAS_BIAS: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
                             WAIT_PRIMARY: tl.constexpr):
    """dweight / dbias = the (P, n_cols) fp32 partial rows summed, written in the parameter's dtype.
    WAIT_PRIMARY: launched while the backward runs (programmatic dependent launch); it waits for
    the backward's end, and its partial rows, before reading them."""
    if WAIT_PRIMARY:
        gdc_wait()
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_mask = cols < n_cols
    dw = tl.zeros((BLOCK_P, BLOCK_C), dtype=tl.float32)
    db = tl.zeros((BLOCK_P, BLOCK_C), dtype=tl.float32)
    for p0 in range(0, n_partials, BLOCK_P):
        parts = p0 + tl.arange(0, BLOCK_P)
        offs = parts.to(tl.int64)[:, None] * n_cols + cols[None, :]
        mask = (parts < n_partials)[:, None] & col_mask[None, :]
        if HAS_WEIGHT:
            dw += tl.load(DW_PARTIAL + offs, mask=mask, other=0.0)
        if HAS_BIAS:
            db += tl.load(DB_PARTIAL + offs, mask=mask, other=0.0)
    if HAS_WEIGHT:
        tl.store(DW + cols, tl.sum(dw, axis=0).to(DW.dtype.element_ty), mask=col_mask)
    if HAS_BIAS:
        tl.store(DB + cols, tl.sum(db, axis=0).to(DB.dtype.element_ty), mask=col_mask)


_FWD_KERNELS = {(True, False): _rms_norm_fwd_kernel, (True, True): _add_rms_norm_fwd_kernel,
                (False, False): _layer_norm_fwd_kernel, (False, True): _add_layer_norm_fwd_kernel}
_BWD_KERNELS = {(True, False): _rms_norm_bwd_kernel, (True, True): _add_rms_norm_bwd_kernel,
                (False, False): _layer_norm_bwd_kernel, (False, True): _add_layer_norm_bwd_kernel}


# -- launchers ----------------------------------------------------------------------------------------
def segmentable(n_cols: int, segments: int) -> bool:
    """Whether rows of n_cols split into `segments` statistics groups in one tile: equal segments of
    a power-of-two length (no padding inside a segment; the segment count is padded to a power of
    two, 12 groups of 64 as 16), the padded row within MAX_BLOCK_N."""
    if not 0 < segments <= n_cols or n_cols % segments:
        return False
    size = n_cols // segments
    return not size & (size - 1) and next_power_of_2(segments) * size <= MAX_BLOCK_N


def _gemma_flag(rms: bool, residual: bool, gemma: bool) -> dict:
    """The GEMMA constexpr, which only the RMSNorm kernels without a residual take."""
    if gemma and (not rms or residual):
        raise ValueError("norm: the Gemma form (1 + weight) is an RMSNorm without a residual")
    return {"GEMMA": gemma} if rms and not residual else {}


def _check_segments(n_cols: int, segments: int, rms: bool, residual: bool) -> None:
    if rms or residual or not segmentable(n_cols, segments):
        raise ValueError(f"norm: {segments} segments of rows of {n_cols} need LayerNorm without a residual "
                         "and segments of a power-of-two length")


def norm_fwd(x: torch.Tensor, residual: Optional[torch.Tensor], weight: Optional[torch.Tensor],
             bias: Optional[torch.Tensor], eps: float, rms: bool, out_dtype: torch.dtype,
             sum_dtype: Optional[torch.dtype] = None, config: Optional[TileConfig] = None, segments: int = 1,
             gemma: bool = False):
    """x (and residual): (rows, n_cols) views with a contiguous last dim. Returns (y, s, mean, rstd):
    s the residual sum (None without a residual), mean None for RMSNorm; statistics fp32 per row,
    or per row and segment: `segments` > 1 (LayerNorm flags, no residual, equal segments of a
    power-of-two length: `segmentable`) normalises each of `segments` column groups on its own
    (GroupNorm over channels). `config` forces a tile (norm_tune.py's search); default: `fwd_config`.
    `gemma` (RMSNorm without a residual): GemmaRMSNorm's (1 + weight), in fp32, rounded once."""
    n_rows, n_cols = x.shape
    device = x.device
    y = torch.empty((n_rows, n_cols), dtype=out_dtype, device=device)
    s = torch.empty((n_rows, n_cols), dtype=sum_dtype, device=device) if residual is not None else None
    rstd = torch.empty(n_rows * segments, dtype=torch.float32, device=device)
    mean = None if rms else torch.empty(n_rows * segments, dtype=torch.float32, device=device)
    kernel, extra = _FWD_KERNELS[(rms, residual is not None)], _gemma_flag(rms, residual is not None, gemma)
    if segments > 1:
        _check_segments(n_cols, segments, rms, residual is not None)
        kernel, extra = _group_norm_rows_fwd_kernel, {"SEGMENTS": next_power_of_2(segments)}
    if n_rows and n_cols:
        cfg = config or fwd_config(n_cols, n_rows, 2 * _sm_programs(device), x.element_size(), gpu_name(device),
                                   residual is not None)
        r, s_ = (residual, s) if residual is not None else (x, y)
        # Absent tensors are never read (constexpr flags): another tensor stands in as the pointer.
        programs = cdiv(n_rows, cfg.block_m)
        if cfg.stages > 1:   # persistent: programs_per_sm on every SM, each looping over tiles
            programs = min(programs, _sm_programs(device) * cfg.programs_per_sm)
        kernel[(programs,)](
            x, r, s_, x if weight is None else weight, x if bias is None else bias, y,
            rstd if mean is None else mean, rstd, x.stride(0), r.stride(0), s_.stride(0), y.stride(0),
            n_rows, n_cols, eps, HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None,
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, STAGES=cfg.stages, num_warps=cfg.num_warps, **extra)
    return y, s, mean, rstd


def norm_bwd(dy: torch.Tensor, ds_out: Optional[torch.Tensor], x: torch.Tensor, weight: Optional[torch.Tensor],
             bias: Optional[torch.Tensor], mean: Optional[torch.Tensor], rstd: torch.Tensor, rms: bool,
             residual: bool = False, config: Optional[TileConfig] = None, segments: int = 1, gemma: bool = False):
    """dy, ds_out, x: (rows, n_cols) views with a contiguous last dim (x: the norm's input, the sum
    when `residual`); ds_out the returned residual's grad or None. Returns (dx, dweight, dbias),
    dx contiguous in x's dtype, each parameter grad in its parameter's dtype (None when absent);
    `segments` as norm_fwd's."""
    n_rows, n_cols = x.shape
    device = x.device
    dx = torch.empty((n_rows, n_cols), dtype=x.dtype, device=device)
    dw = torch.empty_like(weight) if weight is not None else None
    db = torch.empty_like(bias) if bias is not None else None
    if not n_cols:
        return dx, dw, db
    if not n_rows:
        for g in (dw, db):
            if g is not None:
                g.zero_()
        return dx, dw, db
    cfg = config or bwd_config(n_cols, n_rows, x.element_size(), gpu_name(device), residual)
    programs = bwd_programs(cfg, n_rows, device)
    dw_in_memory, db_in_memory = norm_tiles.sums_in_memory(cfg.block_n)
    reload = norm_tiles.reloads(cfg.block_n)
    # a pipelined load would read a partial row before its store
    stages = 1 if dw_in_memory or db_in_memory else cfg.stages
    n_params = int(weight is not None) + int(bias is not None)
    partial = torch.empty((max(n_params, 1), programs, n_cols), dtype=torch.float32, device=device)
    dw_partial, db_partial = partial[0], partial[n_params - 1]
    dso = ds_out if ds_out is not None else dy
    kernel, extra = _BWD_KERNELS[(rms, residual)], _gemma_flag(rms, residual, gemma)
    if segments > 1:
        _check_segments(n_cols, segments, rms, residual)
        kernel, extra = _group_norm_rows_bwd_kernel, {"SEGMENTS": next_power_of_2(segments)}
    early = n_params > 0 and pdl(device)   # the parameter-grad kernel launched while this one runs
    kernel[(programs,)](
        dy, dso, x, x if weight is None else weight, rstd if mean is None else mean, rstd, dx, dw_partial,
        db_partial, dy.stride(0), dso.stride(0), x.stride(0), dx.stride(0), n_rows, n_cols,
        HAS_DS_OUT=ds_out is not None, HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, DW_IN_MEMORY=dw_in_memory, DB_IN_MEMORY=db_in_memory,
        PREFETCH=cfg.prefetch and stages == 1 and not reload, STAGES=stages, LAUNCH_DEPENDENTS=early, RELOAD=reload,
        EVEN=reload and n_cols == cfg.block_n,
        num_warps=cfg.num_warps, **extra)
    if n_params:
        sum_partial_rows(partial, [g for g in (dw, db) if g is not None], max(32, min(256, cfg.block_n // 64)), early)
    return dx, dw, db


def sum_partial_rows(partials: torch.Tensor, grads: list, block_c: int, early: bool) -> None:
    """grads[i] (a parameter's grad, in its dtype) = partials[i], the (P, n_cols) fp32 partial rows
    of a persistent backward, summed over P (`_norm_param_grads_kernel`, BLOCK_C columns a program);
    one grad or two. `early`: the backward was launched with LAUNCH_DEPENDENTS, so this launch may
    start while it runs (common.pdl)."""
    programs, n_cols = partials.shape[1:]
    block_p = min(next_power_of_2(programs), max(1, 4096 // block_c))
    _norm_param_grads_kernel[(cdiv(n_cols, block_c),)](
        partials[0], partials[len(grads) - 1], grads[0], grads[-1], programs, n_cols,
        HAS_WEIGHT=True, HAS_BIAS=len(grads) == 2, BLOCK_P=block_p, BLOCK_C=block_c,
        WAIT_PRIMARY=early, num_warps=4, **({"launch_pdl": True} if early else {}))


# -- autograd glue shared by the norm patterns --------------------------------------------------------
def sum_dtype(x: torch.Tensor, residual: torch.Tensor) -> torch.dtype:
    """The dtype of residual + x: the add + norm patterns' returned residual."""
    return torch.promote_types(x.dtype, residual.dtype)


def fake_param_grads(like: torch.Tensor, weight: Optional[torch.Tensor],
                     bias: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """A norm launcher's (dweight, dbias), as fakes: empty for a missing parameter."""
    dw = weight.new_empty(weight.shape) if weight is not None else like.new_empty(0)
    db = bias.new_empty(bias.shape) if bias is not None else like.new_empty(0)
    return dw, db


def affine_norm_function(name: str, forward, backward) -> type:
    """The autograd.Function of a norm called as F.layer_norm and F.group_norm are, (x, shape,
    weight, bias, eps) -> y, `shape` (normalized_shape, num_groups) passed to the launchers as given.
    `forward` / `backward` are its fused_op dispatchers: (y, mean, rstd) and (dx, dweight, dbias)."""

    class Function(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, shape, weight, bias, eps):
            y, mean, rstd = forward(x, shape, weight, bias, eps)
            ctx.save_for_backward(x, weight, bias, mean, rstd)
            ctx.shape = shape
            return y

        @staticmethod
        def backward(ctx, dy):
            x, weight, bias, mean, rstd = ctx.saved_tensors
            dx, dw, db = backward(dy, x, ctx.shape, weight, bias, mean, rstd)
            return dx, None, dw if weight is not None else None, db if bias is not None else None, None

    Function.__name__ = Function.__qualname__ = name
    return Function


def affine_norm_inputs(params: dict, device: torch.device, requires_grad: bool, shape, param_shape) -> Inputs:
    """Inputs of a norm called as F.layer_norm / F.group_norm are: x of params' shape and dtype,
    `shape` (normalized_shape, num_groups), and a weight (about 1) and a bias (about 0) of
    `param_shape` in params' weight_dtype, unless params' `weight` / `bias` say False."""
    wdtype = param_dtype(params, "weight_dtype")
    x = torch.randn(params["shape"], dtype=param_dtype(params), device=device, requires_grad=requires_grad)
    weight = bias = None
    if params.get("weight", True):
        weight = (1.0 + 0.1 * torch.randn(param_shape, device=device)).to(wdtype).requires_grad_(requires_grad)
    if params.get("bias", True):
        bias = (0.1 * torch.randn(param_shape, device=device)).to(wdtype).requires_grad_(requires_grad)
    grads = tuple(i for i, t in ((0, x), (2, weight), (3, bias)) if t is not None) if requires_grad else ()
    return Inputs((x, shape, weight, bias), {"eps": params.get("eps", 1e-5)}, grad_inputs=grads)


def apply_affine_norm(function: type, aten_name: str, x: torch.Tensor, shape, weight: Optional[torch.Tensor],
                      bias: Optional[torch.Tensor], eps: float) -> torch.Tensor:
    """`function` (an affine_norm_function) on these arguments, cast where eager's torch.autocast
    casts the aten op `aten_name` (on CUDA: a bf16/fp16 input runs, and returns, in fp32)."""
    if autocast.upcasts(aten_name, x, weight, bias):
        x, weight, bias = autocast.to_fp32(x, weight, bias)
    return function.apply(x, shape, weight, bias, eps)
