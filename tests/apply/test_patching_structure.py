"""Runtime patching by what a module computes, not by its class name (advisor/module_forms.py):
norms built from their own weight, bias and eps, pointwise modules as generated kernels; each
checked against the module's own forward, reverted exactly; look-alikes refused."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fusion_advisor
from fusion_advisor import calls, patching
from fusion_advisor.kernels.layer_norm import LayerNorm as FusedLayerNorm
from fusion_advisor.kernels.rms_norm import RMSNorm as FusedRMSNorm
from fusion_advisor.kernels.tolerances import tolerance
from fusion_advisor.module_forms import PointwiseChainModule
from fusion_advisor.core.result import AdvisorResult, Cluster, Recommendation
from measured import measured_win

ALL = ["rms_norm", "layer_norm", "pointwise_chain"]


class UserRMSNorm(nn.Module):
    """A user's RMSNorm: eps under `epsilon`, computed in the input dtype."""

    def __init__(self, dim, epsilon=1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.epsilon = epsilon

    def forward(self, x):
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.epsilon))


class LayerNorm(nn.Module):
    """nanoGPT's: no eps attribute (F.layer_norm's 1e-5 is inside forward), bias optional."""

    def __init__(self, ndim, bias):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))
        self.bias = nn.Parameter(torch.zeros(ndim)) if bias else None

    def forward(self, input):
        return F.layer_norm(input, self.weight.shape, self.weight, self.bias, 1e-5)


class NewGELU(nn.Module):
    """minGPT's one-line tanh GELU."""

    def forward(self, x):
        return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


class GemmaStyleRMSNorm(nn.Module):
    """Gemma's (1 + weight) scaling, weight initialised to zeros, computed in fp32."""

    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))

    def forward(self, x):
        out = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
        return (out * (1.0 + self.weight.float())).type_as(x)


class OffsetTwoRMSNorm(GemmaStyleRMSNorm):
    """(2 + weight): neither Llama's form nor Gemma's."""

    def forward(self, x):
        out = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
        return (out * (2.0 + self.weight.float())).type_as(x)


class WrongEpsNorm(UserRMSNorm):
    """Says eps=1e-6 but computes with 1e-3."""

    def __init__(self, dim):
        super().__init__(dim, epsilon=1e-6)

    def forward(self, x):
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-3))


class ExtraScaleNorm(UserRMSNorm):
    """An RMSNorm times a float attribute."""

    def __init__(self, dim):
        super().__init__(dim)
        self.scale = 2.0

    def forward(self, x):
        return super().forward(x) * self.scale


