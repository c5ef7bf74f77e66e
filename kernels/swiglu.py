"""SwiGLU: y = silu(gate) * up, the Llama/Mistral/Qwen MLP's activation, one kernel each way.

Replaces `F.silu(gate) * up` (Hugging Face's LlamaMLP: `down_proj(act_fn(gate_proj(x)) * up_proj(x))`),
which eager PyTorch runs as 2 kernels forward (silu, mul) and 3 backward (dy * up, dy * silu(gate),
silu_backward). The kernels live in glu.py, shared with geglu.py.

Bytes for gate and up of M x N elements each (element size e):
  unfused forward:  silu reads gate, writes a; mul reads a and up, writes y:      5 * M*N*e
  unfused backward: dy*up and dy*a read 2, write 1 each; silu_backward 2 + 1:     9 * M*N*e
  fused forward:    read gate and up, write y:                                     3 * M*N*e
  fused backward:   read dy, gate, up (silu recomputed), write dgate and dup:      5 * M*N*e
`fused_bytes` returns exactly the fused numbers.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from fusion_advisor.kernels.activations import module_activation
from fusion_advisor.kernels.glu import GatedExperts, GatedMLP, PackedGatedMLP, gated_mlp_width, glu, glu_bytes, glu_params_from_ops
from fusion_advisor.kernels.registry import (Inputs, OpRecord, Rewrite, param_dtype, register_pattern,
                                             training_shapes)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """Fused silu(gate) * up, numerically the eager expression's forward and backward."""
    return glu(gate, up, "silu")


def _is_silu(act: torch.nn.Module) -> bool:
    return (module_activation(act) or ("",))[0] == "silu"


class SwiGLUMLP(GatedMLP):
    """Drop-in for LlamaMLP / MistralMLP / Qwen2MLP / Qwen3MLP (same gate/up/down projections)."""

    @classmethod
    def from_module(cls, module: torch.nn.Module) -> "SwiGLUMLP | PackedGatedMLP":
        """Wrap an existing MLP's projections (shared, not copied): a PackedGatedMLP where gate and up
        come from one `gate_up_proj` (Phi-3, GLM). An activation other than SiLU is refused; a module
        without one (hard-coded, as in examples/llama_train.py) is taken at its class name's word."""
        act = GatedMLP.activation_module(module)
        if act is not None and not _is_silu(act):
            raise ValueError(f"{type(module).__name__}'s activation is {type(act).__name__}, not SiLU: not a SwiGLU MLP")
        if GatedExperts.shaped(module):
            return GatedExperts.with_fused_gate(module, "silu")
        if GatedMLP.packed(module):
            return PackedGatedMLP.wrap(module, "silu")
        return cls.wrap(module, "silu")


def reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """Hugging Face LlamaMLP's activation, verbatim (act_fn = SiLU)."""
    return F.silu(gate) * up


def liger(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """Liger-Kernel's SiLU-mul on the same inputs."""
    from liger_kernel.ops.swiglu import LigerSiLUMulFunction
    return LigerSiLUMulFunction.apply(gate, up)


def make_inputs(params: dict, device: torch.device, requires_grad: bool = True) -> Inputs:
    dtype = param_dtype(params)
    gate = torch.randn(params["shape"], dtype=dtype, device=device, requires_grad=requires_grad)
    up = torch.randn(params["shape"], dtype=dtype, device=device, requires_grad=requires_grad)
    return Inputs((gate, up), grad_inputs=(0, 1) if requires_grad else ())


def fused_bytes(params: dict) -> dict:
    return glu_bytes(params)


def params_from_ops(ops: list[OpRecord]) -> dict | None:
    """Shape and dtype from the traced silu and the mul of its output with up (same shape)."""
    return glu_params_from_ops(ops, ("silu", "silu_"))


PATTERN = register_pattern(
    __name__,
    description="SwiGLU MLP activation silu(gate) * up as one Triton kernel each way",
    forward_signature=r"\bsilu_? (?:\S+ ){0,2}mul\b",
    modules=("LlamaMLP", "MistralMLP", "Qwen2MLP", "Qwen3MLP", "Phi3MLP", "GlmMLP", "Glm4MLP"),
    module_factory=SwiGLUMLP.from_module,
    # a SiLU module, or none at all (torchtitan's and lit-gpt's F.silu in the forward): the check decides
    # (also an MoE's batched experts with a SiLU: GatedExperts, the gate between its grouped GEMMs)
    module_shape=lambda module: GatedMLP.activation_is(module, _is_silu) or (
        GatedMLP.shaped(module) and GatedMLP.activation_module(module) is None) or (
        GatedExperts.shaped(module) and _is_silu(GatedMLP.activation_module(module))),
    rewrites=(Rewrite("F.silu($gate) * $up", "swiglu($gate, $up)", ("from fusion_advisor.kernels.swiglu import swiglu",)),),
    example_params={"shape": [6, 42, 431], "dtype": "float32"},
    bench_params=training_shapes(lambda tokens, hidden:
                                 {"shape": [tokens, gated_mlp_width(hidden)], "dtype": "bfloat16"}),
    liger=liger,
    counted_as="glu",  # its launches are glu.py's, shared with the other gated MLP
)
