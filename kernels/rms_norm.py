"""RMSNorm: y = weight * (x * rsqrt(mean(x^2, -1) + eps)).to(x.dtype)

and, with gemma=True, GemmaRMSNorm's y = (x * rsqrt(mean(x^2, -1) + eps) * (1 + weight)).to(x.dtype),
computed in fp32 and rounded once (the same kernels, a constexpr flag).

Replaces the decomposed form users write (Hugging Face's LlamaRMSNorm, `reference` below), which
eager PyTorch runs as 6-8 kernels: to(fp32), pow, mean, add, rsqrt, mul, to(dtype), mul.

Bytes for x of M rows x N (element size e, weight size w, output size o):
  unfused forward (bf16 x and weight, the cast included): each of the ~8 kernels reads and writes a
      full M x N tensor, most in fp32: about M*N*(2+4 + 4+4 + 4 + 4+4 + 4+2 + 2+2+2) bytes
  fused forward:  read x once, write y once, write rstd: M*N*(e+o) + N*w + 4*M
  fused backward: read dy, x, rstd, weight; write dx and per-program partial dweight:
                  M*N*(o+e+e) + 4*M + N*w + 2*P*N*4  (P programs: norm_tiles.backward_programs_for)
`fused_bytes` returns exactly these numbers; the cost model prices them.

The kernels are norm_core.py's (`_rms_norm_fwd_kernel`, `_rms_norm_bwd_kernel`: the shared norm
tiles with RMSNorm's flags): several rows a program for short rows, a persistent backward.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from fusion_advisor.kernels import norm_core, norm_tiles
from fusion_advisor.kernels.common import as_rows, check_device, check_dtype
from fusion_advisor.kernels.fused_op import fused_op
from fusion_advisor.kernels.registry import (Inputs, OpRecord, dtype_from_trace, param_dtype, register_pattern,
                                             training_shapes)


def _out_dtype(x: torch.Tensor, weight: Optional[torch.Tensor], gemma: bool = False) -> torch.dtype:
    if gemma or weight is None:   # Gemma: output.type_as(x); no weight: the normalised x in its dtype
        return x.dtype
    return torch.promote_types(x.dtype, weight.dtype)


def rms_norm_fwd(x: torch.Tensor, weight: Optional[torch.Tensor], eps: float,
                 gemma: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Launcher: (y, rstd). x may have any leading dims; weight has shape (x.shape[-1],), or is None
    (the unweighted RMSNorm of DeepSeek-V4's and others' q/k norms)."""
    check_dtype(x, "rms_norm")
    check_device(x, weight, op="rms_norm")
    if weight is not None and weight.shape != (x.shape[-1],):
        raise ValueError(f"rms_norm: weight shape {tuple(weight.shape)} does not match x's last dim {x.shape[-1]}")
    if gemma and weight is None:
        raise ValueError("rms_norm: the Gemma form (1 + weight) needs a weight")
    x2 = as_rows(x, "rms_norm")
    y, _, _, rstd = norm_core.norm_fwd(x2, None, weight.contiguous() if weight is not None else None, None, eps,
                                       rms=True, out_dtype=_out_dtype(x, weight, gemma), gemma=gemma)
    return y.view(x.shape), rstd