class Block(nn.Module):
    """Attention with per-head q/k norms, then an MLP: the norms and the activation each of a
    class no pattern names."""

    def __init__(self, t5_norm, d=32, heads=2):
        super().__init__()
        self.heads = heads
        self.ln1 = t5_norm(d, eps=1e-6)
        self.qkv = nn.Linear(d, 3 * d)
        self.q_norm = UserRMSNorm(d // heads, epsilon=1e-6)
        self.k_norm = UserRMSNorm(d // heads, epsilon=1e-6)
        self.ln2 = LayerNorm(d, bias=True)
        self.fc = nn.Linear(d, 4 * d)
        self.act = NewGELU()
        self.proj = nn.Linear(4 * d, d)
        self.ln3 = UserRMSNorm(d, epsilon=1e-5)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, d // self.heads).unbind(2)
        att = torch.softmax(self.q_norm(q).transpose(1, 2) @ self.k_norm(k).permute(0, 2, 3, 1), -1)
        x = x + (att @ v.transpose(1, 2)).transpose(1, 2).reshape(b, t, d)
        x = x + self.proj(self.act(self.fc(self.ln2(x))))
        return self.ln3(x)


@pytest.fixture
def t5_norm():
    pytest.importorskip("transformers")
    from transformers.models.t5.modeling_t5 import T5LayerNorm
    return T5LayerNorm


def _randomize(model):
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_((1.0 if name.endswith("weight") and p.dim() == 1 else 0.0) + 0.2 * torch.randn_like(p))


def _grads(model, x):
    model.zero_grad(set_to_none=True)
    model(x).square().mean().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def test_norms_and_gelu_swapped_by_structure_checked_and_reverted_exactly(t5_norm, device):
    torch.manual_seed(0)
    model = Block(t5_norm).to(device)
    _randomize(model)
    x = torch.randn(2, 5, 32, device=device)
    want = model(x).detach()
    want_grads = _grads(model, x)
    modules_before = dict(model.named_modules())
    state_before = {k: v.clone() for k, v in model.state_dict().items()}

    handle = fusion_advisor.patch(model, patterns=ALL)
    kinds = {s.path: (type(s.replacement), s.pattern) for s in handle.swaps}
    assert kinds == {"ln1": (FusedRMSNorm, "rms_norm"),             # T5LayerNorm
                     "q_norm": (FusedRMSNorm, "rms_norm"),          # per-head, weight of head_dim
                     "k_norm": (FusedRMSNorm, "rms_norm"),
                     "ln2": (FusedLayerNorm, "layer_norm"),         # nanoGPT's, eps from F.layer_norm's default
                     "act": (PointwiseChainModule, "pointwise_chain"),
                     "ln3": (FusedRMSNorm, "rms_norm")}, handle.summary()
    assert model.ln3.variance_epsilon == 1e-5 and model.ln1.variance_epsilon == 1e-6  # their own eps
    assert model.ln2.eps == 1e-5 and model.ln2.bias is modules_before["ln2"].bias
    for s in handle.swaps:                  # the very Parameters, not copies
        assert all(a is b for a, b in zip(s.replacement.parameters(), s.original.parameters()))

    calls.reset()
    torch.testing.assert_close(model(x).detach(), want, **tolerance(torch.float32))
    assert calls.snapshot().get("pointwise_chain") == 1      # the generated kernel ran
    got_grads = _grads(model, x)
    for name, g in want_grads.items():
        torch.testing.assert_close(got_grads[name], g, **tolerance(torch.float32, 10), msg=name)

    handle.revert()
    assert dict(model.named_modules()) == modules_before   # the same module objects back
    state = model.state_dict()
    assert state.keys() == state_before.keys() and all(torch.equal(state[k], v) for k, v in state_before.items())
    assert torch.equal(model(x).detach(), want)


def test_an_optimizer_built_before_patching_keeps_training_the_model(t5_norm, device):
    torch.manual_seed(0)
    model = Block(t5_norm).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    weight = model.ln1.weight
    before = weight.detach().clone()
    with fusion_advisor.patched(model, patterns=ALL) as handle:
        assert len(handle.swaps) == 6
        model(torch.randn(2, 5, 32, device=device)).square().mean().backward()
        opt.step()
    assert model.ln1.weight is weight and not torch.equal(weight.detach(), before)


def test_t5_layer_norm_in_bf16(t5_norm, device):
    torch.manual_seed(0)
    model = nn.Sequential(t5_norm(48, eps=1e-6)).to(device, torch.bfloat16)
    x = torch.randn(3, 7, 48, dtype=torch.bfloat16, device=device)
    want = model(x)
    with fusion_advisor.patched(model, patterns=["rms_norm"]) as handle:
        assert [s.pattern for s in handle.swaps] == ["rms_norm"], handle.summary()
        torch.testing.assert_close(model(x), want, **tolerance(torch.bfloat16))


@pytest.mark.parametrize("norm", [OffsetTwoRMSNorm(16), WrongEpsNorm(16), ExtraScaleNorm(16)],
                         ids=["two_plus_weight", "eps_not_what_it_says", "extra_scale"])
def test_look_alike_norms_are_refused_with_a_reason(norm, device):
    model = nn.Sequential(norm).to(device)
    handle = fusion_advisor.patch(model, patterns=ALL)
    assert handle.swaps == [] and model[0] is norm
    [(path, why)] = handle.skipped
    assert path == "0" and "rms_norm: numerics check failed" in why and "layer_norm: numerics check failed" in why


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gemma_norms_get_the_one_plus_weight_form(dtype, device):
    """A user's Gemma-style norm and HF's GemmaRMSNorm: (1 + weight) in fp32, proven by the check
    (Llama's form fails it first), outputs and gradients equal, reverted exactly."""
    modeling_gemma = pytest.importorskip("transformers.models.gemma.modeling_gemma")
    model = nn.Sequential(GemmaStyleRMSNorm(16), modeling_gemma.GemmaRMSNorm(16, eps=1e-6)).to(device, dtype)
    for p in model.parameters():
        nn.init.normal_(p, std=0.1)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(3, 5, 16, device=device, dtype=dtype)
    want = model(x)
    with fusion_advisor.patched(model, patterns=["rms_norm"]) as handle:
        assert [type(s.replacement).__name__ for s in handle.swaps] == ["RMSNorm", "RMSNorm"], handle.summary()
        assert all(s.replacement.gemma for s in handle.swaps)
        torch.testing.assert_close(model(x), want, **tolerance(dtype))
    assert type(model[1]).__name__ == "GemmaRMSNorm"
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_hf_activation_modules_become_generated_kernels(device):
    activations = pytest.importorskip("transformers.activations")
    model = nn.Sequential(activations.NewGELUActivation(), activations.FastGELUActivation(),
                          activations.QuickGELUActivation(), activations.GELUTanh(), nn.ReLU()).to(device)
    x = torch.randn(3, 5, 24, device=device)
    want = model(x)
    with fusion_advisor.patched(model, patterns=["pointwise_chain"]) as handle:
        # GELUTanh and ReLU run one op each: already one kernel each way, left alone.
        assert [s.path for s in handle.swaps] == ["0", "1", "2"], handle.summary()
        torch.testing.assert_close(model(x), want, **tolerance(torch.float32))


def test_one_check_per_signature(t5_norm, monkeypatch, device):
    checks = []
    real = patching.check_norm

    def counting(*args, **kwargs):
        checks.append(1)
        return real(*args, **kwargs)
    monkeypatch.setattr(patching, "check_norm", counting)
    model = nn.Sequential(*[UserRMSNorm(16) for _ in range(6)], *[t5_norm(16) for _ in range(3)]).to(device)
    handle = fusion_advisor.patch(model, patterns=["rms_norm"])
    assert len(handle.swaps) == 9 and len(checks) == 2


def test_a_result_limits_the_swaps_to_the_classes_its_clusters_came_from(t5_norm, device):
    torch.manual_seed(0)
    model = Block(t5_norm).to(device)
    clusters = [Cluster(id="c1", direction="forward", pattern="rms_norm", module_class="Block/T5LayerNorm"),
                Cluster(id="c2", direction="forward", pattern="generic:0123456789", module_class="Block/NewGELU")]
    recs = [Recommendation(rank=i + 1, cluster_id=c.id, pattern=c.pattern, title=c.id, measured_saving_us_per_step=5.0,
                           estimate_saving_us_per_step=5.0, confidence="measured") for i, c in enumerate(clusters)]
    result = AdvisorResult(clusters=clusters, recommendations=recs,
                           benchmarks=[measured_win(c.id, c.pattern) for c in clusters])
    assert patching.recommended_patterns(result) == ["rms_norm", "generic:0123456789"]
    x = torch.randn(2, 5, 32, device=device)
    calls.reset()
    with fusion_advisor.patched(model, result) as handle:
        assert {s.path: s.pattern for s in handle.swaps} == {"ln1": "rms_norm", "act": "generic:0123456789"}
        model(x)
        assert calls.snapshot().get("generic:0123456789") == 1   # counted as the recommendation it came from


def test_modules_option_names_the_classes(device):
    model = nn.Sequential(UserRMSNorm(16), NewGELU(), nn.Sequential(UserRMSNorm(16))).to(device)
    handle = fusion_advisor.patch(model, patterns=["rms_norm", "pointwise_chain"],
                                  modules={"rms_norm": ["Nothing"], "pointwise_chain": ["NewGELU"]})
    assert [s.path for s in handle.swaps] == ["1"], handle.summary()
    handle.revert()


def test_apply_plans_a_runtime_swap_for_a_generated_chain_inside_a_module(device):
    from fusion_advisor.apply import plan
    cluster = Cluster(id="c1", direction="forward", pattern="generic:0123456789",
                      module_class="GPT2MLP/NewGELUActivation", source="/site-packages/transformers/activations.py:60")
    rec = Recommendation(rank=1, cluster_id="c1", pattern=cluster.pattern, title="tanh GELU chain",
                         measured_saving_us_per_step=50.0, estimate_saving_us_per_step=60.0, confidence="measured")
    p = plan(AdvisorResult(clusters=[cluster], recommendations=[rec], benchmarks=[measured_win("c1", rec.pattern)]))
    assert p.runtime_patterns == ["generic:0123456789"]
    assert p.runtime_modules == {"generic:0123456789": ["NewGELUActivation"]}
    assert p.files == [] and "patched at run time" in p.notes[0]
    activations = pytest.importorskip("transformers.activations")
    model = nn.Sequential(nn.Linear(8, 8), activations.NewGELUActivation()).to(device)
    with fusion_advisor.patched(model, patterns=p.runtime_patterns, modules=p.runtime_modules) as handle:
        assert [(s.path, s.pattern) for s in handle.swaps] == [("1", "generic:0123456789")], handle.summary()


def test_two_chains_in_one_module_class_plan_one_swap():
    """T5 (H100 zoo run): the encoder's and the decoder's NewGELUActivation traced as two chains,
    two generated names; one swap of the class serves both, so the second is not planned (it
    would never run, and verify would rightly fail it)."""
    from fusion_advisor.apply import plan
    clusters = [Cluster(id=f"c{i}", direction="forward", pattern=f"generic:{i}123456789",
                        module_class="T5DenseGatedActDense/NewGELUActivation",
                        source="/site-packages/transformers/activations.py:65") for i in (1, 2)]
    recs = [Recommendation(rank=i, cluster_id=c.id, pattern=c.pattern, title=f"chain {i}", measured_saving_us_per_step=5.0,
                           estimate_saving_us_per_step=5.0, confidence="measured") for i, c in enumerate(clusters, 1)]
    p = plan(AdvisorResult(clusters=clusters, recommendations=recs,
                           benchmarks=[measured_win(c.id, c.pattern) for c in clusters]))
    assert p.runtime_patterns == ["generic:1123456789"] and list(p.replacements) == ["generic:1123456789"]
    assert any("already swapped for generic:1123456789" in n for n in p.notes), p.notes


class DropGELU(nn.Module):
    """Pointwise in eval, random in training: the chain is recorded per mode."""

    def forward(self, x):
        return F.gelu(F.dropout(x * 2.0, 0.5, self.training))


def test_a_chain_is_recorded_per_train_eval_mode(device):
    model = nn.Sequential(DropGELU()).eval()
    x = torch.randn(4, 16, device=device)
    with fusion_advisor.patched(model, patterns=["pointwise_chain"]) as handle:
        assert len(handle.swaps) == 1, handle.summary()
        calls.reset()
        torch.testing.assert_close(model(x), F.gelu(x * 2.0), **tolerance(torch.float32))
        assert calls.snapshot().get("pointwise_chain") == 1   # (its generated kernel counts under its own name too)
        model.train()                                 # dropout now: no generated kernel, the original runs
        torch.manual_seed(3)
        got = model(x)
        torch.manual_seed(3)
        torch.testing.assert_close(got, handle.swaps[0].original(x))
        assert calls.snapshot().get("pointwise_chain") == 1


def test_torch_modules_that_are_not_last_dim_norms_are_not_candidates(device):
    model = nn.Sequential(nn.PReLU(8), nn.GroupNorm(2, 8), nn.LayerNorm(8), nn.RMSNorm(8, eps=None)).to(device)
    handle = fusion_advisor.patch(model, patterns=["rms_norm", "layer_norm"])
    assert [(s.path, s.pattern) for s in handle.swaps] == [("2", "layer_norm"), ("3", "rms_norm")], handle.summary()
    assert handle.skipped == []


class PoolFormerLikeGroupNorm(nn.GroupNorm):   # a subclass under its own name (PoolFormer's, Wav2Vec2's feature norm)
    pass


def test_group_norms_over_channels_are_checked_on_channels_second_inputs_and_swapped(device):
    # The check's input puts the channels second, as GroupNorm reads them (a (2, 7, C) input made
    # F.group_norm raise, so no GroupNorm was ever swapped); a subclass is tried by its shape.
    model = nn.Sequential(nn.Conv1d(4, 8, 3), nn.GroupNorm(2, 8), nn.GELU(), nn.Conv1d(8, 16, 1),
                          PoolFormerLikeGroupNorm(16, 16)).to(device)
    x = torch.randn(3, 4, 20, device=device)
    want = model(x)
    handle = fusion_advisor.patch(model, patterns=["group_norm"])
    assert [(s.path, s.pattern) for s in handle.swaps] == [("1", "group_norm"), ("4", "group_norm")], handle.summary()
    calls.reset()
    torch.testing.assert_close(model(x), want, **tolerance(torch.float32))
    assert calls.snapshot().get("group_norm") == 2


class MaskedLMHead(nn.Module):
    """DistilBERT's: the loss module an attribute of the model, called on flattened logits."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(16, 50)
        self.mlm_loss_fct = nn.CrossEntropyLoss()

    def forward(self, x, labels):
        return self.mlm_loss_fct(self.proj(x).view(-1, 50), labels.view(-1))


def test_a_loss_module_is_checked_on_logits_and_labels_and_swapped(device):
    # its check had no example input ("no example input for CrossEntropyLoss"); nor is our own swapped
    # module's file taken for modeling code whose CrossEntropyLoss global to patch
    torch.manual_seed(0)
    model = MaskedLMHead().to(device)
    x, labels = torch.randn(2, 5, 16, device=device), torch.randint(0, 50, (2, 5), device=device)
    labels[0, :2] = -100
    want = model(x, labels)
    handle = fusion_advisor.patch(model, patterns=["cross_entropy"])
    assert [(s.path, s.pattern) for s in handle.swaps] == [("mlm_loss_fct", "cross_entropy")], handle.summary()
    assert handle.skipped == []
    calls.reset()
    torch.testing.assert_close(model(x, labels), want, **tolerance(torch.float32))
    assert calls.snapshot().get("cross_entropy") == 1


class LayerNorm1PLike(nn.LayerNorm):
    """Megatron's apply_layernorm_1p form: the weight applies as (1 + weight), zeros at init."""

    def forward(self, x):
        return F.layer_norm(x, self.normalized_shape, self.weight + 1.0, self.bias, self.eps)


def test_a_layer_norm_whose_weight_applies_as_one_plus_weight_is_taken_for_that_form(device):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), LayerNorm1PLike(16), nn.LayerNorm(16)).to(device)
    with torch.no_grad():
        model[1].weight.normal_(0.0, 0.3)
    x = torch.randn(3, 5, 16, device=device)
    want = model(x)
    handle = fusion_advisor.patch(model, patterns=["layer_norm"])
    assert [(s.path, type(s.replacement).__name__) for s in handle.swaps] == [("1", "LayerNorm1P"), ("2", "LayerNorm")]
    assert model[1].weight is handle.swaps[0].original.weight
    calls.reset()
    got = model(x)
    torch.testing.assert_close(got, want, **tolerance(torch.float32))
    assert calls.snapshot().get("layer_norm") == 2
    got.sum().backward()
    assert model[1].weight.grad is not None


