import pytest
import torch

from fusion_advisor.kernels import bias_act as mod
from fusion_advisor.kernels import match
from fusion_advisor.kernels.activations import ACTIVATION_IDS
from fusion_advisor.core.records import OpRecord
from kernel_checks import check_against_reference
from traced_ops import forward_ops, windows


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("activation", list(ACTIVATION_IDS))
def test_bias_act_matches_eager(activation, dtype, device):
    check_against_reference(mod.PATTERN, {"shape": [5, 7, 131], "dtype": dtype, "activation": activation},
                            device, reduced_grads=(1,))


@pytest.mark.parametrize("shape", [[3, 256], [1, 1, 8], [8, 1500]])
def test_round_and_wide_shapes(shape, device):
    check_against_reference(mod.PATTERN, {"shape": shape, "dtype": "bfloat16", "activation": "gelu_tanh"},
                            device, reduced_grads=(1,))


def test_fp32_bias_with_bf16_input_promotes_like_eager(device):
    check_against_reference(mod.PATTERN, {"shape": [4, 96], "dtype": "bfloat16", "bias_dtype": "float32",
                                          "activation": "silu"}, device, reduced_grads=(1,))


def test_leaky_relu_slope_is_used(device):
    check_against_reference(mod.PATTERN, {"shape": [4, 96], "dtype": "float32", "activation": "leaky_relu",
                                          "negative_slope": 0.2}, device, reduced_grads=(1,))


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
def test_nan_propagates_like_eager(device):
    # (no inf: eager CPU gelu(inf) is NaN, the CUDA one and ours inf)
    x = torch.tensor([[float("nan"), -1.0, 2.0, -float("inf")]], device=device)
    bias = torch.zeros(4, device=device)
    for activation in ("relu", "gelu", "silu", "relu_squared", "leaky_relu"):
        torch.testing.assert_close(mod.bias_act(x, bias, activation), mod.reference(x, bias, activation),
                                   equal_nan=True)


def test_non_contiguous_input(device):
    x = torch.randn(64, 48, device=device).t()  # (48, 64), last dim strided
    bias = torch.randn(64, device=device)
    torch.testing.assert_close(mod.bias_act(x, bias, "gelu"), mod.reference(x, bias, "gelu"))


def test_bad_inputs_are_refused(device):
    x = torch.randn(2, 8, device=device)
    with pytest.raises(TypeError, match="float64 is not supported"):
        mod.bias_act(x.double(), torch.zeros(8, dtype=torch.float64, device=device))
    with pytest.raises(ValueError, match="bias shape"):
        mod.bias_act(x, torch.zeros(4, device=device))
    with pytest.raises(ValueError, match="unknown activation 'swish'"):
        mod.bias_act(x, torch.zeros(8, device=device), "swish")


def test_params_read_from_traced_ops():
    """Real GPT trace ops: its residual add before a gelu is not a bias add; a bias add is."""
    gpt = forward_ops("gpt-bf16-h200.json.gz")
    window = windows(gpt, "aten::gelu", 4, 0)[0]  # add (residual), layer_norm, linear, gelu
    assert [o.short for o in window][-4:] == ["add", "layer_norm", "linear", "gelu"]
    assert mod.PATTERN.match(window[-4:]) is None
    gelu = window[-1]
    bias_add = OpRecord("aten::add", (gelu.dims[0], (3072,), ()), ("c10::BFloat16", "c10::BFloat16", "Scalar"),
                        ("", "", "1"))
    pattern, params = match([bias_add, gelu])
    assert pattern is mod.PATTERN
    assert params == {"shape": [8, 512, 3072], "dtype": "bfloat16", "activation": "gelu"}
    relu = OpRecord("aten::relu", (gelu.dims[0],), ("float",))
    square = OpRecord("aten::square", (gelu.dims[0],), ("float",))
    fp32_add = OpRecord("aten::add", ((3072,), gelu.dims[0]), ("c10::BFloat16", "float"))
    assert mod.PATTERN.match([fp32_add, relu, square]) == {
        "shape": [8, 512, 3072], "dtype": "float32", "bias_dtype": "bfloat16", "activation": "relu_squared"}


def test_fused_bytes_counts_partial_bias_grads():
    params = {"shape": [4096, 4096], "dtype": "bfloat16", "activation": "gelu", "num_sms": 132}
    programs, _ = mod.bwd_programs(4096, 4096, 132)
    assert 1 <= programs <= 4096
    assert mod.fused_bytes(params) == {"forward": 4096 * 4096 * 4 + 4096 * 2,
                                       "backward": 4096 * 4096 * 6 + 4096 * 2 + 2 * programs * 4096 * 4}


def test_custom_ops_pass_opcheck(device):
    x, bias = torch.randn(3, 40, device=device), torch.randn(40, device=device)
    torch.library.opcheck(torch.ops.fusion_advisor.bias_act_fwd.default, (x, bias, "gelu_tanh", 0.01))
    torch.library.opcheck(torch.ops.fusion_advisor.bias_act_bwd.default,
                          (torch.randn_like(x), x, bias, "gelu_tanh", 0.01))


def test_runs_under_torch_compile_fullgraph(device):
    x = torch.randn(3, 40, device=device, requires_grad=True)
    bias = torch.randn(40, device=device, requires_grad=True)
    compiled = torch.compile(lambda a, b: mod.bias_act(a, b, "gelu").sum(), fullgraph=True, backend="aot_eager")
    compiled(x, bias).backward()
    x_ref, b_ref = (t.detach().clone().requires_grad_() for t in (x, bias))
    mod.reference(x_ref, b_ref, "gelu").sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad)
    torch.testing.assert_close(bias.grad, b_ref.grad)


def test_source_rewrites_compute_the_same(device):
    """Each rewrite, applied to code written either way round (`h + bias`, `bias + h`), gives
    code that computes what the original did."""
    from fusion_advisor.source_patch import rewrite_source
    text = ("import torch.nn.functional as F\n\n"
            "def gelu_tanh(h, bias):\n    return F.gelu(h + bias, approximate=\"tanh\")\n\n"
            "def silu_swapped(h, bias):\n    return F.silu(bias + h)\n")
    out = rewrite_source("mlp.py", text, {}, [(r, set(), "bias_act") for r in mod.PATTERN.rewrites])
    assert len(out.changes) == 2 and "from fusion_advisor.kernels.bias_act import bias_act" in out.after
    before, after = {}, {}
    exec(compile(text, "before.py", "exec"), before)
    exec(compile(out.after, "after.py", "exec"), after)
    h, bias = torch.randn(3, 40, device=device), torch.randn(40, device=device)
    for fn in ("gelu_tanh", "silu_swapped"):
        torch.testing.assert_close(after[fn](h, bias), before[fn](h, bias))
