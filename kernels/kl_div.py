"""KL divergence: F.kl_div(input, target, reduction="batchmean", log_target=False/True).

`input` holds log-probabilities; `target` probabilities (log_target=False) or log-probabilities
(log_target=True). Pointwise loss, as PyTorch defines it:
  log_target=False: xlogy(target, target) - target * input      (0 where target == 0)
  log_target=True:  exp(target) * (target - input)
then summed and divided by input.size(0) ("batchmean"; also "sum", "mean" = / numel, "none").

Eager PyTorch (torch.kl_div is a composite) runs xlogy, mul, sub (or exp, sub, mul), a sum and a
div in the forward, and mul(s) over a broadcast grad in the backward. Bytes for n elements, input
element size e, target element size t, output size o (the loss dtype):
  unfused forward (log_target=False): xlogy 2t+o, mul e+t+o, sub 2o+o, sum o: n*(e + 3t + 6o)
  unfused backward: -target * grad over the expanded grad: n*(t + o + e)
  fused forward:  read input and target once, write one fp32 partial sum per program and read it
                  back to finish the sum: n*(e + t) + 8*P  (P = ceil(n / BLOCK_SIZE));
                  reduction="none" writes the pointwise loss instead: n*(e + t + o)
  fused backward: read target, write grad_input: n*(t + e) + 4 (+ n*o: the grad of "none")
`fused_bytes` returns exactly these numbers; the cost model prices them.

Only the gradient w.r.t. `input` is computed (a distillation target is a constant); a target
that requires grad is refused rather than silently given none.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from fusion_advisor.kernels.common import cdiv, check_same_shape
from fusion_advisor.kernels.fused_op import fused_op
from fusion_advisor.kernels.registry import (Inputs, OpRecord, dtype_from_trace, dtype_name, param_dtype,
                                             register_pattern)

REDUCTIONS = ("none", "batchmean", "sum", "mean")
_REDUCTION_OF_ENUM = {"0": "none", "1": "mean", "2": "sum"}  # at::Reduction, as traced
_BLOCK_SIZE, _NUM_WARPS = 4096, 8


@triton.jit
def _kl_div_fwd_kernel(INPUT, TARGET, OUT, PARTIAL, n_elements, LOG_TARGET: tl.constexpr,
                       POINTWISE: tl.constexpr, BLOCK_SIZE: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = offs < n_elements
    x = tl.load(INPUT + offs, mask=mask, other=0.0).to(tl.float32)
    t = tl.load(TARGET + offs, mask=mask, other=0.0).to(tl.float32)
    if LOG_TARGET:
        loss = tl.exp(t) * (t - x)
    else:
        # xlogy(t, t) - t * x, as PyTorch writes it (so 0 * -inf input stays NaN, as there); log(1)
        # where t == 0 keeps -inf out of the discarded branch.
        loss = tl.where(t == 0.0, 0.0, t * tl.log(tl.where(t == 0.0, 1.0, t))) - t * x
    if POINTWISE:
        tl.store(OUT + offs, loss.to(OUT.dtype.element_ty), mask=mask)
    else:
        tl.store(PARTIAL + pid, tl.sum(tl.where(mask, loss, 0.0), axis=0))


@triton.jit
def _kl_div_bwd_kernel(TARGET, GRAD_LOSS, GRAD_INPUT, n_elements, scale, LOG_TARGET: tl.constexpr,
                       POINTWISE: tl.constexpr, BLOCK_SIZE: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = offs < n_elements
    t = tl.load(TARGET + offs, mask=mask, other=0.0).to(tl.float32)
    if POINTWISE:
        g = tl.load(GRAD_LOSS + offs, mask=mask, other=0.0).to(tl.float32)
    else:
        g = tl.load(GRAD_LOSS).to(tl.float32) * scale
    if LOG_TARGET:
        d = -tl.exp(t) * g
    else:
        d = -t * g
    tl.store(GRAD_INPUT + offs, d.to(GRAD_INPUT.dtype.element_ty), mask=mask)


def _out_dtype(input: torch.Tensor, target: torch.Tensor) -> torch.dtype:
    return torch.promote_types(input.dtype, target.dtype)


def _scale(reduction: str, shape) -> float:
    """What the summed loss is divided by, as a multiplier."""
    numel = 1
    for d in shape:
        numel *= d
    if reduction == "batchmean":
        return 1.0 / shape[0] if len(shape) and shape[0] else 1.0
    if reduction == "mean":
        return 1.0 / numel if numel else float("nan")
    return 1.0


def _check(input: torch.Tensor, target: torch.Tensor, reduction: str) -> None:
    check_same_shape(input, target, "kl_div", ("input", "target"))
    if reduction not in REDUCTIONS:
        raise ValueError(f"kl_div: reduction {reduction!r} is not one of {', '.join(REDUCTIONS)}")


def kl_div_fwd(input: torch.Tensor, target: torch.Tensor, reduction: str = "batchmean",
               log_target: bool = False) -> torch.Tensor:
    """Launcher: the loss in promote(input, target)'s dtype (pointwise for reduction="none")."""
    _check(input, target, reduction)
    x, t = input.contiguous(), target.contiguous()
    n = x.numel()
    out_dtype = _out_dtype(input, target)
    programs = cdiv(n, _BLOCK_SIZE)
    if reduction == "none":
        out = torch.empty(input.shape, dtype=out_dtype, device=input.device)
        if n:
            _kl_div_fwd_kernel[(programs,)](x, t, out, out, n, LOG_TARGET=log_target, POINTWISE=True,
                                            BLOCK_SIZE=_BLOCK_SIZE, num_warps=_NUM_WARPS)
        return out
    if not n:
        return (torch.zeros((), device=input.device) * _scale(reduction, input.shape)).to(out_dtype)
    partial = torch.empty(programs, dtype=torch.float32, device=input.device)
    _kl_div_fwd_kernel[(programs,)](x, t, partial, partial, n, LOG_TARGET=log_target, POINTWISE=False,
                                    BLOCK_SIZE=_BLOCK_SIZE, num_warps=_NUM_WARPS)
    # Summing the per-program partials with torch keeps the result deterministic (no atomics).
    return (partial.sum() * _scale(reduction, input.shape)).to(out_dtype)