def test_layer_norm_1p_matches_nemotrons_own_module(device):
    modeling = pytest.importorskip("transformers.models.nemotron.modeling_nemotron")
    from fusion_advisor.module_forms import layer_norm_module
    torch.manual_seed(0)
    original = modeling.NemotronLayerNorm1P(24, eps=1e-5).to(device)
    with torch.no_grad():
        original.weight.normal_(0.0, 0.3)
        original.bias.normal_(0.0, 0.3)
    fused = layer_norm_module(original.weight, original.bias, 1e-5, one_plus=True)
    x = torch.randn(4, 24, device=device, requires_grad=True)
    upstream = torch.randn(4, 24, device=device)
    torch.testing.assert_close(fused(x), original(x), **tolerance(torch.float32))
    want = torch.autograd.grad(original(x), (x, original.weight, original.bias), upstream)
    got = torch.autograd.grad(fused(x), (x, fused.weight, fused.bias), upstream)
    for g, w in zip(got, want):   # the input's, the weight's (through its + 1) and the bias's gradients
        torch.testing.assert_close(g, w, **tolerance(torch.float32, 4))
    if device.type == "cuda":   # under CUDA autocast both cast to bf16 and run the norm there
        with torch.autocast("cuda", dtype=torch.bfloat16):
            got, want = fused(x), original(x)
        assert got.dtype == want.dtype == torch.bfloat16
        torch.testing.assert_close(got, want, **tolerance(torch.bfloat16))


