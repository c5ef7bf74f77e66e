"""Mixed precision as users train: bf16 activations beside fp32 master weights and an fp32 residual
stream (torch.autocast, HF Trainer's bf16=True). Bench builds each tensor at its traced dtype; the
kernels return what eager returns, under autocast too."""
import pytest
import torch
import torch.nn.functional as F

from fusion_advisor.bench import BenchOptions, bench
from fusion_advisor.kernels import add_layer_norm, autocast, bias_act, group_norm, layer_norm, rms_norm
from fusion_advisor.kernels import match
from fusion_advisor.kernels.codegen.candidate import candidate_for
from fusion_advisor.kernels.numerics import compare, tensor_outputs
from fusion_advisor.kernels.registry import Inputs, OpRecord
from fusion_advisor.core.result import AdvisorResult, Cluster, Estimate

BF, F32 = "c10::BFloat16", "float"
SHAPE = (4, 6, 48)
HIDDEN = (SHAPE[-1],)
CPU_BENCH = BenchOptions(providers=("eager", "triton"), mode="cpu")
GPU = torch.cuda.is_available()
# CPU autocast on CPU tensors: the kernels run there only in Triton's interpreter (CI); on a GPU
# machine the CUDA-autocast tests below cover the same paths on CUDA tensors.
on_cpu_tensors = pytest.mark.skipif(GPU, reason="CPU tensors through the Triton interpreter")


def vit_block_ops() -> list[OpRecord]:
    """What a ViT block under bf16 autocast traces at `x = x + attn(ln_1(x))`, then `ln_2(x)`: the
    attention output (bf16) added to the fp32 residual stream, then an fp32 LayerNorm with fp32
    weights (torchvision's EncoderBlock)."""
    add = OpRecord("aten::add", (SHAPE, SHAPE, ()), (BF, F32, "Scalar"), ("", "", "1"))
    norm = OpRecord("aten::layer_norm", (SHAPE, (), HIDDEN, HIDDEN, (), ()), (F32, "", F32, F32, "Scalar", "Scalar"),
                    ("", "[48]", "", "", "1e-06", "True"))
    return [add, norm]


def training_result(cluster_id: str, pattern: str, params: dict) -> AdvisorResult:
    result = AdvisorResult(run={"step_source": "optimizer"})
    result.clusters = [Cluster(id=cluster_id, direction="forward", pattern=pattern, pattern_params=dict(params),
                               module_class="VisionTransformer/EncoderBlock", occurrences_per_step=12,
                               estimate=Estimate(saving_us=5.0))]
    return result


def assert_benched_and_checked(result: AdvisorResult) -> None:
    assert [b.passes for b in result.benchmarks] == ["forward", "forward+backward"]
    for b in result.benchmarks:
        assert b.numerics_ok is True, b.reason
        assert b.numerics_by_provider == {"triton": "ok"}


def test_residual_add_keeps_the_norms_fp32_weight_dtype():
    found = match(vit_block_ops())
    assert found is not None
    pattern, params = found
    assert pattern.name == "add_layer_norm"
    assert params["dtype"] == "bfloat16" and params["residual_dtype"] == "float32"
    assert params["weight_dtype"] == "float32"   # was bf16: the reference then refused the inputs
    inputs = pattern.make_inputs(params, torch.device("cpu"), True)
    x, residual, _, weight, bias = inputs.args
    assert (x.dtype, residual.dtype, weight.dtype, bias.dtype) == (torch.bfloat16, torch.float32,
                                                                  torch.float32, torch.float32)


@pytest.mark.skipif(GPU, reason="CPU/interpreter bench mode")
def test_vit_add_layer_norm_cluster_is_benched_and_checked():
    pattern, params = match(vit_block_ops())
    assert_benched_and_checked(bench(training_result("fwd-vit", pattern.name, params), CPU_BENCH))


@pytest.mark.skipif(GPU, reason="CPU/interpreter bench mode")
@pytest.mark.parametrize("pattern,params", [
    ("layer_norm", {"shape": list(SHAPE), "dtype": "bfloat16", "weight_dtype": "float32", "eps": 1e-6}),
    ("rms_norm", {"shape": list(SHAPE), "dtype": "bfloat16", "weight_dtype": "float32", "eps": 1e-6}),
    ("add_rms_norm", {"shape": list(SHAPE), "dtype": "bfloat16", "residual_dtype": "float32",
                      "weight_dtype": "float32", "eps": 1e-6}),
    ("bias_act", {"shape": list(SHAPE), "dtype": "bfloat16", "bias_dtype": "float32", "activation": "gelu"}),
], ids=lambda v: v if isinstance(v, str) else "")
def test_mixed_clusters_of_each_pattern_are_benched_and_checked(pattern, params):
    assert_benched_and_checked(bench(training_result("fwd-mixed", pattern, params), CPU_BENCH))


