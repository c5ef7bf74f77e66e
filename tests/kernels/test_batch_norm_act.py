import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fusion_advisor.kernels import batch_norm_act as mod
from fusion_advisor.kernels import batch_norm_core as core
from fusion_advisor.kernels import match
from fusion_advisor.kernels.tolerances import tolerance
from fusion_advisor.core.records import OpRecord
from kernel_checks import check_against_reference, hopper_compile_errors, recorded_launches, sm90_resources

_ODD = [3, 5, 7, 9]


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("activation", ["relu", "silu", "gelu", "leaky_relu", "relu6", "hardswish"])
def test_matches_eager(activation, dtype, training, device):
    check_against_reference(mod.PATTERN, {"shape": _ODD, "dtype": dtype, "activation": activation,
                                          "training": training}, device)


@pytest.mark.parametrize("params", [
    {"shape": _ODD, "memory_format": "channels_last"},                         # sC == 1: channels the long side
    {"shape": [2, 6, 3, 4, 5], "memory_format": "channels_last"},              # channels_last_3d
    {"shape": [2, 6, 3, 4, 5]},                                                # BatchNorm3d, NCDHW
    {"shape": [7, 10]},                                                        # BatchNorm1d (N, C)
    {"shape": [4, 6, 11]},                                                     # BatchNorm1d (N, C, L)
    {"shape": [1, 6, 11], "activation": "gelu_tanh"},                          # one sample: positions only
    {"shape": _ODD, "weight": False, "bias": False, "activation": "sigmoid"},  # affine=False
    {"shape": _ODD, "bias": False},                                            # BN(bias=False)
    {"shape": _ODD, "running_stats": False},                                   # track_running_stats=False
    {"shape": _ODD, "memory_format": "channels_last", "training": False},
    {"shape": [4, 6, 11], "training": False, "weight": False, "bias": False},
    {"shape": _ODD, "activation": "leaky_relu", "negative_slope": 0.2},
    {"shape": _ODD, "momentum": 0.5, "eps": 1e-3},
])
def test_layouts_shapes_and_options(params, device):
    check_against_reference(mod.PATTERN, {"dtype": "float32", "activation": "relu", **params}, device)


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_low_precision_input_with_fp32_parameters_as_under_autocast(dtype, training, device):
    check_against_reference(mod.PATTERN, {"shape": _ODD, "dtype": dtype, "weight_dtype": "float32",
                                          "activation": "silu", "training": training,
                                          "memory_format": "channels_last"}, device)


def _running_stats_after_step(params, device):
    """(fused, eager) running_mean and running_var after one training forward from the same state."""
    inputs = mod.make_inputs(params, device, requires_grad=False)
    x, running_mean, running_var, weight, bias = inputs.args
    stats = {}
    for name, fn in (("fused", mod.batch_norm_act), ("eager", mod.reference)):
        rm, rv = running_mean.clone(), running_var.clone()
        fn(x, rm, rv, weight, bias, **inputs.kwargs)
        stats[name] = (rm, rv)
    return stats["fused"], stats["eager"]


@pytest.mark.parametrize("params", [
    {"shape": _ODD, "dtype": "float32"},
    {"shape": _ODD, "dtype": "bfloat16"},
    {"shape": _ODD, "dtype": "bfloat16", "weight_dtype": "float32", "memory_format": "channels_last"},
    {"shape": [7, 10], "dtype": "float16", "momentum": 0.3},
])
def test_running_statistics_are_updated_like_eager(params, device):
    (rm, rv), (rm_ref, rv_ref) = _running_stats_after_step({"activation": "relu", **params}, device)
    tol = tolerance(rm_ref.dtype)
    torch.testing.assert_close(rm, rm_ref, **tol)
    torch.testing.assert_close(rv, rv_ref, **tol)   # unbiased, n / (n - 1), as eager


