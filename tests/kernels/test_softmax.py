import pytest
import torch

from fusion_advisor.kernels import match
from fusion_advisor.kernels import softmax as mod
from fusion_advisor.core.records import OpRecord
from fusion_advisor.kernels.tolerances import tolerance
from kernel_checks import check_against_reference
from traced_ops import forward_ops, windows

# exp(-inf - -inf) in a fully masked row: NaN on purpose, as in eager; numpy warns about it.
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("mask", ["none", "causal"])
@pytest.mark.parametrize("shape", [[2, 3, 13, 13], [4, 16, 16]])
def test_scaled_softmax_matches_eager(shape, mask, dtype, device):
    check_against_reference(mod.PATTERN, {"shape": shape, "dtype": dtype, "scale": 0.125, "mask": mask}, device)


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("mask_shape", [[2, 1, 5, 37], [5, 37], [2, 3, 1, 37]])
def test_additive_mask_matches_eager(mask_shape, dtype, device):
    """Broadcast masks, the last quarter of keys at finfo.min (padding): a uniform row stays finite."""
    check_against_reference(mod.PATTERN, {"shape": [2, 3, 5, 37], "dtype": dtype, "scale": 0.3, "mask": "additive",
                                          "mask_shape": mask_shape}, device)


@pytest.mark.parametrize("mask_dtype", ["bfloat16", "float32"])
def test_mask_grad_and_dtype_promotion(mask_dtype, device):
    """A learned additive bias (T5, ALiBi-style) gets its grad, summed over the broadcast dims; an
    fp32 mask on bf16 scores gives fp32 probabilities, as eager does."""
    check_against_reference(mod.PATTERN, {"shape": [2, 3, 5, 37], "dtype": "bfloat16", "scale": 0.3,
                                          "mask": "additive", "mask_shape": [3, 5, 37], "mask_dtype": mask_dtype,
                                          "mask_grad": True}, device, reduced_grads=(2,))


def test_long_rows(device):
    check_against_reference(mod.PATTERN, {"shape": [2, 3000], "dtype": "bfloat16", "scale": 1.0}, device)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fully_masked_rows_behave_like_eager(dtype, device):
    """A row masked with -inf everywhere is NaN in eager and here (forward and grad); a row masked
    with finfo.min is uniform in both."""
    torch.manual_seed(0)
    scores = torch.randn(2, 2, 4, 6, device=device).to(dtype)
    mask = torch.zeros(2, 1, 4, 6, device=device, dtype=dtype)
    mask[0, 0, 1] = float("-inf")
    mask[1, 0, 2] = torch.finfo(dtype).min
    ref_in, fused_in = scores.clone().requires_grad_(), scores.clone().requires_grad_()
    ref, fused = mod.reference(ref_in, 0.5, mask), mod.softmax(fused_in, 0.5, mask)
    assert ref[0, :, 1].isnan().all() and not ref[1].isnan().any()
    torch.testing.assert_close(fused, ref, equal_nan=True)
    torch.testing.assert_close(fused[1, :, 2], torch.full_like(fused[1, :, 2], 1 / 6))
    dy = torch.randn_like(ref)
    ref.backward(dy)
    fused.backward(dy)
    torch.testing.assert_close(fused_in.grad, ref_in.grad, equal_nan=True, **tolerance(dtype))


def test_non_contiguous_inputs(device):
    scores = torch.randn(2, 3, 9, 9, device=device).transpose(-1, -2)  # last dim strided: copied
    mask = torch.randn(9, 2, device=device).t()[:, None, None, :]  # (2, 1, 1, 9), strided, broadcast
    torch.testing.assert_close(mod.softmax(scores, 0.5, mask), mod.reference(scores, 0.5, mask))
    heads = torch.randn(2, 9, 3, 9, device=device).transpose(1, 2)  # strided leading dims: read in place
    torch.testing.assert_close(mod.softmax(heads, 0.5, causal=True), mod.reference(heads, 0.5, causal=True))


def test_bad_inputs_are_refused(device):
    scores = torch.randn(2, 4, 4, device=device)
    with pytest.raises(TypeError, match="float64 is not supported"):
        mod.softmax(scores.double())
    with pytest.raises(TypeError, match="additive float mask"):
        mod.softmax(scores, mask=torch.ones(4, 4, dtype=torch.bool, device=device))
    with pytest.raises(ValueError, match="does not broadcast"):
        mod.softmax(scores, mask=torch.zeros(3, 4, 4, device=device))
    with pytest.raises(ValueError, match="square"):
        mod.softmax(torch.randn(2, 4, 6, device=device), causal=True)


def test_params_read_from_gpt_traces():
    """GPT-2's `mul alias bitwise_not masked_fill softmax` in real H200 traces, every layer."""
    for name, dtype in (("gpt-bf16-h200.json.gz", "bfloat16"), ("gpt-fp32-h200.json.gz", "float32")):
        found = [match(w) for w in windows(forward_ops(name), "aten::softmax", 4, 1)]
        assert len(found) == 4
        for pattern, params in found:
            assert pattern is mod.PATTERN
            # the trace does not record the double scale: 1.0, which times the same
            assert params == {"shape": [8, 12, 512, 512], "dtype": dtype, "scale": 1.0, "mask": "causal"}


