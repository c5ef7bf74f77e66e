"""Linear + cross-entropy (an LM head and its loss) without the (tokens, vocab) logits.

Replaces (`reference` below) `F.cross_entropy(F.linear(hidden, weight, bias).float(), target)`: what a
Hugging Face causal LM runs in training (`lm_head`, then ForCausalLMLoss's `logits.float()` and
cross-entropy). Eager keeps the whole logits tensor, its fp32 copy and logits-sized gradients alive;
the `cross_entropy` pattern removes the fp32 copies but still holds the bf16 logits and one
logits-sized gradient buffer (2 x 250 MiB at 4096 tokens x 32000 vocab).

Here the forward walks the rows in chunks. For each chunk:
    logits_c = hidden_c @ weight.T (+ bias)        in the input dtype, (chunk_rows, vocab)
    cross_entropy's forward kernel on logits_c, writing d loss / d logits over logits_c in place,
        scaled by 1/n_valid where n_valid counts the non-ignored targets of the WHOLE batch
        (a device scalar computed once up front: no host sync)
    grad_hidden[c] = grad_c @ weight
    grad_weight   += grad_c.T @ hidden_c            (fp32 accumulator by default, see below)
    grad_bias     += grad_c.sum(0)                  (fp32)
and the chunk's logits are dropped before the next. The forward returns the loss and keeps
grad_hidden / grad_weight / grad_bias; backward multiplies them by grad_output (a device-side
multiply, never a host check for 1.0). No input requiring grad: the gradient work is skipped.

Chunk size (`chunk_rows=None`): rows such that a chunk's logits are about the size of the hidden
states (rows * vocab ~ tokens * hidden: vocab/hidden chunks), rounded up to a multiple of 128
rows for the GEMMs' tiles. At 4096 tokens x hidden 2048 x vocab 32000: 16 chunks of 256 rows,
16 MiB of bf16 logits each.

Memory held at the end of the forward (N tokens, H hidden, V vocab, element size e):
    grad_hidden N*H*e, grad_weight V*H*e (and V*e for a bias)
    while the loop runs: one chunk's logits (~N*H*e) and the grad_weight accumulator:
        grad_weight_fp32=True (default): V*H*4, and V*H*(4+e) for a moment at the final cast;
        grad_weight_fp32=False: V*H*e, accumulated with addmm into the weight's dtype (each GEMM
            sums in fp32 and rounds once per chunk: N/chunk_rows roundings instead of one),
            as Liger-Kernel does by default.
At V=32000, H=2048 bf16 the fp32 accumulator is 250 MiB (375 MiB at the cast) against 125 MiB:
in a training step whose peak is the end of the forward that difference is on the peak
(benchmarks/apply_models.py measures both: fusion-advisor+flce (bf16) and +flce-fp32acc).

Cost: three GEMMs of 2*N*H*V flops (logits, grad_hidden, grad_weight), as eager's forward +
backward of the LM head: this op is compute-bound; `fused_bytes` counts its HBM traffic only.
Each chunk's weight-gradient GEMM also reads and writes the whole accumulator (V*H*4 bytes twice
in fp32: 8 GB over 16 chunks at V=32000, H=2048, ~1.7 ms of HBM time on an H200): larger chunks
(`chunk_rows`) trade logits memory for that traffic and for fuller GEMMs.

Eager only: the chunk loop launches cross_entropy's Triton kernel directly (no torch.library op),
so a torch.compile'd model should not use it (not tested under compile).
"""
from __future__ import annotations

import functools
import inspect
import math

import torch
import torch.nn.functional as F

from fusion_advisor.kernels.common import backward_once, cdiv, check_device, check_dtype
from fusion_advisor.kernels.cross_entropy import _cross_entropy_fwd_kernel, _vocab_block, is_hf_causal_lm_loss
from fusion_advisor import calls
from fusion_advisor.kernels.registry import (FunctionPatch, Inputs, OpRecord, dtype_from_trace,
                                             dtype_name, param_dtype, register_pattern)

REDUCTIONS = ("mean", "sum")


