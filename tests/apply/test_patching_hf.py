"""Runtime patches of Hugging Face functions: apply_rotary_pos_emb (a modeling-module global) and
the model's loss_function, beside the module swaps, checked and reverted exactly."""
import sys

import pytest
import torch

import fusion_advisor
from fusion_advisor import patching
from fusion_advisor.kernels import cross_entropy as ce_mod, rope as rope_mod
from fusion_advisor.kernels.tolerances import tolerance
from conftest import DEVICE   # CPU under the interpreter; the GPU where there is one

transformers = pytest.importorskip("transformers")
modeling_llama = pytest.importorskip("transformers.models.llama.modeling_llama")

PATTERNS = ["rope", "cross_entropy", "rms_norm", "swiglu"]


@pytest.fixture
def model():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    return transformers.LlamaForCausalLM._from_config(config, attn_implementation="eager").float().to(DEVICE)


def _loss_and_grads(model, ids, labels):
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, labels=labels).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def _assert_same_loss_and_grads(got, want, rows: int) -> None:
    """The patched model's loss and every parameter's gradient equal the unpatched model's (fp32
    tolerances; a gradient summed over `rows` positions gets the table's scaled atol)."""
    (got_loss, got_grads), (want_loss, want_grads) = got, want
    torch.testing.assert_close(got_loss, want_loss, **tolerance(torch.float32))
    for name, g in want_grads.items():
        torch.testing.assert_close(got_grads[name], g, **tolerance(torch.float32, rows), msg=name)


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
    ids = torch.randint(0, 128, (2, 16), device=DEVICE)
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
    _assert_same_loss_and_grads((got_loss, got_grads), (want_loss, want_grads), ids.numel())

    handle.revert()
    assert modeling_llama.apply_rotary_pos_emb is rope_before
    assert model.loss_function is loss_before
    assert vars(model) == attrs_before
    assert handle.functions == [] and handle.swaps == []


def test_num_items_in_batch_divides_the_summed_loss(model):
    ids = torch.randint(0, 128, (2, 16), device=DEVICE)
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


# -- encoders: the masked-LM loss, built inside forward (BERT family) or as a loss_function -------------
def _bert():
    modeling_bert = pytest.importorskip("transformers.models.bert.modeling_bert")
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=96, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return transformers.BertForMaskedLM(config).float().to(DEVICE), modeling_bert


def test_bert_masked_lm_loss_built_in_forward_is_fused_and_reverted(monkeypatch):
    """BertForMaskedLM builds `CrossEntropyLoss()` in its forward, a global of modeling_bert: that
    global is swapped (no model attribute holds the loss), the fused kernel runs, and revert puts
    torch's class back. The zoo's BERT row read 'cross_entropy refused' before."""
    model, modeling_bert = _bert()
    ids = torch.randint(0, 96, (2, 12), device=DEVICE)
    labels = ids.clone()
    labels[:, ::3] = -100
    want_loss, want_grads = _loss_and_grads(model, ids, labels)

    handle = fusion_advisor.patch(model, patterns=["cross_entropy"])
    paths = [f.path for f in handle.functions]
    assert "transformers.models.bert.modeling_bert.CrossEntropyLoss" in paths, handle.summary()
    assert modeling_bert.CrossEntropyLoss is not torch.nn.CrossEntropyLoss
    calls = _count_forwards(monkeypatch, ce_mod)
    got_loss, got_grads = _loss_and_grads(model, ids, labels)
    assert calls == ["cross_entropy"]
    _assert_same_loss_and_grads((got_loss, got_grads), (want_loss, want_grads), ids.numel())
    handle.revert()
    assert modeling_bert.CrossEntropyLoss is torch.nn.CrossEntropyLoss


def test_the_masked_lm_loss_function_is_fused_unshifted():
    from transformers.loss.loss_utils import ForMaskedLMLoss
    assert ce_mod.is_hf_lm_loss(ForMaskedLMLoss)
    fused = ce_mod.hf_lm_loss(ForMaskedLMLoss)
    logits = torch.randn(2, 7, 50, requires_grad=True, device=DEVICE)
    labels = torch.randint(0, 50, (2, 7), device=DEVICE)
    labels[0, :2] = -100
    for kwargs in ({}, {"num_items_in_batch": torch.tensor(9)}):
        want = ForMaskedLMLoss(logits, labels, 50, **kwargs)
        got = fused(logits, labels, 50, **kwargs)
        torch.testing.assert_close(got, want, **tolerance(torch.float32))


