"""Linear + cross-entropy in row chunks vs `F.cross_entropy(F.linear(hidden, weight, bias).float(), target)`,
and the runtime patch of a Hugging Face causal LM's forward that uses it in training.

Under the interpreter the vocab block is 256, so a 301-word vocab runs the CE kernel's vocab loop twice;
chunk_rows 8 or 16 over 37 tokens gives several row chunks with a short tail.
"""
import pytest
import torch

import fusion_advisor
from fusion_advisor.kernels import linear_cross_entropy as mod
from fusion_advisor.kernels.tolerances import tolerance
from kernel_checks import check_against_reference


@pytest.mark.parametrize("params", [
    {"dtype": "float32", "reduction": "mean", "bias": True, "chunk_rows": 16},
    {"dtype": "float32", "reduction": "sum", "chunk_rows": 8, "ignored": 0.3},
    {"dtype": "bfloat16", "reduction": "mean", "chunk_rows": 8, "ignored": 0.3},
    {"dtype": "bfloat16", "reduction": "sum", "bias": True, "chunk_rows": 16},
    {"dtype": "bfloat16", "reduction": "mean", "chunk_rows": 16, "grad_weight_fp32": False},
])
def test_matches_linear_then_cross_entropy(params, device):
    check_against_reference(mod.PATTERN, {"tokens": 37, "hidden": 40, "vocab": 301, **params}, device)


def test_mean_divides_by_the_whole_batch_count_when_a_chunk_is_all_ignored(device):
    hidden = torch.randn(20, 24, device=device, requires_grad=True)
    weight = torch.randn(70, 24, device=device, requires_grad=True)
    target = torch.randint(0, 70, (20,), device=device)
    target[:8] = -100  # the first chunk holds no target at all
    got = mod.linear_cross_entropy(hidden, weight, target, chunk_rows=8)
    got.backward()
    a, b = hidden.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
    want = mod.reference(a, b, target)
    want.backward()
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(hidden.grad, a.grad)
    torch.testing.assert_close(weight.grad, b.grad)
    assert (hidden.grad[:8] == 0).all()


def test_chunk_count_does_not_change_the_result_and_no_grad_skips_the_gradients(device):
    torch.manual_seed(0)
    hidden, weight = torch.randn(19, 16, device=device), torch.randn(50, 16, device=device)
    target = torch.randint(0, 50, (19,), device=device)
    want = mod.reference(hidden, weight, target, reduction="sum")
    for rows in (1, 5, 19, 64):  # one row a chunk ... one chunk for all
        torch.testing.assert_close(mod.linear_cross_entropy(hidden, weight, target, reduction="sum", chunk_rows=rows),
                                   want)
    assert not mod.linear_cross_entropy(hidden, weight, target).requires_grad


def test_only_the_weight_requires_grad(device):
    hidden = torch.randn(9, 16, device=device)
    weight = torch.randn(40, 16, device=device, requires_grad=True)
    target = torch.randint(0, 40, (9,), device=device)
    (2.5 * mod.linear_cross_entropy(hidden, weight, target, chunk_rows=4)).backward()
    want = torch.func.grad(lambda w: 2.5 * mod.reference(hidden, w, target))(weight.detach())
    torch.testing.assert_close(weight.grad, want)


def test_second_backward_and_bad_inputs_are_refused(device):
    hidden = torch.randn(4, 8, device=device, requires_grad=True)
    weight = torch.randn(10, 8, device=device)
    target = torch.randint(0, 10, (4,), device=device)
    loss = mod.linear_cross_entropy(hidden, weight, target)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward ran twice"):
        loss.backward()
    with pytest.raises(ValueError, match="reduction 'none'"):
        mod.linear_cross_entropy(hidden, weight, target, reduction="none")
    with pytest.raises(TypeError, match="share one dtype"):
        mod.linear_cross_entropy(hidden, weight.bfloat16(), target)
    with pytest.raises(ValueError, match=r"weight \(vocab, hidden\)"):
        mod.linear_cross_entropy(hidden, weight.t(), target)


def test_default_chunk_is_about_the_hidden_states_size():
    assert mod.default_chunk_rows(4096, 2048, 32000) == 256  # 16 chunks, 16 MiB of bf16 logits each
    assert mod.default_chunk_rows(100, 4096, 1000) == 100    # a small vocab: one chunk
    n, h, v = 4096, 2048, 32000
    got = mod.fused_bytes({"tokens": n, "hidden": h, "vocab": v, "dtype": "bfloat16"})
    assert got["backward"] == 2 * (n * h + v * h) * 2
    assert got["forward"] > 6 * n * v * 2  # the logits chunks: written, read by the CE kernel and both GEMMs


# -- the Hugging Face causal-LM patch ------------------------------------------------------------------
transformers = pytest.importorskip("transformers")


@pytest.fixture
def model():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    return transformers.LlamaForCausalLM._from_config(config, attn_implementation="eager").float().train()


