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


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("form", [(True, False, False), (True, True, False), (True, True, True), (True, False, True),
                                  (False, False, True)])
def test_rope_forms_match_their_reference(form, dtype, device):
    """Each (interleaved, fp32_math, cos_pair) form: Cohere's, Ernie's, Helium's, GPT-OSS's (a
    half-width cos), and what bench runs for a traced chain with `interleaved` read off its `stack`."""
    interleaved, fp32_math, cos_pair = form
    check_against_reference(mod.PATTERN, {"q_shape": [2, 4, 9, 16], "k_heads": 2, "dtype": dtype,
                                          "interleaved": interleaved, "fp32_math": fp32_math, "cos_pair": cos_pair},
                            device)


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("case", [
    {"q_shape": [2, 4, 9, 32], "k_heads": 2, "rotary_dim": 8},                        # GPT-NeoX: a quarter
    {"q_shape": [1, 3, 5, 12], "k_heads": 3, "rotary_dim": 6, "layout": "contiguous"},  # odd widths on both sides
    {"q_shape": [2, 2, 5, 16], "k_heads": 1, "rotary_dim": 8, "interleaved": True, "cos_pair": True},  # GLM-4
])
def test_partial_rotary_matches_gpt_neox(case, dtype, device):
    """GPT-NeoX's apply_rotary_pos_emb: the first rotary_dim elements of a head rotate, the rest
    pass through (its gradient too) and `cat` joins them, in the promoted dtype."""
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
    with pytest.raises(ValueError, match="rotary_dim must be even"):
        mod.rope(q, q, cos[..., :3], cos[..., :3], rotary_dim=3)
    with pytest.raises(ValueError, match="cos and sin must be"):
        mod.rope(q, q, cos, cos, rotary_dim=4)   # a partial rotation reads a table that wide
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


def test_partial_rotary_fused_bytes_read_a_narrower_table():
    params = {"q_shape": [2, 32, 4096, 128], "k_heads": 8, "dtype": "bfloat16", "rotary_dim": 32}
    qk = 2 * 40 * 4096 * 128
    assert mod.fused_bytes(params) == {"forward": qk * 4 + 2 * 4096 * 32 * 2, "backward": qk * 4 + 2 * 4096 * 32 * 2}


def test_custom_ops_pass_opcheck(device):
    q, k, cos, sin = mod.make_inputs({"q_shape": [2, 4, 5, 8], "k_heads": 2, "dtype": "float32"}, device, False).args
    for form in ((False, False, False, 0), (True, True, False, 0), (True, True, True, 0), (False, False, False, 4)):
        c, s = (t[..., :form[3] or None].contiguous() for t in (cos, sin))   # partial rotary: a narrower table
        torch.library.opcheck(torch.ops.fusion_advisor.rope_fwd.default, (q, k, c, s, *form))
        torch.library.opcheck(torch.ops.fusion_advisor.rope_bwd.default,
                              (torch.randn_like(q), torch.randn_like(k), c, s, torch.float32, *form))


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


def _interleaved_inputs(b, h, hk, s, d, dtype, device):
    """q and k in Cohere's transposed layout, cos/sin as CohereRotaryEmbedding builds them:
    repeat_interleave of the frequencies (each pair shares one angle), in the model's dtype."""
    q = torch.randn(b, s, h, d, device=device).to(dtype).transpose(1, 2).requires_grad_()
    k = torch.randn(b, s, hk, d, device=device).to(dtype).transpose(1, 2).requires_grad_()
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, d, 2, dtype=torch.float32, device=device) / d))
    freqs = torch.arange(s, device=device, dtype=torch.float32)[None, :, None] * inv_freq[None, None, :]
    emb = torch.repeat_interleave(freqs, 2, dim=-1)
    return q, k, emb.cos().to(dtype), emb.sin().to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(2, 4, 2, 9, 16), (1, 3, 1, 5, 6)])
def test_interleaved_fp32_math_matches_cohere(shape, dtype, device):
    """Cohere's apply_rotary_pos_emb: pairs (2i, 2i + 1), computed in fp32, rounded once to q's dtype."""
    from fusion_advisor.kernels.tolerances import tolerance

    q, k, cos, sin = _interleaved_inputs(*shape, dtype, device)
    outs = []
    for fn in (lambda *a: mod.rope(*a, interleaved=True, fp32_math=True), mod.reference_interleaved):
        qi, ki = (t.detach().clone().requires_grad_() for t in (q, k))
        q_embed, k_embed = fn(qi, ki, cos, sin)
        torch.manual_seed(1)
        (q_embed * torch.randn_like(q_embed)).sum().backward(retain_graph=True)
        (k_embed * torch.randn_like(k_embed)).sum().backward()
        outs.append((q_embed.detach(), k_embed.detach(), qi.grad, ki.grad))
    assert outs[0][0].dtype == dtype
    for got, want in zip(*outs):
        torch.testing.assert_close(got, want, **tolerance(dtype))