def default_chunk_rows(n_rows: int, hidden: int, vocab: int) -> int:
    """Rows per chunk: a chunk's logits about the size of the hidden states (vocab/hidden chunks),
    a multiple of 128 rows (GEMM tiles), never more than n_rows."""
    chunks = max(1, cdiv(vocab, max(hidden, 1)))
    rows = cdiv(cdiv(max(n_rows, 1), chunks), 128) * 128
    return max(1, min(rows, n_rows))


def _check(hidden, weight, target, bias, reduction) -> None:
    check_dtype(hidden, "linear_cross_entropy")
    check_device(hidden, weight, target, bias, op="linear_cross_entropy")
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"linear_cross_entropy: hidden must be (tokens, hidden) and weight (vocab, hidden), got "
                         f"{tuple(hidden.shape)} and {tuple(weight.shape)}")
    if weight.dtype != hidden.dtype or (bias is not None and bias.dtype != hidden.dtype):
        raise TypeError("linear_cross_entropy: hidden, weight and bias must share one dtype")
    if bias is not None and bias.shape != weight.shape[:1]:
        raise ValueError(f"linear_cross_entropy: bias shape {tuple(bias.shape)} is not ({weight.shape[0]},)")
    if target.dtype not in (torch.int64, torch.int32) or target.shape != hidden.shape[:1]:
        raise ValueError(f"linear_cross_entropy: target must be {hidden.shape[0]} class indices (int64/int32), got "
                         f"{tuple(target.shape)} {target.dtype}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"linear_cross_entropy: reduction {reduction!r} is not one of {', '.join(REDUCTIONS)}")


_ADDMM_OUT_DTYPE = [True]  # does this torch's addmm take out_dtype (bf16 GEMM into an fp32 output)?


def _accumulate_weight_grad(acc: torch.Tensor, grad_logits: torch.Tensor, hidden: torch.Tensor) -> None:
    """acc += grad_logits.T @ hidden. Same dtype: one addmm (fp32 sums inside, one rounding). An fp32
    acc with bf16/fp16 operands: addmm's out_dtype path on CUDA where torch has it, else the product
    in the operands' dtype added in fp32 (a weight-sized temporary in that dtype per chunk; torch >= 2.8
    on CUDA has the out_dtype path)."""
    if acc.dtype == grad_logits.dtype:
        torch.addmm(acc, grad_logits.t(), hidden, out=acc)
        return
    if acc.is_cuda and _ADDMM_OUT_DTYPE[0]:
        try:
            torch.addmm(acc, grad_logits.t(), hidden, out_dtype=acc.dtype, out=acc)
            return
        except (TypeError, RuntimeError, NotImplementedError):
            _ADDMM_OUT_DTYPE[0] = False
    acc.add_(grad_logits.t() @ hidden)  # the bf16 product is promoted inside the add: no fp32 temporary


class LinearCrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, target, bias, ignore_index, reduction, chunk_rows, grad_weight_fp32):
        calls.hit_eager("linear_cross_entropy")
        n_rows, n_hidden = hidden.shape
        vocab = weight.shape[0]
        need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_bias = bias is not None and ctx.needs_input_grad[3]
        need_grad = need_hidden or need_weight or need_bias
        hidden = hidden.contiguous()
        target = target.contiguous()
        rows = chunk_rows or default_chunk_rows(n_rows, n_hidden, vocab)
        mean = reduction == "mean"
        loss_rows = torch.empty(n_rows, dtype=torch.float32, device=hidden.device)
        # The whole batch's count, once: every chunk's gradient is scaled by the same 1/n_valid.
        n_valid = (target != ignore_index).sum().to(torch.float32) if mean else loss_rows
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        acc_dtype = torch.float32 if grad_weight_fp32 else weight.dtype
        grad_weight = torch.zeros(weight.shape, dtype=acc_dtype, device=weight.device) if need_weight else None
        grad_bias = torch.zeros(vocab, dtype=torch.float32, device=weight.device) if need_bias else None
        block, warps = _vocab_block(vocab)
        for start in range(0, n_rows, rows):
            end = min(start + rows, n_rows)
            hidden_c = hidden[start:end]
            if bias is not None:
                logits = torch.addmm(bias, hidden_c, weight.t())
            else:
                logits = hidden_c @ weight.t()
            # The gradient goes over the logits in place: nothing reads this chunk's logits again.
            _cross_entropy_fwd_kernel[(end - start,)](
                logits, target[start:end], logits, loss_rows[start:], loss_rows, n_valid, logits.stride(0),
                logits.stride(0), vocab, ignore_index, 0.0, COMPUTE_GRAD=need_grad, STORE_LSE=False, MEAN=mean,
                SMOOTHING=False, BLOCK_SIZE=block, num_warps=warps)
            if not need_grad:
                continue
            if need_hidden:
                torch.mm(logits, weight, out=grad_hidden[start:end])
            if need_weight:
                _accumulate_weight_grad(grad_weight, logits, hidden_c)
            if need_bias:
                grad_bias += logits.sum(0, dtype=torch.float32)
            del logits
        total = loss_rows.sum()
        loss = total / n_valid if mean else total  # all targets ignored: 0/0 = NaN, as PyTorch
        if grad_weight is not None:
            grad_weight = grad_weight.to(weight.dtype)
        if grad_bias is not None:
            grad_bias = grad_bias.to(bias.dtype)
        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)
        ctx.grad_consumed = False
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        backward_once(ctx, "linear_cross_entropy", "the fused gradients")  # they are scaled in place
        grads = [g.mul_(grad_loss) if g is not None else None for g in ctx.saved_tensors]
        return grads[0], grads[1], None, grads[2], None, None, None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor,
                         bias: torch.Tensor | None = None, ignore_index: int = -100, reduction: str = "mean",
                         chunk_rows: int | None = None, grad_weight_fp32: bool = True) -> torch.Tensor:
    """The fp32 loss of `F.cross_entropy(F.linear(hidden, weight, bias).float(), target)` without the
    full logits. hidden (tokens, H), weight (V, H), bias (V,) or None, target (tokens,).
    grad_weight_fp32=False accumulates the weight's gradient in its own dtype (less memory)."""
    _check(hidden, weight, target, bias, reduction)
    if chunk_rows is not None and chunk_rows < 1:
        raise ValueError(f"linear_cross_entropy: chunk_rows must be positive, got {chunk_rows}")
    return LinearCrossEntropyFunction.apply(hidden, weight, target, bias, int(ignore_index), reduction, chunk_rows,
                                            bool(grad_weight_fp32))


