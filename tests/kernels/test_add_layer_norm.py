import pytest
import torch

from fusion_advisor.analyzers.trace import Trace
from fusion_advisor.kernels import add_layer_norm as mod
from fusion_advisor.kernels import match
from kernel_checks import check_against_reference
from traced_ops import op_records

# Kept to a few thousand elements: the Triton interpreter runs every program in Python.
CASES = [
    {"shape": [2, 5, 431]},
    {"shape": [16, 256]},
    {"shape": [3, 7, 129]},
    {"shape": [4, 6, 8, 5], "normalized_shape": [8, 5]},
]
PARAM_GRADS = (3, 4)  # weight, bias: summed over rows


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c["shape"])))
def test_add_layer_norm_matches_add_then_f_layer_norm(case, dtype, device):
    # Both outputs get a grad, so x and residual see the norm's grad plus the residual's own.
    check_against_reference(mod.PATTERN, {**case, "dtype": dtype}, device, reduced_grads=PARAM_GRADS)


@pytest.mark.parametrize("options", [{"weight": False, "bias": False}, {"bias": False},
                                     {"residual_dtype": "float32", "weight_dtype": "float32"}], ids=str)
def test_affine_and_fp32_residual_options(options, device):
    check_against_reference(mod.PATTERN, {"shape": [5, 3, 77], "dtype": "bfloat16", "eps": 1e-6, **options},
                            device, reduced_grads=PARAM_GRADS)


@pytest.mark.parametrize("used", ["y", "residual"])
def test_grads_when_only_one_output_is_used(used, device):
    torch.manual_seed(0)
    inputs = mod.make_inputs({"shape": [6, 40], "dtype": "float32"}, device)
    grads = {}
    for name, fn in (("fused", mod.add_layer_norm), ("reference", mod.reference)):
        args = [a.detach().clone().requires_grad_() if isinstance(a, torch.Tensor) else a for a in inputs.args]
        y, residual = fn(*args, **inputs.kwargs)
        (y if used == "y" else residual).square().sum().backward()
        grads[name] = [args[i].grad for i in inputs.grad_inputs]
    for fused, ref in zip(grads["fused"], grads["reference"]):
        if ref is None:  # weight and bias get no grad through the residual alone
            assert fused is None or not fused.any()
        else:
            torch.testing.assert_close(fused, ref, atol=1e-5, rtol=1e-4)


def test_non_contiguous_inputs(device):
    x = torch.randn(64, 48, device=device).t()
    residual = torch.randn(64, 48, device=device).t()
    w, b = torch.randn(64, device=device), torch.randn(64, device=device)
    for fused, ref in zip(mod.add_layer_norm(x, residual, 64, w, b), mod.reference(x, residual, (64,), w, b)):
        torch.testing.assert_close(fused, ref, atol=1e-5, rtol=1e-4)


def test_module_takes_over_a_layer_norm(device):
    ln = torch.nn.LayerNorm(32, device=device)
    fused = mod.AddLayerNorm.from_module(ln)
    assert fused.weight is ln.weight and fused.bias is ln.bias
    x, residual = torch.randn(3, 32, device=device), torch.randn(3, 32, device=device)
    y, new_residual = fused(x, residual)
    torch.testing.assert_close(new_residual, x + residual)
    torch.testing.assert_close(y, ln(x + residual))


def test_unsupported_dtype_and_mismatched_shapes_are_refused(device):
    x = torch.randn(2, 8, device=device)
    with pytest.raises(TypeError, match="float64 is not supported"):
        mod.add_layer_norm(x, x.double(), 8)
    with pytest.raises(ValueError, match="residual shape"):
        mod.add_layer_norm(x, torch.randn(1, 8, device=device), 8)


def test_custom_ops_pass_opcheck(device):
    x = torch.randn(40, 6, device=device).t()  # transposed: the fakes must promise real strides
    residual = torch.randn(6, 40, device=device)
    w, b = torch.randn(40, device=device), torch.randn(40, device=device)
    _, s, mean, rstd = mod.add_layer_norm_fwd(x, residual, [40], w, b, 1e-5)
    torch.library.opcheck(torch.ops.fusion_advisor.add_layer_norm_fwd.default, (x, residual, [40], w, b, 1e-5))
    dy = torch.randn(6, 40, device=device)
    for ds_out, weight, bias in ((dy.t().contiguous().t(), w, b), (None, None, None)):
        torch.library.opcheck(torch.ops.fusion_advisor.add_layer_norm_bwd.default,
                              (dy, ds_out, s, [40], weight, bias, mean, rstd))


def test_module_runs_under_torch_compile_fullgraph(device):
    # aot_eager: dynamo (fullgraph), the fake kernels and AOTAutograd, which is what the
    # registration decides; inductor would add only C++ codegen of the ops around ours.
    torch._dynamo.reset()
    module = mod.AddLayerNorm.from_module(torch.nn.LayerNorm(24, device=device))

    def block(x, residual):
        y, residual = module(x, residual)
        return y * 2, residual

    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 3, 24, device=device, requires_grad=True)
    residual = torch.randn(2, 3, 24, device=device, requires_grad=True)
    y, new_residual = compiled(x, residual)
    (y.sum() + new_residual.square().sum()).backward()
    torch.testing.assert_close(new_residual, x + residual)
    assert x.grad is not None and residual.grad is not None and module.weight.grad is not None
    torch.testing.assert_close(x.grad, residual.grad)


def test_params_read_from_a_real_gpt_trace(data_dir):
    trace = Trace.load(data_dir / "gpt-bf16-h200.json.gz")
    ops = trace.ops
    norms = ops.index[(ops["name"] == "aten::layer_norm") & ~ops["backward"]]
    # The first LayerNorm follows the token + position embedding add (a broadcast, no residual);
    # the second follows the attention block's residual add.
    embed = op_records(trace, [norms[0] - 1, norms[0], norms[0] + 1])
    block = op_records(trace, [norms[1] - 1, norms[1], norms[1] + 1])
    assert [r.short for r in block] == ["add", "layer_norm", "native_layer_norm"]
    assert block[0].dims[:2] == ((8, 512, 768), (8, 512, 768))
    expected = {"shape": [8, 512, 768], "dtype": "bfloat16", "eps": 1e-5}
    assert mod.PATTERN.match(block) == expected
    assert mod.PATTERN.match([block[0], block[2]]) == expected
    assert match(block) == (mod.PATTERN, expected)
    assert mod.PATTERN.match(embed) is None
    pattern, params = match(embed)
    assert pattern.name == "layer_norm" and params == expected


def test_fused_bytes():
    m, n = 4096, 1024
    b = mod.fused_bytes({"shape": [m, n], "dtype": "bfloat16"})
    assert b["forward"] == m * n * 8 + 2 * n * 2 + 8 * m
    # P = 264: two 8-warp backward programs an SM at N=1024 (norm_tiles.backward_programs_for)
    assert b["backward"] == m * n * 8 + 8 * m + n * 2 + 2 * (2 * 264 * n * 4 + n * 2)
    no_residual_grad = mod.fused_bytes({"shape": [m, n], "dtype": "bfloat16", "residual_grad": False})
    assert b["backward"] - no_residual_grad["backward"] == m * n * 2