def _loss_and_grads(model, **kwargs):
    model.zero_grad(set_to_none=True)
    out = model(**kwargs)
    out.loss.backward()
    return out, {n: p.grad.clone() for n, p in model.named_parameters()}


def _assert_same(got, want, rows):
    (got_out, got_grads), (want_out, want_grads) = got, want
    torch.testing.assert_close(got_out.loss, want_out.loss, **tolerance(torch.float32))
    for name, g in want_grads.items():
        torch.testing.assert_close(got_grads[name], g, **tolerance(torch.float32, rows), msg=name)


def test_llama_patched_loss_and_grads_match_logits_none_and_reverts_exactly(model):
    ids = torch.randint(0, 128, (2, 16))
    labels = ids.clone()
    labels[0, :3] = -100
    want = _loss_and_grads(model, input_ids=ids, labels=labels)
    vars_before = dict(vars(model))
    assert "forward" not in vars_before

    handle = fusion_advisor.patch(model, patterns=["linear_cross_entropy"])
    assert [f.pattern for f in handle.functions] == ["linear_cross_entropy"], handle.summary()
    assert "LlamaForCausalLM.forward" in handle.summary()
    got = _loss_and_grads(model, input_ids=ids, labels=labels)
    assert got[0].logits is None
    assert type(got[0].loss.grad_fn).__name__ == "LinearCrossEntropyFunctionBackward"
    _assert_same(got, want, ids.numel())

    model.eval()  # eval mode: the original forward, logits included
    with torch.no_grad():
        eval_out = model(input_ids=ids, labels=labels)
    handle.revert()
    with torch.no_grad():
        eval_want = model(input_ids=ids, labels=labels)
    torch.testing.assert_close(eval_out.logits, eval_want.logits)
    torch.testing.assert_close(eval_out.loss, eval_want.loss)
    assert "forward" not in vars(model) and vars(model) == dict(vars_before, training=False)
    assert handle.functions == []


def test_under_autocast_the_original_forward_runs(model):
    ids = torch.randint(0, 128, (1, 8))
    with fusion_advisor.patched(model, patterns=["linear_cross_entropy"]) as handle:
        assert len(handle.functions) == 1
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(input_ids=ids, labels=ids)
    assert out.logits is not None and out.loss.requires_grad
    assert handle.functions == []


def test_num_items_in_batch_and_logits_to_keep_are_honoured(model):
    ids = torch.randint(0, 128, (2, 16))
    kwargs = dict(input_ids=ids, labels=ids[:, -8:], logits_to_keep=8, num_items_in_batch=torch.tensor(11))
    want = _loss_and_grads(model, **kwargs)
    with fusion_advisor.patched(model, patterns=["linear_cross_entropy"]) as handle:
        assert len(handle.functions) == 1
        got = _loss_and_grads(model, **kwargs)
    _assert_same(got, want, ids.numel())


def test_with_cross_entropy_too_linear_cross_entropy_computes_the_training_loss(model):
    ids = torch.randint(0, 128, (2, 16))
    with fusion_advisor.patched(model, patterns=["cross_entropy", "linear_cross_entropy"]) as handle:
        assert [f.pattern for f in handle.functions] == ["cross_entropy", "linear_cross_entropy"]
        out = model(input_ids=ids, labels=ids)
        assert out.logits is None
        assert type(out.loss.grad_fn).__name__ == "LinearCrossEntropyFunctionBackward"


def test_a_forward_that_fails_numerics_or_is_not_a_causal_lm_is_left_out(model, monkeypatch):
    real = mod.linear_cross_entropy
    monkeypatch.setattr(mod, "linear_cross_entropy", lambda *a, **k: 1.01 * real(*a, **k))
    handle = fusion_advisor.patch(model, patterns=["linear_cross_entropy"])
    assert handle.functions == [] and "forward" not in vars(model)
    assert any("numerics check failed" in why for _, why in handle.skipped), handle.summary()
    assert model.training and all(p.grad is None for p in model.parameters())  # the check left no trace
    model.loss_function = lambda logits, labels, vocab_size, **kw: logits.sum()
    handle = fusion_advisor.patch(model, patterns=["linear_cross_entropy"])
    assert handle.functions == [] and any("is not the function" in why for _, why in handle.skipped)


def test_gpt2_with_tied_embeddings_and_dropout(device):
    """GPT-2: the LM head shares the token embedding's weight; dropout is on (the check seeds both runs)."""
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_embd=32, n_layer=1, n_head=2, n_positions=16, vocab_size=96)
    gpt2 = transformers.GPT2LMHeadModel._from_config(config, attn_implementation="eager").train()
    assert gpt2.lm_head.weight is gpt2.transformer.wte.weight
    ids = torch.randint(0, 96, (2, 12))

    def run():
        torch.manual_seed(3)
        return _loss_and_grads(gpt2, input_ids=ids, labels=ids)
    want = run()
    with fusion_advisor.patched(gpt2, patterns=["linear_cross_entropy"]) as handle:
        assert len(handle.functions) == 1, handle.summary()
        got = run()
    assert got[0].logits is None
    _assert_same(got, want, ids.numel())
