"""The one way every kernel test compares a fused op with the PyTorch code it replaces.

The rule itself lives in fusion_advisor.kernels.numerics, shared with `fusion-advisor bench`: a
kernel that passes here passes the bench's numerics check on the same shapes.
"""
from __future__ import annotations

import torch

from fusion_advisor.kernels.numerics import compare_pattern
from fusion_advisor.kernels.registry import FusionPattern


def check_against_reference(pattern: FusionPattern, params: dict, device: torch.device, seed: int = 0,
                            backward: bool = True, reduced_grads: tuple[int, ...] | None = None) -> None:
    """Forward outputs and every input gradient of `pattern.fused` equal `pattern.reference`'s,
    within the dtype's tolerance. `reduced_grads`: positions of grads summed over the rows of
    input 0, compared with the table's atol scaled by sqrt(rows); None infers them (every input
    smaller than input 0), as the bench does."""
    result = compare_pattern(pattern, params, device, seed=seed, backward=backward, reduced_grads=reduced_grads)
    assert result.ok, result.detail


def round_like_kernel(values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """fp32 `values` rounded to `dtype` as a Triton kernel's `.to(dtype)` rounds them: to nearest
    even, as PyTorch does (tests/conftest.py makes the interpreter round the same way)."""
    return values.float().to(dtype)
