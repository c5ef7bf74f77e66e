"""bench: numerics and plumbing in CPU/interpreter mode, verdicts from figures, no-GPU behaviour."""
import dataclasses
import json
import os
import subprocess
import sys

import pytest
import torch

from fusion_advisor import measure
from fusion_advisor.bench import (NOT_TIMED_ON_GPU, BenchOptions, bench, judge,
                                  parse_providers)
from fusion_advisor.core.errors import AdvisorError
from fusion_advisor.kernels import registry
from fusion_advisor.kernels import rms_norm as rms
from fusion_advisor.core.result import AdvisorResult, Benchmark, Cluster, Estimate, ProviderTiming

TINY = {"shape": [4, 64], "dtype": "bfloat16", "eps": 1e-6}
CPU = BenchOptions(providers=("eager", "triton"), mode="cpu")
GPU = torch.cuda.is_available()
# CPU mode runs Triton in its interpreter, which conftest switches on only where there is no GPU.
cpu_mode = pytest.mark.skipif(GPU, reason="CPU/interpreter mode: the GPU test below covers this machine")
HERE = BenchOptions(providers=("eager", "triton"), mode="auto" if GPU else "cpu")   # numerics judged alike


def training_result(pattern="rms_norm", params=TINY, **cluster) -> AdvisorResult:
    result = AdvisorResult(run={"step_source": "optimizer", "step_time_s_unprofiled": 0.05})
    result.clusters = [Cluster(id="c-rms", direction="forward", pattern=pattern, pattern_params=dict(params),
                               module_class="LlamaModel/LlamaDecoderLayer/LlamaRMSNorm", occurrences_per_step=9,
                               estimate=Estimate(saving_us=10.0), **cluster)]
    return result


@cpu_mode
def test_cpu_mode_checks_numerics_and_is_not_a_gpu_timing():
    result = bench(training_result(), CPU)
    assert [b.passes for b in result.benchmarks] == ["forward", "forward+backward"]
    for b in result.benchmarks:
        assert b.cluster_id == "c-rms"
        assert b.numerics_ok is True and b.numerics_by_provider == {"triton": "ok"}
        assert b.timing == "cpu-interpreter" and "TRITON_INTERPRET" in b.device
        assert b.verdict == "not run" and b.reason == NOT_TIMED_ON_GPU
        assert set(b.measured) == {"eager", "triton"}
        assert b.measured["eager"].p20_us <= b.measured["eager"].p50_us <= b.measured["eager"].p80_us
        assert b.best_provider is None


@pytest.fixture
def broken_pattern(monkeypatch):
    """rms_norm whose fused forward is 1 % off: a replacement that must never be recommended."""
    def off_by_one_percent(x, weight, eps=1e-6):
        return rms.rms_norm(x, weight, eps) * 1.01
    pattern = dataclasses.replace(rms.PATTERN, name="broken_rms_norm", fused=off_by_one_percent)
    monkeypatch.setitem(registry._REGISTRY, pattern.name, pattern)
    return pattern


def test_wrong_replacement_is_rejected_with_the_reason(broken_pattern):
    from fusion_advisor.recommend import recommend
    result = bench(training_result(pattern=broken_pattern.name, params={**TINY, "dtype": "float32"}), HERE)
    for b in result.benchmarks:
        assert b.verdict == "rejected"
        assert b.numerics_ok is False
        assert b.reason.startswith("numerics: forward output 0")
        assert "Mismatched elements" in b.reason and "triton" not in b.measured
    # ...and recommend leaves it out, although the cost model thought it would save time.
    assert recommend(result).recommendations == []


@cpu_mode
def test_without_a_gpu_nothing_is_timed():
    result = bench(training_result(), BenchOptions(mode="auto"))
    (b,) = result.benchmarks
    assert b.verdict == "not run" and b.reason == "no CUDA GPU" and b.timing == "none"
    assert b.measured == {} and b.numerics_ok is None and b.passes == "forward+backward"


