"""Cross-entropy over a vocabulary: log-softmax + NLL in one pass forward, the gradient in one pass backward.

Replaces what Hugging Face's ForCausalLMLoss runs (`reference` below): `logits.float()` then
`F.cross_entropy(..., ignore_index=-100)`, which eager PyTorch runs as to(fp32), log_softmax,
nll_loss forward, then nll_loss_backward (a zero fill and a scatter), log_softmax_backward and a cast
back. With `upcast=False` it replaces `F.cross_entropy` on the logits as they are (bf16 directly).

Forward: one program per row walks the vocabulary in BLOCK_SIZE chunks (a 128k row does not fit one
block) with a running max and sum of exp (online logsumexp), reads x[target], and writes the row's
loss and logsumexp. Backward: one program per (row, vocab chunk) reads the logits again and writes
d loss / d logits = (softmax - (1-ls)*onehot - ls/V) * scale * grad_loss, where scale = 1/n_valid for
reduction="mean" and 1 otherwise; rows whose target is ignore_index read nothing and write zeros.

Why the gradient is not written in the forward (as it was until 2026-12-07, and as Liger does): it
then needs a second pass over the row in the forward and a scaling pass (read + write) in the
backward, 4 logits-sized passes against 3 here. On an H100 under autocast, GPT-2's loss over 8,192 x
50,304 bf16 logits ran 815 us fwd+bwd that way, against eager's 780 and torch.compile's 564 (which
makes the same 3 passes; nanoGPT's profile, benchmarks/results/verify-nanogpt-h100-6335e73/).
Memory is the same: the forward keeps the logits for the backward instead of a gradient buffer.

Where the gradient lives (`inplace`):
  inplace=False (default): a new buffer in the logits' dtype; the logits stay intact.
  inplace=True: written over the logits' storage in the backward. Saves the buffer, but the logits
      hold the gradient after the backward; use it only where nothing reads them afterwards.

Bytes for N rows x V vocab, logits element size e (the target is int64, the loss and logsumexp fp32):
  unfused (HF, bf16 logits, e=2), per element: to(fp32) 2+4, log_softmax 4+4, nll_loss_backward
      zero fill 4, log_softmax_backward 4+4+4, cast back 4+2: N*V*36 bytes (plus O(N))
  fused forward:  read the logits once, read the target, write per-row losses and logsumexps:
                  N*V*e + 16*N; then summing the row losses reads 4*N more (not for
                  reduction="none") and "mean" counts the non-ignored targets (8*N)
  fused backward: read the logits, write the gradient, read the target and logsumexps:
                  2*N*V*e + 12*N, plus the incoming gradient (4*N for reduction="none", else 4)
`fused_bytes` returns exactly these numbers; the cost model prices them.

Memory at N=16k tokens x V=128k vocab, bf16 logits (N*V*2 bytes = 4 GiB), counted as the peak of
`torch.cuda.max_memory_allocated()` over forward + backward above what was allocated before it
(logits, target) — how `benchmarks/cross_entropy_memory.py` measures it:
  eager, HF (logits.float()):  fp32 copy 8 GiB + log_softmax out 8 GiB in the forward; in the
      backward log_softmax out 8 + nll grad 8 + log_softmax grad 8 = 24 GiB peak
  eager, bf16 logits directly: log_softmax out 4 + nll grad 4 + log_softmax grad 4 = 12 GiB peak
  fused, inplace=False: the gradient buffer, 4 GiB (+ 128 KiB of per-row losses and logsumexps):
      1/6 of HF's, a hair over 1/3 of bf16-direct's; it cannot be less there, since the buffer is
      the logits' gradient itself, which eager's 12 GiB also ends in
  fused, inplace=True: ~0 (the per-row figures): the gradient takes the logits' place
The eager figures are what the allocator must hold at once; the caching allocator may round up.
Not yet measured on a GPU: `python benchmarks/cross_entropy_memory.py --check` prints all four.
"""
from __future__ import annotations

import dis
import inspect
import math
import types

import torch
import triton
import triton.language as tl

from fusion_advisor.kernels import autocast
from fusion_advisor.kernels.common import (backward_once, cdiv, check_device, check_dtype, interpreting,
                                          next_power_of_2)
