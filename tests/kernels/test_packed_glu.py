"""The packed gated activation (Phi-3's and GLM's MLP): gate and up are the halves of one fused
projection; the gradient comes back as that projection's, written over it where it is private."""
import pytest
import torch
import torch.nn.functional as F

from fusion_advisor.kernels import geglu, swiglu
from fusion_advisor.kernels.glu import PackedGatedMLP, packed_glu
from fusion_advisor.kernels.tolerances import tolerance

EAGER = {"silu": F.silu, "gelu": F.gelu, "gelu_tanh": lambda t: F.gelu(t, approximate="tanh")}


def eager_packed(gate_up: torch.Tensor, activation: str) -> torch.Tensor:
    """Phi3MLP's lines, verbatim but for the activation."""
    gate, up_states = gate_up.chunk(2, dim=-1)
    return up_states * EAGER[activation](gate)


@pytest.mark.parametrize("private", [False, True])
@pytest.mark.parametrize("activation", ["silu", "gelu", "gelu_tanh"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(5, 7, 2 * 131), (3, 2 * 256), (1, 2)])
def test_packed_glu_matches_the_eager_lines(shape, dtype, activation, private, device):
    base = torch.randn(shape, device=device).to(dtype)
    ref_in, fused_in = base.clone().requires_grad_(), base.clone().requires_grad_()
    # private: the fused call's input is a fresh tensor nothing else reads, as a projection's output is
    fused_arg = fused_in * 1 if private else fused_in
    ref = eager_packed(ref_in, activation)
    fused = packed_glu(fused_arg, activation, private_input=private)
    tol = tolerance(dtype)
    torch.testing.assert_close(fused, ref, **tol)
    dy = torch.randn_like(ref)
    ref.backward(dy)
    fused.backward(dy)
    torch.testing.assert_close(fused_in.grad, ref_in.grad, **tol)


def test_private_backward_writes_over_the_projection_output(device):
    gate_up = torch.randn(4, 2 * 64, device=device, requires_grad=True)
    fresh = gate_up * 1.0
    seen = []
    fresh.register_hook(lambda g: seen.append(g.data_ptr()))
    packed_glu(fresh, "silu", private_input=True).sum().backward()
    assert seen == [fresh.data_ptr()]            # no (rows, 2 * width) gradient buffer, no cat


def test_an_odd_last_dim_is_refused():
    with pytest.raises(ValueError, match="even last dim"):
        packed_glu(torch.randn(3, 5), "silu")


class Phi3LikeMLP(torch.nn.Module):
    """transformers' Phi3MLP, as written there (gate the first half)."""

    def __init__(self, hidden: int, width: int, act: torch.nn.Module):
        super().__init__()
        self.gate_up_proj = torch.nn.Linear(hidden, 2 * width, bias=False)
        self.down_proj = torch.nn.Linear(width, hidden, bias=False)
        self.activation_fn = act

    def forward(self, hidden_states):
        up_states = self.gate_up_proj(hidden_states)
        gate, up_states = up_states.chunk(2, dim=-1)
        up_states = up_states * self.activation_fn(gate)
        return self.down_proj(up_states)


@pytest.mark.parametrize("pattern, act, activation", [(swiglu, torch.nn.SiLU(), "silu"),
                                                      (geglu, torch.nn.GELU(approximate="tanh"), "gelu_tanh")])
def test_packed_mlps_are_wrapped_with_their_projections_shared(pattern, act, activation, device):
    mlp = Phi3LikeMLP(32, 48, act).to(device)
    fused = pattern.PATTERN.module_factory(mlp)
    assert isinstance(fused, PackedGatedMLP) and fused.activation == activation
    assert fused.gate_up_proj is mlp.gate_up_proj and fused.down_proj is mlp.down_proj
    x = torch.randn(2, 5, 32, device=device)
    torch.testing.assert_close(fused(x), mlp(x))


class ModernBertLikeMLP(torch.nn.Module):
    """ModernBERT's MLP as written: one Wi projection chunked, act on the first half, a dropout, Wo."""

    def __init__(self, hidden: int, width: int, p: float):
        super().__init__()
        self.Wi = torch.nn.Linear(hidden, 2 * width, bias=False)
        self.act = torch.nn.GELU()
        self.drop = torch.nn.Dropout(p)
        self.Wo = torch.nn.Linear(width, hidden, bias=False)

    def forward(self, hidden_states):
        input, gate = self.Wi(hidden_states).chunk(2, dim=-1)
        return self.Wo(self.drop(self.act(input) * gate))


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_a_packed_mlp_under_its_own_names_keeps_them_and_its_dropout(p, device):
    mlp = ModernBertLikeMLP(32, 48, p).to(device)
    fused = geglu.PATTERN.module_factory(mlp)
    assert isinstance(fused, PackedGatedMLP) and fused.activation == "gelu"
    assert list(fused.state_dict()) == list(mlp.state_dict()) == ["Wi.weight", "Wo.weight"]
    assert fused.Wi is mlp.Wi and fused.dropout is mlp.drop
    x = torch.randn(2, 5, 32, device=device)
    torch.manual_seed(1)
    want = mlp(x)
    torch.manual_seed(1)
    torch.testing.assert_close(fused(x), want, **tolerance(torch.float32))


def test_a_packed_mlp_with_another_activation_is_refused():
    with pytest.raises(ValueError, match="not SiLU"):
        swiglu.SwiGLUMLP.from_module(Phi3LikeMLP(8, 8, torch.nn.ReLU()))
