import pytest
import torch

from fusion_advisor.analyzers.trace import Trace
from fusion_advisor.kernels import add_rms_norm as mod
from fusion_advisor.kernels import match
from fusion_advisor.kernels import rms_norm
from kernel_checks import check_against_reference
from traced_ops import op_records

# Kept to a few thousand elements: the Triton interpreter runs every program in Python.
SHAPES = [[2, 5, 431], [16, 256], [3, 7, 129], [1, 1, 8]]
WEIGHT_GRAD = (2,)  # summed over rows


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_add_rms_norm_matches_add_then_llama_rmsnorm(shape, dtype, device):
    # Both outputs get a grad, so x and residual see the norm's grad plus the residual's own.
    check_against_reference(mod.PATTERN, {"shape": shape, "dtype": dtype}, device, reduced_grads=WEIGHT_GRAD)


@pytest.mark.parametrize("options", [{"weight_dtype": "float32"}, {"residual_dtype": "float32"}], ids=str)
def test_fp32_weight_or_residual_with_bf16_input(options, device):
    check_against_reference(mod.PATTERN, {"shape": [5, 3, 77], "dtype": "bfloat16", "eps": 1e-5, **options},
                            device, reduced_grads=WEIGHT_GRAD)


@pytest.mark.parametrize("used", ["y", "residual"])
def test_grads_when_only_one_output_is_used(used, device):
    torch.manual_seed(0)
    inputs = mod.make_inputs({"shape": [6, 40], "dtype": "float32"}, device)
    grads = {}
    for name, fn in (("fused", mod.add_rms_norm), ("reference", mod.reference)):
        args = [a.detach().clone().requires_grad_() for a in inputs.args]
        y, residual = fn(*args, **inputs.kwargs)
        (y if used == "y" else residual).square().sum().backward()
        grads[name] = [a.grad for a in args]
    for fused, ref in zip(grads["fused"], grads["reference"]):
        if ref is None:  # the weight gets no grad through the residual alone
            assert fused is None
        else:
            torch.testing.assert_close(fused, ref, atol=1e-5, rtol=1e-4)


def test_non_contiguous_inputs(device):
    x = torch.randn(64, 48, device=device).t()
    residual = torch.randn(64, 48, device=device).t()
    w = torch.randn(64, device=device)
    for fused, ref in zip(mod.add_rms_norm(x, residual, w), mod.reference(x, residual, w)):
        torch.testing.assert_close(fused, ref, atol=1e-5, rtol=1e-4)


def test_module_takes_over_an_rmsnorm(device):
    norm = torch.nn.Module()
    norm.weight = torch.nn.Parameter(torch.randn(32, device=device))
    norm.variance_epsilon = 1e-5
    fused = mod.AddRMSNorm.from_module(norm)
    assert fused.weight is norm.weight and fused.variance_epsilon == 1e-5
    x, residual = torch.randn(3, 32, device=device), torch.randn(3, 32, device=device)
    y, new_residual = fused(x, residual)
    torch.testing.assert_close(new_residual, x + residual)
    torch.testing.assert_close(y, rms_norm.reference(x + residual, norm.weight, 1e-5))


def test_unsupported_dtype_and_mismatched_shapes_are_refused(device):
    x, w = torch.randn(2, 8, device=device), torch.ones(8, device=device)
    with pytest.raises(TypeError, match="float64 is not supported"):
        mod.add_rms_norm(x.double(), x.double(), w.double())
    with pytest.raises(ValueError, match="residual shape"):
        mod.add_rms_norm(x, torch.randn(1, 8, device=device), w)
    with pytest.raises(ValueError, match="weight shape"):
        mod.add_rms_norm(x, x, torch.ones(4, device=device))


def test_custom_ops_pass_opcheck(device):
    x = torch.randn(40, 6, device=device).t()  # transposed: the fakes must promise real strides
    residual = torch.randn(6, 40, device=device)
    w = torch.randn(40, device=device)
    _, s, rstd = mod.add_rms_norm_fwd(x, residual, w, 1e-6)
    torch.library.opcheck(torch.ops.fusion_advisor.add_rms_norm_fwd.default, (x, residual, w, 1e-6))
    dy = torch.randn(6, 40, device=device)
    for ds_out in (dy.t().contiguous().t(), None):
        torch.library.opcheck(torch.ops.fusion_advisor.add_rms_norm_bwd.default, (dy, ds_out, s, w, rstd))


def test_module_runs_under_torch_compile_fullgraph(device):
    # aot_eager: dynamo (fullgraph), the fake kernels and AOTAutograd, which is what the
    # registration decides; inductor would add only C++ codegen of the ops around ours.
    torch._dynamo.reset()
    module = mod.AddRMSNorm(24, device=device)

    def layer(x, residual):
        y, residual = module(x, residual)
        return y * 2, residual

    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 3, 24, device=device, requires_grad=True)
    residual = torch.randn(2, 3, 24, device=device, requires_grad=True)
    y, new_residual = compiled(x, residual)
    (y.sum() + new_residual.square().sum()).backward()
    torch.testing.assert_close(new_residual, x + residual)
    assert x.grad is not None and module.weight.grad is not None
    torch.testing.assert_close(x.grad, residual.grad)


@pytest.mark.parametrize("fixture,dtype", [("llama-bf16-h200", "bfloat16"), ("llama-fp32-h200", "float32")])
def test_params_read_from_a_real_llama_trace(fixture, dtype, data_dir):
    trace = Trace.load(data_dir / f"{fixture}.json.gz")
    top = trace.ops[(trace.ops["depth"] == 0) & ~trace.ops["backward"]]
    pows = [list(top.index).index(i) for i in top.index[top["name"] == "aten::pow"]]
    # The first RMSNorm of the model has no residual add before it; the second has one.
    first = op_records(trace, top.index[pows[0]:pows[0] + 7])
    second = op_records(trace, top.index[pows[1] - 2:pows[1] + 7])
    assert [r.short for r in second] == ["add", "to", "pow", "mean", "add", "rsqrt", "mul", "to", "mul"]
    assert second[0].dims[:2] == ((4, 1024, 1024), (4, 1024, 1024))
    expected = {"shape": [4, 1024, 1024], "dtype": dtype, "weight_dtype": dtype, "eps": 1e-6}
    assert match(second) == (mod.PATTERN, expected)
    assert mod.PATTERN.match(first) is None
    assert match(first)[0].name == "rms_norm"


def test_fused_bytes():
    m, n = 4096, 1024
    b = mod.fused_bytes({"shape": [m, n], "dtype": "bfloat16"})
    assert b["forward"] == m * n * 8 + n * 2 + 4 * m
    # P = 264: two 8-warp backward programs an SM at N=1024 (norm_tiles.backward_programs_for)
    assert b["backward"] == m * n * 8 + 4 * m + n * 2 + 2 * 264 * n * 4 + n * 2
    no_residual_grad = mod.fused_bytes({"shape": [m, n], "dtype": "bfloat16", "residual_grad": False})
    assert b["backward"] - no_residual_grad["backward"] == m * n * 2
