import pytest
import torch

from fusion_advisor.kernels import match
from fusion_advisor.kernels import rope as mod
from kernel_checks import check_against_reference
from traced_ops import forward_ops, windows


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("case", [
    {"q_shape": [2, 4, 9, 16], "k_heads": 2},                                  # GQA, Llama's transposed layout
    {"q_shape": [2, 3, 5, 6], "k_heads": 3, "layout": "contiguous", "cos_batch": 2},  # odd sizes, per-batch cos
    {"q_shape": [1, 5, 7, 128], "k_heads": 1},                                 # a real head dim, MQA
])
def test_rope_matches_apply_rotary_pos_emb(case, dtype, device):
    check_against_reference(mod.PATTERN, {**case, "dtype": dtype}, device)


def test_fp32_cos_with_bf16_q_promotes_like_eager(device):
    check_against_reference(mod.PATTERN, {"q_shape": [2, 3, 5, 8], "k_heads": 1, "dtype": "bfloat16",
                                          "cos_dtype": "float32"}, device)


def test_outputs_keep_the_input_layout(device):
    inputs = mod.make_inputs({"q_shape": [2, 4, 9, 16], "k_heads": 2, "dtype": "float32"}, device, False)
    q, k = inputs.args[:2]
    q_embed, k_embed = mod.rope(*inputs.args)
    ref_q, ref_k = mod.reference(*inputs.args)
    assert q_embed.stride() == ref_q.stride() == q.stride() and k_embed.stride() == ref_k.stride() == k.stride()


def test_strided_inputs(device):
    """q/k/v sliced out of one fused qkv projection (not dense), and a q whose last dim is strided."""
    b, s, h, d = 2, 5, 3, 8
    qkv = torch.randn(b, s, 3, h, d, device=device)
    q, k = qkv[:, :, 0].transpose(1, 2), qkv[:, :, 1].transpose(1, 2)
    emb = torch.randn(1, s, d, device=device)
    cos, sin = emb.cos(), emb.sin()
    for fused, ref in zip(mod.rope(q, k, cos, sin), mod.reference(q, k, cos, sin)):
        torch.testing.assert_close(fused, ref)
    q_t = torch.randn(b, h, d, s, device=device).transpose(-1, -2)
    for fused, ref in zip(mod.rope(q_t, k, cos, sin), mod.reference(q_t, k, cos, sin)):
        torch.testing.assert_close(fused, ref)


def test_bad_inputs_are_refused(device):
    q = torch.randn(1, 2, 3, 8, device=device)
    cos = torch.randn(1, 3, 8, device=device)
    with pytest.raises(TypeError, match="float64 is not supported"):
        mod.rope(q.double(), q.double(), cos, cos)
    with pytest.raises(ValueError, match="head dim must be even"):
        mod.rope(q[..., :7], q[..., :7], cos[..., :7], cos[..., :7])
    with pytest.raises(ValueError, match="cos and sin must be"):
        mod.rope(q, q, cos[0], cos[0])
    with pytest.raises(ValueError, match="does not match q"):
        mod.rope(q, q[:, :, :2], cos, cos)
    with pytest.raises(ValueError, match="require grad"):
        mod.rope(q, q, cos.requires_grad_(), cos)


def test_params_read_from_llama_traces():
    """Every layer's `mul slice slice neg cat mul add` for q then k, in real H200 traces."""
    for name, dtype in (("llama-bf16-h200.json.gz", "bfloat16"), ("llama-fp32-h200.json.gz", "float32")):
        found = [match(w) for w in windows(forward_ops(name), "aten::neg", 5, 9)[::2]]  # q's neg of each layer
        assert len(found) == 4
        for pattern, params in found:
            assert pattern is mod.PATTERN
            assert params == {"q_shape": [4, 8, 1024, 128], "k_heads": 8, "dtype": dtype, "cos_batch": 1}


def test_fused_bytes():
    params = {"q_shape": [2, 32, 4096, 128], "k_heads": 8, "dtype": "bfloat16"}
    qk = 2 * 40 * 4096 * 128
    assert mod.fused_bytes(params) == {"forward": qk * 4 + 2 * 4096 * 128 * 2, "backward": qk * 4 + 2 * 4096 * 128 * 2}


def test_custom_ops_pass_opcheck(device):
    q, k, cos, sin = mod.make_inputs({"q_shape": [2, 4, 5, 8], "k_heads": 2, "dtype": "float32"}, device, False).args
    torch.library.opcheck(torch.ops.fusion_advisor.rope_fwd.default, (q, k, cos, sin))
    torch.library.opcheck(torch.ops.fusion_advisor.rope_bwd.default,
                          (torch.randn_like(q), torch.randn_like(k), cos, sin, torch.float32))


def test_runs_under_torch_compile_fullgraph(device):
    q, k, cos, sin = mod.make_inputs({"q_shape": [2, 4, 5, 8], "k_heads": 2, "dtype": "float32"}, device, True).args

    def loss(fn, q, k):
        q_embed, k_embed = fn(q, k, cos, sin)
        return (q_embed * 2).sum() + (k_embed ** 2).sum()

    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    compiled(mod.rope, q, k).backward()
    q_ref, k_ref = (t.detach().clone().requires_grad_() for t in (q, k))
    loss(mod.reference, q_ref, k_ref).backward()
    torch.testing.assert_close(q.grad, q_ref.grad)
    torch.testing.assert_close(k.grad, k_ref.grad)
