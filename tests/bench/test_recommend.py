"""recommend: ranking and ROI, checked against numbers worked out by hand."""
import json

import pytest
from typer.testing import CliRunner

from fusion_advisor.apply import describe_patches
from fusion_advisor.cli import app
from fusion_advisor.core.errors import AdvisorError
from fusion_advisor.recommend import DEFAULT_GPU_HOURLY_COST, RoiOptions, recommend, roi
from fusion_advisor.core.result import AdvisorResult, Benchmark, Cluster, Estimate, ProviderTiming

FB = "forward+backward"


def timing(p50, host=None, activation=None):
    return ProviderTiming(p50, p50, p50, peak_mem_bytes=None, host_us=host, activation_bytes=activation)


def cluster(cid, occurrences, estimate_us, pattern="rms_norm", **kw):
    return Cluster(id=cid, direction="forward", pattern=pattern, pattern_params={"shape": [8, 64], "dtype": "bfloat16"},
                   module_class="LlamaModel/LlamaDecoderLayer/LlamaRMSNorm", occurrences_per_step=occurrences,
                   estimate=Estimate(saving_us=estimate_us), **kw)


def gpu_bench(cid, measured, verdict, best):
    return Benchmark(cid, "rms_norm", {}, FB, measured=measured, numerics_ok=True, verdict=verdict, timing="gpu",
                     device="NVIDIA H200", best_provider=best)


@pytest.fixture
def result():
    r = AdvisorResult(run={"step_time_s_unprofiled": 0.05},      # 1,728,000 steps a day
                      summary={"gpu_busy_pct": 20.0, "gpu_idle_us_per_step": 26780.0})
    r.clusters = [cluster("A", 10, 5.0), cluster("B", 4, 1.0), cluster("C", 5, 100.0), cluster("D", 3, 50.0),
                  cluster("E", 2, 80.0, pattern=None)]
    r.benchmarks = [
        # A: ours 20 µs faster per call, 10 per step -> 200 µs; activations 600 B less x 10
        gpu_bench("A", {"eager": timing(30, host=40, activation=1000), "triton": timing(10, host=8, activation=400),
                        "cuda_graph": timing(25, host=5)}, "recommended", "triton"),
        # B: torch.compile wins: 30 µs x 4 = 120 µs
        gpu_bench("B", {"eager": timing(50), "triton": timing(30), "compile": timing(20)}, "recommended", "compile"),
        # C: no GPU: the estimate, 100 x 5 = 500 µs, ranks after every measured saving
        Benchmark("C", "rms_norm", {}, FB, verdict="not run", reason="no CUDA GPU"),
        # D: rejected, nothing beat eager: never recommended, whatever the estimate
        gpu_bench("D", {"eager": timing(10), "triton": timing(12)}, "rejected", None),
    ]
    return r


def test_measured_first_by_saving_then_estimates(result):
    recs = recommend(result, RoiOptions()).recommendations
    describe_patches(result)   # apply's part: what each change is
    assert [(r.rank, r.cluster_id, r.confidence) for r in recs] == [
        (1, "A", "measured"), (2, "B", "measured"), (3, "C", "estimate")]
    a, b, c = recs
    assert a.measured_saving_us_per_step == pytest.approx(200.0) and a.estimate_saving_us_per_step == pytest.approx(50.0)
    assert a.kind == "fused_kernel" and a.memory_saved_bytes == 6000
    assert a.patch["kind"] == "module_swap"
    assert a.patch["modules"] == [{"from": "LlamaRMSNorm", "to": "fusion_advisor.kernels.rms_norm.RMSNorm"}]
    assert b.kind == "torch_compile" and b.measured_saving_us_per_step == pytest.approx(120.0)
    assert "torch.compile" in b.title and b.patch["kind"] == "torch_compile"
    assert c.measured_saving_us_per_step is None and c.estimate_saving_us_per_step == pytest.approx(500.0)
    assert "estimate" in c.title and c.roi["basis"] == "estimate" and "no CUDA GPU" in c.detail


