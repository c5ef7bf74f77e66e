"""Dropout + residual add: `residual + F.dropout(x, p, training=True)` in one launch.

Eager PyTorch on CUDA runs native_dropout (reads x, writes the dropped x and a bool mask that it
keeps for the backward) and then the add (reads both back). Here one kernel draws the keep mask
from Philox (`tl.rand4x`: one call yields four uniforms, for four elements), computes
`residual + where(keep, x * scale, 0)` with scale = 1/(1-p), and stores only the output. The mask is
never stored: the backward regenerates it from the same (seed, element offset) pairs, so it costs
no memory and no bytes. Rounding follows eager's: the dropped x is rounded to x's dtype before
the add, the add is done in fp32 and rounded once to the output dtype.

The seed is drawn per call from torch's CPU generator (so `torch.manual_seed` makes runs
repeatable and the draw needs no GPU launch and no sync) and travels to the backward as a
CPU int64 tensor. Philox is not PyTorch's CUDA dropout RNG stream: for the same seed the masks differ
from eager's; the keep probability is the same, 1-p.

Bytes for n elements, x element size e, residual size r, output size o = max(e, r):
  unfused forward:  native_dropout reads x, writes x' and the mask: n*(2e + 1); add: n*(e + r + o)
  unfused backward: native_dropout_backward reads dy and the mask, writes dx: n*(o + 1 + e)
  fused forward:    read x and residual, write the output: n*(e + r + o)
  fused backward:   read dy, write dx: n*(o + e)  (d residual is dy itself: no bytes, plus a cast
                    n*(o + r) only when residual's dtype differs from the output's)
`fused_bytes` returns exactly these numbers; the cost model prices them.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from fusion_advisor.kernels.common import cdiv, check_same_shape
from fusion_advisor.kernels.fused_op import fused_op
from fusion_advisor.kernels.registry import (Inputs, OpRecord, dtype_from_trace, dtype_name, param_dtype,
                                             register_pattern, training_shapes)

# Four quarters of BLOCK_SIZE share one Philox call; 8192 elements = 4 x 2048 at 8 warps: each
# thread moves 8 contiguous elements a quarter (one 16-byte access in bf16).
_BLOCK_SIZE, _NUM_WARPS = 8192, 8
_SEED_LIMIT = 2**31 - 1  # int32 seeds: one compiled kernel (the seed is not specialised on either)


@triton.jit
def _dropout_add_quarter(X, RES, Y, offs, n_elements, r, p, scale):
    mask = offs < n_elements
    x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    res = tl.load(RES + offs, mask=mask, other=0.0).to(tl.float32)
    dropped = tl.where(r >= p, x * scale, 0.0).to(X.dtype.element_ty)  # F.dropout's output, in x's dtype
    tl.store(Y + offs, (res + dropped.to(tl.float32)).to(Y.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["seed"])
def _dropout_add_fwd_kernel(X, RES, Y, n_elements, p, scale, seed, BLOCK_SIZE: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    QUARTER: tl.constexpr = BLOCK_SIZE // 4
    lane = tl.arange(0, QUARTER)
    r0, r1, r2, r3 = tl.rand4x(seed, pid * QUARTER + lane)
    base = pid * BLOCK_SIZE + lane
    _dropout_add_quarter(X, RES, Y, base, n_elements, r0, p, scale)
    _dropout_add_quarter(X, RES, Y, base + QUARTER, n_elements, r1, p, scale)
    _dropout_add_quarter(X, RES, Y, base + 2 * QUARTER, n_elements, r2, p, scale)
    _dropout_add_quarter(X, RES, Y, base + 3 * QUARTER, n_elements, r3, p, scale)


@triton.jit
def _dropout_bwd_quarter(DY, DX, offs, n_elements, r, p, scale):
    mask = offs < n_elements
    dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(DX + offs, tl.where(r >= p, dy * scale, 0.0).to(DX.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["seed"])
def _dropout_add_bwd_kernel(DY, DX, n_elements, p, scale, seed, BLOCK_SIZE: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    QUARTER: tl.constexpr = BLOCK_SIZE // 4
    lane = tl.arange(0, QUARTER)
    r0, r1, r2, r3 = tl.rand4x(seed, pid * QUARTER + lane)  # the forward's draws, element for element
    base = pid * BLOCK_SIZE + lane
    _dropout_bwd_quarter(DY, DX, base, n_elements, r0, p, scale)
    _dropout_bwd_quarter(DY, DX, base + QUARTER, n_elements, r1, p, scale)
    _dropout_bwd_quarter(DY, DX, base + 2 * QUARTER, n_elements, r2, p, scale)
    _dropout_bwd_quarter(DY, DX, base + 3 * QUARTER, n_elements, r3, p, scale)


def _out_dtype(x: torch.Tensor, residual: torch.Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, residual.dtype)


def _scale(p: float) -> float:
    return 0.0 if p == 1.0 else 1.0 / (1.0 - p)


def _check(x: torch.Tensor, residual: torch.Tensor, p: float) -> None:
    check_same_shape(x, residual, "dropout_add", ("x", "residual"))
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"dropout_add: dropout probability has to be between 0 and 1, but got {p}")


def draw_seed() -> int:
    """A Philox seed from torch's CPU generator (follows torch.manual_seed; no GPU launch)."""
    return int(torch.randint(0, _SEED_LIMIT, (1,)).item())


