"""check_equivalent's rule: ours against eager, and where they differ past the tolerance, eager's own
error against the original run in float64 decides (as kernels/numerics.py judges kernels)."""
import torch
import torch.nn.functional as F
from torch import nn

from fusion_advisor.equivalence import check_equivalent


class SplitKLinear(nn.Linear):
    """A Linear whose reduction rounds to bf16 after every 8 products, as cuBLAS's bf16 split-K
    reduction does on a long K (an LM head's dx over a 50,265 vocabulary)."""

    def forward(self, x):
        y = F.linear(x[..., :8], self.weight[:, :8])
        for i in range(8, self.in_features, 8):
            y = y + F.linear(x[..., i:i + 8], self.weight[:, i:i + 8])
        return y


class FP32Linear(nn.Module):
    """The same Linear (its weight, shared) reduced in fp32: closer to the exact result than the original."""

    def __init__(self, linear: nn.Linear, scale: float = 1.0):
        super().__init__()
        self.weight, self.scale = linear.weight, scale

    def forward(self, x):
        return F.linear(x.float(), self.weight.float()).to(x.dtype) * self.scale


def test_a_replacement_more_exact_than_eager_passes_where_the_plain_tolerance_refused_it():
    torch.manual_seed(0)
    original = SplitKLinear(16384, 64, bias=False).to(torch.bfloat16)
    x = torch.randn(2, 7, 16384).to(torch.bfloat16)
    # the plain comparison refuses it: eager's rounding is past bf16's tolerance at 24 % of the outputs
    plain_ok = torch.isclose(FP32Linear(original)(x).float(), original(x).float(), atol=2e-2, rtol=1.6e-2).all()
    assert not plain_ok
    assert check_equivalent(original, FP32Linear(original)) is None


def test_a_replacement_that_computes_something_else_still_fails():
    torch.manual_seed(0)
    original = SplitKLinear(16384, 64, bias=False).to(torch.bfloat16)
    reason = check_equivalent(original, FP32Linear(original, scale=1.05))
    assert reason is not None and reason.startswith("output")


def test_a_wrong_weight_gradient_fails_in_fp32():
    class NoWeightGrad(nn.Module):
        def __init__(self, linear):
            super().__init__()
            self.weight, self.bias = linear.weight, linear.bias

        def forward(self, x):
            return F.linear(x, self.weight.detach() + 0 * self.weight, self.bias)

    torch.manual_seed(0)
    original = nn.Linear(32, 16)
    reason = check_equivalent(original, NoWeightGrad(original))
    assert reason is not None and reason.startswith("grad of weight")
    assert check_equivalent(original, nn.Linear(32, 16)) is not None   # other weights: not the same function


def test_a_norm_whose_output_is_laid_out_otherwise_is_refused(device):
    """Values equal, memory order not: Hugging Face's channels_first ConvNextLayerNorm returns
    channels_last; a replacement returning NCHW made ConvNeXt's depthwise convs 52 ms a step slower
    on the H100 zoo (2026-12-07), so the check refuses it, and the module form keeps the order."""
    import pytest
    modeling = pytest.importorskip("transformers.models.convnext.modeling_convnext")
    from fusion_advisor.kernels.channel_norm import ChannelsFirstLayerNorm
    from fusion_advisor.module_forms import check_norm, norm_builders, norm_parts, norm_probe, redrawn_copy

    norm = redrawn_copy(modeling.ConvNextLayerNorm(24, eps=1e-6, data_format="channels_first").to(device))
    x = norm_probe(24, torch.float32, device, layout="nchw")
    nchw = ChannelsFirstLayerNorm(norm.weight, norm.bias, 1e-6, "contiguous")
    reason = check_norm(norm, nchw, x, channels_first=True)
    assert reason is not None and "strides" in reason and "other kernels" in reason
    (candidate,) = norm_builders("layer_norm", norm_parts(norm))
    built = candidate.build(norm)
    assert built.output_layout == "channels_last" and check_norm(norm, built, x, channels_first=True) is None