def test_cpu_mode_without_interpreter_is_refused(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(AdvisorError, match="TRITON_INTERPRET=1"):
        bench(training_result(), CPU)


@cpu_mode
def test_unregistered_pattern_and_huge_cpu_shape_are_not_run():
    result = training_result(pattern="no_such_pattern")
    result.clusters.append(Cluster(id="big", direction="forward", pattern="rms_norm",
                                   pattern_params={"shape": [4096, 4096], "dtype": "float32"}))
    b_unknown, *b_big = bench(result, CPU).benchmarks
    assert b_unknown.verdict == "not run" and "not registered" in b_unknown.reason
    assert [b.passes for b in b_big] == ["forward", "forward+backward"]
    assert all(b.verdict == "not run" and "too large for CPU" in b.reason for b in b_big)


def test_backward_cluster_is_timed_with_its_forward_partner():
    result = training_result()
    result.clusters.append(Cluster(id="c-rms-bwd", direction="backward", pattern="rms_norm",
                                   pattern_params=dict(TINY)))
    result.run["step_source"] = "module"   # only the partner says there is a backward
    assert result.has_backward(result.clusters[0])
    benches = bench(result, HERE).benchmarks
    assert [(b.cluster_id, b.passes) for b in benches] == [
        ("c-rms", "forward"), ("c-rms", "forward+backward"), ("c-rms-bwd", "forward+backward")]
    assert benches[2].verdict == "not run" and "timed with its forward cluster c-rms" in benches[2].reason


@pytest.mark.gpu
@pytest.mark.skipif(not GPU, reason="needs a CUDA GPU")
def test_gpu_bench_times_every_provider_and_recommends_from_measurements():
    from fusion_advisor.recommend import recommend
    result = training_result(params={"shape": [2048, 1024], "dtype": "bfloat16", "eps": 1e-6})
    result.launch_bound = {"launch_bound": True}
    bench(result, BenchOptions(providers=("eager", "triton", "compile", "liger")))
    for b in result.benchmarks:
        assert b.timing == "gpu" and b.numerics_ok is True, b.reason
        assert b.verdict in ("recommended", "rejected") and b.reason
        assert {"eager", "triton", "compile", "cuda_graph"} <= set(b.measured), b.reason
        for p, m in b.measured.items():
            assert 0 < m.p20_us <= m.p50_us <= m.p80_us and m.host_us > 0, p
            if p != "cuda_graph":
                assert m.peak_mem_bytes > 0 and m.activation_bytes > 0, p
    recs = recommend(result).recommendations
    assert recs[0].kind == "cuda_graphs" and recs[0].confidence == "measured"
    assert all(r.confidence == "measured" for r in recs)


def t(p50, host=None):
    return ProviderTiming(p50 * 0.9, p50, p50 * 1.1, host_us=host)


def test_judge_recommends_only_a_faster_correct_kernel():
    ok = {"triton": "ok", "compile": "ok"}
    verdict, reason, best = judge({"eager": t(30), "triton": t(10), "compile": t(20)}, ok, "gpu")
    assert (verdict, best) == ("recommended", "triton") and "3.00x" in reason
    verdict, reason, best = judge({"eager": t(30), "triton": t(29.9)}, ok, "gpu")
    assert verdict == "rejected" and reason.startswith("not faster than eager: triton 29.9 µs vs eager 30.0 µs")
    assert best is None


def test_judge_says_use_torch_compile_when_it_wins():
    verdict, reason, best = judge({"eager": t(30), "triton": t(20), "compile": t(10)},
                                  {"triton": "ok", "compile": "ok"}, "gpu")
    assert verdict == "recommended" and best == "compile" and "use torch.compile" in reason
    verdict, reason, best = judge({"eager": t(30), "triton": t(20), "compile": t(19.9)},
                                  {"triton": "ok", "compile": "ok"}, "gpu")
    assert best == "triton" and "torch.compile" not in reason   # within noise of ours
    verdict, reason, best = judge({"eager": t(30), "triton": t(40), "compile": t(10)},
                                  {"triton": "ok", "compile": "ok"}, "gpu")
    assert verdict == "rejected" and best == "compile" and "use torch.compile" in reason


def test_judge_counts_host_time_when_launch_bound():
    # 8 launches of eager cost 40 µs of host time; on the GPU both take 10 µs.
    figures = {"eager": t(10, host=40), "triton": t(10, host=6)}
    assert judge(figures, {"triton": "ok"}, "gpu")[0] == "rejected"
    verdict, reason, _ = judge(figures, {"triton": "ok"}, "gpu", launch_bound=True)
    assert verdict == "recommended" and "host time" in reason


def test_judge_never_uses_cpu_timings():
    assert judge({"eager": t(30), "triton": t(1)}, {"triton": "ok"}, "cpu-interpreter")[0] == "not run"


@pytest.mark.parametrize("value, expected", [
    (None, False), (True, True), ({"launch_bound": True}, True), ({"is_launch_bound": False}, False),
    ({"verdict": "launch-bound"}, True), ({"verdict": "not launch-bound"}, False), ({"gpu_busy_pct": 20}, False),
    ("garbage", False)])
def test_launch_bound_is_read_defensively(value, expected):
    assert AdvisorResult(launch_bound=value).is_launch_bound() is expected


def test_providers_are_checked():
    assert parse_providers("eager, triton,cuda_graph") == ("eager", "triton", "cuda_graph")
    with pytest.raises(AdvisorError, match="unknown provider 'tensorrt'"):
        parse_providers("eager,tensorrt")
    with pytest.raises(AdvisorError, match="must include eager"):
        parse_providers("triton")


def test_input_sets_rotate_only_when_a_set_fits_in_l2():
    l2 = 50 * 2**20
    assert measure.input_sets_needed(200 * 2**20, l2) == 1
    assert measure.input_sets_needed(30 * 2**20, l2) == 5
    assert measure.input_sets_needed(1024, l2) == measure.MAX_INPUT_SETS


@cpu_mode
def test_bench_cli_in_cpu_mode_writes_the_result(tmp_path):
    src = tmp_path / "result.json"
    training_result().save(src)
    env = dict(os.environ, TRITON_INTERPRET="1", COLUMNS="250")
    r = subprocess.run([sys.executable, "-m", "fusion_advisor.cli", "bench", src, "--cpu", "--providers",
                        "eager,triton", "--out", tmp_path / "benched.json", "--steps-per-day", "1000"],
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    data = json.loads((tmp_path / "benched.json").read_text())
    assert [b["verdict"] for b in data["benchmarks"]] == ["not run", "not run"]
    assert data["recommendations"][0]["confidence"] == "estimate"
    assert "not timed on GPU" in r.stdout and "Recommendations" in r.stdout
    bad = subprocess.run([sys.executable, "-m", "fusion_advisor.cli", "bench", src, "--providers", "triton"],
                         capture_output=True, text=True, env=env, timeout=120)
    assert bad.returncode == 2 and "must include eager" in bad.stderr


@cpu_mode
def test_after_the_cuda_context_is_lost_later_clusters_say_so(monkeypatch):
    """A device-side assert in one bench (an index past its table) poisons every later CUDA call: the
    clusters after it say why they were not timed, not that their own inputs failed."""
    from fusion_advisor import bench as bench_mod
    result = training_result()
    result.clusters.append(Cluster(id="c-later", direction="forward", pattern="rms_norm",
                                   pattern_params={**TINY, "shape": [8, 64]}))
    answers = iter(["AcceleratorError: CUDA error: device-side assert triggered", None])
    monkeypatch.setattr(bench_mod, "context_lost", lambda device: next(answers))
    first, *rest = bench(result, CPU).benchmarks
    assert first.cluster_id == "c-rms" and first.numerics_ok is True
    later = [b for b in rest if b.cluster_id == "c-later"]
    assert len(later) == 1 and later[0].timing == "none"
    assert "CUDA context was lost during the bench of rms_norm" in later[0].reason
    assert "device-side assert" in later[0].reason


def test_context_lost_is_none_off_the_gpu():
    from fusion_advisor.bench import context_lost
    assert context_lost(None) is None and context_lost(torch.device("cpu")) is None


def test_forward_backward_returns_grads_rather_than_accumulating_them():
    # A model's grads flow on to the layer before; into leaves' .grad, the one tensor an add + norm
    # returns for x and the residual would be cloned for the second, a cost no model pays.
    from fusion_advisor.kernels import add_rms_norm
    params = {"shape": [8, 64], "dtype": "float32", "eps": 1e-6}
    work = measure.build_workload(add_rms_norm.PATTERN, params, torch.device("cpu"), backward=True)
    inputs = work.sets[0]
    assert len(inputs.grad_inputs) >= 3   # x, residual and the weight
    work.call(add_rms_norm.PATTERN.reference, 0)()
    assert all(inputs.args[i].grad is None for i in inputs.grad_inputs)   # computed, returned, not accumulated


def test_bench_notes_norms_timed_on_a_gpu_without_searched_tiles(monkeypatch):
    from fusion_advisor import bench as bench_module
    from fusion_advisor.kernels import norm_tiles
    result = AdvisorResult()
    result.benchmarks = [Benchmark("c0", "layer_norm", {}, "forward+backward", timing="gpu"),
                         Benchmark("c1", "rms_norm", {}, "forward+backward", timing="cpu-interpreter")]
    monkeypatch.setattr(norm_tiles, "gpu_name", lambda device: "NVIDIA H200")
    note = bench_module._untuned_tiles_note(result, torch.device("cuda"))
    assert note and "layer_norm kernels" in note and "rms_norm" not in note   # only what the GPU timed
    assert bench_module._untuned_tiles_note(result, torch.device("cpu")) is None
    monkeypatch.setattr(norm_tiles, "gpu_name", lambda device: "NVIDIA H100 80GB HBM3")
    assert bench_module._untuned_tiles_note(result, torch.device("cuda")) is None
