"""One tolerance table, per dtype, for every comparison of a fused kernel with its reference.

Forward and backward use the same table. The references run in the input dtype (exactly the code
users write), so bf16 differences of a few ulps on O(1) values are expected: bf16 has 8 bits of
mantissa (ulp 2**-7 = 0.0078 at 1.0).

Gradients that sum over many rows (a norm's weight grad, a bias grad) are compared with
`atol * sqrt(rows)`: their typical magnitude grows as sqrt(rows) on random data and so does the
rounding error of the reference, which rounds every product to the dtype before summing (seen:
a bf16 LlamaRMSNorm weight grad over 252 rows differed from an fp32-accumulated one by 0.13).
"""
from __future__ import annotations

import math

import torch

TOLERANCES = {
    #                (atol,  rtol)
    torch.float32: (1e-5, 1e-4),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (2e-2, 1.6e-2),
}


def tolerance(dtype: torch.dtype, reduce_rows: int = 1) -> dict:
    """kwargs for torch.testing.assert_close: `assert_close(a, b, **tolerance(dtype))`."""
    try:
        atol, rtol = TOLERANCES[dtype]
    except KeyError:
        raise ValueError(f"no tolerance for dtype {dtype}") from None
    return {"atol": atol * math.sqrt(max(reduce_rows, 1)), "rtol": rtol}


_PRECISION = {torch.bfloat16: 0, torch.float16: 1, torch.float32: 2, torch.float64: 3}


def least_precise(dtypes) -> torch.dtype:
    """The least precise float dtype of `dtypes` (others ignored), float32 where there is none: its
    rounding bounds a comparison (an fp32 result computed in bf16 still carries bf16 rounding)."""
    floats = [d for d in dtypes if d in _PRECISION]
    return min(floats, key=_PRECISION.__getitem__) if floats else torch.float32


def computed_dtype(x: torch.Tensor, y: torch.Tensor) -> torch.dtype:
    """The dtype a module's check compares at: the least precise of its input's, its output's and,
    inside torch.autocast for x's device, autocast's (fp32 weights under bf16 autocast compute conv
    and matmul in bf16: comparing them at fp32's tolerance refused ResNet's BN + ReLU, whose two
    bf16 paths round differently)."""
    dtypes = [x.dtype, y.dtype]
    if torch.is_autocast_enabled(x.device.type):
        dtypes.append(torch.get_autocast_dtype(x.device.type))
    return least_precise(dtypes)
