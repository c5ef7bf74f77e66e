"""The GPU's busy time in verification runs (advisor/gpu_time.py), and why a patched step is slower."""
from __future__ import annotations

import textwrap
from dataclasses import dataclass

import pytest
import torch
from torch.autograd import DeviceType

from fusion_advisor.gpu_time import gpu_time, why_slower


@dataclass
class Event:
    """What kineto_results.events() gives, reduced to what gpu_time reads."""
    _name: str
    start: int
    duration: int
    device: DeviceType = DeviceType.CUDA

    def name(self): return self._name
    def device_type(self): return self.device
    def start_ns(self): return self.start
    def duration_ns(self): return self.duration


def test_busy_time_is_the_union_of_gpu_intervals_per_step():
    events = [Event("void at::native::vectorized_elementwise_kernel<4>(int, float)", 0, 1000),
              Event("rms_norm_fwd_kernel", 500, 1000),          # overlaps the first: 1500 ns busy
              Event("aten::mul", 0, 10_000, DeviceType.CPU),    # host ops are not GPU time
              Event("rms_norm_fwd_kernel", 4000, 2000)]         # 2000 more
    g = gpu_time(events, steps=2)
    assert g.busy_s == pytest.approx(3500e-9 / 2)
    assert g.kernels_s == pytest.approx({"rms_norm_fwd_kernel": 1500e-9, "vectorized_elementwise_kernel<4>": 500e-9})
    assert list(g.kernels_s)[0] == "rms_norm_fwd_kernel"   # largest first


def test_no_gpu_activity_or_no_step_measures_nothing():
    assert gpu_time([Event("aten::mul", 0, 5, DeviceType.CPU)], steps=3) is None
    assert gpu_time([Event("k", 0, 5)], steps=0) is None


def test_a_slower_step_with_less_gpu_work_is_the_host():
    why = why_slower(0.0349, 0.0200, 0.0459, 0.0180)
    assert why.startswith("why slower: the GPU waited on the host")
    assert "GPU busy 20.00 ms -> 18.00 ms" in why and "GPU idle 14.90 ms -> 27.90 ms" in why


def test_a_slower_step_with_more_gpu_work_names_the_kernels_that_grew():
    why = why_slower(0.030, 0.028, 0.036, 0.034, {"a": 0.010, "b": 0.002}, {"a": 0.011, "b": 0.002, "ours": 0.005})
    assert "the GPU itself worked longer" in why
    assert why.endswith("grew most: ours +5.00 ms, a +1.00 ms")


def test_no_reason_where_the_step_is_not_slower_or_a_figure_is_missing():
    assert why_slower(0.03, 0.02, 0.02, 0.015) is None
    assert why_slower(0.03, None, 0.04, 0.02) is None


SCRIPT = """
import torch
torch.manual_seed(0)
model = torch.nn.Linear(8, 1)
opt = torch.optim.SGD(model.parameters(), lr=0.01)
for i in range(50):
    loss = model(torch.randn(4, 8)).pow(2).mean()
    loss.backward()
    opt.step()
    opt.zero_grad()
"""


def test_the_window_follows_the_timed_steps_and_is_not_timed(tmp_path, monkeypatch):
    """With a (stand-in) GPU, the profiler starts after the timed steps, covers gpu_profile_steps
    more, and those steps are in neither the step times nor the warm-up."""
    from fusion_advisor import verify

    script = tmp_path / "train.py"
    script.write_text(textwrap.dedent(SCRIPT))
    seen = []

    class FakeProfile:
        def __init__(self, activities):
            assert activities == [torch.profiler.ProfilerActivity.CUDA]
            self.profiler = self

        def start(self):
            seen.append("start")

        def stop(self):
            seen.append("stop")
            self.kineto_results = self

        def events(self):
            return [Event("k", 0, 3_000_000), Event("k", 5_000_000, 3_000_000)]

    steps_at = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: steps_at.append(len(seen)))
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda: None)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda: 0)
    monkeypatch.setattr(torch.profiler, "profile", FakeProfile)
    m = verify._run_in_process(verify.RunSpec(str(script), [], steps=4, warmup=2, gpu_profile_steps=3))
    assert m.error is None
    assert m.steps_run == 2 + 4 + 3 and len(m.step_times_s) == 4
    assert steps_at == [0] * 6 + [1] * 3        # the profiler started at the end of the 6th step
    assert seen == ["start", "stop"]
    assert m.gpu_busy_s == pytest.approx(6e-3 / 3) and m.gpu_kernels_s == pytest.approx({"k": 2e-3})
    assert len(m.losses) == 9                    # read at each step's end, every one of them