def dropout_add_fwd(x: torch.Tensor, residual: torch.Tensor, p: float, seed: int) -> torch.Tensor:
    """Launcher: residual + dropout(x, p) with the mask drawn from `seed`."""
    _check(x, residual, p)
    x1, res1 = x.contiguous(), residual.contiguous()
    n = x1.numel()
    y = torch.empty(x.shape, dtype=_out_dtype(x, residual), device=x.device)
    if n:
        # No fp fusion: x*scale + residual must round twice, as eager's dropout-then-add does.
        _dropout_add_fwd_kernel[(cdiv(n, _BLOCK_SIZE),)](
            x1, res1, y, n, float(p), _scale(p), seed, BLOCK_SIZE=_BLOCK_SIZE, num_warps=_NUM_WARPS,
            enable_fp_fusion=False)
    return y


def dropout_add_bwd(dy: torch.Tensor, p: float, seed: int, x_dtype: torch.dtype) -> torch.Tensor:
    """Launcher: d x, the forward's mask regenerated from `seed`."""
    dy1 = dy.contiguous()
    n = dy1.numel()
    dx = torch.empty(dy.shape, dtype=x_dtype, device=dy.device)
    if n:
        _dropout_add_bwd_kernel[(cdiv(n, _BLOCK_SIZE),)](
            dy1, dx, n, float(p), _scale(p), seed, BLOCK_SIZE=_BLOCK_SIZE, num_warps=_NUM_WARPS,
            enable_fp_fusion=False)
    return dx


def dropout_add_fwd_seeded(x: torch.Tensor, residual: torch.Tensor, p: float,
                           seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The forward as the autograd.Function calls it: seed < 0 draws one. Returns the output and
    the seed used (a CPU int64 tensor, saved for the backward)."""
    if seed < 0:
        seed = draw_seed()
    return dropout_add_fwd(x, residual, p, seed), torch.tensor(seed, dtype=torch.int64)


def dropout_add_bwd_seeded(dy: torch.Tensor, seed: torch.Tensor, p: float, x_dtype: torch.dtype) -> torch.Tensor:
    """The backward as the autograd.Function calls it, from the seed tensor the forward returned."""
    return dropout_add_bwd(dy, p, int(seed.item()), x_dtype)


# torch.library ops: a patched model still runs under torch.compile(fullgraph=True). Eager calls run
# the launchers directly (see fused_op).
# The forward is tagged as random so that compilers neither merge nor drop two calls on equal inputs.
_forward = fused_op("fusion_advisor::dropout_add_fwd", tags=(torch.Tag.nondeterministic_seeded,),
                    fake=lambda x, residual, p, seed: (x.new_empty(x.shape, dtype=_out_dtype(x, residual)),
                                                       torch.empty((), dtype=torch.int64, device="cpu")))(
    dropout_add_fwd_seeded)
_backward = fused_op("fusion_advisor::dropout_add_bwd", fake=lambda dy, seed, p, x_dtype: dy.new_empty(
    dy.shape, dtype=x_dtype))(dropout_add_bwd_seeded)


class DropoutAddFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, residual, p, seed):
        y, seed_used = _forward(x, residual, p, seed)
        ctx.save_for_backward(seed_used)
        ctx.p = p
        ctx.x_dtype = x.dtype
        ctx.residual_dtype = residual.dtype
        return y

    @staticmethod
    def backward(ctx, dy):
        (seed,) = ctx.saved_tensors
        dx = None
        if ctx.needs_input_grad[0]:
            dx = _backward(dy, seed, ctx.p, ctx.x_dtype)
        return dx, dy.to(ctx.residual_dtype), None, None


def dropout_add(x: torch.Tensor, residual: torch.Tensor, p: float = 0.5, training: bool = True,
                seed: int | None = None) -> torch.Tensor:
    """Fused `residual + F.dropout(x, p, training)`. `seed` fixes the mask (the same seed gives the same
    mask); None draws one from torch's CPU generator. In eval mode it is `residual + x`, as eager."""
    if not training:
        return residual + x
    if seed is not None and not 0 <= seed < _SEED_LIMIT:
        raise ValueError(f"dropout_add: seed must be in [0, 2**31 - 1), got {seed}")
    return DropoutAddFunction.apply(x, residual, float(p), -1 if seed is None else int(seed))


class DropoutAdd(torch.nn.Module):
    """`residual + dropout(x)` as a module: forward(x, residual); follows train()/eval() like nn.Dropout."""

    def __init__(self, p: float = 0.5):
        super().__init__()
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"dropout_add: dropout probability has to be between 0 and 1, but got {p}")
        self.p = p

    @classmethod
    def from_dropout(cls, dropout: torch.nn.Module) -> "DropoutAdd":
        """From the model's nn.Dropout (its p; the add is the caller's)."""
        return cls(dropout.p)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return dropout_add(x, residual, self.p, self.training)

    def extra_repr(self) -> str:
        return f"p={self.p} (fused Triton)"


