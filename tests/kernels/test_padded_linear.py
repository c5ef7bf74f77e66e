"""padded_linear: an nn.Linear of misaligned width through GEMMs padded to a multiple of 64, against
F.linear forward and backward, and its module form as patch swaps it."""
import pytest
import torch
from torch import nn

import fusion_advisor
from fusion_advisor import calls
from fusion_advisor.kernels import padded_linear as mod
from fusion_advisor.kernels.registry import NotThisForm, OpRecord
from kernel_checks import check_against_reference


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("shape", [
    {"tokens": 37, "in_features": 48, "out_features": 301, "bias": True},    # an odd vocabulary
    {"tokens": 16, "in_features": 50, "out_features": 64, "bias": False},    # misaligned in_features only
    {"tokens": 5, "in_features": 21, "out_features": 13, "bias": True},     # both
])
def test_matches_f_linear_forward_and_backward(shape, dtype, device):
    check_against_reference(mod.PATTERN, dict(shape, dtype=dtype), device, reduced_grads=(1, 2))


def test_the_gemm_runs_at_the_padded_width_and_the_result_is_contiguous(monkeypatch):
    x, w = torch.randn(2, 3, 48), torch.randn(301, 48)
    original, seen = torch.nn.functional.linear, []

    def spy(a, b, bias=None):
        seen.append(tuple(b.shape))
        return original(a, b, bias)
    monkeypatch.setattr(torch.nn.functional, "linear", spy)
    y = mod.padded_linear(x, w)
    assert seen == [(320, 48)] and y.shape == (2, 3, 301) and y.is_contiguous()
    torch.testing.assert_close(y, original(x, w))
    assert mod.padded_size(50257) == 50304 and mod.padded_size(50265) == 50304 and mod.padded_size(768) == 768


class Head(nn.Module):
    """A tiny LM: an embedding tied to a head of odd vocabulary, and an aligned projection."""

    def __init__(self, vocab=131, hidden=32):
        super().__init__()
        self.embed = nn.Embedding(vocab, hidden)
        self.proj = nn.Linear(hidden, hidden)
        self.head = nn.Linear(hidden, vocab, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, ids):
        return self.head(torch.relu(self.proj(self.embed(ids))))


def test_patch_swaps_only_the_misaligned_linear_and_keeps_the_tie():
    torch.manual_seed(0)
    model = Head()
    ids = torch.randint(0, 131, (2, 9))
    want = model(ids)
    calls.reset()
    handle = fusion_advisor.patch(model, patterns=["padded_linear"])
    assert [(s.path, type(s.replacement).__name__) for s in handle.swaps] == [("head", "PaddedLinear")]
    assert handle.skipped == []                       # the aligned proj is not of the form: not a refusal
    assert model.head.weight is model.embed.weight    # the tie (and the optimizer's parameter) kept
    got = model(ids)
    torch.testing.assert_close(got, want)
    got.sum().backward()
    assert model.embed.weight.grad is not None and calls.snapshot()["padded_linear"] >= 1
    handle.revert()
    assert type(model.head) is nn.Linear and model.head.weight is model.embed.weight


def test_the_module_form_refuses_what_it_is_not():
    with pytest.raises(NotThisForm, match="aligned already"):
        mod.PaddedLinear.from_module(nn.Linear(64, 128))
    with pytest.raises(NotThisForm, match="not an nn.Linear"):
        mod.PaddedLinear.from_module(nn.Conv1d(3, 5, 1))

    class Scaled(nn.Linear):
        def forward(self, x):
            return 2 * super().forward(x)
    with pytest.raises(NotThisForm):
        mod.PaddedLinear.from_module(Scaled(8, 13))   # a forward of its own: not what we would compute


def _linear(x, w, bias=None, t="c10::BFloat16"):
    dims = (x, w) + ((bias,) if bias else ((),))
    return OpRecord("aten::linear", dims, (t, t, t if bias else ""), ("", "", ""))


def test_params_read_from_a_traced_linear():
    assert mod.params_from_linear(_linear((8, 512, 768), (50265, 768), (50265,))) == {
        "tokens": 4096, "in_features": 768, "out_features": 50265, "bias": True, "dtype": "bfloat16"}
    assert mod.params_from_linear(_linear((4096, 768), (32000, 768))) is None        # aligned
    assert mod.params_from_linear(_linear((4096, 768), (50257, 768), t="long int")) is None
    assert mod.params_from_linear(OpRecord("aten::mm", ((4, 3), (3, 5)), ("float", "float"), ("", ""))) is None


def test_with_a_result_only_the_shape_bench_timed_is_swapped():
    """Bench timed the 32 -> 131 head: the 32 -> 3 classifier, misaligned too, was never timed and
    stays as it is."""
    from fusion_advisor.bench import judge
    from fusion_advisor.core.result import AdvisorResult, Benchmark, Cluster, ProviderTiming
    from fusion_advisor.recommend import recommend

    params = {"tokens": 18, "in_features": 32, "out_features": 131, "bias": False, "dtype": "float32"}
    measured = {"eager": ProviderTiming(900.0, 900.0, 900.0), "triton": ProviderTiming(500.0, 500.0, 500.0)}
    verdict, reason, best = judge(measured, {"triton": "ok"}, "gpu")
    result = recommend(AdvisorResult(
        clusters=[Cluster("g1", "forward", "padded_linear", dict(params), module_class="Head/Linear",
                          occurrences_per_step=1, memory_bound=False)],
        benchmarks=[Benchmark("g1", "padded_linear", dict(params), "forward+backward", measured, numerics_ok=True,
                              verdict=verdict, reason=reason, timing="gpu", device="NVIDIA H100",
                              numerics_by_provider={"triton": "ok"}, best_provider=best)]))
    assert [r.pattern for r in result.recommendations] == ["padded_linear"]
    assert "GEMMs (PyTorch's, at the padded width)" in result.recommendations[0].title
    model = Head()
    model.classifier = nn.Linear(32, 3)
    handle = fusion_advisor.patch(model, result)
    assert [s.path for s in handle.swaps] == ["head"]
    assert type(model.classifier) is nn.Linear
    handle.revert()