def rms_norm_bwd(dy: torch.Tensor, x: torch.Tensor, weight: Optional[torch.Tensor], rstd: torch.Tensor,
                 gemma: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Launcher: (dx, dweight); dweight is empty without a weight (a custom op returns tensors)."""
    dx, dw, _ = norm_core.norm_bwd(as_rows(dy, "rms_norm"), None, as_rows(x, "rms_norm"),
                                   weight.contiguous() if weight is not None else None, None, None, rstd, rms=True,
                                   gemma=gemma)
    return dx.view(x.shape), dw if dw is not None else x.new_empty(0)


# torch.library ops: a patched model still runs under torch.compile(fullgraph=True). Eager calls run
# the launchers directly (see fused_op).
_forward = fused_op("fusion_advisor::rms_norm_fwd", fake=lambda x, weight, eps, gemma: (
    x.new_empty(x.shape, dtype=_out_dtype(x, weight, gemma)),
    x.new_empty((x.numel() // x.shape[-1] if x.dim() else 1,), dtype=torch.float32)))(rms_norm_fwd)
# dx is allocated contiguous (from the row view), whatever x's strides: so is its fake.
_backward = fused_op("fusion_advisor::rms_norm_bwd", fake=lambda dy, x, weight, rstd, gemma: (
    x.new_empty(x.shape), weight.new_empty(weight.shape) if weight is not None else x.new_empty(0)))(rms_norm_bwd)


class RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps, gemma):
        y, rstd = _forward(x, weight, eps, gemma)
        ctx.save_for_backward(x, weight, rstd)
        ctx.gemma = gemma
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, rstd = ctx.saved_tensors
        dx, dw = _backward(dy, x, weight, rstd, ctx.gemma)
        return dx, dw if weight is not None else None, None, None


def rms_norm(x: torch.Tensor, weight: Optional[torch.Tensor], eps: float = 1e-6, gemma: bool = False) -> torch.Tensor:
    """Fused RMSNorm, numerically LlamaRMSNorm's forward and backward; gemma=True: GemmaRMSNorm's
    ((1 + weight), in fp32, rounded once to x's dtype); weight None: x * rsqrt(mean(x^2) + eps),
    computed in fp32 and rounded once to x's dtype."""
    return RMSNormFunction.apply(x, weight, eps, bool(gemma))


class RMSNorm(torch.nn.Module):
    """Drop-in for LlamaRMSNorm / MistralRMSNorm / Qwen2RMSNorm (same `weight` and eps); with
    gemma=True for GemmaRMSNorm (its weight applies as 1 + weight, zeros at init)."""

    gemma = False   # instances built by __new__ (from_module, module_forms) read the class default

    def __init__(self, hidden_size: int, eps: float = 1e-6, device=None, dtype=None, gemma: bool = False):
        super().__init__()
        init = torch.zeros if gemma else torch.ones
        self.weight = torch.nn.Parameter(init(hidden_size, device=device, dtype=dtype))
        self.variance_epsilon = eps
        self.gemma = gemma

    @classmethod
    def from_module(cls, module: torch.nn.Module) -> "RMSNorm":
        """Wrap an existing RMSNorm module's parameter (shared, not copied)."""
        eps = getattr(module, "variance_epsilon", getattr(module, "eps", 1e-6))
        new = cls.__new__(cls)
        torch.nn.Module.__init__(new)
        new.weight = module.weight
        new.variance_epsilon = float(eps)
        return new

    def forward(self, x):
        return rms_norm(x, self.weight, self.variance_epsilon, self.gemma)

    def extra_repr(self) -> str:
        form = ", 1 + weight (Gemma)" if self.gemma else ""
        features = tuple(self.weight.shape) if self.weight is not None else "no weight"
        return f"{features}, eps={self.variance_epsilon}{form} (fused Triton)"


def gemma_reference(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Hugging Face GemmaRMSNorm.forward, verbatim."""
    output = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps)
    output = output * (1.0 + weight.float())
    return output.type_as(x)


def reference(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Hugging Face LlamaRMSNorm.forward, verbatim."""
    input_dtype = x.dtype
    hidden_states = x.to(torch.float32)
    variance = hidden_states.pow(2).mean(-1, keepdim=True)
    hidden_states = hidden_states * torch.rsqrt(variance + eps)
    return weight * hidden_states.to(input_dtype)


def liger(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Liger-Kernel's RMSNorm on the same inputs (llama casting mode, as LlamaRMSNorm)."""
    from liger_kernel.ops.rms_norm import LigerRMSNormFunction
    return LigerRMSNormFunction.apply(x, weight, eps, 0.0, "llama")


def make_inputs(params: dict, device: torch.device, requires_grad: bool = True) -> Inputs:
    dtype = param_dtype(params)
    wdtype = param_dtype(params, "weight_dtype")
    x = torch.randn(params["shape"], dtype=dtype, device=device, requires_grad=requires_grad)
    w = (1.0 + 0.1 * torch.randn(params["shape"][-1], device=device)).to(wdtype).requires_grad_(requires_grad)
    return Inputs((x, w), {"eps": params.get("eps", 1e-6)}, grad_inputs=(0, 1) if requires_grad else ())


def fused_bytes(params: dict) -> dict:
    shape = params["shape"]
    n = shape[-1]
    m = math.prod(shape[:-1])
    e = param_dtype(params).itemsize
    w = param_dtype(params, "weight_dtype").itemsize
    o = max(e, w)
    programs = norm_tiles.backward_programs_for(n, m, params.get("num_sms", 132), e)
    return {"forward": m * n * (e + o) + n * w + 4 * m,
            "backward": m * n * (o + e + e) + 4 * m + n * w + 2 * programs * n * 4}


def params_from_ops(ops: list[OpRecord]) -> dict | None:
    """Shapes, dtypes and eps from the traced pow/mean/add/rsqrt/mul chain. Each is read off the
    op at its place in the chain (the cast just before pow, the add and the weight mul after it),
    so ops around the chain in the list (a residual add, the next layer's muls) do not leak in."""
    pow_at = next((i for i, o in enumerate(ops) if o.short == "pow"), None)
    if pow_at is None or not ops[pow_at].dims or not ops[pow_at].dims[0]:
        return None
    x_op = ops[pow_at]
    shape = list(x_op.dims[0])
    cast = next((o for o in reversed(ops[:pow_at]) if o.short in ("to", "_to_copy")), None)
    in_dtype = dtype_from_trace(cast.types[0]) if cast is not None and cast.types else dtype_from_trace(x_op.types[0])
    after = ops[pow_at + 1:]
    eps = 1e-6  # LlamaRMSNorm's default: eps is a wrapped Python float there, which traces omit
    add = next((o for o in after if o.short == "add"), None)
    if add is not None and len(add.concrete) > 1 and add.concrete[1] not in ("", None):
        try:
            eps = float(add.concrete[1])
        except ValueError:
            pass
    weight_mul = [o for o in after if o.short == "mul"][1:2]  # after hidden_states * rsqrt(...)
    w_dtype = in_dtype
    if weight_mul and weight_mul[0].types:
        w_dtype = dtype_from_trace(weight_mul[0].types[0]) or in_dtype
    if in_dtype is None:
        return None
    return {"shape": shape, "dtype": str(in_dtype).replace("torch.", ""),
            "weight_dtype": str(w_dtype).replace("torch.", ""), "eps": eps}


PATTERN = register_pattern(
    __name__,
    description="RMSNorm (LlamaRMSNorm-style pow/mean/rsqrt/mul chain) as one Triton kernel each way",
    forward_signature=r"pow mean add rsqrt mul",
    modules=("LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm", "RMSNorm"),
    module_factory=RMSNorm.from_module,
    module_import="fusion_advisor.kernels.rms_norm:RMSNorm",
    example_params={"shape": [6, 42, 431], "dtype": "float32", "eps": 1e-6},
    bench_params=training_shapes(lambda tokens, hidden: {"shape": [tokens, hidden], "dtype": "bfloat16", "eps": 1e-6}),
    liger=liger,
)
