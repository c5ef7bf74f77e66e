"""A Linear whose width misaligns its GEMMs, computed at an aligned width:
y = F.linear(pad(x), pad(W), pad(b))[..., :out_features], made contiguous.

Tensor-core GEMMs want each matrix's leading dimension a multiple of 16 bytes (8 bf16/fp16
elements). An LM head over a vocabulary of 50,265 (RoBERTa, BART), 50,257 (GPT-2) or 51,865
(Whisper) gives the logits, the weight and the weight's gradient an odd leading dimension.
torch.compile pads such GEMMs (inductor's pad_mm); nanoGPT pads GPT-2's vocabulary to 50,304 in the
model itself. Why it is worth a candidate: in the zoo's profiles on an H100 (zoo-h100-b843f28/),
RoBERTa (vocab 50,265) kept the GPU busy 88.7 ms a step, 18.6 of them in memory-bound kernels, where
BERT at the same width and batch (vocab 30,522) was busy 43.4 ms with 14.6 memory-bound: 41 ms more
outside memory-bound kernels for a head with 1.65x the FLOPs; whole-model compile took RoBERTa from
93.1 to 62.8 ms. That the misaligned GEMMs are those 41 ms is a hypothesis; bench times eager and this on
the exact shape, and nothing is applied that it did not measure faster.

Each forward pads the weight (and bias) with zero rows up to a multiple of PAD_TO output features,
and the input with zero columns when in_features is misaligned, runs one aligned GEMM and copies the
first out_features columns out (a contiguous result, as eager's: code downstream may `.view()` the
logits). Autograd runs the same ops backwards: the output gradient is written into a zero-padded
buffer, then aligned GEMMs give dx and the padded dW, whose first rows are W's gradient.
Extra traffic a call: the padded weight (N_pad x K), the output's copy (2 x tokens x N) and the
padded gradient buffer (2 x tokens x N_pad), against three GEMMs of 2 x tokens x N x K FLOPs.

Runs anywhere PyTorch does (no Triton kernel): the module form wraps an existing nn.Linear (its own
weight and bias, shared: an optimizer, and a weight tied to the embeddings, keep working).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from fusion_advisor import calls
from fusion_advisor.kernels.registry import (Inputs, NotThisForm, OpRecord, dtype_from_trace, dtype_name,
                                             param_dtype, register_pattern)

PAD_TO = 64          # output features padded to a multiple of this (nanoGPT's 50,304 = 786 x 64)
ALIGN_ELEMENTS = 8   # 16 bytes of bf16/fp16: a dimension that is a multiple of this is left alone


def misaligned(features: int) -> bool:
    return features % ALIGN_ELEMENTS != 0


def padded_size(features: int) -> int:
    return math.ceil(features / PAD_TO) * PAD_TO if misaligned(features) else features


def reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """nn.Linear's forward, verbatim."""
    return F.linear(x, weight, bias)


def padded_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias) through GEMMs of aligned width (see the module docstring); an
    aligned weight runs F.linear itself."""
    out_features, in_features = weight.shape
    n_pad, k_pad = padded_size(out_features), padded_size(in_features)
    if (n_pad, k_pad) == (out_features, in_features):
        return F.linear(x, weight, bias)
    calls.hit_eager("padded_linear")
    if k_pad != in_features:
        x = F.pad(x, (0, k_pad - in_features))
    w = F.pad(weight, (0, k_pad - in_features, 0, n_pad - out_features))
    b = F.pad(bias, (0, n_pad - out_features)) if bias is not None else None
    return F.linear(x, w, b)[..., :out_features].contiguous()


class PaddedLinear(torch.nn.Module):
    """An nn.Linear's own weight and bias, run through `padded_linear`."""

    def __init__(self, linear: torch.nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias

    @classmethod
    def from_module(cls, module: torch.nn.Module) -> "PaddedLinear":
        if not isinstance(module, torch.nn.Linear) or type(module).forward is not torch.nn.Linear.forward:
            raise NotThisForm(f"{type(module).__name__} is not an nn.Linear")
        if not (misaligned(module.out_features) or misaligned(module.in_features)):
            raise NotThisForm(f"{module.in_features} -> {module.out_features} features: aligned already")
        return cls(module)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return padded_linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"GEMMs at {padded_size(self.in_features)} -> {padded_size(self.out_features)}")