def test_many_splits_and_small_tiles_keep_variance_precise_far_from_zero(monkeypatch, device):
    """Tiles of 64 elements, many programs a channel and finalize chunks of 2 rows: every merge path
    runs. Values at 1000 +- 1 in fp32: sum-of-squares variance would lose most of its digits there;
    Chan's merge of per-tile M2 keeps them (compared with a float64 computation)."""
    monkeypatch.setattr(core, "TILE_ELEMENTS", 64)
    monkeypatch.setattr(core, "SMALL_ROW_POSITIONS", 0)    # (rows of 117 positions would halve the tile)
    monkeypatch.setattr(core, "FINALIZE_ELEMENTS", 8)
    monkeypatch.setattr(core, "num_sms", lambda device: 8)
    x = 1000.0 + torch.randn(5, 6, 13, 9, device=device)
    view = core.channel_view(x)
    p = core.plan(view, 8)
    assert p.splits > 2 and p.tiles_per_program > 1 and p.block_c * p.block_s == 64
    rm, rv = torch.zeros(6, device=device), torch.ones(6, device=device)
    y = mod.batch_norm_act(x, rm, rv, None, None, True, 1.0, 1e-5, "relu")
    x64 = x.double()
    torch.testing.assert_close(rm.double(), x64.mean(dim=(0, 2, 3)), atol=1e-4, rtol=1e-6)
    torch.testing.assert_close(rv.double(), x64.var(dim=(0, 2, 3), unbiased=True), atol=1e-3, rtol=1e-3)
    ref = F.relu(F.batch_norm(x64, None, None, training=True)).float()
    torch.testing.assert_close(y, ref, atol=2e-3, rtol=1e-3)
    check_against_reference(mod.PATTERN, {"shape": [5, 6, 13, 9], "dtype": "float32", "activation": "silu"}, device)
    check_against_reference(mod.PATTERN, {"shape": [5, 6, 13, 9], "dtype": "float32", "activation": "silu",
                                          "memory_format": "channels_last"}, device)


def test_dense_layouts_are_read_in_place(device):
    """channels_last and a BatchNorm1d input transposed from (N, L, C) are read where they lie
    (y and dx get their strides); a slice with gaps is copied once."""
    channels_last = torch.randn(2, 3, 4, 5, device=device).contiguous(memory_format=torch.channels_last)
    transposed = torch.randn(2, 7, 3, device=device).transpose(1, 2)
    assert core.dense(channels_last) is channels_last and core.dense(transposed) is transposed
    assert core.channel_view(transposed) == core.ChannelView(1, 3, 14, 0, 1, 3)
    gaps = torch.randn(2, 3, 8, device=device)[..., ::2]
    assert core.dense(gaps).is_contiguous()
    x, x_ref = (transposed.detach().clone().requires_grad_(True) for _ in range(2))
    y = mod.batch_norm_act(x, None, None, None, None, True, 0.1, 1e-5, "silu")
    ref = mod.reference(x_ref, None, None, None, None, True, 0.1, 1e-5, "silu")
    assert y.stride() == x.stride()
    torch.testing.assert_close(y, ref)
    upstream = torch.randn_like(y)
    y.backward(upstream)
    ref.backward(upstream)
    torch.testing.assert_close(x.grad, x_ref.grad, **tolerance(torch.float32))


def test_strided_input_and_upstream_gradient(device):
    """A slice along W (no single position stride: copied once) and an expanded upstream gradient."""
    x = torch.randn(3, 4, 6, 10, device=device)[..., ::2].requires_grad_(True)
    x_ref = x.detach().clone().requires_grad_(True)
    y = mod.batch_norm_act(x, None, None, None, None, True, 0.1, 1e-5, "silu")
    ref = mod.reference(x_ref, None, None, None, None, True, 0.1, 1e-5, "silu")
    torch.testing.assert_close(y, ref)
    y.sum().backward()
    ref.sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, **tolerance(torch.float32))


# -- the module -----------------------------------------------------------------------------------
def _twins(bn: nn.Module, activation: nn.Module, name: str):
    eager = nn.Sequential(bn, activation)
    fused = mod.BatchNormAct(_copy(bn), name, getattr(activation, "negative_slope", 0.01))
    return eager, fused


def _copy(module):
    import copy
    return copy.deepcopy(module)


def _step(module, x, upstream):
    x = x.detach().clone().requires_grad_(True)
    y = module(x)
    y.backward(upstream)
    return y.detach(), x.grad


