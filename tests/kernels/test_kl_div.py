import pytest
import torch

from fusion_advisor.kernels import kl_div as mod
from fusion_advisor.core.records import OpRecord
from kernel_checks import check_against_reference


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("shape", [[6, 42, 431], [64, 512], [1, 7]])
@pytest.mark.parametrize("log_target", [False, True])
def test_batchmean_matches_f_kl_div(shape, dtype, log_target, device):
    check_against_reference(mod.PATTERN, {"shape": shape, "dtype": dtype, "reduction": "batchmean",
                                          "log_target": log_target}, device)


@pytest.mark.filterwarnings("ignore:reduction. 'mean' divides")  # F.kl_div's own warning about "mean"
@pytest.mark.parametrize("reduction", ["sum", "none", "mean"])
@pytest.mark.parametrize("log_target", [False, True])
def test_other_reductions(reduction, log_target, device):
    check_against_reference(mod.PATTERN, {"shape": [5, 300], "dtype": "float32", "reduction": reduction,
                                          "log_target": log_target}, device)


def test_bf16_input_with_fp32_target_promotes_like_reference(device):
    check_against_reference(mod.PATTERN, {"shape": [8, 100], "dtype": "bfloat16", "target_dtype": "float32"}, device)


def test_zero_target_probabilities_contribute_nothing(device):
    x = torch.randn(4, 50, device=device).log_softmax(-1).requires_grad_()
    t = torch.randn(4, 50, device=device).softmax(-1)
    t[:, ::3] = 0.0  # xlogy(0, 0) = 0, not NaN
    torch.testing.assert_close(mod.kl_div(x, t), mod.reference(x, t))


def test_non_contiguous_input(device):
    x = torch.randn(300, 6, device=device).log_softmax(0).t().requires_grad_()  # (6, 300), last dim strided
    t = torch.randn(6, 300, device=device).softmax(-1)
    torch.testing.assert_close(mod.kl_div(x, t), mod.reference(x, t))
    (g_fused,) = torch.autograd.grad(mod.kl_div(x, t), x)
    (g_ref,) = torch.autograd.grad(mod.reference(x, t), x)
    torch.testing.assert_close(g_fused, g_ref)


def test_bad_inputs_are_refused(device):
    x = torch.randn(4, 10, device=device)
    with pytest.raises(TypeError, match="float64 is not supported"):
        mod.kl_div(x.double(), x.double())
    with pytest.raises(ValueError, match="same shape"):
        mod.kl_div(x, x[:1])
    with pytest.raises(ValueError, match="no gradient for target"):
        mod.kl_div(x, x.clone().requires_grad_())
    with pytest.raises(ValueError, match="reduction 'avg'"):
        mod.kl_div(x, x, reduction="avg")


def test_module_is_a_drop_in_for_nn_kl_div_loss(device):
    ref = torch.nn.KLDivLoss(reduction="batchmean", log_target=True)
    fused = mod.KLDivLoss.from_module(ref)
    x = torch.randn(3, 20, device=device).log_softmax(-1)
    t = torch.randn(3, 20, device=device).log_softmax(-1)
    torch.testing.assert_close(fused(x, t), ref(x, t))


def test_custom_ops_pass_opcheck(device):
    x = torch.randn(3, 70, device=device).log_softmax(-1)
    t = torch.randn(3, 70, device=device).softmax(-1)
    for reduction in ("batchmean", "none"):
        torch.library.opcheck(torch.ops.fusion_advisor.kl_div_fwd.default, (x, t, reduction, False))
    torch.library.opcheck(torch.ops.fusion_advisor.kl_div_bwd.default,
                          (torch.tensor(1.5, device=device), t, torch.float32, "batchmean", True))


def test_params_read_from_traced_ops():
    """`F.kl_div(F.log_softmax(s / T, -1), F.softmax(t / T, -1), reduction="batchmean")` as torch.profiler
    records it (transcribed from a real trace: kl_div is a composite, recorded alike on CPU and CUDA;
    "batchmean" is a "sum" kl_div, enum 2, then the division of the scalar by input.size(0))."""
    shape, f = (512, 1024), "float"
    ops = [OpRecord("aten::log_softmax", (shape, (), ()), (f, "Scalar", ""), ("", "-1", "")),
           OpRecord("aten::div", (shape, ()), (f, "Scalar"), ("", "2.")),
           OpRecord("aten::softmax", (shape, (), ()), (f, "Scalar", ""), ("", "-1", "")),
           OpRecord("aten::kl_div", (shape, shape, (), ()), (f, f, "Scalar", "Scalar"), ("", "", "2", "False")),
           OpRecord("aten::mul", (shape, shape), (f, f), ("", "")),
           OpRecord("aten::xlogy", (shape, shape), (f, f), ("", "")),
           OpRecord("aten::sub", (shape, shape, ()), (f, f, "Scalar"), ("", "", "1")),
           OpRecord("aten::sum", (shape, ()), (f, ""), ("", "")),
           OpRecord("aten::div", ((), ()), (f, "long int"), ("", ""))]
    expected = {"shape": [512, 1024], "dtype": "float32", "target_dtype": "float32", "reduction": "batchmean",
                "log_target": False}
    assert mod.PATTERN.match(ops) == expected
    top_level = [o for o in ops if o.short not in ("mul", "xlogy", "sub", "sum")]
    assert mod.PATTERN.match(top_level) == expected
    assert mod.PATTERN.match(ops[:-1])["reduction"] == "sum"  # no division by the batch: "sum" it is
    log_target = ops[3:4] + [OpRecord("aten::div", ((), ()), (f, "long int"), ("", ""))]
    log_target[0] = OpRecord("aten::kl_div", (shape, shape, (), ()), (f, f, "Scalar", "Scalar"), ("", "", "2", "True"))
    assert mod.PATTERN.match(log_target)["log_target"] is True
    assert mod.PATTERN.match(ops[:3]) is None
