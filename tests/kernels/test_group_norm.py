import pytest
import torch

from fusion_advisor.kernels import group_norm as mod
from fusion_advisor.kernels import match
from fusion_advisor.core.records import OpRecord
from kernel_checks import check_against_reference

# Kept to a few thousand elements: the Triton interpreter runs every program in Python.
# (N, C, *) images with odd sizes, and (tokens, hidden) with per-head groups.
CASES = [
    {"shape": [4, 6, 5, 7], "num_groups": 3},
    {"shape": [16, 256], "num_groups": 4},
    {"shape": [3, 12, 41], "num_groups": 4},
]
PARAM_GRADS = (2, 3)  # weight, bias: summed over samples and positions


def _check(params, device):
    shape = params["shape"]
    positions = 1
    for d in shape[2:]:
        positions *= d
    check_against_reference(mod.PATTERN, params, device, reduced_grads=PARAM_GRADS)


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c["shape"])))
def test_group_norm_matches_f_group_norm(case, dtype, device):
    _check({**case, "dtype": dtype}, device)


@pytest.mark.parametrize("options", [{"weight": False, "bias": False}, {"weight_dtype": "float32"}], ids=str)
def test_affine_options(options, device):
    if device.type == "cuda" and options.get("weight_dtype") == "float32":
        pytest.skip("the reference itself refuses a float32 weight with bfloat16 input on CUDA")
    _check({"shape": [3, 10, 41], "num_groups": 5, "dtype": "bfloat16", **options}, device)


@pytest.fixture
def per_group_plan(monkeypatch):
    """Shrink the tiles so that small shapes take the per-group, chunked plan of large images."""
    monkeypatch.setattr(mod, "TILE_ELEMENTS", 64)
    monkeypatch.setattr(mod, "CHUNK_ELEMENTS", 32)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_per_group_plan_matches_f_group_norm(per_group_plan, dtype, device):
    assert not mod.plan(4, 37, 2)["ONE_TILE"]
    _check({"shape": [2, 4, 37], "num_groups": 2, "dtype": dtype}, device)


def test_per_group_plan_keeps_precision_far_from_zero(per_group_plan, device):
    # One-pass sums of x^2 lose the variance when |mean| >> std; the kernel's shifted sums do not.
    x = 1000.0 + torch.randn(2, 4, 37, device=device)
    torch.testing.assert_close(mod.group_norm(x, 2), mod.reference(x, 2), atol=1e-4, rtol=1e-4)


def test_non_contiguous_input(device):
    x = torch.randn(2, 7, 8, 6, device=device).permute(0, 3, 1, 2)  # (2, 6, 8, 7), strided
    w, b = torch.randn(6, device=device), torch.randn(6, device=device)
    torch.testing.assert_close(mod.group_norm(x, 3, w, b), mod.reference(x, 3, w, b), atol=1e-5, rtol=1e-4)


def test_module_wraps_existing_parameters(device):
    ref = torch.nn.GroupNorm(2, 8, eps=1e-6, device=device)
    fused = mod.GroupNorm.from_module(ref)
    assert fused.weight is ref.weight and fused.bias is ref.bias and fused.eps == 1e-6
    x = torch.randn(3, 8, 5, device=device)
    torch.testing.assert_close(fused(x), ref(x))
    plain = mod.GroupNorm.from_module(torch.nn.GroupNorm(4, 8, affine=False))
    assert plain.weight is None
    torch.testing.assert_close(plain(x), torch.nn.functional.group_norm(x, 4))


def test_unsupported_dtype_and_bad_groups_are_refused(device):
    with pytest.raises(TypeError, match="float64 is not supported"):
        mod.group_norm(torch.randn(2, 8, dtype=torch.float64, device=device), 2)
    with pytest.raises(ValueError, match="do not split into 3 groups"):
        mod.group_norm(torch.randn(2, 8, device=device), 3)
    with pytest.raises(ValueError, match=r"weight shape \[4\]"):
        mod.group_norm(torch.randn(2, 8, device=device), 2, torch.ones(4, device=device))


def test_custom_ops_pass_opcheck(device):
    x = torch.randn(2, 7, 6, device=device).transpose(1, 2)  # (2, 6, 7), strided
    w, b = torch.randn(6, device=device), torch.randn(6, device=device)
    _, mean, rstd = mod.group_norm_fwd(x, 3, w, b, 1e-5)
    dy = torch.randn(2, 6, 7, device=device)
    for weight, bias in ((w, b), (None, None)):
        torch.library.opcheck(torch.ops.fusion_advisor.group_norm_fwd.default, (x, 3, weight, bias, 1e-5))
        torch.library.opcheck(torch.ops.fusion_advisor.group_norm_bwd.default, (dy, x, 3, weight, bias, mean, rstd))


def test_module_runs_under_torch_compile_fullgraph(device):
    # aot_eager: dynamo (fullgraph), the fake kernels and AOTAutograd, which is what the
    # registration decides; inductor would add only C++ codegen of the ops around ours.
    torch._dynamo.reset()
    module = mod.GroupNorm.from_module(torch.nn.GroupNorm(2, 8, device=device))
    compiled = torch.compile(module, fullgraph=True, backend="aot_eager")
    x = torch.randn(3, 8, 5, device=device, requires_grad=True)
    out = compiled(x)
    out.sum().backward()
    torch.testing.assert_close(out, mod.reference(x.detach(), 2, module.weight, module.bias))
    assert x.grad is not None and module.weight.grad is not None


