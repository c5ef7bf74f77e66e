"""What torch.autocast does to an op we replace, asked of PyTorch itself, so that a fused kernel
called inside the user's autocast region returns what eager returns there.

Autocast changes an op only where PyTorch registers an autocast kernel for it on that device
type (the dispatcher knows: `AutocastCUDA`, `AutocastCPU`...). For the ops our kernels replace
(norms, softmax, pow/exp/rsqrt, sums) that kernel is autocast's "fp32" policy: every floating
argument below fp32 is cast to fp32 and the op runs and returns in fp32. CUDA registers it for
layer_norm, group_norm, softmax and the others; CPU registers none of them (there, F.layer_norm of a
bf16 input with fp32 weights under autocast is the mixed-dtype kernel and returns bf16). GEMMs
(the "lower precision" policy) are never replaced by our kernels and are not handled here.
"""
from __future__ import annotations

import contextlib
import functools

import torch

_DISPATCH_KEYS = {"cuda": "AutocastCUDA", "cpu": "AutocastCPU", "xpu": "AutocastXPU", "mps": "AutocastMPS"}
_BELOW_FP32 = (torch.float16, torch.bfloat16)


# (op, device type) -> has autocast a kernel for it there. A plain dict, filled outside any traced
# region (for the ops the kernels ask about, at import): torch.compile reads it like a constant.
_KERNELS: dict[tuple[str, str], bool] = {}
# The ops our kernels' wrappers ask about (layer_norm.py, add_layer_norm.py, group_norm.py, bias_act.py).
_ASKED = ("aten::layer_norm", "aten::group_norm", "aten::pow.Tensor_Scalar")


def _has_autocast_kernel(op: str, device_type: str) -> bool:
    known = _KERNELS.get((op, device_type))
    if known is None:
        key = _DISPATCH_KEYS.get(device_type)
        try:
            known = key is not None and torch._C._dispatch_has_kernel_for_dispatch_key(op, key)
        except RuntimeError:   # an op or key this torch does not know
            known = False
        _KERNELS[(op, device_type)] = known
    return known


for _op in _ASKED:
    for _device_type in _DISPATCH_KEYS:
        _has_autocast_kernel(_op, _device_type)


@functools.lru_cache(maxsize=None)
def has_autocast_kernel(short_name: str, device_type: str = "cuda") -> bool:
    """Does autocast on `device_type` handle some overload of aten::<short_name> (e.g. "pow")?"""
    packet = getattr(torch.ops.aten, short_name, None)
    if packet is None:
        return False
    return any(_has_autocast_kernel(f"aten::{short_name}" + ("" if o == "default" else f".{o}"), device_type)
               for o in packet.overloads())


def upcasts(op: str, *tensors: torch.Tensor | None) -> bool:
    """Would eager run `op` (an aten name, "aten::layer_norm") in fp32 on these tensors here:
    autocast is on for their device type, it has a kernel for `op` there, and a floating argument
    is below fp32."""
    # (no truth test of a list here: torch.compile(fullgraph=True) cannot trace `bool(list)`)
    first = next((t for t in tensors if t is not None), None)
    if first is None:
        return False
    device_type = first.device.type
    if not torch.is_autocast_enabled(device_type):   # every call outside autocast stops here
        return False
    return _upcast_when_enabled(op, device_type, [t.dtype for t in tensors if t is not None])


def runs_in_fp32(op: str, device_type: str, *dtypes: torch.dtype) -> bool:
    """`upcasts` for arguments of these dtypes on this device type."""
    # (the first test is the one every call outside autocast pays: one C call)
    return torch.is_autocast_enabled(device_type) and _upcast_when_enabled(op, device_type, dtypes)


def _upcast_when_enabled(op: str, device_type: str, dtypes) -> bool:
    """With autocast on for device_type: does it have a kernel for `op` and a dtype below fp32?
    Under torch.compile too: the compiler applies autocast to aten ops, not to our custom ops, so
    the cast is ours to make there as well (it traces as a plain `to`)."""
    return _has_autocast_kernel(op, device_type) and any(d in _BELOW_FP32 for d in dtypes)


def traced_region(op: str, params: dict, device_type: str):
    """torch.autocast(device_type, the input's dtype) where a traced op's params say it ran inside
    autocast: a bf16/fp16 `dtype` with float32 `weight_dtype` at an op autocast runs in fp32 on this
    device type (no other code hands CUDA's layer_norm that mix); else a context that does nothing."""
    dtype = params.get("dtype")
    below = {str(d).replace("torch.", ""): d for d in _BELOW_FP32}
    if op and dtype in below and params.get("weight_dtype") == "float32" and _has_autocast_kernel(op, device_type):
        return torch.autocast(device_type, dtype=below[dtype])
    return contextlib.nullcontext()


def to_fp32(*tensors: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
    """Autocast's cast, differentiable as eager's is (the gradient is rounded back to each input's
    dtype on the way out); fp32 and fp64 tensors pass unchanged."""
    return tuple(t.to(torch.float32) if t is not None and t.dtype in _BELOW_FP32 else t for t in tensors)