@pytest.mark.parametrize("make", [
    lambda: nn.BatchNorm2d(5),
    lambda: nn.BatchNorm2d(5, momentum=None),              # cumulative average: 1 / num_batches_tracked
    lambda: nn.BatchNorm2d(5, track_running_stats=False),
    lambda: nn.BatchNorm2d(5, affine=False),
])
def test_module_steps_like_batch_norm_then_activation(make, device):
    torch.manual_seed(0)
    bn = make().to(device)
    eager, fused = _twins(bn, nn.LeakyReLU(0.1), "leaky_relu")
    assert list(fused.state_dict()) == list(bn.state_dict())
    for training in (True, True, True, False):
        eager.train(training)
        fused.train(training)
        x = torch.randn(3, 5, 4, 6, device=device) * 2 + 1
        upstream = torch.randn_like(x)
        y, dx = _step(fused, x, upstream)
        y_ref, dx_ref = _step(eager, x, upstream)
        torch.testing.assert_close(y, y_ref, **tolerance(torch.float32))
        torch.testing.assert_close(dx, dx_ref, **tolerance(torch.float32))
        for key, value in bn.state_dict().items():
            torch.testing.assert_close(fused.state_dict()[key], value, **tolerance(torch.float32))
    if bn.affine:
        torch.testing.assert_close(fused.weight.grad, bn.weight.grad, **tolerance(torch.float32, 72))
    if bn.track_running_stats:
        assert int(fused.num_batches_tracked) == int(bn.num_batches_tracked) == 3


def test_frozen_parameters_in_eval_skip_the_sums_pass(device):
    """Fine-tuning with BN frozen (eval, no parameter grads): dx alone, one pass over dy and x."""
    bn = nn.BatchNorm2d(5).to(device).eval().requires_grad_(False)
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1), bn.weight.uniform_(0.5, 1.5)
    fused = mod.BatchNormAct(_copy(bn), "silu").eval()
    x, upstream = torch.randn(2, 5, 3, 4, device=device), torch.randn(2, 5, 3, 4, device=device)
    if torch.cuda.is_available():   # (the launch recorder is the interpreter's; the numerics below still run)
        y, dx = _step(fused, x, upstream)
    else:
        with recorded_launches() as launches:
            y, dx = _step(fused, x, upstream)
        assert [launch["name"] for launch in launches] == ["_apply_kernel", "_dx_kernel"]
    y_ref, dx_ref = _step(nn.Sequential(bn, nn.SiLU()), x, upstream)
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(dx, dx_ref)
    assert fused.weight.grad is None


def test_module_shares_the_batch_norms_tensors_and_checks_input_dims(device):
    bn = nn.BatchNorm1d(6).to(device)
    fused = mod.BatchNormAct(bn, "silu")
    assert fused.weight is bn.weight and fused.running_mean is bn.running_mean
    assert fused.num_batches_tracked is bn.num_batches_tracked
    fused(torch.randn(4, 6, device=device))
    fused(torch.randn(4, 6, 3, device=device))
    with pytest.raises(ValueError, match="expected 2D or 3D input"):
        fused(torch.randn(4, 6, 3, 2, device=device))
    with pytest.raises(ValueError, match="SyncBatchNorm"):
        mod.BatchNormAct(nn.SyncBatchNorm(6), "relu")
    with pytest.raises(ValueError, match="unknown activation"):
        mod.BatchNormAct(nn.BatchNorm2d(6), "swish")


def test_bad_inputs_are_refused(device):
    x = torch.randn(2, 3, 4, device=device)
    with pytest.raises(TypeError, match="float64 is not supported"):
        mod.batch_norm_act(x.double(), None, None, training=True)
    with pytest.raises(ValueError, match="needs running_mean and running_var"):
        mod.batch_norm_act(x, None, None, training=False)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        mod.batch_norm_act(torch.randn(1, 3, device=device), None, None, training=True)
    with pytest.raises(ValueError, match="weight of shape"):
        mod.batch_norm_act(x, None, None, torch.ones(4, device=device), training=True)


