"""Activation math shared by the fused elementwise kernels (bias_act.py, glu.py); registers nothing.

Each activation has a name (the pattern param users see), a constexpr id the kernels branch on at
compile time, the PyTorch call it replaces, and @triton.jit forward and derivative functions that
take and return fp32. The formulas are PyTorch's own (ATen's CUDA kernels), so results agree to
fp32 rounding:
  gelu          0.5 z (1 + erf(z / sqrt 2))           d = Phi(z) + z phi(z)
  gelu_tanh     0.5 z (1 + tanh(u)), u = sqrt(2/pi) (z + 0.044715 z^3), computed as z sigmoid(2u)
                (the same number; needs no tanh, which Triton 3.x has only through libdevice)
  silu          z sigmoid(z)                          d = s (1 + z (1 - s))
  relu          max(z, 0), NaN kept                   d = 0 where z <= 0 else 1 (threshold_backward)
  relu_squared  relu(z)^2 (Primer, modded-nanogpt)    d = 2 relu(z)
  sigmoid       sigmoid(z)                            d = s (1 - s)
  leaky_relu    z if z > 0 else slope z               d = 1 if z > 0 else slope
  relu6         min(max(z, 0), 6), NaN kept           d = 0 where z <= 0 or z >= 6 else 1 (hardtanh_backward)
  hardswish     z relu6(z + 3) / 6                    d = 0 to -3, z / 3 + 1/2 below 3, else 1 (at the
                bends as ATen's hardswish_backward: bf16 puts many values exactly on 3.0)
(relu6 and hardswish: MobileNet's conv -> BN -> activation blocks.)
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

GELU = tl.constexpr(0)
GELU_TANH = tl.constexpr(1)
SILU = tl.constexpr(2)
RELU = tl.constexpr(3)
RELU_SQUARED = tl.constexpr(4)
SIGMOID = tl.constexpr(5)
LEAKY_RELU = tl.constexpr(6)
RELU6 = tl.constexpr(7)
HARDSWISH = tl.constexpr(8)

ACTIVATION_IDS = {"gelu": 0, "gelu_tanh": 1, "silu": 2, "relu": 3, "relu_squared": 4, "sigmoid": 5,
                  "leaky_relu": 6, "relu6": 7, "hardswish": 8}

_SQRT1_2 = tl.constexpr(0.7071067811865476)         # 1 / sqrt(2)
_INV_SQRT_2PI = tl.constexpr(0.3989422804014327)    # 1 / sqrt(2 pi)
_TWO_SQRT_2_OVER_PI = tl.constexpr(1.5957691216057308)  # 2 sqrt(2 / pi)
_GELU_KAPPA = tl.constexpr(0.044715)
_THREE_GELU_KAPPA = tl.constexpr(0.134145)
# (constexpr operands go right of tensors: the interpreter cannot multiply constexpr * tensor)


def activation_id(name: str) -> int:
    try:
        return ACTIVATION_IDS[name]
    except KeyError:
        known = ", ".join(ACTIVATION_IDS)
        raise ValueError(f"unknown activation {name!r} (known: {known})") from None


def torch_activation(z: torch.Tensor, name: str, negative_slope: float = 0.01) -> torch.Tensor:
    """The PyTorch call each activation replaces, as users write it."""
    if name == "gelu":
        return F.gelu(z)
    if name == "gelu_tanh":
        return F.gelu(z, approximate="tanh")
    if name == "silu":
        return F.silu(z)
    if name == "relu":
        return F.relu(z)
    if name == "relu_squared":
        return F.relu(z).square()
    if name == "sigmoid":
        return torch.sigmoid(z)
    if name == "leaky_relu":
        return F.leaky_relu(z, negative_slope)
    if name == "relu6":
        return F.relu6(z)
    if name == "hardswish":
        return F.hardswish(z)
    activation_id(name)  # raises the clear error
    raise AssertionError(name)


# Activation modules by torch class, or by class name (transformers' ACT2FN classes and kin), and
# the activation each computes here. NewGELU and FastGELU write the tanh approximation their own
# way, and a "SiLU" or "Swish" of another library is taken at its name: every swap's check decides.
_TORCH_MODULES = ((torch.nn.ReLU, "relu"), (torch.nn.ReLU6, "relu6"), (torch.nn.SiLU, "silu"),
                  (torch.nn.Sigmoid, "sigmoid"), (torch.nn.Hardswish, "hardswish"))
_NAMED_MODULES = {"SiLU": "silu", "SiLUActivation": "silu", "Swish": "silu", "GELUActivation": "gelu",
                  "GELUTanh": "gelu_tanh", "PytorchGELUTanh": "gelu_tanh", "NewGELUActivation": "gelu_tanh",
                  "FastGELUActivation": "gelu_tanh"}


def module_activation(module: torch.nn.Module) -> tuple[str, float] | None:
    """(activation name, negative_slope) of an activation module computed here, else None: what the
    gated MLPs' and batch_norm_act's module forms fuse."""
    if isinstance(module, torch.nn.GELU):
        name = {"none": "gelu", "tanh": "gelu_tanh"}.get(module.approximate)
        return (name, 0.01) if name else None
    if isinstance(module, torch.nn.LeakyReLU):
        return "leaky_relu", float(module.negative_slope)
    name = next((n for cls, n in _TORCH_MODULES if isinstance(module, cls)), None) \
        or _NAMED_MODULES.get(type(module).__name__)
    return (name, 0.01) if name else None


@triton.jit
def apply_activation(z, ACT: tl.constexpr, negative_slope):
    """act(z) for fp32 z."""
    if ACT == GELU:
        y = 0.5 * z * (1.0 + tl.erf(z * _SQRT1_2))
    elif ACT == GELU_TANH:
        y = z * tl.sigmoid((z + z * z * z * _GELU_KAPPA) * _TWO_SQRT_2_OVER_PI)
    elif ACT == SILU:
        y = z * tl.sigmoid(z)
    elif ACT == RELU:
        y = tl.where(z < 0.0, 0.0, z)
    elif ACT == RELU_SQUARED:
        r = tl.where(z < 0.0, 0.0, z)
        y = r * r
    elif ACT == SIGMOID:
        y = tl.sigmoid(z)
    elif ACT == RELU6:
        r = tl.where(z < 0.0, 0.0, z)
        y = tl.where(r > 6.0, 6.0, r)
    elif ACT == HARDSWISH:
        r = tl.where(z + 3.0 < 0.0, 0.0, z + 3.0)
        y = z * tl.where(r > 6.0, 6.0, r) / 6.0
    else:  # LEAKY_RELU
        y = tl.where(z > 0.0, z, z * negative_slope)
    return y


@triton.jit
def activation_grad(z, ACT: tl.constexpr, negative_slope):
    """d act(z) / dz for fp32 z."""
    if ACT == GELU:
        d = 0.5 * (1.0 + tl.erf(z * _SQRT1_2)) + z * tl.exp(-0.5 * z * z) * _INV_SQRT_2PI
    elif ACT == GELU_TANH:
        s = tl.sigmoid((z + z * z * z * _GELU_KAPPA) * _TWO_SQRT_2_OVER_PI)
        d = s + z * s * (1.0 - s) * (1.0 + z * z * _THREE_GELU_KAPPA) * _TWO_SQRT_2_OVER_PI
    elif ACT == SILU:
        s = tl.sigmoid(z)
        d = s * (1.0 + z * (1.0 - s))
    elif ACT == RELU:
        d = tl.where(z <= 0.0, 0.0, 1.0)
    elif ACT == RELU_SQUARED:
        d = 2.0 * tl.where(z < 0.0, 0.0, z)
    elif ACT == SIGMOID:
        s = tl.sigmoid(z)
        d = s * (1.0 - s)
    elif ACT == RELU6:
        d = tl.where((z <= 0.0) | (z >= 6.0), 0.0, 1.0)
    elif ACT == HARDSWISH:
        d = tl.where(z <= -3.0, 0.0, tl.where(z < 3.0, z / 3.0 + 0.5, 1.0))
    else:  # LEAKY_RELU
        d = tl.where(z > 0.0, 1.0, negative_slope)
    return d
