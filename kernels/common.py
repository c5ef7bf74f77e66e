"""Launcher helpers shared by the kernel files: input checks, row views, block sizes."""
from __future__ import annotations

import functools
import os

import torch
import triton

try:   # grid dependency control (PTX griddepcontrol, sm_90+): Triton 3.4 and newer
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait  # noqa: F401  (the kernels' names)
    _HAS_GDC = True
except ImportError:
    _HAS_GDC = False

    @triton.jit
    def gdc_launch_dependents():
        pass

    @triton.jit
    def gdc_wait():
        pass

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# A two-kernel op launches its second kernel while the first still runs (programmatic dependent launch,
# `pdl`): the second waits on the GPU (griddepcontrol.wait) instead of starting after the first ends.
# The norms' backward gained 0.2-2.9 us a call from it at 65,536 rows of 64 and 128 (H100, LayerNorm at
# 65,536 x 64 fwd+bwd: 25.1 -> 23.5 us; benchmarks/results/bench-norms-small*-h100-5ee0779.csv).
# FUSION_ADVISOR_NO_PDL=1 turns it off (a driver or profiler that mishandles it; or to compare).
PDL = os.environ.get("FUSION_ADVISOR_NO_PDL", "0") != "1"


# Read once: Triton reads TRITON_INTERPRET when a kernel is defined (at import), so the value then is
# the one that holds; and every launcher asks, 7 times a LayerNorm fwd+bwd: reading the environment
# each time cost 4-6 µs of the 70-72 µs host time of one call (`python benchmarks/host_overhead.py
# --patterns layer_norm --calls 2000`, 2-core CI-class CPU, launches stubbed: 64-68 µs since).
_INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") == "1"


def interpreting() -> bool:
    """True under TRITON_INTERPRET=1 (CPU tensors, used by CI), as it was when the kernels loaded."""
    return _INTERPRETING


def check_dtype(x: torch.Tensor, op: str) -> None:
    if x.dtype not in SUPPORTED_DTYPES:
        names = ", ".join(str(d).replace("torch.", "") for d in SUPPORTED_DTYPES)
        raise TypeError(f"{op}: dtype {str(x.dtype).replace('torch.', '')} is not supported (use {names})")


def check_device(*tensors: torch.Tensor, op: str) -> None:
    for t in tensors:
        if t is not None and t.device.type != "cuda" and not interpreting():
            raise RuntimeError(f"{op}: tensors must be on a CUDA device (or run with TRITON_INTERPRET=1)")


def check_same_shape(a: torch.Tensor, b: torch.Tensor, op: str, names: tuple[str, str]) -> None:
    """Two inputs of an elementwise fused op: supported dtypes, a usable device, one shape (the
    fused kernels do not broadcast)."""
    check_dtype(a, op)
    check_dtype(b, op)
    check_device(a, b, op=op)
    if a.shape != b.shape:
        raise ValueError(f"{op}: {names[0]} {tuple(a.shape)} and {names[1]} {tuple(b.shape)} must have the same "
                         f"shape (the fused kernel does not broadcast)")


def backward_once(ctx, op: str, what: str) -> None:
    """Refuse a second backward through one graph (retain_graph=True) of an op whose backward
    scales its saved gradient (`what`) in place: it would scale it twice. ctx.grad_consumed must
    be False after forward."""
    if ctx.grad_consumed:
        raise RuntimeError(f"{op}: backward ran twice through the same loss (retain_graph=True); {what} can be "
                           f"used once")
    ctx.grad_consumed = True


def as_rows(x: torch.Tensor, op: str) -> torch.Tensor:
    """View x as (rows, last_dim). The last dim must be contiguous; other dims may be strided
    (a non-contiguous input is copied once here rather than refused: the copy is what eager
    PyTorch would do too)."""
    if x.dim() == 0:
        raise ValueError(f"{op}: expected a tensor with at least one dim, got a scalar")
    if not x.is_contiguous():
        x = x.contiguous()
    return x.view(-1, x.shape[-1])


def as_row_view(x: torch.Tensor, op: str) -> torch.Tensor:
    """View x as (rows, last_dim) WITHOUT a copy where it can be: the last dim contiguous and the
    leading dims flattening to one row stride, e.g. one `chunk(2, -1)` half of a fused gate/up
    projection (row stride 2 * last_dim). Otherwise copy once, as `as_rows` does. Kernels given
    this view must index rows with its stride(0), which may differ from its last dim."""
    if x.dim() == 0:
        raise ValueError(f"{op}: expected a tensor with at least one dim, got a scalar")
    if x.stride(-1) == 1:
        try:
            return x.view(-1, x.shape[-1])
        except RuntimeError:  # leading dims do not flatten to one stride
            pass
    return x.contiguous().view(-1, x.shape[-1])


# Host-side integer helpers. triton.cdiv and triton.next_power_of_2 are constexpr_functions since
# Triton 3.5: callable from host code, but at ~1.7 µs a call, several times per launch.
def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for non-negative a and positive b."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of 2 >= n (0 for n = 0, as triton.next_power_of_2)."""
    return 1 << (n - 1).bit_length() if n > 0 else 0


# Block choices depend only on the row width: cached, so a launch pays one dict lookup for them.
@functools.lru_cache(maxsize=None)
def row_block(n_cols: int, max_block: int = 65536) -> tuple[int, int]:
    """(BLOCK_SIZE, num_warps) for kernels that keep one whole row in registers."""
    block = next_power_of_2(n_cols)
    if block > max_block:
        raise ValueError(f"rows of {n_cols} elements are too wide for a one-block-per-row kernel")
    num_warps = 4
    if block >= 2048:
        num_warps = 8
    if block >= 8192:
        num_warps = 16
    if block >= 32768:
        num_warps = 32
    return block, num_warps


@functools.lru_cache(maxsize=None)
def elementwise_tile(n_cols: int, elements: int = 4096) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps) for 2-D elementwise kernels over (rows, n_cols): about
    `elements` per program (16 per thread at 8 warps: 16-byte vectors in bf16 and fp32), rows
    stacked when the row is narrower than that."""
    block_n = min(next_power_of_2(max(n_cols, 1)), elements)
    block_m = max(1, elements // block_n)
    return block_m, block_n, 8 if block_m * block_n >= 4096 else 4


def reduction_programs(n_rows: int, device: torch.device) -> int:
    """Programs for a backward kernel that loops over rows and writes one partial weight
    gradient per program: one per SM on a GPU (every SM busy, few partials to sum), a handful
    in the interpreter (each program is slow there)."""
    if interpreting() or device.type != "cuda":
        return max(1, min(n_rows, 4))
    return max(1, min(n_rows, sm_count(device)))


@functools.lru_cache(maxsize=None)
def _hopper_or_newer(device_index: int) -> bool:
    return torch.cuda.get_device_capability(device_index) >= (9, 0)


def pdl(device: torch.device) -> bool:
    """Whether a kernel may be launched to start while the one before it runs (`launch_pdl=True`,
    the kernel calling gdc_wait() before it reads what that one wrote): PDL on, a Hopper or newer
    GPU, a Triton with grid dependency control; never in the interpreter."""
    if not PDL or not _HAS_GDC or interpreting() or device.type != "cuda":
        return False
    return _hopper_or_newer(device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (cached: the properties call costs µs)."""
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())
