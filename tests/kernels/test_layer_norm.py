import pytest
import torch

from fusion_advisor.analyzers.trace import Trace
from fusion_advisor.kernels import layer_norm as mod
from fusion_advisor.kernels import match
from fusion_advisor.core.records import OpRecord
from kernel_checks import check_against_reference
from traced_ops import op_records

# Round and odd shapes, multi-dim normalized
# shapes, and the nn.LayerNorm options (no affine, no bias, fp32 parameters on a bf16 input).
# Kept to a few thousand elements: the Triton interpreter runs every program in Python.
CASES = [
    {"shape": [2, 5, 431]},
    {"shape": [16, 256]},
    {"shape": [3, 7, 129]},
    {"shape": [1, 1, 8]},
    {"shape": [4, 6, 8, 5], "normalized_shape": [8, 5]},
]


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c["shape"])))
def test_layer_norm_matches_f_layer_norm(case, dtype, device):
    check_against_reference(mod.PATTERN, {**case, "dtype": dtype}, device, reduced_grads=(2, 3))


@pytest.mark.parametrize("options", [{"weight": False, "bias": False}, {"bias": False},
                                     {"weight": False}, {"weight_dtype": "float32"}], ids=str)
def test_affine_options(options, device):
    if device.type == "cuda" and options.get("weight_dtype") == "float32":
        pytest.skip("the reference itself refuses a float32 weight with bfloat16 input on CUDA")
    check_against_reference(mod.PATTERN, {"shape": [5, 3, 77], "dtype": "bfloat16", "eps": 1e-6, **options},
                            device, reduced_grads=(2, 3))


def test_non_contiguous_input(device):
    x = torch.randn(64, 48, device=device).t()  # (48, 64), last dim strided
    w, b = torch.randn(64, device=device), torch.randn(64, device=device)
    torch.testing.assert_close(mod.layer_norm(x, (64,), w, b), mod.reference(x, (64,), w, b), atol=1e-5, rtol=1e-4)


def test_module_wraps_existing_parameters(device):
    ref = torch.nn.LayerNorm(32, eps=1e-6, device=device)
    fused = mod.LayerNorm.from_module(ref)
    assert fused.weight is ref.weight and fused.bias is ref.bias and fused.eps == 1e-6
    x = torch.randn(3, 32, device=device)
    torch.testing.assert_close(fused(x), ref(x))
    plain = mod.LayerNorm.from_module(torch.nn.LayerNorm(32, elementwise_affine=False))
    assert plain.weight is None and plain.bias is None
    torch.testing.assert_close(plain(x), torch.nn.functional.layer_norm(x, (32,)))


def test_unsupported_dtype_and_bad_shapes_are_refused(device):
    x64 = torch.randn(2, 8, dtype=torch.float64, device=device)
    with pytest.raises(TypeError, match="float64 is not supported"):
        mod.layer_norm(x64, (8,))
    with pytest.raises(ValueError, match="not the trailing shape"):
        mod.layer_norm(torch.randn(2, 8, device=device), (4,))
    with pytest.raises(ValueError, match="weight shape"):
        mod.layer_norm(torch.randn(2, 8, device=device), (8,), torch.ones(4, device=device))


def test_custom_ops_pass_opcheck(device):
    x = torch.randn(40, 6, device=device).t()  # transposed: the fakes must promise real strides
    w, b = torch.randn(40, device=device), torch.randn(40, device=device)
    _, mean, rstd = mod.layer_norm_fwd(x, [40], w, b, 1e-5)
    for weight, bias in ((w, b), (None, None)):
        torch.library.opcheck(torch.ops.fusion_advisor.layer_norm_fwd.default, (x, [40], weight, bias, 1e-5))
        torch.library.opcheck(torch.ops.fusion_advisor.layer_norm_bwd.default,
                              (torch.randn(6, 40, device=device), x, [40], weight, bias, mean, rstd))


COMPILE_BACKEND = "aot_eager"


def test_module_runs_under_torch_compile_fullgraph(device):
    # aot_eager: dynamo (fullgraph), the fake kernels and AOTAutograd, which is what the
    # registration decides; inductor would add only C++ codegen of the ops around ours (~6 s).
    torch._dynamo.reset()
    module = mod.LayerNorm.from_module(torch.nn.LayerNorm(24, device=device))
    compiled = torch.compile(module, fullgraph=True, backend=COMPILE_BACKEND)
    x = torch.randn(2, 3, 24, device=device, requires_grad=True)
    out = compiled(x)
    out.sum().backward()
    ref_x = x.detach().clone().requires_grad_()
    torch.testing.assert_close(out, mod.reference(ref_x, (24,), module.weight, module.bias))
    assert x.grad is not None and module.weight.grad is not None


def test_params_read_from_a_real_gpt_trace(data_dir):
    trace = Trace.load(data_dir / "gpt-bf16-h200.json.gz")
    ops = trace.ops
    first = ops.index[(ops["name"] == "aten::layer_norm") & ~ops["backward"]][0]
    records = op_records(trace, [first, first + 1])  # aten::layer_norm, its aten::native_layer_norm
    assert [r.short for r in records] == ["layer_norm", "native_layer_norm"]
    expected = {"shape": [8, 512, 768], "dtype": "bfloat16", "eps": 1e-5}
    assert mod.PATTERN.match(records) == expected
    assert mod.PATTERN.match(records[1:]) == expected
    pattern, params = match(records)
    assert pattern.name == "layer_norm" and params == expected


def test_params_of_layer_norms_without_affine_or_over_two_dims():
    # Ops as torch.profiler records them (torch 2.13, CPU) for F.layer_norm(x, (5,)) and
    # F.layer_norm(x, (8, 5), w, b, 1e-6) on a (4, 6, 8, 5) fp32 x.
    plain = OpRecord("aten::native_layer_norm", ((4, 6, 8, 5), (), (), (), ()), ("float", "ScalarList", "", "", "Scalar"),
                     ("", "[5]", "", "", "1.0000000000000001e-05"))
    assert mod.PATTERN.match([plain]) == {"shape": [4, 6, 8, 5], "dtype": "float32", "eps": 1e-5,
                                          "weight": False, "bias": False}
    two = OpRecord("aten::layer_norm", ((4, 6, 8, 5), (), (8, 5), (8, 5), (), ()),
                   ("float", "ScalarList", "float", "float", "Scalar", "Scalar"),
                   ("", "[8, 5]", "", "", "9.9999999999999995e-07", "True"))
    assert mod.PATTERN.match([two]) == {"shape": [4, 6, 8, 5], "dtype": "float32", "eps": 1e-6,
                                        "normalized_shape": [8, 5]}
    backward = OpRecord("aten::native_layer_norm_backward", ((4, 6, 8, 5),), ("float",))
    assert mod.PATTERN.match([backward]) is None


def test_fused_bytes_counts_one_read_and_write_per_tensor():
    b = mod.fused_bytes({"shape": [4096, 1024], "dtype": "bfloat16"})
    m, n = 4096, 1024
    assert b["forward"] == m * n * 4 + 2 * n * 2 + 8 * m
    # P = 264: two 8-warp backward programs an SM at N=1024 (norm_tiles.backward_programs_for)
    assert b["backward"] == m * n * 6 + 8 * m + n * 2 + 2 * (2 * 264 * n * 4 + n * 2)
    plain = mod.fused_bytes({"shape": [4096, 1024], "dtype": "bfloat16", "weight": False, "bias": False})
    assert plain == {"forward": m * n * 4 + 8 * m, "backward": m * n * 6 + 8 * m}