def kl_div_bwd(grad_loss: torch.Tensor, target: torch.Tensor, input_dtype: torch.dtype, reduction: str,
               log_target: bool) -> torch.Tensor:
    """Launcher: d loss / d input."""
    t = target.contiguous()
    n = t.numel()
    grad_input = torch.empty(target.shape, dtype=input_dtype, device=target.device)
    pointwise = reduction == "none"
    grad_loss = grad_loss.contiguous() if pointwise else grad_loss.reshape(1)
    if n:
        _kl_div_bwd_kernel[(cdiv(n, _BLOCK_SIZE),)](
            t, grad_loss, grad_input, n, _scale(reduction, target.shape), LOG_TARGET=log_target,
            POINTWISE=pointwise, BLOCK_SIZE=_BLOCK_SIZE, num_warps=_NUM_WARPS)
    return grad_input


# torch.library ops: a patched model still runs under torch.compile(fullgraph=True). Eager calls run
# the launchers directly (see fused_op).
_forward = fused_op("fusion_advisor::kl_div_fwd", fake=lambda input, target, reduction, log_target: input.new_empty(
    input.shape if reduction == "none" else (), dtype=_out_dtype(input, target)))(kl_div_fwd)
_backward = fused_op("fusion_advisor::kl_div_bwd", fake=lambda grad_loss, target, input_dtype, reduction, log_target: (
    target.new_empty(target.shape, dtype=input_dtype)))(kl_div_bwd)


class KLDivFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, input, target, reduction, log_target):
        loss = _forward(input, target, reduction, log_target)
        ctx.save_for_backward(target)
        ctx.input_dtype = input.dtype
        ctx.reduction = reduction
        ctx.log_target = log_target
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        (target,) = ctx.saved_tensors
        grad_input = _backward(grad_loss, target, ctx.input_dtype, ctx.reduction, ctx.log_target)
        return grad_input, None, None, None


def kl_div(input: torch.Tensor, target: torch.Tensor, reduction: str = "batchmean",
           log_target: bool = False) -> torch.Tensor:
    """Fused F.kl_div, forward and the gradient w.r.t. input."""
    if target.requires_grad and torch.is_grad_enabled():
        raise ValueError("kl_div: the fused kernel computes no gradient for target; pass target.detach()")
    if reduction not in REDUCTIONS:
        raise ValueError(f"kl_div: reduction {reduction!r} is not one of {', '.join(REDUCTIONS)}")
    return KLDivFunction.apply(input, target, reduction, bool(log_target))


