"""The one table of dtypes as a Kineto trace names them, and the conversions around it.

torch is imported inside the functions that return a torch.dtype, so reading the table (the
cost model, the analyzers) loads no torch.
"""
from __future__ import annotations

# trace type name -> (dtype name, bytes per element)
TRACE_DTYPES: dict[str, tuple[str, int]] = {
    "float": ("float32", 4), "c10::BFloat16": ("bfloat16", 2), "c10::Half": ("float16", 2),
    "double": ("float64", 8), "long int": ("int64", 8), "int": ("int32", 4), "short int": ("int16", 2),
    "signed char": ("int8", 1), "unsigned char": ("uint8", 1), "bool": ("bool", 1),
    "c10::Float8_e4m3fn": ("float8_e4m3fn", 1), "c10::Float8_e5m2": ("float8_e5m2", 1),
    "c10::complex<float>": ("complex64", 8), "c10::complex<double>": ("complex128", 16),
}
DTYPE_BYTES: dict[str, int] = {d: b for d, b in TRACE_DTYPES.values()}
# Priced by the cost model, but no kernel of ours takes them: dtype_from_trace says None.
_NO_KERNEL_DTYPES = frozenset({"float8_e4m3fn", "float8_e5m2", "complex64", "complex128"})


def dtype_from_trace(type_name: str):
    """'c10::BFloat16' -> torch.bfloat16; None for scalars, unknown names and the dtypes no kernel
    takes (float8, complex)."""
    entry = TRACE_DTYPES.get(type_name)
    if entry is None or entry[0] in _NO_KERNEL_DTYPES:
        return None
    import torch

    return getattr(torch, entry[0])


def dtype_name(dtype) -> str:
    """torch.bfloat16 -> 'bfloat16'."""
    return str(dtype).replace("torch.", "")


def dtype_from_name(name: str):
    """'bfloat16' -> torch.bfloat16; ValueError for a name that is not a torch dtype."""
    import torch

    dt = getattr(torch, name, None)
    if not isinstance(dt, torch.dtype):
        raise ValueError(f"unknown dtype {name!r}")
    return dt
