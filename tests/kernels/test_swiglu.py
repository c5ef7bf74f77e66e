import importlib.util
import pathlib

import pytest
import torch

from fusion_advisor.kernels import match
from fusion_advisor.kernels.common import as_row_view
from fusion_advisor.kernels.tolerances import tolerance
from fusion_advisor.kernels import swiglu as mod
from kernel_checks import check_against_reference
from traced_ops import forward_ops, windows

SHAPES = [[5, 7, 131], [3, 256], [1, 1, 8], [2, 1500]]


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("shape", SHAPES)
def test_swiglu_matches_silu_mul(shape, dtype, device):
    check_against_reference(mod.PATTERN, {"shape": shape, "dtype": dtype}, device)


def test_chunked_gate_up_read_in_place(device):
    """gate/up as the two halves of a fused projection: strided rows, read without a copy."""
    gate_up = torch.randn(4, 6, 2 * 96, device=device)
    gate, up = gate_up.chunk(2, dim=-1)
    assert as_row_view(gate, "t").data_ptr() == gate.data_ptr()
    ref_in = [t.detach().clone().requires_grad_() for t in (gate, up)]
    fused_in = [t.detach().requires_grad_() for t in (gate, up)]  # still strided views of gate_up
    assert fused_in[0].stride() == (6 * 192, 192, 1)
    ref, fused = mod.reference(*ref_in), mod.swiglu(*fused_in)
    torch.testing.assert_close(fused, ref)
    dy = torch.randn_like(ref)
    ref.backward(dy)
    fused.backward(dy)
    for r, f in zip(ref_in, fused_in):
        torch.testing.assert_close(f.grad, r.grad)


def test_last_dim_strided_input_is_copied(device):
    gate, up = torch.randn(32, 12, device=device).t(), torch.randn(12, 32, device=device)
    torch.testing.assert_close(mod.swiglu(gate, up), mod.reference(gate, up))


