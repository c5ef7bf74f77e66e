"""GEGLU: y = gelu(gate, approximate) * up, the Gemma / T5 v1.1 MLP's activation, one kernel each way.

Replaces `F.gelu(gate, approximate=...) * up` (Hugging Face's GemmaMLP with act_fn
gelu_pytorch_tanh), which eager PyTorch runs as 2 kernels forward (gelu, mul) and 3 backward
(dy * up, dy * gelu(gate), gelu_backward). The kernels live in glu.py, shared with swiglu.py.

Bytes for gate and up of M x N elements each (element size e):
  unfused forward:  gelu reads gate, writes a; mul reads a and up, writes y:      5 * M*N*e
  unfused backward: dy*up and dy*a read 2, write 1 each; gelu_backward 2 + 1:     9 * M*N*e
  fused forward:    read gate and up, write y:                                     3 * M*N*e
  fused backward:   read dy, gate, up (gelu recomputed), write dgate and dup:      5 * M*N*e
`fused_bytes` returns exactly the fused numbers.

A Kineto trace does not record gelu's `approximate` string (its Concrete Inputs entry is empty), so
`params_from_ops` cannot tell tanh from exact GELU: it reports approximate="none". Both run at the
same speed (memory-bound); whoever patches a model must read `approximate` off the model's code or
its act_fn module, as `GEGLUMLP.from_module` does.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from fusion_advisor.kernels.activations import module_activation
from fusion_advisor.kernels.glu import GatedExperts, GatedMLP, PackedGatedMLP, gated_mlp_width, glu, glu_bytes, glu_params_from_ops
from fusion_advisor.kernels.registry import (Inputs, OpRecord, Rewrite, param_dtype, register_pattern,
                                             training_shapes)

_ACTIVATION = {"none": "gelu", "tanh": "gelu_tanh"}


def _activation(approximate: str) -> str:
    try:
        return _ACTIVATION[approximate]
    except KeyError:
        raise ValueError(f"geglu: approximate must be 'none' or 'tanh', got {approximate!r}") from None


def geglu(gate: torch.Tensor, up: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    """Fused gelu(gate, approximate) * up, numerically the eager expression's forward and backward."""
    return glu(gate, up, _activation(approximate))


def approximate_of(act: torch.nn.Module) -> str | None:
    """'none' / 'tanh' for a GELU module (torch's or transformers'), None for anything else."""
    return {"gelu": "none", "gelu_tanh": "tanh"}.get((module_activation(act) or ("",))[0])


class GEGLUMLP(GatedMLP):
    """Drop-in for GemmaMLP / Gemma2MLP / Gemma3MLP (same gate/up/down projections)."""

    @classmethod
    def from_module(cls, module: torch.nn.Module) -> "GEGLUMLP | PackedGatedMLP":
        """Wrap an existing MLP's projections (shared, not copied; packed in one `gate_up_proj`, a
        PackedGatedMLP); `approximate` is read off its activation, which must be a GELU."""
        act = GatedMLP.activation_module(module)
        approximate = approximate_of(act) if act is not None else None
        if approximate is None:
            found = type(act).__name__ if act is not None else "no act_fn"
            raise ValueError(f"{type(module).__name__}: {found} is not a known GELU: not a GEGLU MLP")
        if GatedExperts.shaped(module):
            return GatedExperts.with_fused_gate(module, _activation(approximate))
        if GatedMLP.packed(module):
            return PackedGatedMLP.wrap(module, _activation(approximate))
        return cls.wrap(module, _activation(approximate))


def reference(gate: torch.Tensor, up: torch.Tensor, approximate: str = "none", written_out: bool = False) -> torch.Tensor:
    """Hugging Face GemmaMLP's activation, verbatim (act_fn = GELU with this `approximate`); with
    `written_out`, T5 v1.1's: HF's NewGELUActivation (the tanh approximation as eight ops) times up."""
    if written_out:
        return new_gelu(gate) * up
    return F.gelu(gate, approximate=approximate) * up


def new_gelu(x: torch.Tensor) -> torch.Tensor:
    """Hugging Face's NewGELUActivation.forward, verbatim (transformers/activations.py)."""
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


