"""Launch-bound time, the analyze pipeline and `fusion-advisor analyze` on the real H200 fixtures."""
import gzip
import json
import os
import subprocess
import sys

import pytest

from fusion_advisor.analyzers.launch_bound import analyze_launch_bound
from fusion_advisor.analyzers.trace import Trace
from fusion_advisor.pipeline import analyze
from fusion_advisor.core.result import AdvisorResult
from fusion_advisor.report.terminal import render


def _load(name):
    from conftest import DATA
    return Trace.load(DATA / name)


@pytest.fixture(scope="module")
def tiny():
    return _load("llama-tiny-bf16-h200.json.gz")


@pytest.fixture(scope="module")
def tiny_result(tiny):
    return analyze(tiny)


@pytest.fixture(scope="module")
def cpu_only_tiny(tmp_path_factory):
    """The tiny run with its GPU events removed: what a CPU-only trace of it would hold."""
    from conftest import DATA
    doc = json.loads(gzip.open(DATA / "llama-tiny-bf16-h200.json.gz").read())
    doc["traceEvents"] = [e for e in doc["traceEvents"] if e.get("cat") not in ("kernel", "gpu_memcpy", "gpu_memset")]
    path = tmp_path_factory.mktemp("cpu") / "cpu.json"
    path.write_text(json.dumps(doc))
    return path


def invoke(*args):
    """The command in-process (the end-to-end subprocess test is below; this one is faster)."""
    from typer.testing import CliRunner
    from fusion_advisor.cli import app
    return CliRunner().invoke(app, [str(a) for a in args], env={"COLUMNS": "80"})


def cli(*args):
    env = dict(os.environ, PYTHONUNBUFFERED="1", COLUMNS="80")
    return subprocess.run([sys.executable, "-m", "fusion_advisor.cli", *map(str, args)], capture_output=True,
                          text=True, timeout=300, env=env)


# -- launch-bound ---------------------------------------------------------------------------------
def test_tiny_llama_is_launch_bound(tiny):
    lb = analyze_launch_bound(tiny)
    assert lb.verdict == "launch-bound" and lb.primary_remedy == "cuda_graphs"
    assert lb.launch_wait_share > 0.9
    # the figures add up: busy + idle = window, idle = launch waits + other gaps
    assert lb.gpu_busy_us_per_step + lb.gpu_idle_us_per_step == pytest.approx(lb.gpu_window_us_per_step, abs=0.01)
    assert lb.launch_wait_us_per_step + lb.other_gap_us_per_step == pytest.approx(lb.gpu_idle_us_per_step, abs=0.01)
    # almost every kernel is short and followed by a wait for the CPU; kernels start right after launch
    assert lb.short_kernel_launch_waits_per_step > 0.9 * lb.kernels_per_step
    assert lb.median_queue_delay_us < 50
    # and without the profiler the GPU is still idle most of the step
    assert lb.gpu_busy_share_unprofiled < 0.1
    assert set(lb.by_phase) == {"forward", "backward", "optimizer"}
    assert sum(w["launch_wait_us_per_step"] for w in lb.where) <= lb.launch_wait_us_per_step + 0.01
    graphs = next(r for r in lb.remedies if r["remedy"] == "cuda_graphs")
    assert graphs["applies"] and "reduce-overhead" in graphs["title"]
    assert graphs["figure_us_per_step"] == lb.launch_wait_us_per_step


def test_verdict_follows_the_figures_on_bigger_runs():
    """fp32 runs keep the GPU busy (the CPU runs milliseconds ahead); the bf16 4-layer Llama, whose
    kernels are 5x shorter, is still launch-bound on this H200."""
    fp32 = analyze(_load("llama-fp32-h200.json.gz")).launch_bound
    assert fp32["verdict"] == "gpu-bound" and fp32["launch_wait_share"] < 0.1
    assert fp32["median_queue_delay_us"] > 1000
    remedies = {r["remedy"]: r for r in fp32["remedies"]}
    assert not remedies["cuda_graphs"]["applies"]
    # the time to win is in the memory-bound clusters
    assert fp32["primary_remedy"] == "fused_kernels" and remedies["fused_kernels"]["applies"]
    assert remedies["fused_kernels"]["figure_us_per_step"] == fp32["fusion_saving_estimate_us_per_step"] > 0
    bf16 = analyze_launch_bound(_load("llama-bf16-h200.json.gz"))
    assert bf16.verdict == "launch-bound" and bf16.launch_wait_share > 0.5