def test_the_loss_module_runs_what_the_kernel_does_not_take_as_torch_does():
    """(N, C, d) logits and class-probability targets are nn.CrossEntropyLoss's, computed by it."""
    ours, theirs = ce_mod.CrossEntropyLoss(), torch.nn.CrossEntropyLoss()
    spatial, spatial_target = torch.randn(3, 5, 4, device=DEVICE), torch.randint(0, 5, (3, 4), device=DEVICE)
    probs = torch.randn(6, 5, device=DEVICE), torch.softmax(torch.randn(6, 5, device=DEVICE), -1)
    torch.testing.assert_close(ours(spatial, spatial_target), theirs(spatial, spatial_target))
    torch.testing.assert_close(ours(*probs), theirs(*probs))


def test_the_loss_module_is_fp32_where_autocast_runs_the_loss_in_fp32():
    logits = torch.randn(8, 40, dtype=torch.bfloat16, requires_grad=True, device=DEVICE)
    target = torch.randint(0, 40, (8,), device=DEVICE)
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):   # "cpu" left CUDA tensors in bf16 on the GPU
        want = torch.nn.CrossEntropyLoss()(logits, target)
        got = ce_mod.CrossEntropyLoss()(logits, target)
    assert want.dtype == got.dtype == torch.float32
    torch.testing.assert_close(got, want, **tolerance(torch.float32))
    assert ce_mod.CrossEntropyLoss()(logits, target).dtype == torch.bfloat16   # no autocast: the logits' dtype


def test_torch_own_modules_are_never_patched():
    """A loss held as a submodule puts torch.nn.modules.loss among the forward globals; only the
    model's own modeling code is patched."""
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.CrossEntropyLoss())
    with fusion_advisor.patched(model, patterns=["cross_entropy"]) as handle:
        assert not any(f.path.startswith("torch.") for f in handle.functions)
        import torch.nn.modules.loss as loss_module
        assert loss_module.CrossEntropyLoss is torch.nn.CrossEntropyLoss


def test_phi3_packed_mlp_is_swapped_checked_and_reverted():
    """Phi3MLP projects gate and up in one gate_up_proj and chunks it: swapped for the packed form."""
    pytest.importorskip("transformers.models.phi3.modeling_phi3")
    torch.manual_seed(0)
    config = transformers.Phi3Config(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                     num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attention_dropout=0.0, pad_token_id=0)
    model = transformers.Phi3ForCausalLM(config).float().to(DEVICE)
    ids = torch.randint(0, 96, (2, 10), device=DEVICE)
    want_loss, want_grads = _loss_and_grads(model, ids, ids)
    with fusion_advisor.patched(model, patterns=["swiglu"]) as handle:
        assert [f"{type(s.original).__name__}->{type(s.replacement).__name__}" for s in handle.swaps] == \
            ["Phi3MLP->PackedGatedMLP"], handle.summary()
        got_loss, got_grads = _loss_and_grads(model, ids, ids)
    _assert_same_loss_and_grads((got_loss, got_grads), (want_loss, want_grads), ids.numel())
    assert type(model.model.layers[0].mlp).__name__ == "Phi3MLP"


def test_convnext_norms_over_channels_and_last_dim_are_swapped():
    """ConvNextLayerNorm in both data formats: channels_last ones become our LayerNorm, the
    channels_first ones (the stem's and each downsampling's) the channel-dim kernel; the model's
    loss and every gradient are unchanged."""
    pytest.importorskip("transformers.models.convnext.modeling_convnext")
    torch.manual_seed(0)
    config = transformers.ConvNextConfig(hidden_sizes=[8, 16], depths=[1, 1], num_stages=2, image_size=32, num_labels=10)
    model = transformers.ConvNextForImageClassification(config).float().to(DEVICE)
    pixels, labels = torch.randn(2, 3, 32, 32, device=DEVICE), torch.randint(0, 10, (2,), device=DEVICE)

    def loss_and_grads():
        model.zero_grad(set_to_none=True)
        loss = model(pixel_values=pixels, labels=labels).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    want_loss, want_grads = loss_and_grads()
    with fusion_advisor.patched(model, patterns=["layer_norm"]) as handle:
        kinds = sorted(type(s.replacement).__name__ for s in handle.swaps)
        assert kinds.count("ChannelsFirstLayerNorm") == 2 and "LayerNorm" in kinds, handle.summary()
        got_loss, got_grads = loss_and_grads()
    _assert_same_loss_and_grads((got_loss, got_grads), (want_loss, want_grads), 64)


def _mixtral(experts_implementation: str):
    pytest.importorskip("transformers.models.mixtral.modeling_mixtral")
    torch.manual_seed(0)
    config = transformers.MixtralConfig(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                                        num_local_experts=4, experts_implementation=experts_implementation)
    return transformers.MixtralForCausalLM(config).float().to(DEVICE)


