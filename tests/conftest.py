"""Test setup: without a GPU, Triton kernels run in the interpreter on CPU tensors.

TRITON_INTERPRET must be set before any @triton.jit function is defined, so it is set here, before
the test modules import fusion_advisor.kernels.
"""
import os
import pathlib
import tempfile

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Calibrations cached on this machine (`fusion-advisor calibrate`) must not change what the tests
# see: they read only the profiles committed in cost_model/profiles and the datasheets.
os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="fusion-advisor-test-cache-")

import numpy as np  # noqa: E402
import pytest  # noqa: E402


def _round_bf16_to_nearest_in_interpreter() -> None:
    """Make the interpreter round fp32 -> bf16 to nearest-even, as the GPU does.

    Triton's interpreter (3.x) truncates on `x.to(tl.bfloat16)` (its cast passes no rounding mode,
    which its converter reads as round-toward-zero), so a kernel that rounds intermediates to bf16
    the way eager PyTorch does would be off by up to one bf16 ulp per rounding in CI and not on the
    GPU (seen: relu(z)**2 at z = 4.3121 gave 18.25, eager bf16 and the GPU give 18.625).
    Conversions that ask for a rounding mode explicitly are left to the interpreter."""
    try:
        import triton.language as tl
        from triton.runtime import interpreter
    except ImportError:
        return
    convert = getattr(interpreter, "_convert_float", None)
    if convert is None or getattr(convert, "rounds_bf16_to_nearest", False):
        return

    def convert_float(input, input_dtype, output_dtype, rounding_mode):
        if rounding_mode is None and input_dtype == tl.float32 and output_dtype == tl.bfloat16:
            f32 = np.ascontiguousarray(input, dtype=np.float32)
            bits = f32.view(np.uint32).astype(np.uint64)
            rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
            # NaN stays a (quiet) NaN: rounding its payload could carry it into infinity.
            return np.where(np.isnan(f32), ((bits >> 16) | 0x40).astype(np.uint16), rounded)
        return convert(input, input_dtype, output_dtype, rounding_mode)

    convert_float.rounds_bf16_to_nearest = True
    interpreter._convert_float = convert_float


if os.environ.get("TRITON_INTERPRET") == "1":
    _round_bf16_to_nearest_in_interpreter()

DATA = pathlib.Path(__file__).parent / "data"
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture
def device() -> torch.device:
    return DEVICE


@pytest.fixture
def data_dir() -> pathlib.Path:
    return DATA
