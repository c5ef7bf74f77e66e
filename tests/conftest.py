"""Test setup: without a GPU, Triton kernels run in the interpreter on CPU tensors.

TRITON_INTERPRET must be set before any @triton.jit function is defined, so it is set here, before
the test modules import fusion_advisor.kernels.
"""
import os
import pathlib
import shutil
import tempfile

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# One folder for what the suite leaves outside tmp_path, removed when the session ends (it used to
# leave a cache folder per run and torchrun's torchelastic_* log folders in /tmp):
# - XDG_CACHE_HOME: calibrations cached on this machine (`fusion-advisor calibrate`) must not change
#   what the tests see: they read only the profiles committed in cost_model/profiles and the datasheets;
# - TMPDIR, for the subprocesses only (CLI runs, torchrun and its ranks, chromium): this process
#   keeps the temporary folder it had (pytest's own tmp_path root among it).
# The folder goes in the system's temporary folder even in a pytest started by this one (xdist's
# workers inherit TMPDIR): nested, chromium's socket path grew past the 108 bytes a socket takes.
tempfile.gettempdir()
_SYSTEM_TMP = os.environ.setdefault("FUSION_ADVISOR_TESTS_SYSTEM_TMP", tempfile.gettempdir())
_SESSION_DIR = pathlib.Path(tempfile.mkdtemp(prefix="fusion-advisor-tests-", dir=_SYSTEM_TMP))
os.environ["XDG_CACHE_HOME"] = str(_SESSION_DIR / "cache")
os.environ["TMPDIR"] = str(_SESSION_DIR / "tmp")
(_SESSION_DIR / "tmp").mkdir()

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


def pytest_configure(config):
    rss_log = os.environ.get("FUSION_ADVISOR_TEST_RSS")
    if rss_log:   # where the suite's memory goes: see tests/rss_report.py
        from rss_report import RSSReport
        config.pluginmanager.register(RSSReport(rss_log), "fusion_advisor_rss_report")


def pytest_unconfigure(config):
    shutil.rmtree(_SESSION_DIR, ignore_errors=True)
