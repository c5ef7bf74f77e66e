import pytest
import torch

from conftest import DATA
from fusion_advisor.kernels import embedding_add as mod
from fusion_advisor.kernels.common import interpreting
from kernel_checks import check_against_reference, round_like_kernel
from traced_ops import traced_ops

GPT = {"idx_shape": [2, 19], "vocab": 101, "positions": 32, "hidden": 200}


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("params", [GPT, {"idx_shape": [4, 16], "vocab": 40, "positions": 16, "hidden": 64,
                                          "pos_batched": True}])
def test_matches_gpt2_embeddings(params, dtype, device):
    check_against_reference(mod.PATTERN, dict(params, dtype=dtype), device, reduced_grads=(2, 3))


def test_hidden_wider_than_one_block_and_mixed_dtypes(device):
    check_against_reference(mod.PATTERN, {"idx_shape": [2, 5], "vocab": 7, "positions": 5, "hidden": 1500,
                                          "dtype": "bfloat16", "pos_dtype": "float32"}, device, reduced_grads=(2, 3))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_forward_is_bitwise_the_reference(dtype, device):
    torch.manual_seed(0)
    idx, pos, wte, wpe = mod.make_inputs(dict(GPT, dtype=dtype), device, requires_grad=False).args
    # Eager adds the two gathered rows in fp32 and rounds once; so does the kernel.
    expected = round_like_kernel(wte[idx].float() + wpe[pos].float(), wte.dtype)
    assert torch.equal(mod.embedding_add(idx, pos, wte, wpe), expected)
    if dtype == "float32" or not interpreting():
        assert torch.equal(expected, mod.reference(idx, pos, wte, wpe))


def test_weight_grads_are_deterministic_with_repeated_ids(device):
    """Half the tokens share one id: its gradient row sums 24 rows, in the same order every run."""
    torch.manual_seed(0)
    idx = torch.randint(0, 50, (2, 24), device=device)
    idx[:, ::2] = 3
    pos = torch.arange(24, device=device)
    wte = torch.randn(50, 96, device=device, dtype=torch.bfloat16, requires_grad=True)
    wpe = torch.randn(24, 96, device=device, dtype=torch.bfloat16, requires_grad=True)
    dy = torch.randn(2, 24, 96, device=device, dtype=torch.bfloat16)
    runs = []
    for _ in range(2):
        wte.grad = wpe.grad = None
        mod.embedding_add(idx, pos, wte, wpe).backward(dy)
        runs.append((wte.grad.clone(), wpe.grad.clone()))
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])
    expected = dy.float()[idx == 3].sum(0)  # fp32 sum, rounded once (within one bf16 ulp)
    torch.testing.assert_close(runs[0][0][3].float(), expected, atol=0.0, rtol=2**-7)
    assert (runs[0][0][[i for i in range(50) if not (idx == i).any()]] == 0).all()  # unused rows stay zero


def test_module_wraps_existing_embeddings(device):
    wte, wpe = torch.nn.Embedding(30, 16).to(device), torch.nn.Embedding(8, 16).to(device)
    fused = mod.EmbeddingAdd.from_embeddings(wte, wpe)
    assert fused.wte_weight is wte.weight and fused.wpe_weight is wpe.weight
    idx = torch.randint(0, 30, (2, 8), device=device)
    torch.testing.assert_close(fused(idx), wte(idx) + wpe(torch.arange(8, device=device)))
    with pytest.raises(ValueError, match="padding_idx"):
        mod.EmbeddingAdd.from_embeddings(torch.nn.Embedding(30, 16, padding_idx=0), wpe)


def test_bad_inputs_are_refused(device):
    idx = torch.zeros(2, 4, dtype=torch.long, device=device)
    pos = torch.arange(4, device=device)
    w = torch.randn(10, 8, device=device)
    with pytest.raises(TypeError, match="float64 is not supported"):
        mod.embedding_add(idx, pos, w.double(), w.double())
    with pytest.raises(TypeError, match="token ids must be int64 or int32"):
        mod.embedding_add(idx.float(), pos, w, w)
    with pytest.raises(ValueError, match="do not broadcast"):
        mod.embedding_add(idx, torch.arange(5, device=device), w, w)
    with pytest.raises(ValueError, match="same hidden size"):
        mod.embedding_add(idx, pos, w, torch.randn(10, 9, device=device))


def test_custom_ops_pass_opcheck(device):
    idx = torch.randint(0, 10, (2, 6), device=device)
    pos = torch.arange(6, device=device)
    wte, wpe = torch.randn(10, 40, device=device), torch.randn(6, 40, device=device)
    torch.library.opcheck(torch.ops.fusion_advisor.embedding_add_fwd.default, (idx, pos, wte, wpe))
    torch.library.opcheck(torch.ops.fusion_advisor.embedding_add_bwd.default,
                          (torch.randn(2, 6, 40, device=device), idx, pos, [10, 40], torch.float32, [6, 40],
                           torch.float32))


@pytest.mark.parametrize("trace,dtype", [("gpt-bf16-h200.json.gz", "bfloat16"), ("gpt-fp32-h200.json.gz", "float32")])
def test_params_read_from_traced_ops(trace, dtype):
    """GPT's `wte(idx) + wpe(arange(T))`, top-level ops and with the nested index_select/gather ops."""
    expected = {"idx_shape": [8, 512], "vocab": 1024, "positions": 512, "hidden": 768, "dtype": dtype,
                "pos_dtype": dtype, "pos_batched": False}
    for depth in (0, None):
        ops = traced_ops(DATA / trace, "aten::arange", "aten::add", max_depth=depth)
        assert mod.PATTERN.match(ops) == expected
    # One embedding alone (Llama's) is not this pattern.
    assert mod.PATTERN.match(traced_ops(DATA / "llama-bf16-h200.json.gz", "aten::embedding", "aten::embedding")) is None


def test_a_token_type_table_is_not_taken_for_positions():
    """BERT and RoBERTa add the token-type embedding (1 or 2 rows) first: indexing it by position ran
    past its end on an H100 (a device-side assert that ended bench's CUDA context)."""
    from fusion_advisor.kernels.registry import OpRecord
    def embedding(rows, batch=4, seq=16):
        return OpRecord("aten::embedding", ((rows, 32), (batch, seq), (), (), ()),
                        ("c10::BFloat16", "long int", "Scalar", "bool", "bool"), ("", "", "-1", "False", "False"))
    add = OpRecord("aten::add", ((4, 16, 32), (4, 16, 32), ()), ("c10::BFloat16", "c10::BFloat16", "Scalar"),
                   ("", "", "1"))
    assert mod.params_from_ops([embedding(1000), embedding(1), add]) is None
    assert mod.params_from_ops([embedding(1000), embedding(514), add])["positions"] == 514
    params = dict(mod.PATTERN.example_params, positions=8)
    with pytest.raises(ValueError, match="position table of 8 rows"):
        mod.make_inputs(params, torch.device("cpu"))