@pytest.mark.parametrize("experts_implementation", ["grouped_mm", "batched_mm"])
def test_moe_experts_gate_between_the_grouped_gemms_is_fused_checked_and_reverted(experts_implementation, monkeypatch):
    """An MoE's batched experts (HF's 3-D gate_up_proj): a copy of the experts module whose
    `_apply_gate` is our packed GLU; the model's loss and every gradient are unchanged, the kernel
    runs once a layer each forward, and revert puts the original module back."""
    from fusion_advisor.kernels import glu as glu_mod

    model = _mixtral(experts_implementation)
    original = model.model.layers[0].mlp.experts
    keys = list(model.state_dict())
    ids = torch.randint(0, 96, (2, 10), device=DEVICE)
    want_loss, want_grads = _loss_and_grads(model, ids, ids)
    with fusion_advisor.patched(model, patterns=["swiglu"]) as handle:
        assert [s.described() for s in handle.swaps] == \
            ["MixtralExperts -> MixtralExperts (_apply_gate -> fused packed silu gate (Triton))"], handle.summary()
        swapped = model.model.layers[0].mlp.experts
        assert swapped is not original and swapped.gate_up_proj is original.gate_up_proj
        assert list(model.state_dict()) == keys
        ran = _count_forwards(monkeypatch, glu_mod)
        got_loss, got_grads = _loss_and_grads(model, ids, ids)
        assert ran == ["glu"]
    _assert_same_loss_and_grads((got_loss, got_grads), (want_loss, want_grads), ids.numel())
    assert model.model.layers[0].mlp.experts is original and "_apply_gate" not in vars(original)


def test_moe_experts_whose_forward_never_calls_the_gate_are_refused():
    """Mixtral's eager experts forward writes act(gate) * up inline: its numerics match with or
    without our gate, so only the kernel's own call count shows the swap would do nothing."""
    model = _mixtral("eager")
    handle = fusion_advisor.patch(model, patterns=["swiglu"])
    assert not handle.swaps
    assert handle.skipped == [("model.layers.0.mlp.experts",
                               "swiglu: numerics check failed: its forward never reached our glu kernel in the check")]


def test_cohere_interleaved_rope_is_read_off_the_function_and_fused():
    """Cohere's apply_rotary_pos_emb rotates interleaved pairs in fp32: rope_variant reads that form
    off the function itself, and the model's loss and gradients are unchanged with it fused."""
    modeling_cohere = pytest.importorskip("transformers.models.cohere.modeling_cohere")
    assert rope_mod.rope_variant(modeling_cohere.apply_rotary_pos_emb) == (True, True, False, {1.0}, False)
    assert rope_mod.rope_variant(modeling_llama.apply_rotary_pos_emb) == (False, False, False, {1.0}, False)
    torch.manual_seed(0)
    config = transformers.CohereConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                       num_attention_heads=4, num_key_value_heads=2, use_cache=False)
    model = transformers.CohereForCausalLM(config).float().to(DEVICE)
    ids = torch.randint(0, 96, (2, 10), device=DEVICE)
    want_loss, want_grads = _loss_and_grads(model, ids, ids)
    with fusion_advisor.patched(model, patterns=["rope"]) as handle:
        assert [f.path for f in handle.functions] == ["transformers.models.cohere.modeling_cohere.apply_rotary_pos_emb"]
        got_loss, got_grads = _loss_and_grads(model, ids, ids)
    _assert_same_loss_and_grads((got_loss, got_grads), (want_loss, want_grads), ids.numel())
    assert not hasattr(modeling_cohere.apply_rotary_pos_emb, "fused_original")


_ROPE_FORMS = [  # (model, config, extra config, the form rope_variant reads off its apply_rotary_pos_emb)
    ("GptOssForCausalLM", "GptOssConfig", {"num_local_experts": 4, "num_experts_per_tok": 2, "head_dim": 16},
     (False, False, True, {0.5}, False)),    # rotate_half on a half-width cos
    ("Ernie4_5ForCausalLM", "Ernie4_5Config", {}, (True, True, True, {1.0}, False)),   # pairs, fp32, cos[:D/2] per pair
    ("HeliumForCausalLM", "HeliumConfig", {"head_dim": 16}, (True, False, True, {1.0}, False)),
]


