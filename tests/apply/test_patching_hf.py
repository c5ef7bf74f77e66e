"""Runtime patches of Hugging Face functions: apply_rotary_pos_emb (a modeling-module global) and
the model's loss_function, beside the module swaps, checked and reverted exactly."""
import pytest
import torch

import fusion_advisor
from fusion_advisor import patching
from fusion_advisor.kernels import cross_entropy as ce_mod, rope as rope_mod
from fusion_advisor.kernels.tolerances import tolerance

transformers = pytest.importorskip("transformers")
modeling_llama = pytest.importorskip("transformers.models.llama.modeling_llama")

PATTERNS = ["rope", "cross_entropy", "rms_norm", "swiglu"]


@pytest.fixture
def model():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    return transformers.LlamaForCausalLM._from_config(config, attn_implementation="eager").float()


def _loss_and_grads(model, ids, labels):
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, labels=labels).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def _count_forwards(monkeypatch, *modules) -> list[str]:
    """Names of the kernel modules whose autograd.Function forward ran, one entry a call."""
    calls = []
    for mod in modules:
        def counting(*args, _forward=mod._forward, _name=mod.__name__.rsplit(".", 1)[-1]):
            calls.append(_name)
            return _forward(*args)
        monkeypatch.setattr(mod, "_forward", counting)
    return calls


def test_llama_patched_with_functions_matches_and_reverts_exactly(model, monkeypatch):
    ids = torch.randint(0, 128, (2, 16))
    labels = ids.clone()
    labels[0, :3] = -100
    want_loss, want_grads = _loss_and_grads(model, ids, labels)
    rope_before, loss_before, attrs_before = modeling_llama.apply_rotary_pos_emb, model.loss_function, dict(vars(model))

    handle = fusion_advisor.patch(model, patterns=PATTERNS)
    assert [f.pattern for f in handle.functions] == ["rope", "cross_entropy"], handle.summary()
    assert handle.functions[0].path == "transformers.models.llama.modeling_llama.apply_rotary_pos_emb"
    assert modeling_llama.apply_rotary_pos_emb is handle.functions[0].replacement
    assert model.loss_function is handle.functions[1].replacement
    assert len(handle.swaps) == 2 * 2 + 1 + 2, handle.summary()  # 2 norms a layer + the final norm, 2 MLPs
    assert "apply_rotary_pos_emb" in handle.summary() and "loss_function" in handle.summary()

    calls = _count_forwards(monkeypatch, rope_mod, ce_mod)
    got_loss, got_grads = _loss_and_grads(model, ids, labels)
    assert calls.count("rope") == 2 and calls.count("cross_entropy") == 1  # the fused functions ran
    torch.testing.assert_close(got_loss, want_loss, **tolerance(torch.float32))
    for name, g in want_grads.items():
        torch.testing.assert_close(got_grads[name], g, **tolerance(torch.float32, ids.numel()), msg=name)

    handle.revert()
    assert modeling_llama.apply_rotary_pos_emb is rope_before
    assert model.loss_function is loss_before
    assert vars(model) == attrs_before
    assert handle.functions == [] and handle.swaps == []


def test_num_items_in_batch_divides_the_summed_loss(model):
    ids = torch.randint(0, 128, (2, 16))
    want = model(input_ids=ids, labels=ids, num_items_in_batch=torch.tensor(40)).loss
    with fusion_advisor.patched(model, patterns=["cross_entropy"]) as handle:
        assert len(handle.functions) == 1
        got = model(input_ids=ids, labels=ids, num_items_in_batch=torch.tensor(40)).loss
    torch.testing.assert_close(got, want, **tolerance(torch.float32))


def test_a_function_that_fails_numerics_is_left_out(model, monkeypatch):
    def wrong_rope(q, k, cos, sin):
        return q * 1.01, k
    monkeypatch.setattr(rope_mod, "rope", wrong_rope)
    before = modeling_llama.apply_rotary_pos_emb
    handle = fusion_advisor.patch(model, patterns=["rope"])
    assert handle.functions == []
    assert any("numerics check failed" in why for _, why in handle.skipped), handle.summary()
    assert modeling_llama.apply_rotary_pos_emb is before


def test_patch_raising_midway_restores_the_functions(model, monkeypatch):
    rope_before, loss_before = modeling_llama.apply_rotary_pos_emb, model.loss_function
    checks = []
    real_check = patching.check_function

    def check_then_interrupt(*args):
        checks.append(1)
        if len(checks) == 2:  # after rope went in, while checking the loss
            checks.append(hasattr(modeling_llama.apply_rotary_pos_emb, "fused_original"))
            raise KeyboardInterrupt
        return real_check(*args)
    monkeypatch.setattr(patching, "check_function", check_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        fusion_advisor.patch(model, patterns=["rms_norm", "rope", "cross_entropy"])
    assert checks[-1] is True  # rope was in when the patch was interrupted
    assert modeling_llama.apply_rotary_pos_emb is rope_before
    assert model.loss_function is loss_before
    assert not any(type(m).__module__.startswith("fusion_advisor") for m in model.modules())


def test_a_second_live_handle_does_not_stack_on_the_module_global(model):
    other = type(model)(model.config)
    with fusion_advisor.patched(model, patterns=["rope"]) as first:
        second = fusion_advisor.patch(other, patterns=["rope"])
        assert len(first.functions) == 1 and second.functions == []
        assert any("already replaced" in why for _, why in second.skipped)
        second.revert()
        assert modeling_llama.apply_rotary_pos_emb is first.functions[0].replacement
    assert not hasattr(modeling_llama.apply_rotary_pos_emb, "fused_original")