def test_roi_arithmetic(result):
    # 200 µs x 1,728,000 steps/day x 8 GPUs = 2,764.8 s = 0.768 GPU-hours a day; x $2 = $1.536; x 30 = $46.08
    a = recommend(result, RoiOptions(gpu_hourly_cost=2.0, gpus=8, cost_is_default=False)).recommendations[0]
    assert a.roi["gpu_hours_per_day"] == pytest.approx(0.768)
    assert a.roi["usd_per_day"] == pytest.approx(1.54)
    assert a.roi["usd_per_month"] == pytest.approx(46.08)
    assert a.roi["pct_of_step"] == pytest.approx(0.4)
    assert a.roi["assumptions"]["steps_per_day"] == pytest.approx(1_728_000)
    assert a.roi["assumptions"]["gpu_hourly_cost_source"] == "--gpu-hourly-cost"


def test_roi_with_steps_per_day_and_without_a_step_rate():
    r = AdvisorResult()
    # 500 µs x 720,000 steps = 360 s = 0.1 GPU-hour; at the default price
    out = roi(500.0, "measured", r, RoiOptions(steps_per_day=720_000))
    assert out["gpu_hours_per_day"] == pytest.approx(0.1)
    assert out["usd_per_day"] == pytest.approx(round(0.1 * DEFAULT_GPU_HOURLY_COST, 2))
    assert "default" in out["assumptions"]["gpu_hourly_cost_source"]
    missing = roi(500.0, "measured", r, RoiOptions())
    assert "usd_per_day" not in missing and "--steps-per-day" in missing["missing"]


def test_bad_roi_options_are_refused():
    with pytest.raises(AdvisorError, match="--gpus"):
        RoiOptions(gpus=0)
    with pytest.raises(AdvisorError, match="--steps-per-day"):
        RoiOptions(steps_per_day=-1)


def test_launch_bound_step_puts_cuda_graphs_first(result):
    result.launch_bound = {"launch_bound": True}
    recs = recommend(result).recommendations
    first = recs[0]
    assert first.kind == "cuda_graphs" and first.rank == 1 and "launch-bound (GPU busy 20 % of the step)" in first.title
    # eager costs max(30, 40 host) = 40 µs, its graph replay max(25, 5) = 25: 15 µs x 10 per step
    assert first.measured_saving_us_per_step == pytest.approx(150.0)
    assert first.estimate_saving_us_per_step == pytest.approx(26780.0)
    # and the fused kernel is counted on host time too: 40 - max(10, 8) = 30 µs x 10
    a = next(r for r in recs if r.cluster_id == "A")
    assert a.measured_saving_us_per_step == pytest.approx(300.0)


def test_backward_cluster_counts_in_its_forward_partner(result):
    result.clusters.append(Cluster(id="C-bwd", direction="backward", pattern="rms_norm",
                                   pattern_params={"shape": [8, 64], "dtype": "bfloat16"}, occurrences_per_step=5,
                                   estimate=Estimate(saving_us=20.0)))
    recs = recommend(result).recommendations
    assert "C-bwd" not in [r.cluster_id for r in recs]
    c = next(r for r in recs if r.cluster_id == "C")
    assert c.estimate_saving_us_per_step == pytest.approx(100 * 5 + 20 * 5)


def _loss_clusters(backward_source="loss_utils.py:32", backward_module="GPTNeoXForCausalLM"):
    """Hugging Face's loss as the H100 zoo's GPT-NeoX trace read it: the forward cluster starts after
    `logits.float()` (fp32 logits), the backward one holds the cast's backward (bf16, upcast), so
    neither is the other's exact partner; both timed forward + backward."""
    params = {"tokens": 16384, "vocab": 50432, "reduction": "mean", "ignore_index": -100}
    fwd = Cluster(id="fwd-ce", direction="forward", pattern="cross_entropy", source="loss_utils.py:32",
                  module_class="GPTNeoXForCausalLM", occurrences_per_step=1,
                  pattern_params={**params, "dtype": "float32", "upcast": False}, estimate=Estimate(saving_us=1000.0))
    bwd = Cluster(id="bwd-ce", direction="backward", pattern="cross_entropy", source=backward_source,
                  module_class=backward_module, occurrences_per_step=1,
                  pattern_params={**params, "dtype": "bfloat16", "upcast": True}, estimate=Estimate(saving_us=3000.0))
    benches = [Benchmark(c.id, "cross_entropy", c.pattern_params, FB, measured=measured, numerics_ok=True,
                         verdict="recommended", timing="gpu", device="NVIDIA H100", best_provider="triton")
               for c, measured in ((fwd, {"eager": timing(6157.4), "triton": timing(2047.2)}),
                                   (bwd, {"eager": timing(8757.7), "triton": timing(1043.0)}))]
    return [fwd, bwd], benches


