import pytest
import torch

from fusion_advisor.kernels import rms_norm as mod
from fusion_advisor.core.records import OpRecord
from fusion_advisor.kernels.tolerances import tolerance
from kernel_checks import check_against_reference

SHAPES = [[6, 42, 431], [3, 256], [1, 1, 8], [5, 1000]]


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("shape", SHAPES)
def test_rms_norm_matches_llama_rmsnorm(shape, dtype, device):
    check_against_reference(mod.PATTERN, {"shape": shape, "dtype": dtype, "eps": 1e-6}, device,
                            reduced_grads=(1,))


def test_fp32_weight_with_bf16_input_promotes_like_reference(device):
    check_against_reference(mod.PATTERN, {"shape": [4, 96], "dtype": "bfloat16", "weight_dtype": "float32"},
                            device, reduced_grads=(1,))


def test_non_contiguous_input(device):
    x = torch.randn(64, 48, device=device).t()  # (48, 64), last dim strided
    w = torch.randn(64, device=device)
    torch.testing.assert_close(mod.rms_norm(x, w), mod.reference(x, w), atol=1e-5, rtol=1e-4)


def test_module_wraps_existing_parameter(device):
    ref = torch.nn.Module()
    ref.weight = torch.nn.Parameter(torch.randn(32, device=device))
    ref.variance_epsilon = 1e-5
    fused = mod.RMSNorm.from_module(ref)
    assert fused.weight is ref.weight and fused.variance_epsilon == 1e-5
    x = torch.randn(3, 32, device=device)
    torch.testing.assert_close(fused(x), mod.reference(x, ref.weight, 1e-5))


def test_unsupported_dtype_is_refused(device):
    with pytest.raises(TypeError, match="float64 is not supported"):
        mod.rms_norm(torch.randn(2, 8, dtype=torch.float64, device=device), torch.ones(8, dtype=torch.float64, device=device))


def test_params_read_from_traced_ops():
    ops = [OpRecord("aten::to", ((4, 128, 256),), ("c10::BFloat16",)),
           OpRecord("aten::pow", ((4, 128, 256), ()), ("float", "Scalar"), ("", "2")),
           OpRecord("aten::mean", ((4, 128, 256), (), (), ()), ("float",)),
           OpRecord("aten::add", ((4, 128, 1), ()), ("float", "Scalar"), ("", "1e-05", "1")),
           OpRecord("aten::rsqrt", ((4, 128, 1),), ("float",)),
           OpRecord("aten::mul", ((4, 128, 256), (4, 128, 1)), ("float", "float")),
           OpRecord("aten::to", ((4, 128, 256),), ("float",)),
           OpRecord("aten::mul", ((256,), (4, 128, 256)), ("c10::BFloat16", "c10::BFloat16"))]
    params = mod.PATTERN.match(ops)
    assert params == {"shape": [4, 128, 256], "dtype": "bfloat16", "weight_dtype": "bfloat16", "eps": 1e-05}


def test_custom_ops_pass_opcheck_on_a_transposed_input(device):
    # The fake kernels must promise exactly the strides the real ones return (torch.compile
    # trusts them): dx comes back contiguous even for a transposed x.
    x = torch.randn(40, 6, device=device).t()
    w = torch.randn(40, device=device)
    for gemma in (False, True):
        _, rstd = mod.rms_norm_fwd(x, w, 1e-6, gemma)
        torch.library.opcheck(torch.ops.fusion_advisor.rms_norm_fwd.default, (x, w, 1e-6, gemma))
        torch.library.opcheck(torch.ops.fusion_advisor.rms_norm_bwd.default,
                              (torch.randn(6, 40, device=device), x, w, rstd, gemma))


@pytest.mark.parametrize("weight_dtype", [None, torch.float32])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [[5, 7, 131], [3, 256], [2, 1, 1000]])
def test_gemma_form_matches_gemma_rms_norm(shape, dtype, weight_dtype, device):
    """(1 + weight), in fp32, rounded once to x's dtype: GemmaRMSNorm's forward and gradients, also
    with the fp32 weight of autocast-style training."""
    x = torch.randn(shape, device=device).to(dtype)
    w = (0.1 * torch.randn(shape[-1], device=device)).to(weight_dtype or dtype)
    ref_in = [x.clone().requires_grad_(), w.clone().requires_grad_()]
    got_in = [x.clone().requires_grad_(), w.clone().requires_grad_()]
    ref = mod.gemma_reference(*ref_in, eps=1e-6)
    got = mod.rms_norm(*got_in, eps=1e-6, gemma=True)
    assert got.dtype == ref.dtype == dtype
    torch.testing.assert_close(got, ref, **tolerance(dtype))
    dy = torch.randn_like(ref)
    ref.backward(dy)
    got.backward(dy)
    torch.testing.assert_close(got_in[0].grad, ref_in[0].grad, **tolerance(dtype))
    torch.testing.assert_close(got_in[1].grad, ref_in[1].grad, **tolerance(w.dtype, x.numel() // shape[-1]))


def test_the_gemma_flag_is_refused_where_it_does_not_apply():
    from fusion_advisor.kernels import norm_core
    x = torch.randn(4, 8)
    with pytest.raises(ValueError, match="Gemma form"):
        norm_core.norm_fwd(x, x, torch.ones(8), None, 1e-6, rms=True, out_dtype=x.dtype, sum_dtype=x.dtype,
                           gemma=True)


def test_params_read_from_a_real_llama_trace_with_ops_around_the_chain(data_dir):
    # The first LlamaRMSNorm follows the rotary embedding's fp32 -> bf16 cast; the ops after it
    # are the attention's. Neither may leak into the params (the cast once made dtype float32).
    from fusion_advisor.analyzers.trace import Trace
    from traced_ops import op_records

    trace = Trace.load(data_dir / "llama-bf16-h200.json.gz")
    top = trace.ops[(trace.ops["depth"] == 0) & ~trace.ops["backward"]]
    at = list(top.index).index(top.index[top["name"] == "aten::pow"][0])
    records = op_records(trace, top.index[at - 2:at + 9])
    assert [r.short for r in records][:9] == ["to", "to", "pow", "mean", "add", "rsqrt", "mul", "to", "mul"]
    assert mod.PATTERN.match(records) == {"shape": [4, 1024, 1024], "dtype": "bfloat16",
                                          "weight_dtype": "bfloat16", "eps": 1e-6}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [[5, 7, 131], [3, 256]])
def test_without_a_weight_matches_the_unweighted_rms_norm(shape, dtype, device):
    """weight=None: x * rsqrt(mean(x^2) + eps) in fp32, rounded once (DeepSeek-V4's / EsmFold2's
    unweighted q/k norms), forward and backward by the one rule (kernels/numerics.py)."""
    from fusion_advisor.kernels.numerics import compare
    from fusion_advisor.kernels.registry import Inputs

    def unweighted(x, eps=1e-6):
        return (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps)).type_as(x)

    x = torch.randn(shape, device=device).to(dtype).requires_grad_()
    result = compare(unweighted, lambda x, eps=1e-6: mod.rms_norm(x, None, eps), Inputs((x,), grad_inputs=(0,)))
    assert result.ok, result.detail
    with pytest.raises(ValueError, match="needs a weight"):
        mod.rms_norm(x, None, 1e-6, gemma=True)