def test_profiler_overhead_is_not_called_launch_bound(tiny, monkeypatch):
    lb = analyze_launch_bound(tiny)
    # had the unprofiled step taken barely more than the GPU work, the waits were the profiler's
    monkeypatch.setitem(tiny.meta["fusion_advisor"], "step_time_s_unprofiled", lb.gpu_busy_us_per_step * 1.2e-6)
    again = analyze_launch_bound(tiny)
    assert again.verdict == "gpu-bound" and "profiler overhead" in again.notes[0]


# -- the pipeline ---------------------------------------------------------------------------------
def test_analyze_fills_every_section(tiny, tiny_result):
    r = tiny_result
    assert r.device_profile["label"] == "NVIDIA H200 (calibrated 2026-11-22)"  # cost_model/profiles
    assert r.device_profile["chosen_because"] == "the GPU the trace was recorded on"
    assert r.clusters[0].pattern == "rms_norm" and r.clusters[0].estimate.saving_us > 0
    assert {c["class"] for c in r.kernel_classes} >= {"gemm", "elementwise", "attention"}
    assert r.launch_bound["verdict"] == "launch-bound"
    assert 0 < r.launch_bound["memory_bound_share"] <= 1
    saving = sum(c.estimate.saving_us * c.occurrences_per_step for c in r.clusters if c.estimate.saving_us)
    assert r.launch_bound["fusion_saving_estimate_us_per_step"] == pytest.approx(saving, abs=0.01)
    assert 0 < r.launch_bound["launches_fused_away_per_step"] < r.summary["kernels_per_step"]
    # the timeline is one step: as many kernels as a step has, from 0
    assert len(r.timeline) == r.summary["kernels_per_step"] and r.timeline[0]["start_us"] == 0
    rms = {c.id for c in r.clusters if c.pattern == "rms_norm"}
    assert any(t["cluster_id"] in rms for t in r.timeline)
    # roofline points: one per kernel name; GEMMs compute-bound and outside clusters
    names = [p["name"] for p in r.kernels]
    assert len(names) == len(set(names))
    gemm = [p for p in r.kernels if p["kernel_class"] == "gemm"]
    assert gemm and all(p["cluster_id"] is None for p in gemm)
    assert len(r.kernels) == tiny.kernels["name"].nunique()
    pow_point = next(p for p in r.kernels if "pow_tensor_scalar" in p["short_name"])
    assert pow_point["memory_bound"] and pow_point["cluster_id"] is not None
    assert pow_point["intensity"] < 1 and 0 < pow_point["pct_of_peak_bw"] < 100


def test_result_json_round_trip_keeps_clusters_and_estimates(tiny_result):
    back = AdvisorResult.from_dict(json.loads(tiny_result.to_json()))
    assert [c.id for c in back.clusters] == [c.id for c in tiny_result.clusters]
    assert back.clusters[0].estimate.saving_us == pytest.approx(tiny_result.clusters[0].estimate.saving_us)
    assert back.launch_bound == json.loads(json.dumps(tiny_result.launch_bound))


def test_terminal_report_is_compact(tiny_result):
    text = render(tiny_result, width=80)
    assert "Memory-bound clusters" in text and "rms_norm" in text
    assert "Step verdict: launch-bound" in text and 'torch.compile(mode="reduce-overhead")' in text
    table = text[text.index("Memory-bound clusters"):]
    assert max(len(line) for line in table.splitlines()) <= 80