@pytest.mark.skipif(GPU, reason="CPU/interpreter bench mode")
def test_generated_kernel_of_a_mixed_chain_is_benched_and_checked():
    """bf16 activations scaled by an fp32 parameter, plus an fp32 residual, then tanh: every op
    promotes as eager does, each input is built at its traced dtype."""
    ops = [OpRecord("aten::mul", (SHAPE, HIDDEN), (BF, F32)),
           OpRecord("aten::add", (SHAPE, SHAPE, ()), (F32, F32, "Scalar"), ("", "", "1")),
           OpRecord("aten::tanh", (SHAPE,), (F32,))]
    found = candidate_for(ops)
    assert found is not None
    inputs = found.pattern.make_inputs(found.params, torch.device("cpu"), True)
    assert [a.dtype for a in inputs.args if isinstance(a, torch.Tensor)] == [torch.bfloat16, torch.float32,
                                                                             torch.float32]
    result = training_result("fwd-gen", found.pattern.name, found.params)
    assert_benched_and_checked(bench(result, CPU_BENCH))


# -- autocast: the kernels cast where eager's autocast casts -------------------------------------
def _check(fused, reference, *args, **kwargs) -> list[torch.Tensor]:
    """The project's numerics rule (kernels/numerics.compare: dtypes, the tolerance table, every
    input's gradient) on fused vs reference, under the caller's autocast; the fused outputs."""
    args = tuple(a.detach().requires_grad_(True) if isinstance(a, torch.Tensor) else a for a in args)
    grads = tuple(i for i, a in enumerate(args) if isinstance(a, torch.Tensor))
    result = compare(reference, fused, Inputs(tuple(args), kwargs, grads))
    assert result.ok, result.detail
    return tensor_outputs(fused(*args, **kwargs))


def _mixed_args(*extra_dtypes):
    torch.manual_seed(0)
    x = torch.randn(SHAPE, dtype=torch.bfloat16)
    return [x] + [torch.randn(SHAPE if d == "full" else HIDDEN).to(torch.bfloat16 if d == "full" else d)
                  for d in extra_dtypes]


@pytest.fixture
def cuda_policy_on_cpu(monkeypatch):
    """CPU autocast as CUDA's: the ops that CUDA's autocast runs in fp32 run in fp32 here too, so the
    kernels' CUDA branch is exercised on this machine (the reference spells out autocast's cast)."""
    monkeypatch.setitem(autocast._DISPATCH_KEYS, "cpu", "AutocastCUDA")
    monkeypatch.setattr(autocast, "_KERNELS", {})