def _example_llama():
    path = pathlib.Path(__file__).parents[2] / "examples" / "llama_train.py"
    spec = importlib.util.spec_from_file_location("llama_train", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_module_wraps_llama_mlp(device):
    mlp = _example_llama().LlamaMLP(32, 48).to(device)
    fused = mod.SwiGLUMLP.from_module(mlp)
    assert fused.gate_proj is mlp.gate_proj and fused.down_proj is mlp.down_proj
    x = torch.randn(2, 5, 32, device=device)
    torch.testing.assert_close(fused(x), mlp(x))


def test_module_with_other_activation_is_refused():
    mlp = _example_llama().LlamaMLP(8, 16)
    mlp.act_fn = torch.nn.GELU()
    with pytest.raises(ValueError, match="not SiLU"):
        mod.SwiGLUMLP.from_module(mlp)


def test_bad_inputs_are_refused(device):
    with pytest.raises(TypeError, match="float64 is not supported"):
        mod.swiglu(torch.randn(2, 8, dtype=torch.float64, device=device), torch.randn(2, 8, dtype=torch.float64, device=device))
    with pytest.raises(ValueError, match="same shape"):
        mod.swiglu(torch.randn(2, 8, device=device), torch.randn(2, 4, device=device))
    with pytest.raises(TypeError, match="same dtype"):
        mod.swiglu(torch.randn(2, 8, device=device), torch.randn(2, 8, device=device).half())


def test_params_read_from_llama_trace():
    """Every layer's `silu linear mul` (up_proj between) in a real H200 trace reads as SwiGLU."""
    found = [match(w) for w in windows(forward_ops("llama-bf16-h200.json.gz"), "aten::silu", 2, 3)]
    assert len(found) == 4  # 4 layers
    for pattern, params in found:
        assert pattern is mod.PATTERN
        assert params == {"shape": [4, 1024, 2752], "dtype": "bfloat16"}


def test_fused_bytes():
    assert mod.fused_bytes({"shape": [4096, 11008], "dtype": "bfloat16"}) == {
        "forward": 3 * 4096 * 11008 * 2, "backward": 5 * 4096 * 11008 * 2}


def test_custom_ops_pass_opcheck(device):
    gate, up = torch.randn(3, 40, device=device), torch.randn(3, 40, device=device)
    torch.library.opcheck(torch.ops.fusion_advisor.glu_fwd.default, (gate, up, "silu"))
    torch.library.opcheck(torch.ops.fusion_advisor.glu_bwd.default, (torch.randn_like(gate), gate, up, "silu"))


def test_runs_under_torch_compile_fullgraph(device):
    gate = torch.randn(3, 40, device=device, requires_grad=True)
    up = torch.randn(3, 40, device=device, requires_grad=True)
    compiled = torch.compile(lambda g, u: mod.swiglu(g, u).sum(), fullgraph=True, backend="aot_eager")
    compiled(gate, up).backward()
    g_ref, u_ref = (t.detach().clone().requires_grad_() for t in (gate, up))
    mod.reference(g_ref, u_ref).sum().backward()
    torch.testing.assert_close(gate.grad, g_ref.grad)
    torch.testing.assert_close(up.grad, u_ref.grad)


def test_source_rewrite_of_the_example_llama_mlp():
    from fusion_advisor.source_patch import rewrite_source
    path = pathlib.Path(__file__).parents[2] / "examples" / "llama_train.py"
    out = rewrite_source(str(path), path.read_text(), {}, [(r, set(), "swiglu") for r in mod.PATTERN.rewrites])
    assert [c.after for c in out.changes] == ["swiglu(self.gate_proj(x), self.up_proj(x))"]
    assert "from fusion_advisor.kernels.swiglu import swiglu" in out.after



def test_private_inputs_get_their_gradients_in_place(device):
    """private_inputs=True: dgate and dup are written over gate and up (no new buffers), with the
    same values as eager silu(gate) * up's backward."""
    leaf_g = torch.randn(6, 40, device=device, requires_grad=True)
    leaf_u = torch.randn(6, 40, device=device, requires_grad=True)
    gate, up = leaf_g * 1.0, leaf_u * 1.0
    ptrs, grad_ptrs = (gate.data_ptr(), up.data_ptr()), []
    gate.register_hook(lambda g: grad_ptrs.append(g.data_ptr()))
    up.register_hook(lambda g: grad_ptrs.append(g.data_ptr()))
    mod.glu(gate, up, "silu", private_inputs=True).pow(2).sum().backward()
    assert sorted(grad_ptrs) == sorted(ptrs)
    g_ref, u_ref = (t.detach().clone().requires_grad_() for t in (leaf_g, leaf_u))
    mod.reference(g_ref, u_ref).pow(2).sum().backward()
    torch.testing.assert_close(leaf_g.grad, g_ref.grad, **tolerance(torch.float32))
    torch.testing.assert_close(leaf_u.grad, u_ref.grad, **tolerance(torch.float32))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_fused_mlp_gradients_match_llama_mlp(dtype, device):
    """The module path (private_inputs): every gradient equals eager LlamaMLP's."""
    torch.manual_seed(0)
    mlp = _example_llama().LlamaMLP(24, 40).to(device, dtype)
    fused = mod.SwiGLUMLP.from_module(mlp)
    x = torch.randn(3, 5, 24, device=device, dtype=dtype, requires_grad=True)
    fused(x).float().sum().backward()
    got = [x.grad] + [p.grad for p in mlp.parameters()]
    x_ref = x.detach().clone().requires_grad_()
    for p in mlp.parameters():
        p.grad = None
    mlp(x_ref).float().sum().backward()
    for g, want in zip(got, [x_ref.grad] + [p.grad for p in mlp.parameters()]):
        torch.testing.assert_close(g, want, **tolerance(dtype, 15))


def test_overwritten_inputs_fail_loudly_for_another_reader(device):
    """private_inputs is a promise: another op that saved gate for its own backward gets autograd's
    in-place error, never the gradient's values."""
    leaf = torch.randn(4, 16, device=device, requires_grad=True)
    gate, up = leaf * 1.0, leaf * 2.0
    other = gate.sin().sum()  # saves gate; created first, so its backward runs after glu's
    z = mod.glu(gate, up, "silu", private_inputs=True).sum() + other
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        z.backward()


def test_strided_halves_are_not_overwritten(device):
    """gate and up as the two halves of one projection (not contiguous): new gradient buffers."""
    gu = torch.randn(4, 32, device=device, requires_grad=True)
    gate, up = (gu * 1.0).chunk(2, -1)
    mod.glu(gate, up, "silu", private_inputs=True).sum().backward()
    ref = gu.detach().clone().requires_grad_()
    mod.reference(*ref.chunk(2, -1)).sum().backward()
    torch.testing.assert_close(gu.grad, ref.grad, **tolerance(torch.float32))