def test_patching_leaves_the_rng_where_it_was(t5_norm, device):
    model = Block(t5_norm).to(device)
    torch.manual_seed(5)
    want = torch.rand(3)
    torch.manual_seed(5)
    with fusion_advisor.patched(model, patterns=ALL) as handle:
        assert len(handle.swaps) == 6
        torch.testing.assert_close(torch.rand(3), want, atol=0, rtol=0)


class Swish(nn.Module):
    def __init__(self, beta):
        super().__init__()
        self.beta = beta

    def forward(self, x):
        return x * torch.sigmoid(self.beta * x)


def test_a_constant_attribute_is_part_of_the_recorded_chain(device):
    model = nn.Sequential(Swish(1.5))
    x = torch.randn(4, 16, device=device)
    with fusion_advisor.patched(model, patterns=["pointwise_chain"]) as handle:
        assert len(handle.swaps) == 1
        torch.testing.assert_close(model(x), x * torch.sigmoid(1.5 * x), **tolerance(torch.float32))
        handle.swaps[0].original.beta = 0.5          # a new value: a new chain, not the stale kernel
        torch.testing.assert_close(model(x), x * torch.sigmoid(0.5 * x), **tolerance(torch.float32))


def test_modules_that_are_not_one_input_chains_are_left_alone_silently():
    model = nn.Sequential(nn.Identity(), nn.ReLU(), nn.Dropout(0.1))
    loss = nn.MSELoss()
    model.add_module("loss", loss)
    handle = fusion_advisor.patch(model, patterns=["pointwise_chain"])
    assert handle.swaps == [] and handle.skipped == []