def liger(gate: torch.Tensor, up: torch.Tensor, approximate: str = "none", written_out: bool = False) -> torch.Tensor:
    """Liger-Kernel's GELU-mul on the same inputs. Liger has the tanh approximation only."""
    if approximate != "tanh" and not written_out:
        raise NotImplementedError("Liger-Kernel's GEGLU computes tanh-approximate GELU only")
    from liger_kernel.ops.geglu import LigerGELUMulFunction
    return LigerGELUMulFunction.apply(gate, up)


def fused(gate: torch.Tensor, up: torch.Tensor, approximate: str = "none", written_out: bool = False) -> torch.Tensor:
    """`geglu` with `reference`'s arguments: the written-out tanh GELU is the tanh approximation,
    computed in fp32 and rounded once (eager rounds each of its eight ops: the check's tolerance)."""
    return geglu(gate, up, "tanh" if written_out else approximate)


def make_inputs(params: dict, device: torch.device, requires_grad: bool = True) -> Inputs:
    dtype = param_dtype(params)
    gate = torch.randn(params["shape"], dtype=dtype, device=device, requires_grad=requires_grad)
    up = torch.randn(params["shape"], dtype=dtype, device=device, requires_grad=requires_grad)
    kwargs = {"approximate": params.get("approximate", "none")}
    if params.get("written_out"):
        kwargs["written_out"] = True
    return Inputs((gate, up), kwargs, grad_inputs=(0, 1) if requires_grad else ())


def fused_bytes(params: dict) -> dict:
    return glu_bytes(params)


# HF's NewGELUActivation as traced (T5 v1.1, its gated-gelu MLP): 0.5*x, pow, 0.044715*, +x, *c, tanh, 1+, *
WRITTEN_OUT_TANH_GELU = "mul pow mul add mul tanh add mul"


def params_from_ops(ops: list[OpRecord]) -> dict | None:
    """Shape and dtype from the traced gelu and the mul of its output with up (same shape); or from
    the written-out tanh GELU (its `pow` reads the gate) and the mul that follows it."""
    params = glu_params_from_ops(ops, ("gelu", "gelu_"))
    if params is not None:
        return {**params, "approximate": "none"}
    names = " ".join(o.short for o in ops)
    if WRITTEN_OUT_TANH_GELU not in names:
        return None
    params = glu_params_from_ops(ops, ("pow",))
    if params is None or names.count("mul") < WRITTEN_OUT_TANH_GELU.count("mul") + 1:
        return None
    return {**params, "approximate": "tanh", "written_out": True}


PATTERN = register_pattern(
    __name__,
    description="GEGLU MLP activation gelu(gate) * up as one Triton kernel each way",
    # gelu then the mul with up; or HF's NewGELU written out (eight ops) then that mul, which rule 4a
    # of analyzers/clusters.py joins across the activation module's boundary (neither piece alone matches)
    forward_signature=r"\bgelu_? (?:\S+ ){0,2}mul\b|\b" + WRITTEN_OUT_TANH_GELU + r" (?:\S+ ){0,2}mul\b",
    modules=("GemmaMLP", "Gemma2MLP", "Gemma3MLP"),
    module_factory=GEGLUMLP.from_module,
    module_shape=lambda module: GatedMLP.activation_is(module, lambda act: approximate_of(act) is not None) or (
        GatedExperts.shaped(module) and approximate_of(GatedMLP.activation_module(module)) is not None),
    rewrites=tuple(Rewrite(f"F.gelu($gate{kw}) * $up", f"geglu($gate, $up{kw})", ("from fusion_advisor.kernels.geglu import geglu",))
                   for kw in ("", ", approximate=$approximate")),
    example_params={"shape": [6, 42, 431], "dtype": "float32", "approximate": "tanh"},
    bench_params=training_shapes(lambda tokens, hidden:
                                 {"shape": [tokens, gated_mlp_width(hidden)], "dtype": "bfloat16",
                                  "approximate": "tanh"}),
    fused=fused,
    liger=liger,
    counted_as="glu",  # its launches are glu.py's, shared with the other gated MLP
)