from fusion_advisor.kernels.fused_op import fused_op
from fusion_advisor.kernels.registry import (FunctionPatch, Inputs, OpRecord, Rewrite, dtype_from_trace,
                                             dtype_name, param_dtype, register_pattern)

REDUCTIONS = ("none", "mean", "sum")
_REDUCTION_OF_ENUM = {"0": "none", "1": "mean", "2": "sum"}  # at::Reduction, as traced


@triton.jit
def _cross_entropy_fwd_kernel(LOGITS, TARGET, GRAD, LOSS, LSE, N_VALID, stride_logits, stride_grad, n_cols,
                              ignore_index, label_smoothing, COMPUTE_GRAD: tl.constexpr, STORE_LSE: tl.constexpr,
                              MEAN: tl.constexpr, SMOOTHING: tl.constexpr, BLOCK_SIZE: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    logits_row = LOGITS + row * stride_logits
    grad_row = GRAD + row * stride_grad
    target = tl.load(TARGET + row).to(tl.int64)
    cols = tl.arange(0, BLOCK_SIZE)
    if target == ignore_index:
        tl.store(LOSS + row, 0.0)
        if STORE_LSE:
            tl.store(LSE + row, 0.0)
        if COMPUTE_GRAD:
            zeros = tl.zeros((BLOCK_SIZE,), dtype=GRAD.dtype.element_ty)
            for start in range(0, n_cols, BLOCK_SIZE):
                tl.store(grad_row + start + cols, zeros, mask=start + cols < n_cols)
    else:
        # Pass 1: online logsumexp, one chunk at a time.
        run_max = -float("inf")
        run_sum = 0.0
        x_sum = 0.0
        for start in range(0, n_cols, BLOCK_SIZE):
            offs = start + cols
            mask = offs < n_cols
            x = tl.load(logits_row + offs, mask=mask, other=-float("inf")).to(tl.float32)
            new_max = tl.maximum(run_max, tl.max(x, axis=0))
            # A chunk of only -inf logits (masked vocab) must not turn exp(-inf - -inf) into NaN.
            shift = tl.where(new_max == -float("inf"), 0.0, new_max)
            run_sum = run_sum * tl.exp(run_max - shift) + tl.sum(tl.exp(x - shift), axis=0)
            run_max = new_max
            if SMOOTHING:
                x_sum += tl.sum(tl.where(mask, x, 0.0), axis=0)
        lse = run_max + tl.log(run_sum)
        # An out-of-range target reads nothing and makes the loss NaN (PyTorch raises instead).
        in_range = (target >= 0) & (target < n_cols)
        x_target = tl.load(logits_row + tl.where(in_range, target, 0)).to(tl.float32)
        x_target = tl.where(in_range, x_target, float("nan"))
        loss = lse - x_target
        if SMOOTHING:
            loss = (1.0 - label_smoothing) * loss + label_smoothing * (lse - x_sum / n_cols)
        tl.store(LOSS + row, loss)
        if STORE_LSE:
            tl.store(LSE + row, lse)
        if COMPUTE_GRAD:
            # Pass 2: the gradient, scaled for the reduction, rounded once to the logits' dtype.
            scale = 1.0
            if MEAN:
                scale = 1.0 / tl.load(N_VALID)
            smooth = label_smoothing / n_cols
            for start in range(0, n_cols, BLOCK_SIZE):
                offs = start + cols
                mask = offs < n_cols
                x = tl.load(logits_row + offs, mask=mask, other=0.0).to(tl.float32)
                g = tl.exp(x - lse) - smooth
                g = tl.where(offs == target, g - (1.0 - label_smoothing), g)
                tl.store(grad_row + offs, (g * scale).to(GRAD.dtype.element_ty), mask=mask)


@triton.jit
def _cross_entropy_bwd_kernel(LOGITS, TARGET, LSE, GRAD, GRAD_LOSS, N_VALID, stride_logits, stride_grad,
                              stride_grad_loss, n_cols, ignore_index, label_smoothing, MEAN: tl.constexpr,
                              BLOCK_SIZE: tl.constexpr):
    """One vocab chunk of one row: d loss / d logits = (softmax - (1-ls)*onehot - ls/V) * scale *
    grad_loss from the logits and the row's logsumexp; zeros for an ignored row (which reads no
    logits). GRAD may be LOGITS itself (inplace): each element is read before it is written."""
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = offs < n_cols
    target = tl.load(TARGET + row).to(tl.int64)
    grad_ptrs = GRAD + row * stride_grad + offs
    if target == ignore_index:
        tl.store(grad_ptrs, tl.zeros((BLOCK_SIZE,), dtype=GRAD.dtype.element_ty), mask=mask)
    else:
        scale = tl.load(GRAD_LOSS + row * stride_grad_loss).to(tl.float32)
        if MEAN:
            scale = scale / tl.load(N_VALID)
        lse = tl.load(LSE + row)
        x = tl.load(LOGITS + row * stride_logits + offs, mask=mask, other=0.0).to(tl.float32)
        g = tl.exp(x - lse) - label_smoothing / n_cols
        g = tl.where(offs == target, g - (1.0 - label_smoothing), g)
        tl.store(grad_ptrs, (g * scale).to(GRAD.dtype.element_ty), mask=mask)


def _vocab_block(n_cols: int) -> tuple[int, int]:
    """(BLOCK_SIZE, num_warps) for the vocab loop. 4096 bf16 = 8 KiB a chunk, 16 elements a thread
    at 8 warps: two 16-byte loads each. Under the interpreter a small block makes the loop run
    several times on test-sized vocabularies, the path a 128k vocab takes on the GPU."""
    block = min(next_power_of_2(n_cols), 256 if interpreting() else 4096)
    return block, 8 if block >= 2048 else 4


def _check(logits: torch.Tensor, target: torch.Tensor, reduction: str, label_smoothing: float) -> None:
    check_dtype(logits, "cross_entropy")
    check_device(logits, target, op="cross_entropy")
    if logits.dim() != 2:
        raise ValueError(f"cross_entropy: logits must be (tokens, vocab), got shape {tuple(logits.shape)}; "
                         f"flatten first: logits.view(-1, logits.shape[-1])")
    if target.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"cross_entropy: target must hold class indices (int64 or int32), got {dtype_name(target.dtype)}")
    if target.shape != logits.shape[:1]:
        raise ValueError(f"cross_entropy: target shape {tuple(target.shape)} does not match logits' "
                         f"{logits.shape[0]} rows")
    if reduction not in REDUCTIONS:
        raise ValueError(f"cross_entropy: reduction {reduction!r} is not one of {', '.join(REDUCTIONS)}")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"cross_entropy: label_smoothing must be in [0, 1], got {label_smoothing}")