def test_hf_t5_v1_1_norms_and_gated_gelu_activation(device):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=48, num_layers=1, num_decoder_layers=1,
                                   num_heads=2, feed_forward_proj="gated-gelu", dropout_rate=0.0,
                                   decoder_start_token_id=0, pad_token_id=0)
    model = transformers.T5ForConditionalGeneration(config).to(device)
    _randomize(model)
    ids = torch.randint(0, 64, (2, 6), device=device)
    labels = torch.randint(0, 64, (2, 5), device=device)

    def loss_and_grads():
        model.zero_grad(set_to_none=True)
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    want_loss, want_grads = loss_and_grads()
    with fusion_advisor.patched(model, patterns=["rms_norm", "pointwise_chain"]) as handle:
        swapped = {(type(s.original).__name__, s.pattern) for s in handle.swaps}
        assert swapped == {("T5LayerNorm", "rms_norm"), ("NewGELUActivation", "pointwise_chain")}, handle.summary()
        assert len(handle.swaps) == 2 + 3 + 2 + 2, handle.summary()  # 2 + 3 norms in the blocks, 2 final, 2 GELUs
        calls.reset()
        got_loss, got_grads = loss_and_grads()
        assert calls.snapshot().get("pointwise_chain") == 2
    torch.testing.assert_close(got_loss, want_loss, **tolerance(torch.float32))
    assert got_grads.keys() == want_grads.keys()
    for name, g in want_grads.items():
        torch.testing.assert_close(got_grads[name], g, **tolerance(torch.float32, 12), msg=name)
    torch.testing.assert_close(loss_and_grads()[0], want_loss, atol=0, rtol=0)   # reverted: eager again, bit for bit


