"""LayerNorm over dim 1 of (N, C, *spatial) (kernels/channel_norm.py), against the exact eager code it
replaces: Hugging Face ConvNextLayerNorm's channels_first branch (permute, F.layer_norm, permute)."""
import pytest
import torch
import torch.nn.functional as F

from fusion_advisor.kernels.channel_norm import (ChannelsFirstLayerNorm, channels_first_layer_norm, channels_last,
                                                 output_layout_of)
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
    # the memory order eager's permuted layer_norm returns (channels_last), from either order of x
    for xi in (x.detach(), x.detach().movedim(1, -1).contiguous().movedim(-1, 1)):
        assert same_strides(channels_first_layer_norm(xi, *params), eager(xi, *params))


def same_strides(a, b):
    """Equal strides on every dim longer than 1 (a dim of size 1 may have any stride)."""
    return a.shape == b.shape and all(sa == sb for sa, sb, n in zip(a.stride(), b.stride(), a.shape) if n > 1)


def test_a_permuted_input_is_read_as_its_values(device):
    x = torch.randn(2, 5, 6, 24, device=device).permute(0, 3, 1, 2)   # channels-last memory, NCHW view
    w, b = torch.randn(24, device=device), torch.randn(24, device=device)
    torch.testing.assert_close(channels_first_layer_norm(x, w, b, 1e-5), eager(x, w, b, 1e-5))


@pytest.mark.parametrize("layout", ["channels_last", "contiguous", "like_input"])
def test_each_memory_order_in_and_out_forward_and_backward(layout, device):
    """x and the upstream gradient in either memory order, the output in each requested one: the values
    and gradients of eager's, the output and dx in the promised orders."""
    torch.manual_seed(0)
    w, b = 1 + 0.3 * torch.randn(24, device=device), 0.1 * torch.randn(24, device=device)
    for x_cl in (False, True):
        for dy_cl in (False, True):
            x = torch.randn(2, 24, 5, 3, device=device)
            x = x.to(memory_format=torch.channels_last) if x_cl else x
            dy = torch.randn(2, 24, 5, 3, device=device)
            dy = dy.to(memory_format=torch.channels_last) if dy_cl else dy
            xs = [x.clone().requires_grad_(), x.clone().requires_grad_()]
            ws, bs = [w.clone().requires_grad_() for _ in xs], [b.clone().requires_grad_() for _ in xs]
            want = eager(xs[0], ws[0], bs[0], 1e-6)
            got = channels_first_layer_norm(xs[1], ws[1], bs[1], 1e-6, layout)
            promised = layout == "channels_last" or (layout == "like_input" and x_cl)
            assert channels_last(got) == promised and got.is_contiguous() != promised
            want.backward(dy), got.backward(dy)
            torch.testing.assert_close(got, want, **tolerance(torch.float32))
            for g, e in ((xs[1].grad, xs[0].grad), (ws[1].grad, ws[0].grad), (bs[1].grad, bs[0].grad)):
                torch.testing.assert_close(g, e, **tolerance(torch.float32, 30))
            assert channels_last(xs[1].grad) == x_cl    # dx in x's order


def test_the_module_returns_the_order_the_module_it_replaces_returns(device):
    class MeanOverChannels(torch.nn.Module):   # ConvNeXt's original code: means over dim 1 keep x's order
        def __init__(self, c):
            super().__init__()
            self.weight, self.bias, self.eps = torch.nn.Parameter(torch.ones(c)), torch.nn.Parameter(torch.zeros(c)), 1e-6

        def forward(self, x):
            u = x.mean(1, keepdim=True)
            s = (x - u).pow(2).mean(1, keepdim=True)
            return self.weight[:, None, None] * ((x - u) / torch.sqrt(s + self.eps)) + self.bias[:, None, None]

    class Contiguous(MeanOverChannels):
        def forward(self, x):
            return super().forward(x).contiguous()

    modeling = pytest.importorskip("transformers.models.convnext.modeling_convnext")
    hf = modeling.ConvNextLayerNorm(16, eps=1e-6, data_format="channels_first").to(device)
    assert output_layout_of(hf, 16) == "channels_last"
    assert output_layout_of(MeanOverChannels(16).to(device), 16) == "like_input"
    assert output_layout_of(Contiguous(16).to(device), 16) == "contiguous"
    for module in (hf, MeanOverChannels(16).to(device), Contiguous(16).to(device)):
        fused = ChannelsFirstLayerNorm.from_module(module)
        for x in (torch.randn(2, 16, 4, 4, device=device), torch.randn(2, 16, 4, 4, device=device).to(
                memory_format=torch.channels_last)):
            want, got = module(x), fused(x)
            torch.testing.assert_close(got, want, **tolerance(torch.float32))
            assert same_strides(got, want), (type(module).__name__, got.stride(), want.stride())


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
        for kernel, tile, orders in (("_channel_norm_fwd_kernel", cn.FWD_TILE, ("X_CL", "Y_CL")),
                                     ("_channel_norm_bwd_kernel", cn.BWD_TILE, ("DY_CL", "X_CL"))):
            for cl in ((False, False), (False, True), (True, False), (True, True)):
                block_c, block_s, warps = cn._blocks(channels, 56 * 56, tile, cl)
                cases.append({"module": "fusion_advisor.kernels.channel_norm", "kernel": kernel, "types": types,
                              "constexprs": {"HAS_WEIGHT": True, "HAS_BIAS": True, "BLOCK_C": block_c,
                                             "BLOCK_S": block_s, **dict(zip(orders, cl)),
                                             **({"LAUNCH_DEPENDENTS": True} if "bwd" in kernel else {})},
                              "num_warps": warps, "unaligned": ["eps"]})
    for case, (regs, stack) in zip(cases, sm90_resources(cases)):
        assert stack == 0, (case, stack)
        assert regs * 32 * case["num_warps"] <= 65536, (case, regs)


def test_building_the_module_form_leaves_the_users_rng_alone(device):
    """Swapping happens after the user seeded: apply --verify compares the seeded runs' losses."""
    modeling = pytest.importorskip("transformers.models.convnext.modeling_convnext")
    norm = modeling.ConvNextLayerNorm(24, eps=1e-6, data_format="channels_first").to(device)
    state = torch.get_rng_state()
    ChannelsFirstLayerNorm.from_module(norm)
    assert torch.equal(state, torch.get_rng_state())


def test_channels_last_in_and_out_runs_the_row_family_bench_timed(device, monkeypatch):
    """Rows of C in NHWC memory are the rows the trace's aten::layer_norm saw: the row kernels run
    them (no copy); the channel kernels only where one side is NCHW."""
    from fusion_advisor.kernels import channel_norm as cn
    used = []
    real = cn._forward
    monkeypatch.setattr(cn, "_forward", lambda *a: used.append("channel") or real(*a))
    w, b = torch.randn(16, device=device), torch.randn(16, device=device)
    x = torch.randn(2, 16, 4, 3, device=device)
    for xi, layout, kernel in ((x.to(memory_format=torch.channels_last), "channels_last", []),
                               (x.to(memory_format=torch.channels_last), "like_input", []),
                               (x, "channels_last", ["channel"]), (x, "contiguous", ["channel"])):
        used.clear()
        got = channels_first_layer_norm(xi, w, b, 1e-6, layout)
        assert used == kernel, (layout, xi.is_contiguous())
        torch.testing.assert_close(got, eager(xi, w, b, 1e-6), **tolerance(torch.float32))