def test_one_call_seen_from_both_directions_is_counted_once():
    r = AdvisorResult(run={"step_time_s_unprofiled": 0.035})
    r.clusters, r.benchmarks = _loss_clusters()
    recs = recommend(r).recommendations
    assert [rec.cluster_id for rec in recs] == ["bwd-ce"]   # the side whose eager took longer: it saw the cast too
    assert recs[0].measured_saving_us_per_step == pytest.approx(8757.7 - 1043.0)
    assert recs[0].estimate_saving_us_per_step == pytest.approx(4000.0)
    assert "the same call's forward cluster fwd-ce (read as" in recs[0].detail and "upcast=False" in recs[0].detail


def test_a_cpu_trace_names_the_backward_by_the_line_that_called_backward():
    """The tiny GPT-NeoX on CPU: the backward clusters' source is the script's `loss.backward()`
    line, their module the forward's; the module pairs them."""
    r = AdvisorResult(run={"step_time_s_unprofiled": 0.035})
    r.clusters, r.benchmarks = _loss_clusters(backward_source="gpt_neox_train.py:72")
    assert [rec.cluster_id for rec in recommend(r).recommendations] == ["bwd-ce"]


@pytest.mark.parametrize("where", [{"backward_module": "GPTNeoXForCausalLM/Other"},
                                   {"backward_module": None, "backward_source": "loss_utils.py:64"}])
def test_clusters_of_different_modules_or_lines_are_different_calls(where):
    r = AdvisorResult(run={"step_time_s_unprofiled": 0.035})
    r.clusters, r.benchmarks = _loss_clusters(**where)
    if where["backward_module"] is None:
        r.clusters[0].module_class = None   # neither knows its module: the line decides
    assert sorted(rec.cluster_id for rec in recommend(r).recommendations) == ["bwd-ce", "fwd-ce"]


def test_two_candidates_for_one_backward_cluster_pair_none():
    """T5's RMSNorm at one source line runs at two sequence lengths: a backward cluster that matches
    neither exactly is not guessed into either."""
    r = AdvisorResult(run={"step_time_s_unprofiled": 0.035})
    (fwd, bwd), benches = _loss_clusters()
    other = Cluster(**{**fwd.__dict__, "id": "fwd-ce-2", "pattern_params": {**fwd.pattern_params, "tokens": 4096}})
    r.clusters, r.benchmarks = [fwd, other, bwd], benches
    assert r.same_call_partner(bwd) is None and r.same_call_partner(fwd) is None


def test_recommend_cli_reprices_a_saved_result(result, tmp_path):
    path = tmp_path / "result.json"
    result.save(path)
    out = CliRunner().invoke(app, ["recommend", str(path), "--gpu-hourly-cost", "2", "--gpus", "8", "--json"])
    assert out.exit_code == 0, out.output
    saved = json.loads(path.read_text())
    assert saved["recommendations"][0]["roi"]["usd_per_month"] == pytest.approx(46.08)
    assert [r["cluster_id"] for r in saved["recommendations"]] == ["A", "B", "C"]


def _memory_trade_result(eager_peak=1500 * 2**20, ours_peak=160 * 2**20, numerics_ok=True):
    r = AdvisorResult(run={"step_time_s_unprofiled": 0.05})
    params = {"tokens": 4096, "hidden": 2048, "vocab": 32000, "dtype": "bfloat16"}
    r.clusters = [Cluster(id="L", direction="forward", pattern="linear_cross_entropy", pattern_params=params,
                          module_class="LlamaForCausalLM", source="transformers/loss/loss_utils.py:32",
                          occurrences_per_step=1, memory_bound=False)]
    eager = ProviderTiming(3800, 3830, 3860, peak_mem_bytes=eager_peak)
    ours = ProviderTiming(4400, 4430, 4460, peak_mem_bytes=ours_peak)
    r.benchmarks = [Benchmark("L", "linear_cross_entropy", params, FB, measured={"eager": eager, "triton": ours},
                              numerics_ok=numerics_ok, verdict="rejected", timing="gpu", device="NVIDIA H200")]
    return r