def test_apply_plans_the_norm_part_of_an_add_norm_cluster_in_library_code():
    from fusion_advisor.apply import plan
    cluster = Cluster(id="c1", direction="forward", pattern="add_rms_norm",
                      module_class="T5Block/T5LayerFF/T5LayerNorm", source="/site-packages/transformers/models/t5/modeling_t5.py:80")
    rec = Recommendation(rank=1, cluster_id="c1", pattern="add_rms_norm", title="add + T5LayerNorm",
                         measured_saving_us_per_step=50.0, estimate_saving_us_per_step=60.0, confidence="measured")
    p = plan(AdvisorResult(clusters=[cluster], recommendations=[rec], benchmarks=[measured_win("c1", rec.pattern)]))
    assert p.runtime_patterns == ["rms_norm"] and p.runtime_modules == {"rms_norm": ["T5LayerNorm"]}


def test_patching_twice_leaves_the_first_replacements_alone(device):
    model = nn.Sequential(UserRMSNorm(16), NewGELU()).to(device)
    originals = list(model)
    first = fusion_advisor.patch(model, patterns=ALL)
    assert len(first.swaps) == 2
    second = fusion_advisor.patch(model, patterns=ALL + ["rms_norm"])
    assert second.swaps == [] and second.skipped == []
    second.revert()
    first.revert()
    assert list(model) == originals


class OlmoLikeMLP(nn.Module):
    """A Llama-shaped gated MLP under a class name no pattern lists (Olmo-2's, Granite's, Cohere's)."""

    def __init__(self, hidden, width, act):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, width, bias=False)
        self.up_proj = nn.Linear(hidden, width, bias=False)
        self.down_proj = nn.Linear(width, hidden, bias=False)
        self.act_fn = act

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class NotGatedTheSameWay(OlmoLikeMLP):
    """The same attributes, another computation: act(up) * gate."""

    def forward(self, x):
        return self.down_proj(self.act_fn(self.up_proj(x)) * self.gate_proj(x))


def test_gated_mlps_are_swapped_by_shape_without_a_class_name(device):
    model = nn.Sequential(OlmoLikeMLP(16, 24, nn.SiLU()), OlmoLikeMLP(16, 24, nn.GELU(approximate="tanh")),
                          NotGatedTheSameWay(16, 24, nn.SiLU()), OlmoLikeMLP(16, 24, nn.ReLU())).to(device)
    x = torch.randn(2, 5, 16, device=device)
    want = model(x)
    with fusion_advisor.patched(model, patterns=["swiglu", "geglu"]) as handle:
        assert {s.path: type(s.replacement).__name__ for s in handle.swaps} == {"0": "SwiGLUMLP", "1": "GEGLUMLP"}
        assert [p for p, _ in handle.skipped] == ["2"] and "numerics check failed" in handle.skipped[0][1]
        torch.testing.assert_close(model(x), want, **tolerance(torch.float32))