class KLDivLoss(torch.nn.Module):
    """Drop-in for nn.KLDivLoss (same reduction and log_target; target must not need a gradient)."""

    def __init__(self, reduction: str = "batchmean", log_target: bool = False):
        super().__init__()
        if reduction not in REDUCTIONS:
            raise ValueError(f"kl_div: reduction {reduction!r} is not one of {', '.join(REDUCTIONS)}")
        self.reduction = reduction
        self.log_target = log_target

    @classmethod
    def from_module(cls, module: torch.nn.Module) -> "KLDivLoss":
        return cls(module.reduction, module.log_target)

    def forward(self, input, target):
        return kl_div(input, target, self.reduction, self.log_target)

    def extra_repr(self) -> str:
        return f"reduction={self.reduction!r}, log_target={self.log_target} (fused Triton)"


def reference(input: torch.Tensor, target: torch.Tensor, reduction: str = "batchmean",
              log_target: bool = False) -> torch.Tensor:
    """The call it replaces, verbatim."""
    return torch.nn.functional.kl_div(input, target, reduction=reduction, log_target=log_target)


def liger(input: torch.Tensor, target: torch.Tensor, reduction: str = "batchmean",
          log_target: bool = False) -> torch.Tensor:
    """Liger-Kernel's KL divergence on the same inputs (it clamps target at 1e-10 inside the log)."""
    from liger_kernel.ops.kl_div import LigerKLDivLossFunction
    return LigerKLDivLossFunction.apply(input, target, reduction, log_target, 1e-10)


def make_inputs(params: dict, device: torch.device, requires_grad: bool = True) -> Inputs:
    """input: log-softmax of N(0, 1) logits over the last dim; target: softmax (or log-softmax) of others."""
    dtype = param_dtype(params)
    tdtype = param_dtype(params, "target_dtype")
    log_target = params.get("log_target", False)
    shape = params["shape"]
    x = torch.randn(shape, device=device).log_softmax(-1).to(dtype).requires_grad_(requires_grad)
    t = torch.randn(shape, device=device)
    t = (t.log_softmax(-1) if log_target else t.softmax(-1)).to(tdtype)
    return Inputs((x, t), {"reduction": params.get("reduction", "batchmean"), "log_target": log_target},
                  grad_inputs=(0,) if requires_grad else ())


def fused_bytes(params: dict) -> dict:
    n = 1
    for d in params["shape"]:
        n *= d
    e = param_dtype(params).itemsize
    t = param_dtype(params, "target_dtype").itemsize
    o = max(e, t)
    if params.get("reduction", "batchmean") == "none":
        return {"forward": n * (e + t + o), "backward": n * (t + e + o)}
    partials = cdiv(n, _BLOCK_SIZE)
    return {"forward": n * (e + t) + 8 * partials, "backward": n * (t + e) + 4}


def params_from_ops(ops: list[OpRecord]) -> dict | None:
    """Shape, dtypes, reduction and log_target from a traced aten::kl_div; "batchmean" is a "sum"
    kl_div followed by the division of the scalar loss by input.size(0)."""
    ops = list(ops)
    op = next((o for o in ops if o.short == "kl_div"), None)
    if op is None or len(op.dims) < 2 or not op.dims[0] or len(op.types) < 2:
        return None
    dtype, tdtype = dtype_from_trace(op.types[0]), dtype_from_trace(op.types[1])
    if dtype is None or tdtype is None:
        return None
    concrete = tuple(op.concrete) + ("",) * 4
    reduction = _REDUCTION_OF_ENUM.get(concrete[2], "mean")
    after = ops[ops.index(op) + 1:]
    if reduction == "sum" and any(o.short == "div" and o.dims and tuple(o.dims[0]) == () for o in after):
        reduction = "batchmean"
    return {"shape": list(op.dims[0]), "dtype": dtype_name(dtype), "target_dtype": dtype_name(tdtype),
            "reduction": reduction, "log_target": concrete[3] == "True"}


PATTERN = register_pattern(
    __name__,
    description="KL divergence (F.kl_div's xlogy/mul/sub/sum/div chain) as one Triton pass each way",
    forward_signature=r"(^| )kl_div( |$)",
    modules=("KLDivLoss",),
    module_factory=KLDivLoss.from_module,
    example_params={"shape": [6, 42, 431], "dtype": "float32", "reduction": "batchmean", "log_target": False},
    bench_params=tuple({"shape": [tokens, vocab], "dtype": "bfloat16", "reduction": "batchmean",
                        "log_target": log_target}
                       for tokens in (4096, 16384) for vocab in (32768, 131072) for log_target in (False, True)),
    liger=liger,
)