def reference(hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor, bias: torch.Tensor | None = None,
              ignore_index: int = -100, reduction: str = "mean", chunk_rows: int | None = None,
              grad_weight_fp32: bool = True) -> torch.Tensor:
    """An LM head (nn.Linear) then HF's ForCausalLMLoss cross-entropy, verbatim. The fused op's
    options (chunk_rows, grad_weight_fp32) change nothing here."""
    logits = F.linear(hidden, weight, bias)
    return F.cross_entropy(logits.float(), target, ignore_index=ignore_index, reduction=reduction)


def liger(hidden, weight, target, bias=None, ignore_index=-100, reduction="mean", chunk_rows=None,
          grad_weight_fp32=True):
    """Liger-Kernel's fused linear cross-entropy on the same inputs (its own chunking; fp32 logits
    inside, as HF's `.float()`)."""
    return _liger_loss(ignore_index, reduction)(weight, hidden, target, bias)


@functools.lru_cache(maxsize=None)
def _liger_loss(ignore_index: int, reduction: str):
    """One Liger loss module per option set: bench times the calls, not the module's construction."""
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
    return LigerFusedLinearCrossEntropyLoss(ignore_index=ignore_index, reduction=reduction)


def params_from_lm_head(linear: OpRecord, loss_params: dict) -> dict | None:
    """The fused op's params from a traced LM head (`aten::linear` of (..., H) by a (V, H) weight)
    and the cross_entropy params of the loss that read its output: None unless the linear's output
    is exactly the loss's (tokens, vocab) logits, in one float dtype, and the loss is HF's form
    (logits upcast to fp32, or fp32 already) without label smoothing."""
    if linear.short != "linear" or len(linear.dims) < 2 or len(linear.dims[0]) < 2 or len(linear.dims[1]) != 2:
        return None
    x, w = linear.dims[0], linear.dims[1]
    tokens, vocab = loss_params.get("tokens"), loss_params.get("vocab")
    if x[-1] != w[1] or (math.prod(x[:-1]), w[0]) != (tokens, vocab) or loss_params.get("label_smoothing"):
        return None
    if not (loss_params.get("upcast") or loss_params.get("dtype") == "float32"):
        return None
    if len(linear.types) < 2 or linear.types[0] != linear.types[1] or dtype_from_trace(linear.types[0]) is None:
        return None
    has_bias = len(linear.dims) > 2 and bool(linear.dims[2])
    return {"tokens": tokens, "hidden": x[-1], "vocab": vocab, "dtype": dtype_name(dtype_from_trace(linear.types[0])),
            "bias": has_bias, "reduction": loss_params.get("reduction", "mean"),
            "ignore_index": loss_params.get("ignore_index", -100), "ignored": 0.1,
            "grad_weight_fp32": GRAD_WEIGHT_FP32}  # what the HF patch runs


