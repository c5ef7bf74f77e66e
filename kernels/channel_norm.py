"""LayerNorm over the channels of an (N, C, *spatial) tensor: ConvNeXt's `channels_first`
LayerNorm, each (n, position) normalised over its C values, which lie S = prod(spatial) elements
apart. Registers nothing: layer_norm.py's module factory and patch's norm form take it for a module
that says `data_format == "channels_first"`.

Eager runs it as permute -> F.layer_norm -> permute (Hugging Face's ConvNextLayerNorm), and
layer_norm copies the permuted input to a contiguous one first; or, written out, as ~8 reductions
and pointwise kernels in fp32. Here one kernel each way reads the NCHW tensor where it lies: a
program takes one n and BLOCK_S positions, all C channels of them ([BLOCK_C, BLOCK_S] tiles whose
rows are BLOCK_S contiguous elements: at least 32 bytes, a full sector), and reduces over axis 0.
The backward is persistent over those tiles, each program keeping its dweight / dbias column sums
in registers, summed over programs by norm_core's parameter-gradient kernel (no atomics).

Memory order: each tensor is read or written in its own order, NCHW or channels_last (a position's
C values together), as constexpr flags of the same kernels. The output takes the order the module
replaced returns: Hugging Face's permute form returns channels_last whatever the input's order,
and the convolutions after it pick their kernels by it (`output_layout_of` asks the module). A
channels_last input with a channels_last output is rows of C: the row family (layer_norm.py) runs
it on the NHWC view, as bench timed the trace's aten::layer_norm on those rows.

Bytes for x of N*C*S elements (element size e): forward reads x and writes y, plus 8 bytes of
statistics per position; backward reads dy and x, writes dx, plus the statistics and the
(programs, C) fp32 partial sums. Measured on an H100 in NCHW order (bench_channel_norm.py);
the channels_last paths are not measured yet.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import triton
import triton.language as tl

from fusion_advisor.kernels import autocast, norm_core
from fusion_advisor.kernels.common import (cdiv, check_device, check_dtype, gdc_launch_dependents, interpreting,
                                           next_power_of_2, pdl, sm_count)
from fusion_advisor.kernels.fused_op import fused_op

# Elements a program holds (BLOCK_S positions of BLOCK_C channels), from ptxas's sm_90 resource
# report (tests/kernels/test_channel_norm.py reads it). The backward at 8192 took 162-236 registers
# a thread at 8 warps for 96-768 channels and spilled 1 KB at 1536; at 4096 it takes 98-128, and the
# forward at 8192 78-91, none spilling up to 1536 channels (3072: 40 bytes in the backward).
FWD_TILE = 8192
BWD_TILE = 4096
MAX_CHANNELS = 4096   # one tile holds every channel of its positions: past this they would spill


@triton.jit
def _offsets(n, c, s, C, S, CHANNELS_LAST: tl.constexpr):
    """[BLOCK_C, BLOCK_S] element offsets of sample n's channels c at positions s: in (N, C, S)
    memory, or in (N, S, C) memory (channels_last) where a position's C values lie together."""
    base = n.to(tl.int64) * C * S
    if CHANNELS_LAST:
        return base + c.to(tl.int64)[:, None] + s.to(tl.int64)[None, :] * C
    return base + c.to(tl.int64)[:, None] * S + s[None, :]


@triton.jit
def _channel_norm_fwd_kernel(X, W, B, Y, MEAN, RSTD, C, S, eps, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
                             BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, X_CL: tl.constexpr, Y_CL: tl.constexpr):
    s_blocks = tl.cdiv(S, BLOCK_S)
    n = tl.program_id(0) // s_blocks
    s = (tl.program_id(0) % s_blocks) * BLOCK_S + tl.arange(0, BLOCK_S)
    c = tl.arange(0, BLOCK_C)
    mask = (c < C)[:, None] & (s < S)[None, :]
    x = tl.load(X + _offsets(n, c, s, C, S, X_CL), mask=mask, other=0.0).to(tl.float32)
    mean = tl.sum(x, axis=0) / C
    xc = tl.where(mask, x - mean[None, :], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=0) / C + eps)
    y = xc * rstd[None, :]
    if HAS_WEIGHT:
        y = y * tl.load(W + c, mask=c < C, other=1.0).to(tl.float32)[:, None]
    if HAS_BIAS:
        y = y + tl.load(B + c, mask=c < C, other=0.0).to(tl.float32)[:, None]
    tl.store(Y + _offsets(n, c, s, C, S, Y_CL), y.to(Y.dtype.element_ty), mask=mask)
    stats = n.to(tl.int64) * S + s
    tl.store(MEAN + stats, mean, mask=s < S)
    tl.store(RSTD + stats, rstd, mask=s < S)