# -- the pattern ----------------------------------------------------------------------------------
def test_params_read_from_traced_ops():
    # aten::batch_norm as torch.profiler records nn.BatchNorm2d (Kineto's JSON: concrete inputs as
    # strings), then the in-place ReLU; cudnn_batch_norm's eight arguments in a bf16 autocast step.
    shape = (8, 64, 56, 56)
    bn = OpRecord("aten::batch_norm", (shape, (64,), (64,), (64,), (64,), (), (), (), ()),
                  ("float", "float", "float", "float", "float", "Scalar", "Scalar", "Scalar", "Scalar"),
                  ("", "", "", "", "", "True", "0.10000000000000001", "1.0000000000000001e-05", "True"))
    relu = OpRecord("aten::relu_", (shape,), ("float",), ("",))
    pattern, params = match([OpRecord("aten::conv2d", ((8, 3, 58, 58), (64, 3, 3, 3))), bn, relu])
    assert pattern is mod.PATTERN
    assert params == {"shape": list(shape), "dtype": "float32", "activation": "relu", "training": True,
                      "momentum": 0.1, "eps": 1e-5}
    cudnn = OpRecord("aten::cudnn_batch_norm", (shape, (64,), (64,), (64,), (64,), (), (), ()),
                     ("c10::BFloat16", "float", "float", "float", "float", "Scalar", "Scalar", "Scalar"),
                     ("", "", "", "", "", "False", "0.10000000000000001", "0.001"))
    silu = OpRecord("aten::silu", (shape,), ("c10::BFloat16",), ("",))
    assert mod.PATTERN.match([cudnn, silu]) == {"shape": list(shape), "dtype": "bfloat16", "activation": "silu",
                                                "training": False, "momentum": 0.1, "eps": 1e-3,
                                                "weight_dtype": "float32"}
    plain = OpRecord("aten::native_batch_norm", ((4, 6), (), (), (), (), (), (), ()),
                     ("float", "", "", "", "", "Scalar", "Scalar", "Scalar"), ("", "", "", "", "", "True", "0.1", "1e-05"))
    leaky = OpRecord("aten::leaky_relu", ((4, 6), ()), ("float", "Scalar"), ("", "0.2"))
    assert mod.PATTERN.match([plain, leaky]) == {"shape": [4, 6], "dtype": "float32", "activation": "leaky_relu",
                                                 "training": True, "momentum": 0.1, "eps": 1e-5, "weight": False,
                                                 "bias": False, "running_stats": False, "negative_slope": 0.2}
    other_shape = OpRecord("aten::relu", ((8, 64, 28, 28),), ("float",), ("",))
    assert mod.PATTERN.match([bn, other_shape]) is None
    # MobileNet's ReLU6 is traced as hardtanh(x, 0, 6); other bounds are not relu6
    relu6 = OpRecord("aten::hardtanh_", (shape, (), ()), ("float", "Scalar", "Scalar"), ("", "0.", "6."))
    assert mod.PATTERN.match([bn, relu6])["activation"] == "relu6"
    clamp = OpRecord("aten::hardtanh_", (shape, (), ()), ("float", "Scalar", "Scalar"), ("", "-1.", "1."))
    assert mod.PATTERN.match([bn, clamp]) is None
    hardswish = OpRecord("aten::hardswish_", (shape,), ("float",), ("",))
    assert mod.PATTERN.match([bn, hardswish])["activation"] == "hardswish"


def test_fused_bytes_follows_the_plan():
    params = {"shape": [256, 64, 112, 112], "dtype": "bfloat16", "activation": "relu", "num_sms": 132}
    m, c = 256 * 64 * 112 * 112, 64
    p = mod.plan_for(params)
    assert (p.block_c, p.block_s) == (4, 1024) and p.c_blocks * p.splits <= 4 * 132 + p.c_blocks
    assert mod.fused_bytes(params) == {
        "forward": m * 6 + 24 * p.splits * c + 16 * c + 2 * c * 2 + 4 * c * 2,
        "backward": m * 10 + 16 * p.splits * c + 16 * c + 4 * c * 2 + 2 * c * 2 + 16 * c}
    last = mod.plan_for({**params, "memory_format": "channels_last"})
    assert (last.block_c, last.block_s) == (64, 64)
    evaluation = mod.fused_bytes({**params, "training": False, "weight": False, "bias": False})
    assert evaluation == {"forward": m * 4 + 2 * c * 2, "backward": m * 6 + 2 * c * 2}