# -- the command ----------------------------------------------------------------------------------
def test_analyze_json_carries_clusters_estimates_and_profile(data_dir):
    r = cli("analyze", data_dir / "llama-tiny-bf16-h200.json.gz", "--json")
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    assert data["device_profile"]["name"] == "NVIDIA H200"
    top = data["clusters"][0]
    assert top["pattern"] == "rms_norm" and top["estimate"]["profile"] == data["device_profile"]["label"]
    assert top["estimate"]["saving_us"] > 0 and top["occurrences_per_step"] == 5
    assert data["launch_bound"]["verdict"] == "launch-bound"


def test_cpu_only_trace_is_priced_for_a_target(cpu_only_tiny, tiny_result):
    r = invoke("analyze", cpu_only_tiny, "--json", "--target-gpu", "h200")
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    assert data["device_profile"]["name"] == "NVIDIA H200" and data["device_profile"]["source"] == "calibrated"
    assert any("every GPU figure is an estimate" in n for n in data["notes"])
    assert data["launch_bound"] is None and data["timeline"] == [] and data["kernel_classes"] == []
    # the same chains as the GPU trace, with nothing measured
    gpu_ids = {c.id for c in tiny_result.clusters if c.pattern == "rms_norm"}
    cpu = {c["id"]: c for c in data["clusters"]}
    assert gpu_ids <= set(cpu)
    assert all(cpu[i]["measured_us_per_step"] == 0 and cpu[i]["estimate"]["saving_us"] > 0 for i in gpu_ids)
    assert data["kernels"] and all(p["measured_us_per_step"] is None for p in data["kernels"])
    points = {p["name"]: p for p in data["kernels"]}
    # a GEMM is never in a cluster, even one this small, which the roofline puts below the ridge
    assert points["aten::mm"]["kernel_class"] == "gemm" and points["aten::mm"]["cluster_id"] is None
    from fusion_advisor.cost_model.device import load_profile
    h200 = load_profile(target="h200")
    assert points["aten::mm"]["intensity"] < h200.peak("bf16_tc") / h200.hbm_bytes_per_s
    assert points["aten::mm"]["memory_bound"]
    assert points["aten::pow"]["memory_bound"] and points["aten::pow"]["cluster_id"] in gpu_ids
    # without --target-gpu a CPU-only trace is priced for an H100; the terminal says it is an estimate
    plain = invoke("analyze", cpu_only_tiny)
    assert plain.exit_code == 0, plain.output
    assert "estimates for NVIDIA H100 SXM (datasheet)" in plain.stdout
    assert "every GPU figure is an estimate" in " ".join(plain.stdout.split())


def test_unknown_target_gpu_is_one_line(data_dir):
    r = invoke("analyze", data_dir / "llama-tiny-bf16-h200.json.gz", "--target-gpu", "h900")
    assert r.exit_code == 2
    assert len(r.output.strip().splitlines()) == 1 and "unknown target GPU 'h900'" in r.output


def test_a_gpu_without_figures_is_priced_for_the_default_target(tiny, monkeypatch):
    monkeypatch.setitem(tiny.meta["deviceProperties"][0], "name", "NVIDIA GeForce GTX 480")
    r = analyze(tiny)
    assert r.device_profile["name"] == "NVIDIA H100 SXM"
    assert "no figures for the trace's NVIDIA GeForce GTX 480" in r.device_profile["chosen_because"]
    assert any("measured times are from the trace's NVIDIA GeForce GTX 480" in n for n in r.notes)
    # a named target is taken as asked, and said so next to the measured times
    h200 = analyze(tiny, target_gpu="h200")
    assert h200.device_profile["name"] == "NVIDIA H200" and h200.device_profile["chosen_because"] == "--target-gpu h200"


def test_ops_know_their_record_function_range(tiny):
    ops = tiny.ops
    foreach = ops[ops["name"].str.startswith("aten::_foreach_") & (ops["depth"] == 0)]
    assert len(foreach) == 2 * 9 and set(foreach["annotation"]) == {"Optimizer.step#AdamW.step"}
    rms = ops[(ops["name"] == "aten::pow") & ~ops["backward"]]
    assert rms["annotation"].isna().all()   # ProfilerStep spans are not ranges of their own