@triton.jit
def _channel_norm_bwd_kernel(DY, X, W, MEAN, RSTD, DX, DW_PARTIAL, DB_PARTIAL, N, C, S, HAS_WEIGHT: tl.constexpr,
                             HAS_BIAS: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
                             DY_CL: tl.constexpr, X_CL: tl.constexpr, LAUNCH_DEPENDENTS: tl.constexpr):
    if LAUNCH_DEPENDENTS:   # the parameter-grad kernel may start now: it waits for this grid's end
        gdc_launch_dependents()
    pid = tl.program_id(0)
    c = tl.arange(0, BLOCK_C)
    c_mask = c < C
    if HAS_WEIGHT:
        w = tl.load(W + c, mask=c_mask, other=1.0).to(tl.float32)[:, None]
    else:
        w = tl.full((BLOCK_C, 1), 1.0, tl.float32)
    dw_acc = tl.zeros((BLOCK_C,), dtype=tl.float32)
    db_acc = tl.zeros((BLOCK_C,), dtype=tl.float32)
    s_blocks = tl.cdiv(S, BLOCK_S)
    for tile in range(pid, N * s_blocks, tl.num_programs(0)):
        n = tile // s_blocks
        s = (tile % s_blocks) * BLOCK_S + tl.arange(0, BLOCK_S)
        mask = c_mask[:, None] & (s < S)[None, :]
        x_offs = _offsets(n, c, s, C, S, X_CL)   # dx is written in x's layout
        stats = n.to(tl.int64) * S + s
        dy = tl.load(DY + _offsets(n, c, s, C, S, DY_CL), mask=mask, other=0.0).to(tl.float32)
        x = tl.load(X + x_offs, mask=mask, other=0.0).to(tl.float32)
        mean = tl.load(MEAN + stats, mask=s < S, other=0.0)
        rstd = tl.load(RSTD + stats, mask=s < S, other=0.0)
        x_hat = tl.where(mask, (x - mean[None, :]) * rstd[None, :], 0.0)
        g = dy * w
        c1 = tl.sum(g, axis=0) / C
        c2 = tl.sum(g * x_hat, axis=0) / C
        dx = rstd[None, :] * (g - c1[None, :] - x_hat * c2[None, :])
        tl.store(DX + x_offs, dx.to(DX.dtype.element_ty), mask=mask)
        dw_acc += tl.sum(dy * x_hat, axis=1)
        db_acc += tl.sum(dy, axis=1)
    if HAS_WEIGHT:
        tl.store(DW_PARTIAL + pid * C + c, dw_acc, mask=c_mask)
    if HAS_BIAS:
        tl.store(DB_PARTIAL + pid * C + c, db_acc, mask=c_mask)