def module_fits(module: torch.nn.Module, params: dict) -> bool:
    """An nn.Linear of the cluster's width: with a result, only the shapes bench timed are swapped."""
    return (getattr(module, "in_features", None), getattr(module, "out_features", None)) == \
        (params.get("in_features"), params.get("out_features"))


def make_inputs(params: dict, device: torch.device, requires_grad: bool = True) -> Inputs:
    """Rows of N(0, 1), a weight of N(0, 1/in_features) (outputs of unit scale), a small bias."""
    dtype = param_dtype(params)
    tokens, k, n = params["tokens"], params["in_features"], params["out_features"]
    x = torch.randn(tokens, k, device=device).to(dtype).requires_grad_(requires_grad)
    weight = (torch.randn(n, k, device=device) / math.sqrt(k)).to(dtype).requires_grad_(requires_grad)
    args = [x, weight]
    if params.get("bias", False):
        args.append((0.1 * torch.randn(n, device=device)).to(dtype).requires_grad_(requires_grad))
    return Inputs(tuple(args), {}, grad_inputs=tuple(range(len(args))) if requires_grad else ())


def fused_bytes(params: dict) -> dict:
    """What the padded GEMMs and their copies move at least: the forward reads x and the weight,
    writes the padded weight and the padded output, reads it back and writes the result; the
    backward writes and reads the padded gradient, reads x and the padded weight, writes dx and
    the padded dW (whose slice is W's gradient)."""
    e = param_dtype(params).itemsize
    tokens, k, n = params["tokens"], params["in_features"], params["out_features"]
    n_pad, k_pad = padded_size(n), padded_size(k)
    forward = e * (tokens * k + n * k + n_pad * k_pad + 2 * tokens * n_pad + tokens * n)
    backward = e * (tokens * n + 2 * tokens * n_pad + tokens * k_pad + n_pad * k_pad + tokens * k + n_pad * k_pad)
    return {"forward": forward, "backward": backward}


def params_from_linear(record: OpRecord) -> dict | None:
    """Params of a traced `aten::linear` (input (..., K), weight (N, K), optional bias) whose N or K
    is not a multiple of ALIGN_ELEMENTS, in a float dtype; None otherwise."""
    if record.name != "aten::linear" or len(record.dims) < 2:
        return None
    x_dims, w_dims = record.dims[0], record.dims[1]
    if len(w_dims) != 2 or not x_dims or x_dims[-1] != w_dims[1]:
        return None
    out_features, in_features = w_dims
    if not (misaligned(out_features) or misaligned(in_features)):
        return None
    dtype = dtype_from_trace(record.types[0]) if record.types else None
    if dtype not in (torch.bfloat16, torch.float16, torch.float32):
        return None
    bias = len(record.dims) > 2 and tuple(record.dims[2]) == (out_features,)
    return {"tokens": math.prod(x_dims[:-1]), "in_features": in_features, "out_features": out_features,
            "bias": bias, "dtype": dtype_name(dtype)}


PATTERN = register_pattern(
    __name__,
    description="a Linear of misaligned width (an odd vocabulary) through GEMMs padded to a multiple of 64",
    # No forward_signature: a GEMM is never inside a memory-bound chain. The analyzer derives this
    # candidate from each forward aten::linear of misaligned width (analyzers/misaligned_gemm.py).
    replacement_kind="GEMMs (PyTorch's, at the padded width)",
    modules=("Linear",),
    module_factory=PaddedLinear.from_module,
    module_fits=module_fits,
    example_params={"tokens": 37, "in_features": 48, "out_features": 301, "bias": True, "dtype": "float32"},
    bench_params=tuple({"tokens": tokens, "in_features": k, "out_features": n, "bias": bias, "dtype": "bfloat16"}
                       for tokens, k, n, bias in ((8192, 768, 50265, True), (16384, 1024, 50257, False),
                                                  (32768, 768, 50265, True), (8192, 512, 51865, False))),
)