class TorchtitanFeedForward(nn.Module):
    """torchtitan's (and Meta's reference Llama's) FeedForward: w1/w2/w3, F.silu hard-coded."""

    def __init__(self, dim, hidden, act=F.silu):
        super().__init__()
        self.w1, self.w2, self.w3 = nn.Linear(dim, hidden, bias=False), nn.Linear(hidden, dim, bias=False), \
            nn.Linear(dim, hidden, bias=False)
        self._act = act

    def forward(self, x):
        return self.w2(self._act(self.w1(x)) * self.w3(x))


class LitGptMLP(nn.Module):
    """lit-gpt's LLaMAMLP: fc_1 (gate), fc_2 (up), proj (down)."""

    def __init__(self, dim, hidden):
        super().__init__()
        self.fc_1, self.fc_2, self.proj = nn.Linear(dim, hidden), nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.proj(F.silu(self.fc_1(x)) * self.fc_2(x))


def test_gated_mlps_without_an_activation_module_are_swapped_by_what_they_compute(device):
    model = nn.Sequential(TorchtitanFeedForward(16, 24), LitGptMLP(16, 24),
                          TorchtitanFeedForward(16, 24, act=F.gelu)).to(device)
    keys = list(model.state_dict())
    x = torch.randn(2, 5, 16, device=device)
    want = model(x)
    with fusion_advisor.patched(model, patterns=["swiglu", "geglu"]) as handle:
        assert {s.path: type(s.replacement).__name__ for s in handle.swaps} == {"0": "SwiGLUMLP", "1": "SwiGLUMLP"}
        assert [p for p, _ in handle.skipped] == ["2"] and "numerics check failed" in handle.skipped[0][1]
        assert list(model.state_dict()) == keys
        torch.testing.assert_close(model(x), want, **tolerance(torch.float32))


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_t5_gated_mlps_become_geglu_with_their_names_and_dropout_kept(dropout, device):
    """T5 v1.1's T5DenseGatedActDense (wi_0, wi_1, wo, act = NewGELU, dropout before wo): one fused
    GEGLU each way; the state_dict keys stay T5's, and with dropout in training the check (both from
    one seed) and a seeded step draw the same mask as the original."""
    modeling_t5 = pytest.importorskip("transformers.models.t5.modeling_t5")
    config = modeling_t5.T5Config(d_model=16, d_ff=24, feed_forward_proj="gated-gelu", dropout_rate=dropout)
    model = nn.Sequential(modeling_t5.T5DenseGatedActDense(config)).to(device).train()
    keys = dict(model.state_dict())
    x = torch.randn(2, 5, 16, device=device)

    def step():
        torch.manual_seed(7)
        xi = x.clone().requires_grad_(True)
        y = model(xi)
        y.sum().backward()
        grads = [xi.grad] + [p.grad.clone() for p in model.parameters()]
        model.zero_grad()
        return y.detach(), grads

    want, want_grads = step()
    with fusion_advisor.patched(model, patterns=["geglu"]) as handle:
        assert [type(s.replacement).__name__ for s in handle.swaps] == ["GEGLUMLP"], handle.summary()
        assert handle.swaps[0].replacement.activation == "gelu_tanh"
        assert list(model.state_dict()) == list(keys)
        got, got_grads = step()
        torch.testing.assert_close(got, want, **tolerance(torch.float32))
        for a, b in zip(got_grads, want_grads):
            torch.testing.assert_close(a, b, **tolerance(torch.float32, 10))
    assert type(model[0]).__name__ == "T5DenseGatedActDense"


@pytest.mark.parametrize("module_name, cls_name, shape", [
    ("transformers.models.vitdet.modeling_vitdet", "VitDetLayerNorm", (2, 16, 3, 5)),
    ("transformers.models.squeezebert.modeling_squeezebert", "SqueezeBertLayerNorm", (2, 16, 7))])
def test_norms_over_channels_that_do_not_say_so_are_found_by_the_check(module_name, cls_name, shape, device):
    """VitDet's LayerNorm (written out over dim 1 of NCHW) and SqueezeBERT's (permute, LayerNorm,
    permute on NCW) declare no data_format: the last-dim candidates fail the check, the channel ones pass."""
    cls = getattr(pytest.importorskip(module_name), cls_name)
    model = nn.Sequential(cls(16)).to(device)
    for p in model.parameters():
        nn.init.normal_(p, mean=0.5, std=0.2)
    x = torch.randn(shape, device=device)
    want = model(x)
    with fusion_advisor.patched(model, patterns=["layer_norm"]) as handle:
        assert [type(s.replacement).__name__ for s in handle.swaps] == ["ChannelsFirstLayerNorm"], handle.summary()
        torch.testing.assert_close(model(x), want, **tolerance(torch.float32))


