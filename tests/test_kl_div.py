import pytest
import torch

from conftest import DATA
from fusion_advisor.kernels import kl_div as mod
from kernel_checks import check_against_reference, traced_ops

DISTILL = DATA / "distill-bf16-h100.json.gz"


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
    """Distillation loss `F.kl_div(log_softmax(s / T), softmax(t / T), reduction="batchmean")`,
    traced on an H100 (the logits are fp32 after HF's `.float()`)."""
    expected = {"shape": [512, 1024], "dtype": "float32", "target_dtype": "float32", "reduction": "batchmean",
                "log_target": False}
    for depth in (0, None):
        ops = traced_ops(DISTILL, "aten::log_softmax", "aten::div", max_depth=depth)
        assert mod.PATTERN.match(ops) is None or depth is None  # the div comes after kl_div, not before
        ops = traced_ops(DISTILL, "aten::kl_div", "aten::mul", max_depth=depth)
        assert mod.PATTERN.match(ops) == expected
    # Without the division by the batch size, a "sum" kl_div is what it says.
    ops = traced_ops(DISTILL, "aten::kl_div", "aten::kl_div", max_depth=0)
    assert mod.PATTERN.match(ops)["reduction"] == "sum"