def test_rotation_layouts_differ_so_a_wrong_guess_fails_the_check(device):
    q, k, cos, sin = _interleaved_inputs(1, 2, 2, 5, 8, torch.float32, device)
    want, _ = mod.reference_interleaved(q, k, cos, sin)
    assert not torch.allclose(mod.rope(q, k, cos, sin)[0], want, atol=1e-3)
    torch.testing.assert_close(mod.rope(q, k, cos, sin, interleaved=True)[0], want)


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the kernels are built for real")
def test_launches_compile_for_hopper(device):
    """Both pair layouts and both precisions, forward and backward, through Triton's front end for sm_90."""
    from kernel_checks import check_against_reference as check, hopper_compile_errors, recorded_launches

    with recorded_launches() as launches:
        for interleaved, fp32_math, cos_pair in ((False, False, False), (True, True, False), (False, False, True)):
            check(mod.PATTERN, {"q_shape": [2, 3, 5, 8], "k_heads": 1, "dtype": "bfloat16",
                                "interleaved": interleaved, "fp32_math": fp32_math, "cos_pair": cos_pair}, device)
        check(mod.PATTERN, {"q_shape": [2, 3, 5, 24], "k_heads": 1, "dtype": "bfloat16", "rotary_dim": 8}, device)
    assert hopper_compile_errors(launches) == []


def _op(name, dims, types):
    from fusion_advisor.core.records import OpRecord
    return OpRecord.from_trace(name, dims, types, [""] * len(dims))


def test_gpt_oss_chain_is_rope_on_a_half_width_cos():
    """GPT-OSS's chain as a CPU trace of its bf16 attention recorded it (q of 4 heads, k of 2, head
    dim 16, 16 positions): `mul mul sub mul mul add cat` per tensor, on halves and a half-width cos."""
    bf = "c10::BFloat16"

    def chain(heads):
        half, cos = [2, heads, 16, 8], [1, 1, 16, 8]
        return [_op("aten::mul", [half, cos], [bf, bf]), _op("aten::mul", [half, cos], [bf, bf]),
                _op("aten::sub", [half, half, []], [bf, bf, "Scalar"]), _op("aten::mul", [half, cos], [bf, bf]),
                _op("aten::mul", [half, cos], [bf, bf]), _op("aten::add", [half, half, []], [bf, bf, "Scalar"]),
                _op("aten::cat", [[half, half], []], ["TensorList", "Scalar"])]

    pattern, params = match(chain(4) + chain(2))
    assert pattern is mod.PATTERN and params == {"q_shape": [2, 4, 16, 16], "k_heads": 2, "dtype": "bfloat16", "cos_batch": 1, "cos_pair": True}


def test_gpt_neox_chain_is_partial_rope():
    """GPT-NeoX's chain per tensor: slices, `mul neg cat mul add` on the (B, H, S, R) rotated part,
    then `cat([embed, pass])` with the (B, H, S, D - R) rest: the head is D wide, R of it rotated."""
    bf = "c10::BFloat16"

    def chain(heads):
        rot, half, rest, cos = [2, heads, 16, 8], [2, heads, 16, 4], [2, heads, 16, 24], [1, 1, 16, 8]
        return [_op("aten::mul", [rot, cos], [bf, bf]), _op("aten::neg", [half], [bf]),
                _op("aten::cat", [[half, half], []], ["TensorList", "Scalar"]), _op("aten::mul", [rot, cos], [bf, bf]),
                _op("aten::add", [rot, rot, []], [bf, bf, "Scalar"]),
                _op("aten::cat", [[rot, rest], []], ["TensorList", "Scalar"])]

    pattern, params = match(chain(4) + chain(2))
    assert pattern is mod.PATTERN and params == {"q_shape": [2, 4, 16, 32], "k_heads": 2, "dtype": "bfloat16",
                                                 "cos_batch": 1, "rotary_dim": 8}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_partial_rotary_matches_hugging_faces_gpt_neox_function(dtype, device):
    """The exact code replaced: transformers' GPT-NeoX apply_rotary_pos_emb, forward and q/k grads."""
    from fusion_advisor.kernels.tolerances import tolerance
    neox = pytest.importorskip("transformers.models.gpt_neox.modeling_gpt_neox")
    q, k, cos, sin = mod.make_inputs({"q_shape": [2, 4, 9, 32], "k_heads": 4, "dtype": str(dtype).split(".")[1],
                                      "rotary_dim": 8}, device, True).args
    runs = []
    for fn in (lambda *a: mod.rope(*a, rotary_dim=8), neox.apply_rotary_pos_emb):
        qi, ki = (t.detach().clone().requires_grad_() for t in (q, k))
        q_embed, k_embed = fn(qi, ki, cos, sin)
        torch.manual_seed(1)   # (randn, not randn_like: HF's cat returns contiguous, ours q's strides)
        grads = [torch.randn(t.shape, device=device).to(t.dtype) for t in (q_embed, k_embed)]
        torch.autograd.backward((q_embed, k_embed), grads)
        runs.append((q_embed.detach(), k_embed.detach(), qi.grad, ki.grad))
    for got, want in zip(*runs):
        torch.testing.assert_close(got, want, **tolerance(dtype))
