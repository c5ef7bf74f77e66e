import pytest
import torch

from fusion_advisor.kernels import geglu as mod
from fusion_advisor.kernels import match
from fusion_advisor.core.records import OpRecord
from kernel_checks import check_against_reference
from traced_ops import forward_ops, windows


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("shape", [[5, 7, 131], [3, 256]])
def test_geglu_matches_gelu_mul(shape, approximate, dtype, device):
    check_against_reference(mod.PATTERN, {"shape": shape, "dtype": dtype, "approximate": approximate}, device)


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_the_written_out_tanh_gelu_matches_hf_new_gelu_times_up(dtype, device):
    """T5 v1.1's MLP: HF's NewGELUActivation (eight ops, each rounded) times up, against one fused
    tanh GELU rounded once."""
    check_against_reference(mod.PATTERN, {"shape": [5, 7, 131], "dtype": dtype, "approximate": "tanh",
                                          "written_out": True}, device)


def test_unknown_approximation_is_refused(device):
    with pytest.raises(ValueError, match="approximate must be"):
        mod.geglu(torch.randn(2, 8, device=device), torch.randn(2, 8, device=device), approximate="erf")


def test_unsupported_dtype_is_refused(device):
    x = torch.randn(2, 8, dtype=torch.float64, device=device)
    with pytest.raises(TypeError, match="float64 is not supported"):
        mod.geglu(x, x)


class _GemmaMLP(torch.nn.Module):
    def __init__(self, act):
        super().__init__()
        self.gate_proj = torch.nn.Linear(16, 24, bias=False)
        self.up_proj = torch.nn.Linear(16, 24, bias=False)
        self.down_proj = torch.nn.Linear(24, 16, bias=False)
        self.act_fn = act

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_module_reads_approximation_off_act_fn(approximate, device):
    mlp = _GemmaMLP(torch.nn.GELU(approximate=approximate)).to(device)
    fused = mod.GEGLUMLP.from_module(mlp)
    assert fused.activation == {"none": "gelu", "tanh": "gelu_tanh"}[approximate]
    assert fused.up_proj is mlp.up_proj
    x = torch.randn(3, 16, device=device)
    torch.testing.assert_close(fused(x), mlp(x))


def test_module_with_other_activation_is_refused():
    with pytest.raises(ValueError, match="not a known GELU"):
        mod.GEGLUMLP.from_module(_GemmaMLP(torch.nn.SiLU()))


def test_liger_adapter_refuses_exact_gelu():
    with pytest.raises(NotImplementedError, match="tanh"):
        mod.liger(torch.randn(2, 4), torch.randn(2, 4), approximate="none")


def test_params_read_from_traced_ops():
    """The real gelu op of the GPT trace (its `approximate` unrecorded), then a mul with up."""
    gelu_windows = windows(forward_ops("gpt-bf16-h200.json.gz"), "aten::gelu", 2, 2)
    # GPT-2's MLP is linear -> gelu -> linear: no mul, so not GEGLU.
    assert all(mod.PATTERN.match(w) is None for w in gelu_windows)
    gelu = gelu_windows[0][2]
    assert gelu.short == "gelu" and gelu.concrete == ("", "")
    shape = gelu.dims[0]
    ops = [gelu, OpRecord("aten::linear", (shape[:2] + (768,), (3072, 768), (3072,)), ("c10::BFloat16",) * 3),
           OpRecord("aten::mul", (shape, shape), ("c10::BFloat16", "c10::BFloat16"), ("", ""))]
    pattern, params = match(ops)
    assert pattern is mod.PATTERN
    assert params == {"shape": [8, 512, 3072], "dtype": "bfloat16", "approximate": "none"}


def test_runs_under_torch_compile_fullgraph(device):
    gate = torch.randn(3, 40, device=device, requires_grad=True)
    up = torch.randn(3, 40, device=device, requires_grad=True)
    compiled = torch.compile(lambda g, u: mod.geglu(g, u, "tanh").sum(), fullgraph=True, backend="aot_eager")
    compiled(gate, up).backward()
    g_ref, u_ref = (t.detach().clone().requires_grad_() for t in (gate, up))
    mod.reference(g_ref, u_ref, "tanh").sum().backward()
    torch.testing.assert_close(gate.grad, g_ref.grad)
    torch.testing.assert_close(up.grad, u_ref.grad)


def test_source_rewrites_compute_the_same(device):
    from fusion_advisor.source_patch import rewrite_source
    text = ("import torch.nn.functional as F\n\n"
            "def exact(g, u):\n    return F.gelu(g) * u\n\n"
            "def tanh(g, u):\n    return u * F.gelu(g, approximate='tanh')\n")
    out = rewrite_source("mlp.py", text, {}, [(r, set(), "geglu") for r in mod.PATTERN.rewrites])
    assert [c.after for c in out.changes] == ["geglu(g, u)", "geglu(g, u, approximate='tanh')"]
    before, after = {}, {}
    exec(compile(text, "before.py", "exec"), before)
    exec(compile(out.after, "after.py", "exec"), after)
    g, u = torch.randn(3, 40, device=device), torch.randn(3, 40, device=device)
    for fn in ("exact", "tanh"):
        torch.testing.assert_close(after[fn](g, u), before[fn](g, u))


def _op(name, dims, dtype="c10::BFloat16"):
    return OpRecord(f"aten::{name}", dims, tuple(dtype if d else "double" for d in dims), ("",) * len(dims))


def test_the_written_out_tanh_gelu_is_geglu_only_with_the_mul_by_up():
    """HF's NewGELUActivation as traced (T5 v1.1): alone a generated chain's, with the gated MLP's
    mul by up (the next module's op) the geglu pattern, tanh, written out."""
    s = (4, 16, 96)
    chain = [_op("mul", (s, ())), _op("pow", (s, ())), _op("mul", (s, ())), _op("add", (s, s)), _op("mul", (s, ())),
             _op("tanh", (s,)), _op("add", (s, ())), _op("mul", (s, s))]
    assert mod.PATTERN.match(chain) is None
    pattern, params = match(chain + [_op("mul", (s, s))])
    assert pattern is mod.PATTERN
    assert params == {"shape": [4, 16, 96], "dtype": "bfloat16", "approximate": "tanh", "written_out": True}