def test_params_read_from_traced_ops():
    # Ops as torch.profiler records them (torch 2.13, CPU) for nn.GroupNorm(2, 6, eps=1e-6) and
    # F.group_norm(x, 3) on a (4, 6, 8, 5) fp32 x, and nn.GroupNorm(4, 8) on a (3, 8) x.
    affine = [OpRecord("aten::group_norm", ((4, 6, 8, 5), (), (6,), (6,), (), ()),
                       ("float", "Scalar", "float", "float", "Scalar", "Scalar"),
                       ("", "2", "", "", "9.9999999999999995e-07", "True")),
              OpRecord("aten::native_group_norm", ((4, 6, 8, 5), (6,), (6,), (), (), (), (), ()),
                       ("float", "float", "float", "Scalar", "Scalar", "Scalar", "Scalar", "Scalar"),
                       ("", "", "", "4", "6", "40", "2", "9.9999999999999995e-07"))]
    expected = {"shape": [4, 6, 8, 5], "dtype": "float32", "num_groups": 2, "eps": 1e-6}
    assert match(affine) == (mod.PATTERN, expected)
    assert mod.PATTERN.match(affine[1:]) == expected
    plain = OpRecord("aten::native_group_norm", ((4, 6, 8, 5), (), (), (), (), (), (), ()),
                     ("float", "", "", "Scalar", "Scalar", "Scalar", "Scalar", "Scalar"),
                     ("", "", "", "4", "6", "40", "3", "1.0000000000000001e-05"))
    assert mod.PATTERN.match([plain]) == {"shape": [4, 6, 8, 5], "dtype": "float32", "num_groups": 3, "eps": 1e-5,
                                          "weight": False, "bias": False}
    tokens = OpRecord("aten::group_norm", ((3, 8), (), (8,), (8,), (), ()),
                      ("c10::BFloat16", "Scalar", "float", "float", "Scalar", "Scalar"),
                      ("", "4", "", "", "1.0000000000000001e-05", "True"))
    assert mod.PATTERN.match([tokens]) == {"shape": [3, 8], "dtype": "bfloat16", "num_groups": 4, "eps": 1e-5,
                                           "weight_dtype": "float32"}


def test_fused_bytes_follows_the_plan():
    m, c, g = 4096 * 1024, 1024, 16
    tokens = mod.fused_bytes({"shape": [4096, c], "dtype": "bfloat16", "num_groups": g})
    assert tokens["forward"] == m * 4 + 2 * c * 2 + 8 * 4096 * g
    assert tokens["backward"] == m * 6 + 8 * 4096 * g + c * 2 + 2 * (2 * 132 * c * 4 + c * 2)
    n, c, s = 2, 320, 64 * 64  # a diffusion UNet's GroupNorm(32, 320): the per-group plan
    image = mod.fused_bytes({"shape": [n, c, 64, 64], "dtype": "bfloat16", "num_groups": 32})
    assert image["forward"] == n * c * s * 6 + 2 * n * c * 2 + 8 * n * 32


@pytest.fixture
def sliced_plan(per_group_plan, monkeypatch):
    """The per-group plan's shapes with too few groups for the (pretend) GPU: each group cut across
    programs, in chunks smaller than a slice."""
    from fusion_advisor.kernels import group_norm_slices
    monkeypatch.setattr(group_norm_slices, "PROGRAMS_INTERPRETED", 16)
    monkeypatch.setattr(group_norm_slices, "CHUNK_ELEMENTS", 16)
    return group_norm_slices


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("case", [
    {"shape": [2, 6, 5, 7], "num_groups": 1},      # PoolFormer's one group a sample: 6 slices of a channel
    {"shape": [3, 10, 41], "num_groups": 2},       # 5 channels a group in slices of 2, 2 and 1
    {"shape": [2, 8, 9], "num_groups": 2, "weight": False, "bias": False},
], ids=lambda c: "x".join(map(str, c["shape"])) + f"g{c['num_groups']}" + ("-noaffine" if "weight" in c else ""))
def test_sliced_plan_matches_f_group_norm(sliced_plan, case, dtype, device):
    from kernel_checks import recorded_launches
    shape, groups = case["shape"], case["num_groups"]
    n_rows, cpg = shape[0] * groups, shape[1] // groups
    assert sliced_plan.slices_for(n_rows, cpg, torch.device(device)) > 1
    with recorded_launches() as launches:
        _check({**case, "dtype": dtype}, device)
    assert {"_slice_stats_kernel", "_slice_apply_kernel", "_slice_sums_kernel", "_slice_dx_kernel"} <= {
        launch["name"] for launch in launches}


def test_sliced_plan_keeps_precision_far_from_zero(sliced_plan, device):
    x = 1000.0 + torch.randn(2, 6, 37, device=device)
    torch.testing.assert_close(mod.group_norm(x, 1), mod.reference(x, 1), atol=1e-4, rtol=1e-4)


def test_slices_are_equal_and_only_where_groups_are_too_few(sliced_plan):
    cpu = torch.device("cpu")
    assert sliced_plan.slices_for(16, 64, cpu) == 1       # the groups alone fill the target
    assert sliced_plan.slices_for(4, 1, cpu) == 1         # one channel: nothing to cut
    assert sliced_plan.slices_for(2, 64, cpu) == 8        # 16 programs
    assert sliced_plan.slices_for(3, 5, cpu) == 5         # 6 wanted, 5 channels: one channel each
    assert sliced_plan.slices_for(6, 5, cpu) == 3         # 3 wanted: slices of 2, 2 and 1 channels
    assert sliced_plan.slices_for(1, 7, cpu) == 7         # no empty slice
