"""What one traced op and one tensor look like to every stage: OpRecord and TensorSpec."""
from __future__ import annotations

import math
from dataclasses import dataclass

from fusion_advisor.core.dtypes import DTYPE_BYTES


@dataclass(frozen=True)
class OpRecord:
    """One traced op, as a pattern sees it (from the Trace's ops frame or a cluster in JSON)."""

    name: str                                  # "aten::mul"
    dims: tuple = ()                           # Input Dims, e.g. ((4, 128, 256), (256,))
    types: tuple = ()                          # Input type, e.g. ("c10::BFloat16", "float")
    concrete: tuple = ()                       # Concrete Inputs, e.g. ("", "2")
    module: str | None = None                  # nn.Module class path, e.g. "LlamaDecoderLayer/LlamaRMSNorm"

    @property
    def short(self) -> str:
        return short_op_name(self.name)

    @classmethod
    def from_trace(cls, name: str, dims, types, concrete, module: str | None = None) -> "OpRecord":
        """From a Trace ops row's raw columns (JSON lists, None where the op recorded no shapes):
        nested lists become tuples, so records compare and hash."""
        return cls(str(name), _frozen(dims), _frozen(types), _frozen(concrete), module)


def _frozen(value) -> tuple:
    """A recorded argument list as nested tuples; () for a missing one (None, NaN)."""
    if not isinstance(value, (list, tuple)):
        return ()
    return tuple(_frozen(v) if isinstance(v, (list, tuple)) else v for v in value)


def short_op_name(name: str) -> str:
    """'aten::native_layer_norm' -> 'native_layer_norm'; other namespaces keep their prefix."""
    return name[6:] if name.startswith("aten::") else name


@dataclass(frozen=True)
class TensorSpec:
    """A tensor a kernel reads or writes: its shape and dtype (no identity: the trace has none)."""

    shape: tuple[int, ...]
    dtype: str

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * DTYPE_BYTES[self.dtype]