def make_inputs(params: dict, device: torch.device, requires_grad: bool = True) -> Inputs:
    """hidden ~ N(0, 1), weight ~ N(0, 4/H) (logits ~ N(0, 2^2)), bias ~ N(0, 1) when params["bias"],
    targets uniform, `ignored` (default 0.1) of them ignore_index."""
    dtype = param_dtype(params)
    tokens, n_hidden, vocab = params["tokens"], params["hidden"], params["vocab"]
    ignore_index = params.get("ignore_index", -100)
    hidden = torch.randn(tokens, n_hidden, device=device).to(dtype).requires_grad_(requires_grad)
    weight = (2.0 / n_hidden ** 0.5 * torch.randn(vocab, n_hidden, device=device)).to(dtype)
    weight.requires_grad_(requires_grad)
    bias = None
    if params.get("bias", False):
        bias = torch.randn(vocab, device=device).to(dtype).requires_grad_(requires_grad)
    target = torch.randint(0, vocab, (tokens,), device=device)
    target[torch.rand(tokens, device=device) < params.get("ignored", 0.1)] = ignore_index
    kwargs = {"ignore_index": ignore_index, "reduction": params.get("reduction", "mean"),
              "chunk_rows": params.get("chunk_rows"), "grad_weight_fp32": params.get("grad_weight_fp32", True)}
    grad_inputs = ((0, 1) + ((3,) if bias is not None else ())) if requires_grad else ()
    return Inputs((hidden, weight, target, bias), kwargs, grad_inputs=grad_inputs)


def fused_bytes(params: dict) -> dict:
    """HBM bytes of one call (the GEMMs' flops dominate; see the module docstring). Per chunk the
    weight is read by each GEMM (V*H*e, three times with grads) and the fp32 accumulator read and
    written; the logits chunk is written, read twice and overwritten by the CE kernel, then read by
    the two gradient GEMMs. Backward scales grad_hidden and grad_weight in place (read + write)."""
    n, h, v = params["tokens"], params["hidden"], params["vocab"]
    e = param_dtype(params).itemsize
    rows = params.get("chunk_rows") or default_chunk_rows(n, h, v)
    chunks = cdiv(n, rows)
    acc = 4 if params.get("grad_weight_fp32", True) else e
    logits = n * v * e
    forward = (3 * chunks * v * h * e          # the weight, read by the three GEMMs of each chunk
               + 2 * n * h * e                 # hidden read by the logits GEMM and the grad_weight GEMM
               + logits + 3 * logits           # logits written; the CE kernel reads twice, writes the grad
               + 2 * logits                    # the gradient GEMMs read it
               + n * h * e                     # grad_hidden written
               + 2 * chunks * v * h * acc      # the accumulator read and written by each chunk's GEMM
               + (v * h * (acc + e) if acc != e else 0)  # the final cast
               + 16 * n)                       # targets, per-row losses
    return {"forward": forward, "backward": 2 * (n * h + v * h) * e}