@on_cpu_tensors
def test_cpu_autocast_changes_nothing_and_kernels_agree():
    # CPU autocast registers no kernel for layer_norm: eager's mixed-dtype norm returns bf16.
    x, w, b = _mixed_args(torch.float32, torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not autocast.upcasts("aten::layer_norm", x, w, b)
        (y,) = _check(layer_norm.layer_norm, layer_norm.reference, x, HIDDEN, w, b)
    assert y.dtype == torch.bfloat16


@on_cpu_tensors
def test_layer_norm_under_cuda_style_autocast_runs_and_returns_fp32(cuda_policy_on_cpu):
    x, w, b = _mixed_args(torch.float32, torch.float32)

    def autocast_reference(x, shape, w, b):     # what autocast's fp32 policy runs
        return F.layer_norm(x.float(), shape, w, b)

    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert autocast.upcasts("aten::layer_norm", x, w, b)
        (y,) = _check(layer_norm.layer_norm, autocast_reference, x, HIDDEN, w, b)
        x.requires_grad_(True)
        layer_norm.layer_norm(x, HIDDEN, w, b).sum().backward()
    assert y.dtype == torch.float32
    assert x.grad.dtype == torch.bfloat16      # rounded back to x's dtype on the way out, as eager


@on_cpu_tensors
def test_add_layer_norm_under_cuda_style_autocast(cuda_policy_on_cpu):
    x, residual, w, b = _mixed_args("full", torch.float32, torch.float32)

    def autocast_reference(x, residual, shape, w, b):
        residual = x + residual
        return F.layer_norm(residual.float(), shape, w, b), residual

    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, s = _check(add_layer_norm.add_layer_norm, autocast_reference, x, residual, HIDDEN, w, b)
    assert (y.dtype, s.dtype) == (torch.float32, torch.bfloat16)
    # An fp32 sum (bf16 branch + fp32 residual stream, as in ViT) is not upcast: one fused kernel.
    x, residual, w, b = _mixed_args(torch.float32, torch.float32, torch.float32)
    residual = torch.randn(SHAPE)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not autocast.runs_in_fp32("aten::layer_norm", "cpu", torch.promote_types(x.dtype, residual.dtype))
        y, s = _check(add_layer_norm.add_layer_norm, add_layer_norm.reference, x, residual, HIDDEN, w, b)
    assert (y.dtype, s.dtype) == (torch.float32, torch.float32)


@on_cpu_tensors
def test_relu_squared_under_cuda_style_autocast(cuda_policy_on_cpu):
    x, bias = _mixed_args(torch.bfloat16)

    def autocast_reference(x, bias, activation):   # relu in bf16, then autocast's fp32 pow
        return F.relu(x + bias).float().square()

    with torch.autocast("cpu", dtype=torch.bfloat16):
        (y,) = _check(bias_act.bias_act, autocast_reference, x, bias, activation="relu_squared")
    assert y.dtype == torch.float32


@on_cpu_tensors
def test_group_norm_under_cuda_style_autocast(cuda_policy_on_cpu):
    torch.manual_seed(0)
    x = torch.randn(2, 6, 5, 7).to(torch.bfloat16)          # NCHW, 3 groups of 2 channels
    w, b = torch.randn(6), torch.randn(6)

    def autocast_reference(x, groups, w, b):
        return F.group_norm(x.float(), groups, w, b)

    with torch.autocast("cpu", dtype=torch.bfloat16):
        (y,) = _check(group_norm.group_norm, autocast_reference, x, 3, w, b)
    assert y.dtype == torch.float32


@on_cpu_tensors
def test_rms_norm_is_autocast_invariant(cuda_policy_on_cpu):
    # LlamaRMSNorm computes in fp32 explicitly: autocast's fp32 pow/rsqrt change nothing.
    x, w = _mixed_args(torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _check(rms_norm.rms_norm, rms_norm.reference, x, w)


@pytest.mark.skipif(not GPU, reason="needs CUDA: the real torch.autocast('cuda') policy")
@pytest.mark.parametrize("name", ["layer_norm", "add_layer_norm", "group_norm", "rms_norm", "bias_act"])
def test_kernels_match_eager_under_cuda_autocast(name):
    torch.manual_seed(0)
    dev = "cuda"
    x = torch.randn(SHAPE, device=dev, dtype=torch.bfloat16)
    w, b = torch.randn(HIDDEN, device=dev), torch.randn(HIDDEN, device=dev)
    cases = {
        "layer_norm": (layer_norm.layer_norm, layer_norm.reference, (x, HIDDEN, w, b), {}),
        "add_layer_norm": (add_layer_norm.add_layer_norm, add_layer_norm.reference,
                           (x, torch.randn_like(x), HIDDEN, w, b), {}),
        "group_norm": (group_norm.group_norm, group_norm.reference,
                       (torch.randn(2, SHAPE[-1], 5, 7, device=dev, dtype=torch.bfloat16), 4, w, b), {}),
        "rms_norm": (rms_norm.rms_norm, rms_norm.reference, (x, w), {}),
        "bias_act": (bias_act.bias_act, bias_act.reference, (x, b), {"activation": "relu_squared"}),
    }
    fused, reference, args, kwargs = cases[name]
    with torch.autocast("cuda", dtype=torch.bfloat16):
        _check(fused, reference, *args, **kwargs)


def test_bench_times_an_autocast_traced_norm_inside_autocast():
    """A trace's bf16 input with fp32 weights at layer_norm / group_norm ran inside autocast (CUDA's
    kernels refuse the mix outside it: ConvNeXt's forward LayerNorms went untimed on the H100 zoo)."""
    from fusion_advisor.kernels import autocast, registry
    mixed = {"shape": [8, 4, 4, 96], "dtype": "bfloat16", "weight_dtype": "float32"}
    for name in ("layer_norm", "add_layer_norm", "group_norm"):
        region = autocast.traced_region(registry.get(name).autocast_op, mixed, "cuda")
        assert isinstance(region, torch.autocast) and region.fast_dtype == torch.bfloat16, name
    for params in ({**mixed, "weight_dtype": "bfloat16"}, {"shape": [8, 96], "dtype": "bfloat16"},
                   {**mixed, "dtype": "float32"}):
        assert not isinstance(autocast.traced_region("aten::layer_norm", params, "cuda"), torch.autocast)
    # CPU's autocast has no layer_norm kernel (it runs the mixed-dtype kernel), and rms_norm names no op
    assert not isinstance(autocast.traced_region("aten::layer_norm", mixed, "cpu"), torch.autocast)
    assert not isinstance(autocast.traced_region(registry.get("rms_norm").autocast_op, mixed, "cuda"), torch.autocast)
