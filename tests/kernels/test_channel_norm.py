"""LayerNorm over dim 1 of (N, C, *spatial) (kernels/channel_norm.py), against the exact eager code it
replaces: Hugging Face ConvNextLayerNorm's channels_first branch (permute, F.layer_norm, permute)."""
import pytest
import torch
import torch.nn.functional as F

from fusion_advisor.kernels.channel_norm import ChannelsFirstLayerNorm, channels_first_layer_norm
from fusion_advisor.kernels.numerics import compare
from fusion_advisor.kernels.registry import Inputs
from fusion_advisor.kernels.tolerances import tolerance
from kernel_checks import sm90_resources


def eager(x, weight=None, bias=None, eps=1e-6):
    """ConvNextLayerNorm.forward with data_format="channels_first", for any number of spatial dims."""
    features = x.movedim(1, -1)
    features = F.layer_norm(features, (x.shape[1],), weight, bias, eps)
    return features.movedim(-1, 1)


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(2, 96, 7, 5), (3, 131, 4, 4), (1, 8, 33), (2, 16, 3, 2, 5), (2, 300, 1, 1)])
def test_matches_convnext_channels_first(shape, dtype, affine, device):
    """Forward and every gradient, by the one rule (kernels/numerics.py: the tolerance table, and
    where eager's own bf16/fp16 rounding is the larger error, its float64 run decides)."""
    x = (torch.randn(shape, device=device) + 0.5 * torch.randn(shape[0], 1, *shape[2:], device=device)).to(dtype)
    c = shape[1]
    params = (((1 + 0.3 * torch.randn(c, device=device)).to(dtype), (0.1 * torch.randn(c, device=device)).to(dtype))
              if affine else (None, None))
    grads = (0, 1, 2) if affine else (0,)
    inputs = Inputs((x.requires_grad_(), *(p.requires_grad_() if p is not None else None for p in params)),
                    {"eps": 1e-6}, grad_inputs=grads)
    result = compare(eager, channels_first_layer_norm, inputs, reduced_grads=(1, 2))
    assert result.ok, result.detail
    assert channels_first_layer_norm(x.detach(), *params).is_contiguous()


def test_a_permuted_input_is_read_as_its_values(device):
    x = torch.randn(2, 5, 6, 24, device=device).permute(0, 3, 1, 2)   # channels-last memory, NCHW view
    w, b = torch.randn(24, device=device), torch.randn(24, device=device)
    torch.testing.assert_close(channels_first_layer_norm(x, w, b, 1e-5), eager(x, w, b, 1e-5))


def test_under_autocast_it_returns_what_eager_returns(device):
    if device.type != "cuda":
        pytest.skip("needs CUDA: the real torch.autocast('cuda') policy (CPU's keeps layer_norm in bf16)")
    x = torch.randn(2, 16, 3, 3, dtype=torch.bfloat16, device=device)
    w, b = torch.ones(16, device=device), torch.zeros(16, device=device)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        want, got = eager(x, w, b, 1e-6), channels_first_layer_norm(x, w, b, 1e-6)
    assert got.dtype == want.dtype == torch.float32
    torch.testing.assert_close(got, want, **tolerance(torch.float32))


def test_bad_inputs_say_what_is_wrong(device):
    with pytest.raises(ValueError, match=r"expected \(N, C, \*spatial\)"):
        channels_first_layer_norm(torch.randn(4, 8, device=device))
    with pytest.raises(ValueError, match="weight shape"):
        channels_first_layer_norm(torch.randn(2, 8, 3, device=device), torch.ones(7, device=device))


def test_convnext_channels_first_norm_is_wrapped(device):
    modeling = pytest.importorskip("transformers.models.convnext.modeling_convnext")
    from fusion_advisor.kernels.layer_norm import LayerNorm
    norm = modeling.ConvNextLayerNorm(24, eps=1e-6, data_format="channels_first").to(device)
    fused = LayerNorm.from_module(norm)
    assert isinstance(fused, ChannelsFirstLayerNorm) and fused.weight is norm.weight
    x = torch.randn(2, 24, 5, 5, device=device)
    torch.testing.assert_close(fused(x), norm(x), **tolerance(torch.float32))


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the kernels are built for real")
def test_registers_fit_and_nothing_spills_at_convnext_channel_counts():
    """Registers and spills as ptxas builds the kernels for sm_90 (kernel_checks.sm90_resources): no
    spills at ConvNeXt's channel counts, and one program's registers fit an SM."""
    from fusion_advisor.kernels import channel_norm as cn
    types = {"X": "*bf16", "W": "*bf16", "B": "*bf16", "Y": "*bf16", "DY": "*bf16", "DX": "*bf16", "MEAN": "*fp32",
             "RSTD": "*fp32", "DW_PARTIAL": "*fp32", "DB_PARTIAL": "*fp32", "eps": "fp32"}
    cases = []
    for channels in (96, 384, 768, 1536):
        for kernel, tile in (("_channel_norm_fwd_kernel", cn.FWD_TILE), ("_channel_norm_bwd_kernel", cn.BWD_TILE)):
            block_c, block_s, warps = cn._blocks(channels, 56 * 56, tile)
            cases.append({"module": "fusion_advisor.kernels.channel_norm", "kernel": kernel, "types": types,
                          "constexprs": {"HAS_WEIGHT": True, "HAS_BIAS": True, "BLOCK_C": block_c, "BLOCK_S": block_s},
                          "num_warps": warps, "unaligned": ["eps"]})
    for case, (regs, stack) in zip(cases, sm90_resources(cases)):
        assert stack == 0, (case, stack)
        assert regs * 32 * case["num_warps"] <= 65536, (case, regs)
