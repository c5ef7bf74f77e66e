"""Kernel classes: what kind of work each GPU kernel does, from its name and the op that
launched it.

Names alone are ambiguous (a `cudnn::fusion::...` kernel may be attention, a `splitKreduce` is
part of a GEMM, a `Memset` belongs to whatever op asked for zeroed memory); the launching op
settles most of it. Order matters: the first matching rule wins, and the specific classes
(communication, attention, conv) come before the generic ones (gemm, elementwise).
"""
from __future__ import annotations

import re

import numpy as np
import pandas as pd

from fusion_advisor.analyzers.trace import Trace

CLASSES = ("gemm", "conv", "attention", "normalization", "softmax", "reduction", "elementwise",
           "memcpy", "memset", "communication", "triton", "other")


def _rx(*parts: str) -> re.Pattern:
    return re.compile("|".join(parts), re.IGNORECASE)


def _ops(*names: str) -> set[str]:
    return {n if "::" in n else "aten::" + n for n in names}


_ATTENTION_OPS = _ops("scaled_dot_product_attention", "_scaled_dot_product_flash_attention",
                      "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention",
                      "_flash_attention_forward", "_flash_attention_backward", "_efficient_attention_forward",
                      "_efficient_attention_backward", "_cudnn_attention_forward", "_cudnn_attention_backward",
                      "_scaled_dot_product_flash_attention_backward",
                      "_scaled_dot_product_efficient_attention_backward",
                      "_scaled_dot_product_cudnn_attention_backward")
_CONV_OPS = _ops("convolution", "_convolution", "cudnn_convolution", "cudnn_convolution_transpose",
                 "convolution_backward", "conv1d", "conv2d", "conv3d")
_GEMM_OPS = _ops("mm", "addmm", "bmm", "baddbmm", "matmul", "linear", "mv", "addmv", "_scaled_mm", "_int_mm",
                 "addbmm", "dot")
_NORM_OPS = _ops("native_layer_norm", "native_layer_norm_backward", "_fused_rms_norm", "_fused_rms_norm_backward",
                 "native_batch_norm", "native_batch_norm_backward", "cudnn_batch_norm", "cudnn_batch_norm_backward",
                 "native_group_norm", "native_group_norm_backward", "_native_batch_norm_legit",
                 "batch_norm_backward")
_SOFTMAX_OPS = _ops("_softmax", "_log_softmax", "_softmax_backward_data", "_log_softmax_backward_data")
_REDUCTION_OPS = _ops("sum", "mean", "amax", "amin", "max", "min", "prod", "var", "std", "var_mean", "std_mean",
                      "linalg_vector_norm", "norm", "argmax", "argmin", "any", "all", "logsumexp", "cumsum",
                      "nll_loss_forward", "count_nonzero", "nansum")

# (class, kernel-name pattern, launching ops) in order. The launching op decides first (a
# cudnn::fusion helper launched by _cudnn_attention_backward is attention); the kernel name
# decides for ops in no set (a reduce_kernel launched by aten::sum is a reduction).
_RULES: list[tuple[str, re.Pattern | None, set[str]]] = [
    ("communication", _rx(r"nccl", r"all_?reduce", r"all_?gather", r"reduce_?scatter", r"cross_device",
                          r"multimem", r"nvshmem"), set()),
    ("attention", _rx(r"fmha", r"flash", r"attention", r"_sdpa_", r"\bsdpa", r"mha_", r"AttentionKernel"),
     _ATTENTION_OPS),
    ("conv", _rx(r"conv", r"implicit_?gemm", r"fprop", r"dgrad", r"wgrad", r"winograd"), _CONV_OPS),
    ("gemm", _rx(r"^nvjet", r"gemm", r"cutlass", r"cublas", r"splitKreduce", r"wgmma", r"matmul", r"^sm\d+_xmma"),
     _GEMM_OPS),
    ("triton", _rx(r"^triton_", r"^triton\b"), _ops("CompiledFunction", "CompiledFunctionBackward")),
    ("normalization", _rx(r"layer_?norm", r"rms_?norm", r"batch_?norm", r"group_?norm", r"GammaBeta",
                          r"RowwiseMoments", r"welford"), _NORM_OPS),
    ("softmax", _rx(r"softmax"), _SOFTMAX_OPS),
    ("reduction", _rx(r"reduce_kernel", r"ReduceOp", r"DeviceReduce", r"reduce_cuda_kernel", r"argmax", r"argmin",
                      r"DeviceScan", r"cumsum|cumprod"), _REDUCTION_OPS),
    ("elementwise", _rx(r"elementwise", r"multi_tensor_apply", r"CatArrayBatchedCopy", r"Fill(Functor)?",
                        r"gather", r"scatter", r"index_?(select|put|add)", r"indexSelect", r"dropout",
                        r"copy_kernel", r"masked_fill", r"where_kernel", r"fused_adam", r"distribution"),
     _ops("nll_loss_backward")),   # writes one gradient element per row: a scatter, whatever its name
]


def kernel_class(name: str, op_name: str | None = None, kind: str = "kernel") -> str:
    """The class of one kernel, from its name, the op that launched it, and its kind."""
    if kind == "memcpy" or name.startswith("Memcpy"):
        return "memcpy"
    if kind == "memset" or name.startswith("Memset"):
        return "memset"
    if op_name is not None:
        for cls, _, ops in _RULES:
            if op_name in ops:
                return cls
    for cls, pattern, _ in _RULES:
        if pattern is not None and pattern.search(name):
            return cls
    return "other"


def classify(trace: Trace) -> pd.Series:
    """One class per row of `trace.kernels`."""
    k = trace.kernels
    if k.empty:
        return pd.Series([], dtype=object, name="kernel_class")
    names = trace.ops["name"].to_numpy(dtype=object) if len(trace.ops) else np.array([], dtype=object)
    op_rows = k["op_row"].to_numpy()
    cache: dict[tuple, str] = {}
    out = []
    for name, kind, row in zip(k["name"].tolist(), k["kind"].tolist(), op_rows.tolist()):
        op_name = names[row] if row >= 0 else None
        key = (name, kind, op_name)
        if key not in cache:
            cache[key] = kernel_class(name, op_name, kind)
        out.append(cache[key])
    return pd.Series(out, index=k.index, dtype=object, name="kernel_class")


def class_summary(trace: Trace) -> list[dict]:
    """GPU time per step by kernel class, largest first: class, calls_per_step,
    measured_us_per_step, pct (of all kernel time). Per ProfilerStep where the trace has them,
    else for the whole trace."""
    k = trace.kernels
    if k.empty:
        return []
    frame = pd.DataFrame({"kernel_class": classify(trace), "dur": k["dur"].to_numpy(dtype=float),
                          "step": k["step"].to_numpy()})
    steps = trace.step_ids
    if steps:
        frame = frame[frame["step"].isin(steps)]
    n_steps = max(len(steps), 1)
    total = float(frame["dur"].sum()) or 1.0
    grouped = frame.groupby("kernel_class")["dur"].agg(["count", "sum"]).sort_values("sum", ascending=False)
    return [{"class": cls, "calls_per_step": float(row["count"]) / n_steps,
             "measured_us_per_step": float(row["sum"]) / n_steps, "pct": 100.0 * float(row["sum"]) / total}
            for cls, row in grouped.iterrows()]
