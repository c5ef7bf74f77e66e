"""Runtime patching of one model instance: swap, check, revert."""
import importlib.util
from pathlib import Path

import pytest
import torch

import fusion_advisor
from fusion_advisor.kernels.rms_norm import RMSNorm
from fusion_advisor.core.result import AdvisorResult, Cluster, Recommendation
from measured import measured_win

ROOT = Path(__file__).resolve().parents[2]


def _llama_module():
    spec = importlib.util.spec_from_file_location("llama_train", ROOT / "examples" / "llama_train.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture
def model(device):
    torch.manual_seed(0)
    llama = _llama_module()
    return llama.LlamaModel(vocab=64, hidden=32, layers=2, heads=2, intermediate=64).to(device)


def test_swaps_every_rmsnorm_and_reverts_exactly(model, device):
    ids = torch.randint(0, 64, (2, 9), device=device)
    before = model(ids).detach()
    originals = {n: m for n, m in model.named_modules()}
    handle = fusion_advisor.patch(model, patterns=["rms_norm"])
    assert len(handle.swaps) == 5  # 2 layers x 2 norms + the final norm
    assert all(isinstance(s.replacement, RMSNorm) for s in handle.swaps)
    assert handle.swaps[0].replacement.weight is handle.swaps[0].original.weight  # shared, not copied
    torch.testing.assert_close(model(ids).detach(), before, atol=1e-5, rtol=1e-4)
    handle.revert()
    assert {n: m for n, m in model.named_modules()} == originals


def test_only_this_instance_changes(model, device):
    llama = type(model)
    other = llama(vocab=64, hidden=32, layers=1, heads=2, intermediate=64).to(device)
    with fusion_advisor.patched(model, patterns=["rms_norm"]):
        assert isinstance(model.norm, RMSNorm)
        assert not isinstance(other.norm, RMSNorm)
    assert not isinstance(model.norm, RMSNorm)


def test_patterns_come_from_a_result(model, tmp_path):
    result = AdvisorResult(recommendations=[Recommendation(rank=1, cluster_id="c1", pattern="rms_norm", title="RMSNorm",
                                                           measured_saving_us_per_step=10.0,
                                                           estimate_saving_us_per_step=12.0, confidence="measured")],
                           clusters=[Cluster(id="c1", direction="forward", pattern="rms_norm")],
                           benchmarks=[measured_win("c1", "rms_norm")])
    path = tmp_path / "result.json"
    result.save(path)
    handle = fusion_advisor.patch(model, str(path))
    assert len(handle.swaps) == 5
    handle.revert()


def test_unknown_option_is_an_error(model):
    with pytest.raises(TypeError, match="unknown option"):
        fusion_advisor.patch(model, patterns=["rms_norm"], chek=False)


def test_unknown_pattern_is_an_error(model):
    with pytest.raises(KeyError, match="no fusion pattern named"):
        fusion_advisor.patch(model, patterns=["rms_nrom"])


def test_a_replacement_that_fails_numerics_is_left_out(model, monkeypatch):
    from fusion_advisor.kernels import rms_norm as mod

    def wrong(x, weight, eps=1e-6):
        return mod.reference(x, weight, eps) * 1.01
    monkeypatch.setattr(mod, "rms_norm", wrong)
    handle = fusion_advisor.patch(model, patterns=["rms_norm"])
    assert handle.swaps == []
    assert len(handle.skipped) == 5 and "numerics check failed" in handle.skipped[0][1]
    assert not isinstance(model.norm, RMSNorm)


def test_mlp_blocks_swap_to_swiglu(model, device):
    from fusion_advisor.kernels.glu import GatedMLP
    ids = torch.randint(0, 64, (2, 9), device=device)
    before = model(ids).detach()
    with fusion_advisor.patched(model, patterns=["swiglu"]) as handle:
        assert len(handle.swaps) == 2, handle.summary()  # one LlamaMLP per layer
        assert all(isinstance(s.replacement, GatedMLP) for s in handle.swaps)
        torch.testing.assert_close(model(ids).detach(), before, atol=1e-5, rtol=1e-4)


def test_rope_replaces_the_function_the_attention_looks_up_and_reverts(model, device):
    """examples/llama_train.py is loaded without a sys.modules entry: the swap goes into the
    globals its attention forward reads."""
    namespace = type(model.layers[0].self_attn).forward.__globals__
    before = namespace["apply_rotary_pos_emb"]
    ids = torch.randint(0, 64, (2, 9), device=device)
    want = model(ids).detach()
    with fusion_advisor.patched(model, patterns=["rope"]) as handle:
        assert [f.pattern for f in handle.functions] == ["rope"], handle.summary()
        assert namespace["apply_rotary_pos_emb"] is handle.functions[0].replacement
        torch.testing.assert_close(model(ids).detach(), want, atol=1e-5, rtol=1e-4)
    assert namespace["apply_rotary_pos_emb"] is before
