"""Gated activation act(gate) * up, one Triton kernel each way; shared by swiglu.py (silu) and
geglu.py (gelu, gelu_tanh), which register the patterns. This file registers nothing.

The kernels round where the eager code rounds (act(gate) to the input dtype before the product;
dy * up to the input dtype before the activation's derivative), so a bf16 result matches eager
bf16, not an fp32 computation of it.

gate and up may be strided views (one `chunk(2, -1)` half each of a fused gate/up projection):
the kernels read them in place through their row strides; outputs are contiguous, except the
backward's where it is given where to write (the packed form below writes both gradients into one
(rows, 2 * width) buffer, the gate/up projection's own gradient, so no `cat` copies them there).
"""
from __future__ import annotations

import copy
from typing import Callable

import torch
import triton
import triton.language as tl

from fusion_advisor.kernels.activations import activation_grad, activation_id, apply_activation
from fusion_advisor.kernels.common import as_row_view, cdiv, check_device, check_dtype, elementwise_tile
from fusion_advisor.kernels.fused_op import fused_op
from fusion_advisor.kernels.registry import dtype_from_trace, dtype_name, param_dtype


@triton.jit
def _glu_fwd_kernel(G, U, Y, stride_g, stride_u, n_rows, n_cols, ACT: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rows < n_rows)[:, None] & (cols < n_cols)[None, :]
    g = tl.load(G + rows[:, None] * stride_g + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + rows[:, None] * stride_u + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    a = apply_activation(g, ACT, 0.0).to(G.dtype.element_ty).to(tl.float32)
    tl.store(Y + rows[:, None] * n_cols + cols[None, :], (a * u).to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _glu_bwd_kernel(DY, G, U, DG, DU, stride_dy, stride_g, stride_u, stride_dg, stride_du, n_rows, n_cols,
                    ACT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rows < n_rows)[:, None] & (cols < n_cols)[None, :]
    dy = tl.load(DY + rows[:, None] * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    g = tl.load(G + rows[:, None] * stride_g + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + rows[:, None] * stride_u + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    a = apply_activation(g, ACT, 0.0).to(G.dtype.element_ty).to(tl.float32)
    da = (dy * u).to(G.dtype.element_ty).to(tl.float32)
    tl.store(DG + rows[:, None] * stride_dg + cols[None, :], (da * activation_grad(g, ACT, 0.0)).to(DG.dtype.element_ty),
             mask=mask)
    tl.store(DU + rows[:, None] * stride_du + cols[None, :], (dy * a).to(DU.dtype.element_ty), mask=mask)


def _check(gate: torch.Tensor, up: torch.Tensor, op: str) -> None:
    check_dtype(gate, op)
    check_device(gate, up, op=op)
    if gate.shape != up.shape:
        raise ValueError(f"{op}: gate {tuple(gate.shape)} and up {tuple(up.shape)} must have the same shape")
    if gate.dtype != up.dtype:
        raise TypeError(f"{op}: gate ({gate.dtype}) and up ({up.dtype}) must have the same dtype")


def glu_fwd(gate: torch.Tensor, up: torch.Tensor, activation: str) -> torch.Tensor:
    """Launcher: act(gate) * up, contiguous, gate's shape and dtype."""
    act = activation_id(activation)
    if activation == "leaky_relu":  # the only activation with a parameter; no gated form uses it
        raise ValueError("glu: leaky_relu is not supported as a gated activation")
    _check(gate, up, f"glu[{activation}]")
    g2, u2 = as_row_view(gate, "glu"), as_row_view(up, "glu")
    n_rows, n_cols = g2.shape
    y = torch.empty((n_rows, n_cols), dtype=gate.dtype, device=gate.device)
    block_m, block_n, warps = elementwise_tile(n_cols)
    if y.numel():
        grid = (cdiv(n_rows, block_m), cdiv(n_cols, block_n))
        _glu_fwd_kernel[grid](g2, u2, y, g2.stride(0), u2.stride(0), n_rows, n_cols, ACT=act,
                              BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps)
    return y.view(gate.shape)


def glu_bwd(dy: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, activation: str,
            overwrite_inputs: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Launcher: (dgate, dup), contiguous. overwrite_inputs=True writes them over gate and up
    (each program reads its elements before it writes them) and returns those: both must be row
    views of their storage (contiguous, or each a `chunk(2, -1)` half of one contiguous tensor)."""
    act = activation_id(activation)
    dy2, g2, u2 = as_row_view(dy, "glu"), as_row_view(gate, "glu"), as_row_view(up, "glu")
    n_rows, n_cols = g2.shape
    if overwrite_inputs:
        if g2.data_ptr() != gate.data_ptr() or u2.data_ptr() != up.data_ptr():   # as_row_view copied
            raise ValueError("glu: overwrite_inputs needs gate and up that are row views of their own storage")
        dg, du = g2, u2
    else:
        dg = torch.empty((n_rows, n_cols), dtype=gate.dtype, device=gate.device)
        du = torch.empty((n_rows, n_cols), dtype=up.dtype, device=up.device)
    block_m, block_n, warps = elementwise_tile(n_cols)
    if dg.numel():
        grid = (cdiv(n_rows, block_m), cdiv(n_cols, block_n))
        _glu_bwd_kernel[grid](dy2, g2, u2, dg, du, dy2.stride(0), g2.stride(0), u2.stride(0), dg.stride(0),
                              du.stride(0), n_rows, n_cols, ACT=act, BLOCK_M=block_m, BLOCK_N=block_n,
                              num_warps=warps)
    return dg.view(gate.shape), du.view(up.shape)


# torch.library ops: a patched model still runs under torch.compile(fullgraph=True). Eager calls run
# the launchers directly (see fused_op).
_forward = fused_op("fusion_advisor::glu_fwd", like="gate")(glu_fwd)
# The op leaves out the launcher's `overwrite_inputs` (a mutation only eager backward may ask for).
_backward = fused_op("fusion_advisor::glu_bwd", like=("gate", "up"),
                     schema="(Tensor dy, Tensor gate, Tensor up, str activation) -> (Tensor, Tensor)")(glu_bwd)


def _can_overwrite(gate: torch.Tensor, up: torch.Tensor) -> bool:
    return (not torch.compiler.is_compiling() and type(gate) is torch.Tensor and type(up) is torch.Tensor
            and gate.is_contiguous() and up.is_contiguous() and gate.data_ptr() != up.data_ptr())


class GLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up, activation, private_inputs):
        y = _forward(gate, up, activation)
        ctx.save_for_backward(gate, up)
        ctx.activation, ctx.private_inputs = activation, private_inputs
        return y

    @staticmethod
    def backward(ctx, dy):
        gate, up = ctx.saved_tensors
        if ctx.private_inputs and _can_overwrite(gate, up):
            # Nothing else reads gate and up (see glu()): the gradients go over them, as Liger-Kernel's
            # SiLU-mul does. Two (tokens, intermediate) buffers fewer at the MLP's backward: 44 MiB at
            # the peak of an HF Llama bf16 step (hidden 2048, 4096 tokens; H200,
            # benchmarks/memory_by_pattern.py). The version bump makes any other reader of them fail
            # loudly at its backward ("modified by an inplace operation") instead of reading gradients.
            dg, du = glu_bwd(dy, gate, up, ctx.activation, overwrite_inputs=True)
            for t in (gate, up):
                torch.autograd.graph.increment_version(t)
        else:
            dg, du = _backward(dy, gate, up, ctx.activation)
        return dg, du, None, None


def glu(gate: torch.Tensor, up: torch.Tensor, activation: str, private_inputs: bool = False) -> torch.Tensor:
    """Fused act(gate) * up, numerically the eager expression's forward and backward.
    private_inputs=True promises that nothing but this call reads gate and up after it (they are
    fresh projections, as in GatedMLP): backward then writes the gradients over them."""
    return GLUFunction.apply(gate, up, activation, bool(private_inputs))


class PackedGLUFunction(torch.autograd.Function):
    """act(gate) * up for gate and up packed in one tensor, gate the first half of its last dim (a
    fused gate/up projection's output, split by `chunk(2, -1)`); the gradient is that tensor's."""

    @staticmethod
    def forward(ctx, gate_up, activation, private_input):
        gate, up = gate_up.chunk(2, -1)
        y = _forward(gate, up, activation)
        ctx.save_for_backward(gate_up)
        ctx.activation, ctx.private_input = activation, private_input
        return y

    @staticmethod
    def backward(ctx, dy):
        (gate_up,) = ctx.saved_tensors
        gate, up = gate_up.chunk(2, -1)
        if ctx.private_input and _can_overwrite_packed(gate_up):
            # Nothing else reads the projection's output (see packed_glu): its gradient goes over it,
            # both halves in one launch, and is the gradient autograd hands the projection.
            glu_bwd(dy, gate, up, ctx.activation, overwrite_inputs=True)
            torch.autograd.graph.increment_version(gate_up)
            return gate_up, None, None
        dg, du = _backward(dy, gate, up, ctx.activation)
        return torch.cat([dg, du], dim=-1), None, None


def _can_overwrite_packed(gate_up: torch.Tensor) -> bool:
    return not torch.compiler.is_compiling() and type(gate_up) is torch.Tensor and gate_up.is_contiguous()


def packed_glu(gate_up: torch.Tensor, activation: str, private_input: bool = False) -> torch.Tensor:
    """Fused `gate, up = gate_up.chunk(2, -1); act(gate) * up` (Phi-3's and GLM's MLPs), forward and
    backward, the gate and up halves read in place. private_input=True promises that nothing but this
    call reads gate_up after it (a fresh projection, as in PackedGatedMLP): backward then writes the
    gradient over it."""
    if gate_up.shape[-1] % 2:
        raise ValueError(f"glu: a packed gate/up tensor needs an even last dim, got {gate_up.shape[-1]}")
    return PackedGLUFunction.apply(gate_up, activation, bool(private_input))


# The (gate, up, down) projection names of the gated MLPs models write: Llama's (HF); T5 v1.1's
# T5DenseGatedActDense (also mT5, UMT5, LongT5), whose `dropout` sits between the product and `wo`;
# Meta's reference Llama / Mistral and torchtitan's FeedForward (w2(silu(w1(x)) * w3(x))); lit-gpt's
# LLaMAMLP (proj(silu(fc_1(x)) * fc_2(x))). The last two hard-code F.silu: no activation module.
PROJECTION_NAMES = (("gate_proj", "up_proj", "down_proj"), ("wi_0", "wi_1", "wo"), ("w1", "w3", "w2"),
                    ("fc_1", "fc_2", "proj"))
ACTIVATION_NAMES = ("act_fn", "activation_fn", "act")   # Llama/Gemma, Phi-3/GLM, T5
PACKED_NAMES = (("gate_up_proj", "down_proj"), ("Wi", "Wo"))   # Phi-3/GLM, ModernBERT
PACKED_DROPOUT_NAMES = ("drop", "dropout")   # ModernBERT's between the gated activation and the down projection


class GatedMLP(torch.nn.Module):
    """down_proj(dropout(act(gate_proj(x)) * up_proj(x))), the Llama/Gemma MLP (no dropout) and
    T5 v1.1's, with the gated activation fused. Holds the wrapped MLP's projections (shared, not
    copied) under the MLP's own attribute names, so its state_dict keys stay those of the original."""

    def __init__(self, gate_proj: torch.nn.Module, up_proj: torch.nn.Module, down_proj: torch.nn.Module,
                 activation: str, names: tuple[str, str, str] = PROJECTION_NAMES[0],
                 dropout: torch.nn.Module | None = None):
        super().__init__()
        activation_id(activation)
        self._names = tuple(names)
        for name, projection in zip(self._names, (gate_proj, up_proj, down_proj)):
            setattr(self, name, projection)
        self.dropout = dropout
        self.activation = activation

    @classmethod
    def wrap(cls, module: torch.nn.Module, activation: str) -> "GatedMLP":
        """A GatedMLP (of this class) over an existing MLP's projections, names and dropout."""
        names = GatedMLP.projection_names(module)
        dropout = getattr(module, "dropout", None) if names == PROJECTION_NAMES[1] else None
        mlp = cls(*(getattr(module, n) for n in names), activation=activation, names=names,
                  dropout=dropout if isinstance(dropout, torch.nn.Module) else None)
        # children in the original's order (w1, w2, w3 stay so): its state_dict lists the same keys in the same order
        order = [n for n in module._modules if n in mlp._modules]
        mlp._modules = type(mlp._modules)((n, mlp._modules[n]) for n in order + [n for n in mlp._modules if n not in order])
        return mlp

    @staticmethod
    def projection_names(module: torch.nn.Module) -> tuple[str, str, str]:
        for names in PROJECTION_NAMES:
            if all(isinstance(getattr(module, n, None), torch.nn.Module) for n in names):
                return names
        raise ValueError(f"{type(module).__name__} has no gate/up/down projections "
                         f"({' or '.join('/'.join(n) for n in PROJECTION_NAMES)}): not a gated MLP")

    @staticmethod
    def projections(module: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Module, torch.nn.Module]:
        return tuple(getattr(module, n) for n in GatedMLP.projection_names(module))

    def forward(self, x):
        gate, up, down = (getattr(self, n) for n in self._names)
        # gate and up are this forward's own temporaries: their memory can hold their gradients.
        h = glu(gate(x), up(x), self.activation, private_inputs=True)
        return down(h if self.dropout is None else self.dropout(h))

    def extra_repr(self) -> str:
        return f"activation={self.activation} (fused Triton)"

    @staticmethod
    def activation_module(module: torch.nn.Module) -> torch.nn.Module | None:
        """The MLP's activation module: `act_fn` (Llama, Gemma), `activation_fn` (Phi-3, GLM) or
        `act` (T5)."""
        for name in ACTIVATION_NAMES:
            act = getattr(module, name, None)
            # (a plain function under act_fn counts: SwiGLUMLP refuses what is not SiLU)
            if act is not None and (name != "act" or isinstance(act, torch.nn.Module)):
                return act
        return None

    @staticmethod
    def shaped(module: torch.nn.Module) -> bool:
        """Two projections under one of PROJECTION_NAMES and a down projection, or one packed."""
        return GatedMLP.packed(module) or any(
            all(isinstance(getattr(module, n, None), torch.nn.Module) for n in names) for names in PROJECTION_NAMES)

    @staticmethod
    def activation_is(module: torch.nn.Module, test: Callable[[torch.nn.Module], bool]) -> bool:
        """A gated MLP's shape (two projections, or one packed) with an activation module passing `test`."""
        act = GatedMLP.activation_module(module)
        return GatedMLP.shaped(module) and act is not None and test(act)

    @staticmethod
    def packed(module: torch.nn.Module) -> bool:
        """One projection module for gate and up (`gate_up_proj`, Phi-3 and GLM; `Wi`, ModernBERT)
        rather than two (an MoE's experts hold `gate_up_proj` as a batched weight Parameter: not this)."""
        return GatedMLP.packed_names(module) is not None

    @staticmethod
    def packed_names(module: torch.nn.Module) -> tuple[str, str] | None:
        """(packed gate/up projection, down projection) attribute names of a packed MLP, else None."""
        return next((names for names in PACKED_NAMES
                     if all(isinstance(getattr(module, n, None), torch.nn.Module) for n in names)), None)


class PackedGatedMLP(torch.nn.Module):
    """down_proj(dropout(up * act(gate))) with gate, up = gate_up_proj(x).chunk(2, -1), the Phi-3 /
    GLM MLP (ModernBERT's: Wi, Wo and a dropout), the gated activation fused. Holds the wrapped MLP's
    projections (shared, not copied) under its own attribute names, so its state_dict keys stay the
    original's. Which half is the gate is taken as Phi-3 has it; a model with the other order fails
    patch's numerics check."""

    def __init__(self, gate_up_proj: torch.nn.Module, down_proj: torch.nn.Module, activation: str,
                 names: tuple[str, str] = PACKED_NAMES[0], dropout: torch.nn.Module | None = None):
        super().__init__()
        activation_id(activation)
        self._names = tuple(names)
        for name, projection in zip(self._names, (gate_up_proj, down_proj)):
            setattr(self, name, projection)
        self.dropout, self.activation = dropout, activation

    @classmethod
    def wrap(cls, module: torch.nn.Module, activation: str) -> "PackedGatedMLP":
        """A PackedGatedMLP over a packed MLP's projections, names and dropout module."""
        names = GatedMLP.packed_names(module)
        dropout = next((d for d in (getattr(module, n, None) for n in PACKED_DROPOUT_NAMES)
                        if isinstance(d, torch.nn.Module)), None)
        return cls(*(getattr(module, n) for n in names), activation=activation, names=names, dropout=dropout)

    def forward(self, x):
        gate_up, down = (getattr(self, n) for n in self._names)
        # the projection's output is this forward's own temporary: its memory can hold its gradient
        h = packed_glu(gate_up(x), self.activation, private_input=True)
        return down(h if self.dropout is None else self.dropout(h))

    def extra_repr(self) -> str:
        return f"activation={self.activation}, packed gate/up (fused Triton)"


class FusedPackedGate:
    """The fused `_apply_gate(gate_up)` of an MoE's experts: act(gate) * up of the (tokens x experts
    picked, 2 * width) output of the batched gate/up projection, gate the first half (HF's
    `_default_apply_gate`). HF's grouped_mm / batched_mm forwards call it on a fresh projection
    output that nothing else reads, so its gradient is written over it (private_input): were that
    promise broken, autograd's version check would raise, never compute a wrong gradient."""

    def __init__(self, activation: str):
        activation_id(activation)
        self.activation = activation

    def __call__(self, gate_up: torch.Tensor) -> torch.Tensor:
        return packed_glu(gate_up, self.activation, private_input=True)

    def __repr__(self) -> str:
        return f"fused packed {self.activation} gate (Triton)"


class GatedExperts:
    """An MoE's experts held as batched 3-D weights (transformers' `@use_experts_implementation`
    classes: MixtralExperts, Qwen2MoeExperts, Qwen3MoeExperts, OlmoeExperts...): `gate_up_proj`
    of (experts, 2 * width, hidden), and `_apply_gate`, which HF's grouped_mm and batched_mm
    forwards call between the two grouped GEMMs (eager PyTorch: chunk, act, mul; 2 kernels forward,
    3 and a cat backward). Its module form is a shallow copy of the experts module (the same
    parameters, state_dict keys unchanged) whose instance `_apply_gate` is a FusedPackedGate."""

    @staticmethod
    def batched(module: torch.nn.Module) -> bool:
        """Experts held as one batched 3-D `gate_up_proj` (called as forward(hidden_states,
        top_k_index, top_k_weights)), whatever their gate."""
        weight = getattr(module, "gate_up_proj", None)
        return isinstance(weight, torch.nn.Parameter) and weight.dim() == 3

    @staticmethod
    def shaped(module: torch.nn.Module) -> bool:
        return (GatedExperts.batched(module) and callable(getattr(module, "_apply_gate", None))
                and getattr(module, "has_gate", True) is True and getattr(module, "is_concatenated", True) is True)

    @staticmethod
    def with_fused_gate(module: torch.nn.Module, activation: str) -> torch.nn.Module:
        """A copy of the experts module sharing its parameters, hooks and children, with the gate fused.
        Whether its forward calls `_apply_gate` at all (Mixtral's eager forward writes the product
        inline) is for patch's check to find: it refuses a swap whose kernel never ran."""
        twin = copy.copy(module)
        twin._apply_gate = FusedPackedGate(activation)
        return twin


def glu_bytes(params: dict) -> dict:
    """Bytes one fused launch moves each way, for gate/up of params["shape"] and params["dtype"]:
    forward reads gate and up and writes y; backward reads dy, gate and up and writes dgate, dup."""
    n = 1
    for d in params["shape"]:
        n *= d
    e = param_dtype(params).itemsize
    return {"forward": 3 * n * e, "backward": 5 * n * e}


def glu_params_from_ops(ops, activations: tuple[str, ...]) -> dict | None:
    """Shape and dtype from a traced activation (one of `activations`, short op names) and the mul
    of its output with `up` (same shape); None when the ops are not that pair."""
    act = next((o for o in ops if o.short in activations), None)
    if act is None or not act.dims or not act.dims[0] or not act.types:
        return None
    shape = tuple(act.dims[0])
    mul = next((o for o in ops if o.short == "mul" and len(o.dims) >= 2
                and tuple(o.dims[0]) == shape and tuple(o.dims[1]) == shape), None)
    dtype = dtype_from_trace(act.types[0])
    if mul is None or dtype is None:
        return None
    return {"shape": list(shape), "dtype": dtype_name(dtype)}


def gated_mlp_width(hidden: int) -> int:
    """The gated MLP's width for a hidden size, as Llama-2 sizes it: 8/3 hidden rounded up to a
    multiple of 256 (4096 -> 11008). Used for benchmark shapes."""
    return -(-hidden * 8 // (3 * 256)) * 256