# -- runtime patch of a Hugging Face causal LM's forward ---------------------------------------------------
# The patched forward's options (module-wide, for benchmarks): the weight-gradient accumulator and
# rows per chunk (None: default_chunk_rows). Measured on an H200 at 4096 tokens x 2048 x 32000 bf16
# (benchmarks/linear_cross_entropy_chunks.py), fwd+bwd and peak memory: 256-row chunks with an fp32
# accumulator 5.91 ms / 391 MiB, with the weight's own bf16 4.27 ms / 157 MiB (Liger-Kernel's fused
# linear cross-entropy: 4.38 ms / 157 MiB; eager 3.77 ms / 1,500 MiB). The patch exists to save memory,
# so it accumulates in bf16 as Liger does; the functional's default stays fp32.
GRAD_WEIGHT_FP32 = False
CHUNK_ROWS: int | None = None


def _causal_lm(original) -> torch.nn.Module | None:
    model = getattr(original, "__self__", None)
    return model if isinstance(model, torch.nn.Module) else None


def is_hf_causal_lm_forward(original) -> bool:
    """The bound forward of a *ForCausalLM whose loss is HF's ForCausalLMLoss (or our fused one) and
    whose logits are a plain nn.Linear `lm_head` (no logit soft-capping or scaling in the config)."""
    model = _causal_lm(original)
    if model is None or getattr(original, "__func__", None) is not getattr(type(model), "forward", None):
        return False
    loss_fn = getattr(model, "loss_function", None)
    loss_fn = getattr(loss_fn, "fused_original", loss_fn)
    config = getattr(model, "config", None)
    scaled = any(getattr(config, k, None) not in (None, 1, 1.0)
                 for k in ("final_logit_softcapping", "logit_scale", "logits_scaling"))
    seq2seq = bool(getattr(config, "is_encoder_decoder", False))   # T5, BART: decoder inputs, their own loss
    return (isinstance(getattr(model, "lm_head", None), torch.nn.Linear) and is_hf_causal_lm_loss(loss_fn)
            and "labels" in inspect.signature(original).parameters and not scaled and not seq2seq)


def hf_causal_lm_forward(original):
    """The model's forward, except in training with labels: then the loss comes from
    linear_cross_entropy on the lm_head's input (HF's label shift, ignore_index, num_items_in_batch,
    logits_to_keep as the model applied it) and the output's `logits` is None (never materialised).
    A script that reads outputs.logits while training must not use this patch. Under autocast the
    original forward runs (the fused op wants one dtype for hidden and weight)."""
    model = _causal_lm(original)
    signature = inspect.signature(original)

    def forward(*args, **kwargs):
        # Autocast would hand the head fp32 weights and bf16 activations: the original runs there.
        if not model.training or any(torch.is_autocast_enabled(d) for d in ("cuda", "cpu")):
            return original(*args, **kwargs)
        bound = signature.bind_partial(*args, **kwargs)
        labels = bound.arguments.get("labels")
        if labels is None:
            return original(*args, **kwargs)
        bound.arguments["labels"] = None
        extra = next((bound.arguments.get(p.name) or {} for p in signature.parameters.values()
                      if p.kind is inspect.Parameter.VAR_KEYWORD), {})
        lm_head = model.lm_head
        captured = []

        def head_input(hidden):  # records the lm_head's input; the logits are never computed
            captured.append(hidden)
            return hidden.new_empty(hidden.shape[:-1] + (0,))
        had_forward, before = "forward" in vars(lm_head), vars(lm_head).get("forward")
        lm_head.forward = head_input
        try:
            out = original(*bound.args, **bound.kwargs)
        finally:
            if had_forward:
                vars(lm_head)["forward"] = before
            else:
                vars(lm_head).pop("forward", None)
        if len(captured) != 1:
            raise RuntimeError(f"linear_cross_entropy: the lm_head ran {len(captured)} times in one forward")
        hidden = captured[0]
        ignore_index = extra.get("ignore_index", -100)
        shift_labels = extra.get("shift_labels")
        if shift_labels is None:
            shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
        num_items = extra.get("num_items_in_batch")
        loss = linear_cross_entropy(hidden.reshape(-1, hidden.shape[-1]), lm_head.weight,
                                    shift_labels.reshape(-1).to(hidden.device), lm_head.bias, ignore_index,
                                    "mean" if num_items is None else "sum", CHUNK_ROWS, GRAD_WEIGHT_FP32)
        if num_items is not None:
            loss = loss / (num_items.to(loss.device) if torch.is_tensor(num_items) else num_items)
        if isinstance(out, tuple):
            return (loss,) + tuple(out[1:])
        fields = {k: getattr(out, k) for k in getattr(out, "__dataclass_fields__", {})}
        fields.update(loss=loss, logits=None)
        return type(out)(**fields)

    forward.fused_original = original
    return forward