@pytest.mark.parametrize("model_class, config_class, extra, form", _ROPE_FORMS, ids=[c[0] for c in _ROPE_FORMS])
def test_rope_forms_are_read_off_each_model_and_fused(model_class, config_class, extra, form, monkeypatch):
    if not hasattr(transformers, model_class):
        pytest.skip(f"transformers {transformers.__version__} has no {model_class}")
    torch.manual_seed(0)
    config = getattr(transformers, config_class)(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                                 num_attention_heads=2, num_key_value_heads=2, pad_token_id=0, **extra)
    model = getattr(transformers, model_class)(config).float().to(DEVICE)
    modeling = sys.modules[type(model).__module__]
    assert rope_mod.rope_variant(modeling.apply_rotary_pos_emb) == form
    ids = torch.randint(1, 96, (2, 10), device=DEVICE)
    want = _loss_and_grads(model, ids, ids)
    with fusion_advisor.patched(model, patterns=["rope"]) as handle:
        assert [f.pattern for f in handle.functions] == ["rope"], handle.summary()
        ran = _count_forwards(monkeypatch, rope_mod)
        got = _loss_and_grads(model, ids, ids)
        assert ran == ["rope"]
    _assert_same_loss_and_grads(got, want, ids.numel())


_PARTIAL_ROTARY = [  # (model, config, extra config, the form read off its apply_rotary_pos_emb)
    # GPT-NeoX: rotate_half on the first quarter of each head (the H100 zoo's GPT-NeoX, 2026-12-07:
    # `rope never ran`, every call handed back to the original)
    ("GPTNeoXForCausalLM", "GPTNeoXConfig", {"rotary_pct": 0.25, "partial_rotary_factor": 0.25},
     (False, False, False, {1.0}, True)),
    # GLM-4: interleaved pairs, one angle a pair, on half of each head
    ("Glm4ForCausalLM", "Glm4Config", {"num_key_value_heads": 2, "head_dim": 16}, (True, False, True, {1.0}, True)),
]


@pytest.mark.parametrize("model_class, config_class, extra, form", _PARTIAL_ROTARY, ids=[c[0] for c in _PARTIAL_ROTARY])
def test_partial_rotary_is_fused_with_the_rest_of_the_head_passed(model_class, config_class, extra, form, monkeypatch):
    """Partial rotary rotates the first elements of each head and `cat`s the rest back: the kernel
    does both, and the model's loss and gradients are unchanged, with our kernel called."""
    if not hasattr(transformers, model_class):
        pytest.skip(f"transformers {transformers.__version__} has no {model_class}")
    torch.manual_seed(0)
    config = getattr(transformers, config_class)(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                                 num_attention_heads=2, pad_token_id=0, **extra)
    model = getattr(transformers, model_class)(config).float().to(DEVICE)
    modeling = sys.modules[type(model).__module__]
    assert rope_mod.rope_variant(modeling.apply_rotary_pos_emb) == form
    ids = torch.randint(1, 96, (2, 10), device=DEVICE)
    want = _loss_and_grads(model, ids, ids)
    with fusion_advisor.patched(model, patterns=["rope"]) as handle:
        assert [f.pattern for f in handle.functions] == ["rope"], handle.summary()
        ran = _count_forwards(monkeypatch, rope_mod)
        got = _loss_and_grads(model, ids, ids)
    assert ran == ["rope"]
    _assert_same_loss_and_grads(got, want, ids.numel())


def test_convnext_patched_keeps_every_convolutions_input_in_its_memory_order():
    """The H100 zoo's ConvNeXt (2026-12-07): patched alone 0.59x eager, +52 ms in the depthwise
    convolutions, which PyTorch runs by other kernels for an NCHW input than for the channels_last one
    Hugging Face's channels_first LayerNorm returns. Patched, every convolution must see the memory
    order it saw before, and the logits and gradients must match."""
    pytest.importorskip("transformers.models.convnext.modeling_convnext")
    torch.manual_seed(0)
    config = transformers.ConvNextConfig(hidden_sizes=[8, 16, 32, 64], depths=[1, 1, 1, 1], image_size=32,
                                         num_labels=10)
    model = transformers.ConvNextForImageClassification(config).to(DEVICE)
    x = torch.randn(2, 3, 32, 32, device=DEVICE)

    def conv_input_orders():
        seen, hooks = [], []
        for name, m in model.named_modules():
            if isinstance(m, torch.nn.Conv2d):
                hooks.append(m.register_forward_pre_hook(
                    lambda mod, args, name=name: seen.append((name, args[0].is_contiguous(),
                                                              args[0].is_contiguous(memory_format=torch.channels_last)))))
        try:
            logits = model(x).logits
        finally:
            for h in hooks:
                h.remove()
        return seen, logits

    before, want = conv_input_orders()
    assert any(cl and not c for _, c, cl in before)   # HF's channels_first norm hands on channels_last
    handle = fusion_advisor.patch(model, patterns=["layer_norm"])
    try:
        assert sum(type(s.replacement).__name__ == "ChannelsFirstLayerNorm" for s in handle.swaps) == 4
        after, got = conv_input_orders()
        assert after == before
        torch.testing.assert_close(got, want, **tolerance(torch.float32))
    finally:
        handle.revert()