def test_params_of_bert_style_chain():
    shape = (8, 12, 128, 128)
    ops = [OpRecord("aten::div", (shape, ()), ("c10::BFloat16", "Scalar"), ("", "8.0")),
           OpRecord("aten::add", (shape, (8, 1, 1, 128), ()), ("c10::BFloat16", "c10::BFloat16", "Scalar"), ("", "", "1")),
           OpRecord("aten::_softmax", (shape, (), ()), ("c10::BFloat16", "Scalar", "Scalar"), ("", "-1", "False"))]
    assert match(ops)[1] == {"shape": list(shape), "dtype": "bfloat16", "scale": 0.125, "mask": "additive",
                             "mask_shape": [8, 1, 1, 128], "mask_dtype": "bfloat16"}
    not_last_dim = ops[:2] + [OpRecord("aten::_softmax", (shape, (), ()), ("c10::BFloat16", "Scalar", "Scalar"),
                                       ("", "1", "False"))]
    assert mod.PATTERN.match(not_last_dim) is None
    assert mod.PATTERN.match(ops[2:]) is None  # a lone softmax: nothing to fuse


def test_fused_bytes():
    causal = mod.fused_bytes({"shape": [2, 4, 8, 8], "dtype": "bfloat16", "mask": "causal"})
    kept = 2 * 4 * (8 * 9 // 2)
    assert causal == {"forward": kept * 2 + 512 * 2, "backward": 2 * kept * 2 + 512 * 2}
    additive = mod.fused_bytes({"shape": [2, 4, 8, 8], "dtype": "bfloat16", "mask": "additive",
                                "mask_shape": [2, 1, 8, 8], "mask_dtype": "float32", "mask_grad": True})
    assert additive == {"forward": 512 * 2 + 128 * 4 + 512 * 4,
                        "backward": 2 * 512 * 4 + 512 * 2 + 2 * 512 * 4 + 128 * 4}


def test_custom_ops_pass_opcheck(device):
    scores, mask = torch.randn(2, 3, 8, 8, device=device), torch.randn(2, 1, 8, 8, device=device)
    torch.library.opcheck(torch.ops.fusion_advisor.softmax_fwd.default, (scores, mask, 0.5, False))
    torch.library.opcheck(torch.ops.fusion_advisor.softmax_fwd.default, (scores, None, 0.5, True))
    y = mod.softmax_fwd(scores, None, 0.5, True)
    torch.library.opcheck(torch.ops.fusion_advisor.softmax_bwd.default,
                          (torch.randn_like(y), y, 0.5, True, torch.float32, True))


def test_runs_under_torch_compile_fullgraph(device):
    scores = torch.randn(2, 3, 8, 8, device=device, requires_grad=True)
    mask = torch.randn(8, 8, device=device, requires_grad=True)
    compiled = torch.compile(lambda s, m: (mod.softmax(s, 0.5, m, causal=True) ** 2).sum(), fullgraph=True,
                             backend="aot_eager")
    compiled(scores, mask).backward()
    s_ref, m_ref = (t.detach().clone().requires_grad_() for t in (scores, mask))
    (mod.reference(s_ref, 0.5, m_ref, causal=True) ** 2).sum().backward()
    torch.testing.assert_close(scores.grad, s_ref.grad)
    torch.testing.assert_close(mask.grad, m_ref.grad)


@pytest.mark.parametrize("shape", [[1, 2, 40, 40], [3, 33, 33]])
def test_causal_rows_across_whole_load_groups(shape, device):
    """The causal loads take whole groups of 8 entries past the diagonal (16-byte loads); rows whose
    diagonal ends a group, starts one, or sits past the last full group drop those entries."""
    check_against_reference(mod.PATTERN, {"shape": shape, "dtype": "bfloat16", "scale": 0.5, "mask": "causal"},
                            device)


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the bench measures what this checks")
def test_causal_rows_load_16_bytes_at_a_time():
    """sm_90 PTX of the causal kernels (4096-wide bf16 rows): 16-byte loads only. With the mask at
    element granularity every load was a 2-byte one (16 ld.global.b16 a thread in the forward, 32 in
    the backward), and the causal forward ran at 70 % of copy where the additive one ran at 93 %
    (H200, benchmarks/results/bench-kernels-h200.csv)."""
    from kernel_checks import sm90_global_accesses
    types = {"X": "*bf16", "MASK": "*bf16", "Y": "*bf16", "DY": "*bf16", "DX": "*bf16", "DZ": "*bf16",
             "scale": "fp32"}
    cases = [{"module": mod.__name__, "kernel": "_softmax_fwd_kernel", "types": types, "num_warps": 8,
              "constexprs": {"HAS_MASK": False, "CAUSAL": True, "BLOCK_SIZE": 4096, "ROWS": 1}, "unaligned": ["scale"]},
             {"module": mod.__name__, "kernel": "_softmax_bwd_kernel", "types": types, "num_warps": 8,
              "constexprs": {"WRITE_DZ": False, "CAUSAL": True, "BLOCK_SIZE": 1024, "ROWS": 4}, "unaligned": ["scale"]}]
    for case, accesses in zip(cases, sm90_global_accesses(cases)):
        loads = {op: n for op, n in accesses.items() if op.startswith("ld.")}
        assert loads and all(".v4." in op for op in loads), (case["kernel"], accesses)