def test_memory_trade_is_offered_with_its_time_cost():
    """linear_cross_entropy is slower than eager (bench says rejected) but lowers the peak: it is
    recommended as a trade, its cost in the title and in the (negative) saving, ranked last."""
    r = _memory_trade_result()
    r.clusters.append(cluster("A", 10, 5.0))
    r.benchmarks.append(gpu_bench("A", {"eager": timing(30), "triton": timing(10)}, "recommended", "triton"))
    recs = recommend(r).recommendations
    assert [x.cluster_id for x in recs] == ["A", "L"]
    trade = recs[1]
    assert trade.kind == "memory" and trade.memory_saved_bytes == (1500 - 160) * 2**20
    assert trade.measured_saving_us_per_step == pytest.approx(-600.0)
    assert "1,340 MiB" in trade.title and "0.60 ms per step slower" in trade.title
    assert trade.roi["usd_per_day"] < 0


def test_memory_trade_is_priced_against_the_loss_the_plan_already_fuses():
    """GPT-NeoX on the H100 zoo: the fused head + loss was 5.5 ms faster than eager's head and loss,
    but the plan already puts our cross_entropy on that loss; against that it is slower, and the
    title must say so first."""
    r = AdvisorResult(run={"step_time_s_unprofiled": 0.035})
    (fwd, bwd), benches = _loss_clusters()
    params = {"tokens": 16384, "hidden": 1024, "vocab": 50432, "dtype": "bfloat16"}
    head = Cluster(id="fwd-ce-lm-head", direction="forward", pattern="linear_cross_entropy", pattern_params=params,
                   module_class=fwd.module_class, source=fwd.source, occurrences_per_step=1, memory_bound=False)
    r.clusters = [fwd, bwd, head]
    r.benchmarks = benches + [Benchmark(head.id, "linear_cross_entropy", params, FB, numerics_ok=True, verdict="recommended",
                                        timing="gpu", device="NVIDIA H100", measured={
                                            "eager": ProviderTiming(12886.4, 12886.4, 12886.4, peak_mem_bytes=8 * 2**30),
                                            "triton": ProviderTiming(7297.6, 7297.6, 7297.6, peak_mem_bytes=2 * 2**30)})]
    trade = next(x for x in recommend(r).recommendations if x.kind == "memory")
    # our loss saves 8,757.7 - 1,043.0 = 7,714.7 µs a call (the backward cluster speaks for the call):
    # eager's head with it is 12,886.4 - 7,714.7 = 5,171.7 µs, the trade's 7,297.6 is 2,125.9 slower
    assert trade.measured_saving_us_per_step == pytest.approx(5171.7 - 7297.6)
    assert "2.13 ms per step slower than with our cross_entropy, 5.59 ms faster than eager" in trade.title


@pytest.mark.parametrize("kw", [{"ours_peak": 1600 * 2**20}, {"numerics_ok": False}])
def test_memory_trade_needs_a_lower_peak_and_passing_numerics(kw):
    assert recommend(_memory_trade_result(**kw)).recommendations == []


def test_memory_trade_is_applied_only_when_asked(tmp_path):
    from fusion_advisor.apply import plan
    from fusion_advisor.patching import recommended_patterns
    r = recommend(_memory_trade_result())
    r.run["script"] = str(tmp_path / "train.py")
    assert recommended_patterns(r) == [] and recommended_patterns(r, memory=True) == ["linear_cross_entropy"]
    assert plan(r).runtime_patterns == []
    assert any("not applied without --memory" in n for n in plan(r).notes)
    assert plan(r, memory=True).runtime_patterns == ["linear_cross_entropy"]
