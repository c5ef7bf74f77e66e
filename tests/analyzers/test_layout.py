"""analyzers/layout.py and its recommendation: cuDNN's NCHW <-> NHWC transposes around convolutions,
measured in the trace, make a by-hand channels_last recommendation priced at their time."""
import dataclasses

from fusion_advisor.analyzers.layout import layout_transposes
from fusion_advisor.analyzers.trace import Trace
from fusion_advisor.pipeline import analyze, rank
from fusion_advisor.recommend import MIN_TRANSPOSE_SHARE


def test_the_conv_example_transposes_around_its_convolutions(data_dir):
    """examples/conv_pointwise.py in bf16 on an H200 (NCHW): 9 transposes a step in the trace."""
    layout = layout_transposes(Trace.load(data_dir / "conv-pointwise-bf16-h200.json.gz"))
    assert layout["kernels"] == ["nchwToNhwcKernel", "nhwcToNchwKernel"]
    assert layout["transposes_per_step"] == 9.0
    assert 10.0 < layout["transpose_us_per_step"] < 20.0 and 0.05 < layout["share_of_gpu_busy"] < 0.15


def test_no_transposes_no_layout(data_dir):
    assert layout_transposes(Trace.load(data_dir / "llama-bf16-h200.json.gz")) is None


def test_the_recommendation_is_by_hand_and_priced_at_the_transposes(data_dir):
    result = rank(analyze(Trace.load(data_dir / "conv-pointwise-bf16-h200.json.gz")))
    rec = next(r for r in result.recommendations if r.kind == "channels_last")
    assert rec.pattern is None and rec.confidence == "estimate" and rec.measured_saving_us_per_step is None
    assert rec.estimate_saving_us_per_step == result.layout["transpose_us_per_step"]
    assert "channels_last" in rec.title and "torch.channels_last" in rec.patch["description"]
    # under the threshold share it is not worth the change
    small = dataclasses.replace(result, layout=dict(result.layout, share_of_gpu_busy=MIN_TRANSPOSE_SHARE / 2))
    assert not any(r.kind == "channels_last" for r in rank(small).recommendations)
    # a result saved before the field existed reads as none
    from fusion_advisor.core.result import AdvisorResult
    data = result.to_dict() if hasattr(result, "to_dict") else dataclasses.asdict(result)
    data.pop("layout")
    assert AdvisorResult.from_dict(data).layout is None


def test_patch_puts_a_conv_net_in_channels_last_and_back():
    """The runtime change: weights and inputs NHWC, the same outputs and gradients, the parameters
    (an optimizer's) the same objects, counted per call; revert() puts the format back."""
    import torch
    from torch import nn

    import fusion_advisor
    from fusion_advisor import calls

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 1))
    x = torch.randn(2, 3, 10, 10)
    want = model(x)
    weight = model[0].weight
    calls.reset()
    handle = fusion_advisor.patch(model, patterns=["channels_last"])
    assert model[0].weight is weight and weight.is_contiguous(memory_format=torch.channels_last)
    got = model(x)
    assert got.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    got.sum().backward()
    assert weight.grad is not None and calls.snapshot()["channels_last"] == 1
    handle.revert()
    assert weight.is_contiguous() and model(x).is_contiguous()


def test_apply_puts_it_in_only_with_include_estimates(data_dir):
    from fusion_advisor import apply as apply_mod
    from fusion_advisor.patching import recommended_patterns
    result = rank(analyze(Trace.load(data_dir / "conv-pointwise-bf16-h200.json.gz")))
    assert "channels_last" not in apply_mod.plan(result).runtime_patterns
    assert "channels_last" not in recommended_patterns(result)
    plan = apply_mod.plan(result, include_estimates=True)
    assert "channels_last" in plan.runtime_patterns and "channels_last" in plan.estimates
    assert "channels_last" in recommended_patterns(result, include_estimates=True)