def check_hf_forward(model, original, replacement) -> str | None:
    """None when, in training mode on a small random batch (some labels ignored; once with the mean,
    once with num_items_in_batch), the replacement's loss and every parameter's gradient match the
    original forward's (the tolerance table; grads as sums over the batch's tokens). The model's
    gradients and train/eval flags are restored; dropout draws the same masks in both runs."""
    from fusion_advisor.kernels.tolerances import tolerance
    params = [p for p in model.parameters() if p.requires_grad]
    ref = params[0] if params else next(model.parameters())
    vocab = int(model.config.vocab_size)
    ids = torch.randint(0, vocab, (2, 9), device=ref.device)
    labels = ids.clone()
    labels[0, :3] = -100
    n_items = (labels[:, 1:] != -100).sum() + 1  # not the plain count: the division is what is checked
    saved_grads = [p.grad for p in params]
    modes = [(m, m.training) for m in model.modules()]
    devices = [ref.device] if ref.device.type == "cuda" else []
    model.train()
    try:
        for extra in ({}, {"num_items_in_batch": n_items}):
            runs = []
            for fn in (original, replacement):
                for p in params:
                    p.grad = None
                with torch.random.fork_rng(devices=devices):
                    torch.manual_seed(0)
                    loss = fn(input_ids=ids, labels=labels, **extra).loss
                    loss.backward()
                runs.append((loss.detach(), [p.grad for p in params]))
            (want_loss, want_grads), (got_loss, got_grads) = runs
            try:
                torch.testing.assert_close(got_loss, want_loss, **tolerance(ref.dtype))
                for name_p, got, want in zip(params, got_grads, want_grads):
                    if (got is None) != (want is None):
                        return "a parameter got a gradient from one forward and not the other"
                    if got is not None:
                        torch.testing.assert_close(got, want, **tolerance(ref.dtype, ids.numel()))
            except AssertionError as exc:
                return str(exc).strip().splitlines()[0]
        return None
    finally:
        for p, g in zip(params, saved_grads):
            p.grad = g
        for m, training in modes:
            m.training = training


PATTERN = register_pattern(
    __name__,
    description="LM head + cross-entropy in row chunks: the (tokens, vocab) logits never exist; the "
                "gradients are computed in the forward",
    # No forward_signature: the LM head's GEMM is never inside a memory-bound chain. The analyzer
    # derives this candidate from a matched cross_entropy cluster and the linear that fed it
    # (analyzers/lm_head_loss.py, params_from_lm_head above).
    goal="memory",
    liger=liger,
    example_params={"tokens": 37, "hidden": 48, "vocab": 300, "dtype": "bfloat16", "reduction": "mean",
                    "chunk_rows": 16},
    bench_params=tuple({"tokens": tokens, "hidden": hidden, "vocab": vocab, "dtype": "bfloat16", "reduction": "mean"}
                       for tokens, hidden, vocab in ((4096, 2048, 32000), (8192, 4096, 128256))),
    # checked on the whole model (loss and every parameter's gradient), not on the forward's inputs
    function_patches=(FunctionPatch("forward", "instance", is_hf_causal_lm_forward, hf_causal_lm_forward,
                                    lambda model: [], check=check_hf_forward),),
)