def _blocks(channels: int, positions: int, tile: int, orders: tuple[bool, ...] = (False,)) -> tuple[int, int, int]:
    """(BLOCK_C, BLOCK_S, num_warps): every channel, positions up to `tile` elements a program, never
    more than there are; 16 warps where the minimum below is past the tile. `orders`: channels_last
    of each tensor the kernel reads or writes. A tensor in (N, C, S) order needs at least 16 positions
    (32 bytes of bf16 a channel row; 4 past 1024 channels, where 16 spilled; 8 at 1024 where one of
    the others is channels_last: ptxas's sm_90 report spilled 144 bytes in the backward at 16); in
    channels_last order every tensor's tile is whole rows of C and any count does."""
    block_c = next_power_of_2(channels)
    if all(orders):
        least = 1
    elif any(orders):
        least = 16 if block_c < 1024 else 8 if block_c == 1024 else 4
    else:
        least = 16 if block_c <= 1024 else 4
    block_s = min(max(least, tile // block_c), next_power_of_2(max(positions, 1)))
    elements = block_c * block_s
    return block_c, block_s, 16 if elements > tile else 8 if elements >= 4096 else 4


def _check(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor]) -> None:
    op = "channels_first layer_norm"
    check_dtype(x, op)
    check_device(x, weight, bias, op=op)
    if x.dim() < 3:
        raise ValueError(f"{op}: expected (N, C, *spatial), got shape {list(x.shape)}")
    if x.shape[1] > MAX_CHANNELS:
        raise ValueError(f"{op}: {x.shape[1]} channels is more than the {MAX_CHANNELS} one tile holds")
    for name, p in (("weight", weight), ("bias", bias)):
        if p is not None and tuple(p.shape) != (x.shape[1],):
            raise ValueError(f"{op}: {name} shape {list(p.shape)} is not ({x.shape[1]},)")


def channels_last(t: torch.Tensor) -> bool:
    """Is (N, C, *spatial) t laid out with each position's C values together (torch.channels_last
    for 4-D; the same order for any rank), and dense?"""
    return t.dim() >= 3 and t.shape[1] > 1 and t.movedim(1, -1).is_contiguous() and not t.is_contiguous()


def _dense(t: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """(t, channels_last(t)) where t is dense in either layout, else (t.contiguous(), False)."""
    if t.is_contiguous():
        return t, False
    if channels_last(t):
        return t, True
    return t.contiguous(), False


def _empty(shape, dtype, device, channels_last_memory: bool) -> torch.Tensor:
    """A new (N, C, *spatial) tensor, in channels_last memory order or contiguous."""
    if channels_last_memory:
        return torch.empty((shape[0], *shape[2:], shape[1]), dtype=dtype, device=device).movedim(-1, 1)
    return torch.empty(shape, dtype=dtype, device=device)


def channel_norm_fwd(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                     eps: float, out_channels_last: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launcher: (y, mean, rstd); y in x's shape and dtype, in channels_last memory order if
    `out_channels_last` else contiguous; the statistics fp32 per (n, position). x is read where it
    lies if it is dense in either order."""
    _check(x, weight, bias)
    x, x_cl = _dense(x)
    n, c, s = x.shape[0], x.shape[1], math.prod(x.shape[2:])
    y = _empty(x.shape, x.dtype, x.device, out_channels_last)
    mean = torch.empty(n * s, dtype=torch.float32, device=x.device)
    rstd = torch.empty(n * s, dtype=torch.float32, device=x.device)
    if y.numel():
        block_c, block_s, warps = _blocks(c, s, FWD_TILE, (x_cl, out_channels_last))
        _channel_norm_fwd_kernel[(n * cdiv(s, block_s),)](
            x, x if weight is None else weight, x if bias is None else bias, y, mean, rstd, c, s, eps,
            HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, BLOCK_C=block_c, BLOCK_S=block_s,
            X_CL=x_cl, Y_CL=out_channels_last, num_warps=warps)
    return y, mean, rstd


def channel_norm_bwd(dy: torch.Tensor, x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                     mean: torch.Tensor, rstd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launcher: (dx, dweight, dbias); dx in x's memory order (x as the forward saved it: dense);
    a missing parameter's gradient is an empty tensor."""
    (dy, dy_cl), (x, x_cl) = _dense(dy), _dense(x)
    n, c, s = x.shape[0], x.shape[1], math.prod(x.shape[2:])
    dx = _empty(x.shape, x.dtype, x.device, x_cl)
    dw = torch.empty_like(weight) if weight is not None else x.new_empty(0)
    db = torch.empty_like(bias) if bias is not None else x.new_empty(0)
    if not x.numel():
        dw.zero_(), db.zero_()
        return dx, dw, db
    block_c, block_s, warps = _blocks(c, s, BWD_TILE, (dy_cl, x_cl))
    tiles = n * cdiv(s, block_s)
    programs = min(tiles, 4 if interpreting() or x.device.type != "cuda" else 2 * sm_count(x.device))
    n_params = int(weight is not None) + int(bias is not None)
    partial = torch.empty((max(n_params, 1), programs, c), dtype=torch.float32, device=x.device)
    dw_partial, db_partial = partial[0], partial[n_params - 1]
    early = n_params > 0 and pdl(x.device)   # the parameter-grad kernel launched while this one runs
    _channel_norm_bwd_kernel[(programs,)](
        dy, x, x if weight is None else weight, mean, rstd, dx, dw_partial, db_partial, n, c, s,
        HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, BLOCK_C=block_c, BLOCK_S=block_s,
        DY_CL=dy_cl, X_CL=x_cl, LAUNCH_DEPENDENTS=early, num_warps=warps)
    if n_params:
        norm_core.sum_partial_rows(partial, [g for g, p in ((dw, weight), (db, bias)) if p is not None],
                                   max(32, min(256, next_power_of_2(c))), early)
    return dx, dw, db


def _forward_fake(x, weight, bias, eps, out_channels_last):
    stats = x.new_empty((x.shape[0] * math.prod(x.shape[2:]),), dtype=torch.float32)
    return _empty(x.shape, x.dtype, x.device, out_channels_last), stats, stats.new_empty(stats.shape)


def _backward_fake(dy, x, weight, bias, mean, rstd):
    return _empty(x.shape, x.dtype, x.device, _dense(x)[1]), *norm_core.fake_param_grads(mean, weight, bias)


# The calls count as layer_norm's: the module it replaces is a LayerNorm, planned under that name.
_forward = fused_op("fusion_advisor::channel_norm_fwd", fake=_forward_fake, counted_as="layer_norm")(channel_norm_fwd)
_backward = fused_op("fusion_advisor::channel_norm_bwd", fake=_backward_fake)(channel_norm_bwd)


class ChannelNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, eps, out_channels_last):
        x = _dense(x)[0]
        y, mean, rstd = _forward(x, weight, bias, eps, out_channels_last)
        ctx.save_for_backward(x, weight, bias, mean, rstd)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, bias, mean, rstd = ctx.saved_tensors
        dx, dw, db = _backward(dy, x, weight, bias, mean, rstd)
        return dx, dw if weight is not None else None, db if bias is not None else None, None, None


OUTPUT_LAYOUTS = ("channels_last", "contiguous", "like_input")


def channels_first_layer_norm(x: torch.Tensor, weight: Optional[torch.Tensor] = None,
                              bias: Optional[torch.Tensor] = None, eps: float = 1e-6,
                              output_layout: str = "channels_last") -> torch.Tensor:
    """LayerNorm of (N, C, *spatial) x over C, forward and backward: `F.layer_norm(x.movedim(1, -1),
    (C,), weight, bias, eps).movedim(-1, 1)`; inside torch.autocast it casts where eager's autocast
    casts layer_norm. `output_layout`: the memory order of the result, as the module replaced returns
    it: "channels_last" (that code's: the permuted layer_norm output, whatever x's order),
    "contiguous", or "like_input" (a norm written as means over dim 1 keeps x's order). Why it
    matters: a convolution after it picks its kernels by this order; ConvNeXt's depthwise convs on
    NCHW bf16 ran PyTorch's own kernels, 52 ms a step slower on the H100 zoo, when this returned
    contiguous where Hugging Face's returns channels_last."""
    if output_layout not in OUTPUT_LAYOUTS:
        raise ValueError(f"output_layout {output_layout!r}: expected one of {', '.join(OUTPUT_LAYOUTS)}")
    if autocast.upcasts("aten::layer_norm", x, weight, bias):
        x, weight, bias = autocast.to_fp32(x, weight, bias)
    x_cl = channels_last(x)
    out_cl = output_layout == "channels_last" or (output_layout == "like_input" and x_cl)
    if out_cl and x_cl:
        # Each position's C values lie together in and out: these are rows of C, and the row family
        # (norm_core's tuned tiles) runs them on the NHWC view without a copy. It is also what bench
        # timed: the trace's aten::layer_norm saw those rows.
        from fusion_advisor.kernels.layer_norm import layer_norm
        return layer_norm(x.movedim(1, -1), (x.shape[1],), weight, bias, eps).movedim(-1, 1)
    return ChannelNormFunction.apply(x, weight, bias, float(eps), out_cl)


def output_layout_of(module: torch.nn.Module, channels: int) -> str:
    """Which OUTPUT_LAYOUTS the module's own forward follows, asked of it on a (2, channels, 3, 2)
    input in each memory order (in its weight's dtype and device). "channels_last" if it cannot be run."""
    weight = getattr(module, "weight", None)
    dtype, device = (weight.dtype, weight.device) if isinstance(weight, torch.Tensor) else (torch.float32, "cpu")
    # fixed values, not random ones: swapping a module must not move the user's RNG (apply --verify
    # compares seeded runs' losses)
    x = torch.linspace(-2, 2, 2 * channels * 6, device=device).reshape(2, channels, 3, 2).to(dtype)
    try:
        with torch.no_grad():
            from_contiguous = channels_last(module(x))
            from_channels_last = channels_last(module(x.to(memory_format=torch.channels_last)))
    except Exception:   # a module this probe cannot run: its check (which runs it) says why
        return "channels_last"
    if from_contiguous:
        return "channels_last"
    return "like_input" if from_channels_last else "contiguous"


class ChannelsFirstLayerNorm(torch.nn.Module):
    """Drop-in for a LayerNorm over dim 1 of (N, C, *spatial) inputs (ConvNeXt's channels_first
    ConvNextLayerNorm): the wrapped module's weight, bias and eps (shared, not copied), its output
    in the memory order the wrapped module returns (`output_layout_of`)."""

    def __init__(self, weight: Optional[torch.nn.Parameter], bias: Optional[torch.nn.Parameter], eps: float,
                 output_layout: str = "channels_last"):
        super().__init__()
        self.weight, self.bias, self.eps, self.output_layout = weight, bias, float(eps), output_layout

    @classmethod
    def from_module(cls, module: torch.nn.Module) -> "ChannelsFirstLayerNorm":
        weight = getattr(module, "weight", None)
        layout = output_layout_of(module, weight.shape[0]) if isinstance(weight, torch.Tensor) else "channels_last"
        return cls(weight, getattr(module, "bias", None), getattr(module, "eps", 1e-6), layout)

    def forward(self, x):
        return channels_first_layer_norm(x, self.weight, self.bias, self.eps, self.output_layout)

    def extra_repr(self) -> str:
        channels = tuple(self.weight.shape) if self.weight is not None else "?"
        return f"{channels}, eps={self.eps}, over dim 1, output {self.output_layout} (fused Triton)"