def cross_entropy_fwd(logits: torch.Tensor, target: torch.Tensor, ignore_index: int = -100,
                      label_smoothing: float = 0.0,
                      reduction: str = "mean") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launcher: (loss, lse, n_valid). The fp32 loss (a scalar, or one per row for reduction="none");
    each row's logsumexp (fp32, 0 for an ignored row) and the count of non-ignored targets (an fp32
    scalar; 1 unless reduction="mean"), which the backward reads. logits: last dim contiguous."""
    _check(logits, target, reduction, label_smoothing)
    if logits.stride(-1) != 1:
        raise ValueError("cross_entropy: the logits' last dim must be contiguous (the autograd function copies it)")
    n_rows, n_cols = logits.shape
    target = target.contiguous()
    loss_rows = torch.empty(n_rows, dtype=torch.float32, device=logits.device)
    lse = torch.empty(n_rows, dtype=torch.float32, device=logits.device)
    # Only "mean" divides by the number of non-ignored targets (a device scalar: no host sync).
    n_valid = ((target != ignore_index).sum().to(torch.float32) if reduction == "mean"
               else torch.ones((), dtype=torch.float32, device=logits.device))
    block, warps = _vocab_block(n_cols)
    if n_rows:
        _cross_entropy_fwd_kernel[(n_rows,)](
            logits, target, logits, loss_rows, lse, n_valid, logits.stride(0), logits.stride(0), n_cols,
            ignore_index, float(label_smoothing), COMPUTE_GRAD=False, STORE_LSE=True, MEAN=reduction == "mean",
            SMOOTHING=label_smoothing > 0.0, BLOCK_SIZE=block, num_warps=warps)
    if reduction == "none":
        return loss_rows, lse, n_valid
    total = loss_rows.sum()
    # An all-ignored batch gives 0/0 = NaN for "mean", as PyTorch does.
    return (total / n_valid if reduction == "mean" else total), lse, n_valid


def cross_entropy_bwd(logits: torch.Tensor, target: torch.Tensor, lse: torch.Tensor, n_valid: torch.Tensor,
                      grad_loss: torch.Tensor, grad_logits: torch.Tensor, ignore_index: int = -100,
                      label_smoothing: float = 0.0, reduction: str = "mean") -> None:
    """Launcher: writes d loss / d logits, scaled by grad_loss (a scalar, or one value per row for
    reduction="none"), into grad_logits (the logits' shape and dtype, last dim contiguous; it may be
    the logits themselves)."""
    n_rows, n_cols = logits.shape
    if grad_loss.numel() not in (1, n_rows):
        raise ValueError(f"cross_entropy: grad of the loss has {grad_loss.numel()} elements, expected 1 or {n_rows}")
    if grad_logits.shape != logits.shape or grad_logits.dtype != logits.dtype or grad_logits.stride(-1) != 1:
        raise ValueError("cross_entropy: grad_logits must have the logits' shape and dtype and a contiguous last dim")
    grad_loss = grad_loss.reshape(-1).contiguous()
    block, warps = _vocab_block(n_cols)
    if n_rows and n_cols:
        _cross_entropy_bwd_kernel[(n_rows, cdiv(n_cols, block))](
            logits, target.contiguous(), lse, grad_logits, grad_loss, n_valid, logits.stride(0), grad_logits.stride(0),
            0 if grad_loss.numel() == 1 else 1, n_cols, ignore_index, float(label_smoothing),
            MEAN=reduction == "mean", BLOCK_SIZE=block, num_warps=warps)


# torch.library ops: a patched model still runs under torch.compile(fullgraph=True). Eager calls run
# the launchers directly (see fused_op).
def _cross_entropy_bwd_eager(logits, target, lse, n_valid, grad_loss, grad_logits, ignore_index, label_smoothing,
                             reduction):
    cross_entropy_bwd(logits, target, lse, n_valid, grad_loss, grad_logits, ignore_index, label_smoothing, reduction)
    torch.autograd.graph.increment_version(grad_logits)   # what the op's declared mutation does


def _forward_fake(logits, target, ignore_index, label_smoothing, reduction):
    rows = logits.new_empty((logits.shape[0],), dtype=torch.float32)
    return (rows.new_empty(rows.shape if reduction == "none" else ()), rows, rows.new_empty(()))


_forward = fused_op("fusion_advisor::cross_entropy_fwd", fake=_forward_fake)(cross_entropy_fwd)
# The gradient buffer is an argument the backward mutates (not an output), so that it can be the logits.
_backward = fused_op("fusion_advisor::cross_entropy_bwd", mutates_args=("grad_logits",), eager=_cross_entropy_bwd_eager,
                     fake=lambda *args: None)(cross_entropy_bwd)


class CrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, ignore_index, reduction, label_smoothing, upcast, inplace):
        if logits.stride(-1) != 1:
            logits = logits.contiguous()   # (then inplace has no storage of the caller's to write over)
            inplace = False
        loss, lse, n_valid = _forward(logits, target, ignore_index, label_smoothing, reduction)
        if ctx.needs_input_grad[0]:
            ctx.save_for_backward(logits, target, lse, n_valid)
        ctx.options = (ignore_index, label_smoothing, reduction, inplace)
        ctx.grad_consumed = False
        return loss if upcast else loss.to(logits.dtype)

    @staticmethod
    def backward(ctx, grad_loss):
        ignore_index, label_smoothing, reduction, inplace = ctx.options
        if inplace:   # the gradient goes over the logits: a second backward would read it as logits
            backward_once(ctx, "cross_entropy", "the logits, overwritten by their gradient,")
        logits, target, lse, n_valid = ctx.saved_tensors
        grad = logits.detach() if inplace else torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
        _backward(logits, target, lse, n_valid, grad_loss, grad, ignore_index, label_smoothing, reduction)
        return grad, None, None, None, None, None, None


def cross_entropy(logits: torch.Tensor, target: torch.Tensor, ignore_index: int = -100, reduction: str = "mean",
                  label_smoothing: float = 0.0, upcast: bool = True, inplace: bool = False) -> torch.Tensor:
    """Fused cross-entropy. upcast=True: the loss of `F.cross_entropy(logits.float(), target)` (fp32);
    upcast=False: that of `F.cross_entropy(logits, target)` (the logits' dtype). Both compute in fp32;
    the logits' gradient keeps their dtype. inplace=True writes the gradient over the logits."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"cross_entropy: reduction {reduction!r} is not one of {', '.join(REDUCTIONS)}")
    return CrossEntropyFunction.apply(logits, target, int(ignore_index), reduction, float(label_smoothing),
                                      upcast, inplace)


class CrossEntropyLoss(torch.nn.Module):
    """Drop-in for nn.CrossEntropyLoss without class weights. (tokens, vocab) logits with class-index
    targets run the fused kernel; other inputs ((N, C, d1...) logits, class-probability targets)
    run F.cross_entropy, uncounted, as nn.CrossEntropyLoss would. The loss keeps the logits' dtype
    as nn.CrossEntropyLoss's does, and is fp32 where autocast would run the loss in fp32."""

    def __init__(self, ignore_index: int = -100, reduction: str = "mean", label_smoothing: float = 0.0,
                 inplace: bool = False):
        super().__init__()
        if reduction not in REDUCTIONS:
            raise ValueError(f"cross_entropy: reduction {reduction!r} is not one of {', '.join(REDUCTIONS)}")
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.label_smoothing = label_smoothing
        self.inplace = inplace

    @classmethod
    def from_module(cls, module: torch.nn.Module) -> "CrossEntropyLoss":
        if getattr(module, "weight", None) is not None:
            raise ValueError("cross_entropy: class weights are not supported by the fused kernel")
        return cls(module.ignore_index, module.reduction, module.label_smoothing)

    def forward(self, logits, target):
        if logits.dim() != 2 or target.dim() != 1 or target.is_floating_point():
            return torch.nn.functional.cross_entropy(logits, target, ignore_index=self.ignore_index,
                                                     reduction=self.reduction, label_smoothing=self.label_smoothing)
        upcast = autocast.upcasts("aten::cross_entropy_loss", logits)
        return cross_entropy(logits, target, self.ignore_index, self.reduction, self.label_smoothing,
                             upcast=upcast, inplace=self.inplace)

    def extra_repr(self) -> str:
        return (f"ignore_index={self.ignore_index}, reduction={self.reduction!r}, "
                f"label_smoothing={self.label_smoothing}, inplace={self.inplace} (fused Triton)")


def reference(logits: torch.Tensor, target: torch.Tensor, ignore_index: int = -100, reduction: str = "mean",
              label_smoothing: float = 0.0, upcast: bool = True, inplace: bool = False) -> torch.Tensor:
    """Hugging Face ForCausalLMLoss's loss (`logits = logits.float()` then `nn.functional.cross_entropy`),
    verbatim; upcast=False skips the cast. `inplace` is the fused op's option and changes nothing here."""
    if upcast:
        logits = logits.float()
    return torch.nn.functional.cross_entropy(logits, target, ignore_index=ignore_index, reduction=reduction,
                                             label_smoothing=label_smoothing)


def liger(logits: torch.Tensor, target: torch.Tensor, ignore_index: int = -100, reduction: str = "mean",
          label_smoothing: float = 0.0, upcast: bool = True, inplace: bool = False) -> torch.Tensor:
    """Liger-Kernel's cross-entropy on the same inputs (it always writes the gradient over the logits)."""
    from liger_kernel.ops.cross_entropy import LigerCrossEntropyFunction
    loss = LigerCrossEntropyFunction.apply(logits, target, None, ignore_index, 0.0, label_smoothing, reduction)[0]
    # Liger returns the loss in the logits' dtype (bf16 here), where the upcast code it stands in for
    # returns fp32: bench had refused it on the dtype alone (8,192 x 50,257 on an H100)
    return loss.float() if upcast else loss.to(logits.dtype)


_OPTIONS = ("ignore_index", "reduction", "label_smoothing", "upcast", "inplace")


def make_inputs(params: dict, device: torch.device, requires_grad: bool = True) -> Inputs:
    """Logits ~ N(0, 2^2), targets uniform over the vocab, `ignored` (default 0.1) of them set to ignore_index."""
    dtype = param_dtype(params)
    tokens, vocab = params["tokens"], params["vocab"]
    ignore_index = params.get("ignore_index", -100)
    logits = (2.0 * torch.randn(tokens, vocab, device=device)).to(dtype).requires_grad_(requires_grad)
    target = torch.randint(0, vocab, (tokens,), device=device)
    target[torch.rand(tokens, device=device) < params.get("ignored", 0.1)] = ignore_index
    defaults = {"ignore_index": -100, "reduction": "mean", "label_smoothing": 0.0, "upcast": True, "inplace": False}
    kwargs = {k: params.get(k, v) for k, v in defaults.items()}
    return Inputs((logits, target), kwargs, grad_inputs=(0,) if requires_grad else ())


def fused_bytes(params: dict) -> dict:
    n, v = params["tokens"], params["vocab"]
    e = param_dtype(params).itemsize
    reduction = params.get("reduction", "mean")
    forward = n * v * e + 16 * n + (4 * n if reduction != "none" else 0) + (8 * n if reduction == "mean" else 0)
    return {"forward": forward, "backward": 2 * n * v * e + 12 * n + (4 * n if reduction == "none" else 4)}


def params_from_ops(ops: list[OpRecord]) -> dict | None:
    """Shapes, dtype and options from a traced `aten::cross_entropy_loss` (or a log_softmax followed
    by nll_loss); upcast when a cast of the same logits from bf16/fp16 to fp32 (HF's `logits.float()`,
    concrete dtype 6 = Float) precedes it."""
    loss_op = next((o for o in ops if o.short == "cross_entropy_loss"), None)
    label_smoothing = 0.0
    if loss_op is not None:
        if len(loss_op.concrete) > 5 and loss_op.concrete[5] not in ("", None):
            label_smoothing = float(loss_op.concrete[5])
    else:
        loss_op = next((o for o in ops if o.short in ("nll_loss_nd", "nll_loss", "nll_loss_forward")), None)
        if loss_op is None or not any(o.short == "log_softmax" for o in ops):
            return None
    if len(loss_op.dims) < 2 or len(loss_op.dims[0]) != 2 or not loss_op.types:
        return None
    tokens, vocab = loss_op.dims[0]
    dtype = dtype_from_trace(loss_op.types[0])
    if dtype is None:
        return None
    concrete = tuple(loss_op.concrete) + ("",) * 5
    reduction = _REDUCTION_OF_ENUM.get(concrete[3], "mean")
    ignore_index = int(concrete[4]) if concrete[4] not in ("", None) else -100
    upcast = False
    ops = list(ops)
    for o in ops[:ops.index(loss_op)]:
        source = dtype_from_trace(o.types[0]) if o.types else None
        if (o.short in ("to", "_to_copy") and source in (torch.bfloat16, torch.float16) and len(o.concrete) > 1
                and o.concrete[1] == "6" and o.dims and math.prod(o.dims[0]) == tokens * vocab):
            upcast, dtype = True, source
    return {"tokens": tokens, "vocab": vocab, "dtype": dtype_name(dtype), "upcast": upcast, "reduction": reduction,
            "ignore_index": ignore_index, "label_smoothing": label_smoothing}



# -- runtime patches of Hugging Face's losses -------------------------------------------------------------
_HF_LM_LOSSES = ("ForCausalLMLoss", "ForMaskedLMLoss")


def is_hf_causal_lm_loss(fn) -> bool:
    return (getattr(fn, "__module__", None) == "transformers.loss.loss_utils"
            and getattr(fn, "__name__", None) == "ForCausalLMLoss")


def is_hf_lm_loss(fn) -> bool:
    """HF's ForCausalLMLoss or ForMaskedLMLoss: a model's `loss_function`."""
    return (getattr(fn, "__module__", None) == "transformers.loss.loss_utils"
            and getattr(fn, "__name__", None) in _HF_LM_LOSSES)


def hf_lm_loss(original):
    """HF's ForCausalLMLoss (labels shifted) or ForMaskedLMLoss (not shifted): ignore_index -100, the
    mean over non-ignored tokens or the sum / num_items_in_batch, on the fused kernel. The logits
    stay in their dtype (no fp32 copy of the whole (tokens, vocab) tensor), the loss is fp32 as HF's,
    the gradient written in the backward into one logits-sized buffer. `original` is not called: the
    numerics check compares them."""
    shift = getattr(original, "__name__", None) == "ForCausalLMLoss"

    def lm_loss(logits, labels, vocab_size, num_items_in_batch=None, ignore_index=-100, shift_labels=None,
                **kwargs):
        if not shift:
            target = labels
        elif shift_labels is None:
            target = torch.nn.functional.pad(labels, (0, 1), value=ignore_index)[..., 1:]
        else:
            target = shift_labels
        target = target.reshape(-1).to(logits.device)
        reduction = "mean" if num_items_in_batch is None else "sum"
        loss = cross_entropy(logits.reshape(-1, vocab_size), target, ignore_index, reduction, upcast=True)
        if num_items_in_batch is not None:
            if torch.is_tensor(num_items_in_batch):
                num_items_in_batch = num_items_in_batch.to(loss.device)
            loss = loss / num_items_in_batch
        return loss

    lm_loss.fused_original = original
    return lm_loss


def is_torch_cross_entropy_loss(cls) -> bool:
    return cls is torch.nn.CrossEntropyLoss


def built_in_forward(original):
    """`CrossEntropyLoss(...)` where a modeling module builds its loss inside forward (Hugging Face's
    BERT, RoBERTa, DeBERTa... masked-LM heads: `loss_fct = CrossEntropyLoss()`, a global of that
    module, so no model attribute to swap): builds ours, or the original where ours cannot stand
    in (class weights)."""

    def build(*args, **kwargs):
        module = original(*args, **kwargs)
        try:
            return CrossEntropyLoss.from_module(module)
        except ValueError:
            return module

    build.fused_original = original
    return build


class _NnWithFusedLoss(types.ModuleType):
    """torch.nn as a modeling module sees it, with `CrossEntropyLoss` building ours (`built_in_forward`);
    every other name is torch.nn's own."""

    def __init__(self, nn):
        super().__init__(nn.__name__, nn.__doc__)
        self.fused_original = nn
        self.CrossEntropyLoss = built_in_forward(nn.CrossEntropyLoss)

    def __getattr__(self, name):
        return getattr(self.fused_original, name)


def is_torch_nn(module) -> bool:
    return module is torch.nn


def builds_loss(*names: str):
    """A FunctionPatch.used_in: does this model's code in this modeling module build its loss through
    `names` (("CrossEntropyLoss",): BERT's `loss_fct = CrossEntropyLoss()`; ("nn", "CrossEntropyLoss"):
    ELECTRA's `nn.CrossEntropyLoss()`, 21 modeling files of transformers 5.25)? Read off the bytecode
    names of the methods of the model's classes there (and their bases there), but __init__ (a loss
    built there is a module, swapped as one), and of the module's functions. Another head of the
    file (MobileNetV2's segmentation loss beside its classifier's, BEiT's masked-image one) does not
    make it a site: the swap would never be called."""
    def used_in(namespace: dict, classes: set) -> bool:
        owner = namespace.get("__name__")
        functions = [v for v in namespace.values() if inspect.isfunction(v) and v.__module__ == owner]
        for cls in classes:
            for base in cls.__mro__:
                if base.__module__ != owner:
                    continue
                for name, member in vars(base).items():   # (a forward under HF's decorators: what they wrap)
                    member = getattr(member, "__func__", member)
                    if inspect.isfunction(member) and name != "__init__":
                        functions.append(inspect.unwrap(member))
        return any(_looks_up(f, names) for f in functions)

    return used_in


def _looks_up(function, names: tuple[str, ...]) -> bool:
    """Does the function's bytecode load the global names[0] and, where more are given, the attributes
    names[1:] (`nn.CrossEntropyLoss`)? (co_names alone mixes globals and attributes: ELECTRA's
    `nn.CrossEntropyLoss` would count as the global CrossEntropyLoss it imports and never calls.)"""
    if not set(names) <= set(function.__code__.co_names):   # the cheap test first
        return False
    loads = [(i.opname, i.argval) for i in dis.get_instructions(function)]
    return (("LOAD_GLOBAL", names[0]) in loads
            and all(any(op in ("LOAD_ATTR", "LOAD_METHOD") and value == name for op, value in loads)
                    for name in names[1:]))


builds_nn_cross_entropy = builds_loss("nn", "CrossEntropyLoss")


def loss_module_example_inputs(model) -> list[Inputs]:
    """(logits, labels) as a masked-LM head passes them to its loss module: (tokens, vocab) in the
    model's dtype and device, some labels ignored."""
    ref = next((p for p in model.parameters() if p.is_floating_point()), None)
    dtype, device = (ref.dtype, ref.device) if ref is not None else (torch.float32, torch.device("cpu"))
    vocab = int(getattr(getattr(model, "config", None), "vocab_size", 0) or 1000)
    logits = (2.0 * torch.randn(14, vocab, device=device)).to(dtype).requires_grad_(True)
    labels = torch.randint(0, vocab, (14,), device=device)
    labels[:4] = -100
    return [Inputs((logits, labels), grad_inputs=(0,))]


def hf_loss_example_inputs(model) -> list[Inputs]:
    """(logits, labels, vocab_size) as LlamaForCausalLM passes them, over the model's vocab, in its
    dtype and device, some labels ignored; once with the mean, once with num_items_in_batch."""
    ref = next(p for p in model.parameters() if p.is_floating_point())
    # A model without a vocabulary (a vision backbone's default loss_function is ForCausalLMLoss too)
    # is checked on a made-up one: the function is the same either way.
    vocab = int(getattr(getattr(model, "config", None), "vocab_size", 0) or 1000)
    logits = (2.0 * torch.randn(2, 7, vocab, device=ref.device)).to(ref.dtype).requires_grad_(True)
    labels = torch.randint(0, vocab, (2, 7), device=ref.device)
    labels[:, :2] = -100
    n_items = (labels[:, 1:] != -100).sum() + 1  # not the plain count: the division is what is checked
    return [Inputs((logits, labels, vocab), grad_inputs=(0,)),
            Inputs((logits, labels, vocab), {"num_items_in_batch": n_items}, grad_inputs=(0,))]

PATTERN = register_pattern(
    __name__,
    description="cross-entropy (log_softmax + nll_loss, HF's logits.float() included) as one Triton pass "
                "each way: the loss and logsumexp forward, the gradient backward",
    forward_signature=r"(^| )(cross_entropy_loss|log_softmax( \S+)* nll_loss(_nd|_forward)?)( |$)",
    modules=("CrossEntropyLoss",),
    rewrites=(Rewrite("F.cross_entropy($logits, $target)", "cross_entropy($logits, $target)",
                      ("from fusion_advisor.kernels.cross_entropy import cross_entropy",)),),
    module_factory=CrossEntropyLoss.from_module,
    example_params={"tokens": 37, "vocab": 1000, "dtype": "bfloat16", "upcast": True, "reduction": "mean"},
    bench_params=tuple({"tokens": tokens, "vocab": vocab, "dtype": "bfloat16", "upcast": True, "reduction": "mean"}
                       for tokens in (4096, 8192, 16384) for vocab in (32768, 50257, 65536, 131072)),  # GPT-2's too
    liger=liger,
    function_patches=(FunctionPatch("loss_function", "instance", is_hf_lm_loss, hf_lm_loss, hf_loss_example_inputs),
                      FunctionPatch("CrossEntropyLoss", "module_global", is_torch_cross_entropy_loss, built_in_forward,
                                    loss_module_example_inputs, called_as=lambda cls: lambda *a, **k: cls()(*a, **k),
                                    used_in=builds_loss("CrossEntropyLoss")),
                      # `nn.CrossEntropyLoss()` in forward: the module's `nn`, torch.nn but for that class
                      FunctionPatch("nn", "module_global", is_torch_nn, _NnWithFusedLoss, loss_module_example_inputs,
                                    called_as=lambda nn: lambda *a, **k: nn.CrossEntropyLoss()(*a, **k),
                                    used_in=builds_nn_cross_entropy)),
)