class UnweightedRMSNorm(nn.Module):
    """DeepSeek-V4's q/k norm: no weight, eps under a usual name."""

    def __init__(self, eps=1e-6):
        super().__init__()
        self.variance_epsilon = eps

    def forward(self, x):
        return (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.variance_epsilon)).type_as(x)


class ScaleNorm(nn.Module):
    """No parameters and an eps, but not an RMSNorm: a fixed scale of 2."""

    def __init__(self, eps=1e-6):
        super().__init__()
        self.eps = eps

    def forward(self, x):
        return 2.0 * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_unweighted_rms_norms_are_swapped_and_look_alikes_refused(dtype, device):
    model = nn.Sequential(UnweightedRMSNorm(), ScaleNorm()).to(device)
    x = torch.randn(3, 5, 48, device=device, dtype=dtype)
    want = model(x)
    with fusion_advisor.patched(model, patterns=["rms_norm", "layer_norm"]) as handle:
        assert [(s.path, type(s.replacement).__name__, s.replacement.weight) for s in handle.swaps] == \
            [("0", "RMSNorm", None)], handle.summary()
        assert [p for p, _ in handle.skipped] == ["1"] and "numerics check failed" in handle.skipped[0][1]
        torch.testing.assert_close(model(x), want, **tolerance(dtype))


def test_a_layer_norm_without_parameters_is_swapped_by_its_normalized_shape(device):
    """OLMo's LayerNorm: no weight, no bias, no eps attribute (F.layer_norm's 1e-5 in its forward,
    on an fp32 copy): its normalized_shape gives the row length, the usual eps are checked."""
    modeling_olmo = pytest.importorskip("transformers.models.olmo.modeling_olmo")
    model = nn.Sequential(modeling_olmo.OlmoLayerNorm(48)).to(device)
    x = torch.randn(3, 5, 48, device=device)
    want = model(x)
    with fusion_advisor.patched(model, patterns=["rms_norm", "layer_norm"]) as handle:
        [swap] = handle.swaps
        assert type(swap.replacement).__name__ == "LayerNorm" and swap.replacement.weight is None
        assert swap.replacement.eps == 1e-5, handle.summary()
        torch.testing.assert_close(model(x), want, **tolerance(torch.float32))


class GatedFF(nn.Module):
    """T5 v1.1's gated MLP under a class name no pattern lists: wo(act(wi_0(x)) * wi_1(x))."""

    def __init__(self, width=16, inner=24):
        super().__init__()
        self.wi_0, self.wi_1 = nn.Linear(width, inner, bias=False), nn.Linear(width, inner, bias=False)
        self.wo = nn.Linear(inner, width, bias=False)
        self.act = nn.GELU(approximate="tanh")
        self.dropout = nn.Dropout(0.0)

    def forward(self, x):
        return self.wo(self.dropout(self.act(self.wi_0(x)) * self.wi_1(x)))


def test_a_result_hinting_the_activation_swaps_the_gated_mlp_around_it(device):
    """The H100 zoo's T5: its geglu cluster is named after the activation module (the leaf the GELU
    ran in), and the result's hint allowed that class only: the MLP that holds it, the module the
    GEGLU form swaps, was never tried and the recommendation was refused."""
    torch.manual_seed(0)
    model = nn.Sequential(GatedFF(), GatedFF()).to(device)
    cluster = Cluster(id="c1", direction="forward", pattern="geglu", module_class="Sequential/GatedFF/GELU")
    rec = Recommendation(rank=1, cluster_id="c1", pattern="geglu", title="geglu", measured_saving_us_per_step=5.0,
                         estimate_saving_us_per_step=5.0, confidence="measured")
    result = AdvisorResult(clusters=[cluster], recommendations=[rec], benchmarks=[measured_win("c1", "geglu")])
    x = torch.randn(2, 5, 16, device=device)
    want = model(x)
    with fusion_advisor.patched(model, result) as handle:
        assert [(s.path, type(s.replacement).__name__) for s in handle.swaps] == [("0", "GEGLUMLP"), ("1", "GEGLUMLP")], \
            handle.summary()
        calls.reset()
        torch.testing.assert_close(model(x), want, **tolerance(torch.float32))
        assert calls.snapshot().get("glu") == 2