def test_short_nchw_rows_take_half_tiles():
    """ResNet's 14x14 and 7x7 layers (positions < SMALL_ROW_POSITIONS) take tiles of 2048 elements,
    measured faster on an H100; 28x28 and up, and channels_last, keep 4096."""
    def elements(shape, layout="contiguous"):
        p = mod.plan_for({"shape": shape, "dtype": "bfloat16", "activation": "relu", "memory_format": layout})
        return p.block_c * p.block_s, p.num_warps
    assert elements([256, 256, 14, 14]) == (2048, 4) and elements([256, 512, 7, 7]) == (2048, 4)
    assert elements([256, 128, 28, 28]) == (4096, 8) and elements([256, 64, 112, 112]) == (4096, 8)
    assert elements([256, 512, 7, 7], "channels_last") == (4096, 8)


def test_custom_ops_pass_opcheck(device):
    x = torch.randn(3, 4, 5, device=device)
    rm, rv, w, b = torch.zeros(4, device=device), torch.ones(4, device=device), torch.randn(4, device=device), None
    torch.library.opcheck(torch.ops.fusion_advisor.batch_norm_act_fwd.default,
                          (x, rm, rv, w, b, True, 0.1, 1e-5, "silu", 0.01))
    y, mean, rstd = mod.batch_norm_act_fwd(x, rm, rv, w, b, True, 0.1, 1e-5, "silu", 0.01)
    torch.library.opcheck(torch.ops.fusion_advisor.batch_norm_act_bwd.default,
                          (torch.randn_like(x), x, w, b, mean, rstd, True, 1e-5, "silu", 0.01, True))


def test_module_runs_under_torch_compile_fullgraph(device):
    bn = nn.BatchNorm2d(4).to(device)
    fused = mod.BatchNormAct(_copy(bn), "relu")
    compiled = torch.compile(fused, fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 4, 3, 5, device=device, requires_grad=True)
    out = compiled(x)
    out.sum().backward()
    x_ref = x.detach().clone().requires_grad_(True)
    ref = F.relu(bn(x_ref))
    ref.sum().backward()
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(x.grad, x_ref.grad, **tolerance(torch.float32))
    torch.testing.assert_close(fused.running_var, bn.running_var)


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the kernels are built for real")
def test_launches_compile_for_hopper(device):
    """Every kernel and constexpr combination the tests above launch, through Triton's front end for sm_90."""
    with recorded_launches() as launches:
        for params in ({"shape": _ODD, "dtype": "bfloat16", "activation": "relu"},
                       {"shape": _ODD, "dtype": "float16", "activation": "gelu", "training": False,
                        "memory_format": "channels_last"},
                       {"shape": [4, 6], "dtype": "float32", "activation": "silu", "weight": False, "bias": False}):
            check_against_reference(mod.PATTERN, params, device)
    assert hopper_compile_errors(launches) == []


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the kernels are built for real")
def test_registers_fit_and_nothing_spills_at_resnet_shapes():
    """ptxas's sm_90 build (kernel_checks.sm90_resources) of the four passes at the plans of
    ResNet-50's widest and deepest activations, NCHW and channels_last: no spills, and one
    program's registers fit an SM (seen: 32-105 registers a thread at 8 warps)."""
    types = {"X": "*bf16", "Y": "*bf16", "DY": "*bf16", "DX": "*bf16", "MEAN": "*fp32", "SPREAD": "*fp32",
             "W": "*bf16", "B": "*bf16", "PARTIAL": "*fp32", "TERMS": "*fp32", "eps": "fp32", "negative_slope": "fp32"}
    cases = []
    for shape in ([256, 64, 112, 112], [256, 2048, 7, 7]):
        for layout in ("contiguous", "channels_last"):
            p = mod.plan_for({"shape": shape, "memory_format": layout})
            unit_stride = {"stride_c": 1} if layout == "channels_last" else {"stride_s": 1}
            for kernel in ("_stats_kernel", "_apply_kernel", "_grad_sums_kernel", "_dx_kernel"):
                flags = {} if kernel == "_stats_kernel" else {"ACT": 2, "TRAINING": True, "HAS_WEIGHT": True,
                                                              "HAS_BIAS": True}
                cases.append({"module": core.__name__, "kernel": kernel, "types": types, "num_warps": p.num_warps,
                              "constexprs": {"BLOCK_C": p.block_c, "BLOCK_S": p.block_s, **unit_stride, **flags},
                              "unaligned": ["eps", "negative_slope"]})
    for case, (regs, stack) in zip(cases, sm90_resources(cases)):
        assert stack == 0, (case, stack)
        assert regs * 32 * case["num_warps"] <= 65536, (case, regs)