def reference(x: torch.Tensor, residual: torch.Tensor, p: float = 0.5, training: bool = True,
              seed: int | None = None) -> torch.Tensor:
    """The code it replaces, verbatim (`seed` is the fused op's and changes nothing here)."""
    return residual + torch.nn.functional.dropout(x, p, training=training)


def make_inputs(params: dict, device: torch.device, requires_grad: bool = True) -> Inputs:
    dtype = param_dtype(params)
    rdtype = param_dtype(params, "residual_dtype")
    x = torch.randn(params["shape"], device=device).to(dtype).requires_grad_(requires_grad)
    residual = torch.randn(params["shape"], device=device).to(rdtype).requires_grad_(requires_grad)
    kwargs = {"p": params.get("p", 0.1), "training": params.get("training", True)}
    if "seed" in params:
        kwargs["seed"] = params["seed"]
    return Inputs((x, residual), kwargs, grad_inputs=(0, 1) if requires_grad else ())


def fused_bytes(params: dict) -> dict:
    n = 1
    for d in params["shape"]:
        n *= d
    e = param_dtype(params).itemsize
    r = param_dtype(params, "residual_dtype").itemsize
    o = max(e, r)
    cast = n * (o + r) if r != o else 0
    return {"forward": n * (e + r + o), "backward": n * (o + e) + cast}


def params_from_ops(ops: list[OpRecord]) -> dict | None:
    """Shape, dtypes and p from a traced aten::dropout (or native_dropout) in training mode and the
    add that follows it; x's dtype is the dropout's, the residual's the add's other operand's."""
    ops = list(ops)
    drop = next((o for o in ops if o.short in ("dropout", "native_dropout")), None)
    if drop is None or not drop.dims or not drop.dims[0] or not drop.types or len(drop.concrete) < 3:
        return None
    if drop.concrete[2] != "True":  # eval mode: eager launches no dropout kernel, nothing to fuse
        return None
    try:
        p = float(drop.concrete[1])
    except ValueError:
        return None
    shape = list(drop.dims[0])
    add = next((o for o in ops[ops.index(drop) + 1:]
                if o.short == "add" and len(o.dims) >= 2 and [list(d) for d in o.dims[:2]] == [shape, shape]), None)
    if add is None or len(add.types) < 2:
        return None
    dtype = dtype_from_trace(drop.types[0])
    add_types = [dtype_from_trace(t) for t in add.types[:2]]
    if dtype is None or None in add_types:
        return None
    if dtype not in add_types:
        return None
    add_types.remove(dtype)
    rdtype = add_types[0]
    return {"shape": shape, "dtype": dtype_name(dtype), "residual_dtype": dtype_name(rdtype), "p": p}


def _without_randomness(params: dict) -> dict:
    return dict(params, p=0.0)


PATTERN = register_pattern(
    __name__,
    description="dropout + residual add as one Triton launch; the mask is regenerated from a seed, not stored",
    forward_signature=r"(^| )(native_)?dropout( \S+)* add( |$)",
    example_params={"shape": [6, 42, 431], "dtype": "float32", "p": 0.1},
    # Philox masks cannot equal PyTorch's: compare with the reference where no randomness is left.
    numerics_params=_without_randomness,
    bench_params=training_shapes(lambda tokens, hidden: {"shape": [tokens, hidden], "dtype": "bfloat16", "p": 0.1}),
)
