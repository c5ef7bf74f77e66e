"""analyzers/misaligned_gemm.py: a forward aten::linear of misaligned width (an odd vocabulary)
becomes a `padded_linear` candidate; aligned ones do not."""
import json
import os
import subprocess
import sys
from pathlib import Path

from fusion_advisor.analyzers.clusters import find_clusters
from fusion_advisor.analyzers.trace import Trace
from fusion_advisor.cost_model.device import load_profile
from fusion_advisor.kernels.lookup import pattern_lookup

ROOT = Path(__file__).resolve().parents[2]


def test_an_odd_vocabulary_head_is_a_padded_linear_candidate(tmp_path):
    """The Llama example at vocabulary 131 on CPU: its LM head (64 -> 131) is the one candidate, with
    the shapes the step ran; the 64-wide projections are aligned and are not."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", COLUMNS="80")
    r = subprocess.run([sys.executable, "-m", "fusion_advisor.cli", "profile", str(ROOT / "examples" / "llama_train.py"),
                        "--warmup", "2", "--steps", "2", "--no-bench", "-o", str(tmp_path / "out"), "--",
                        "--hidden", "64", "--layers", "1", "--seq", "16", "--vocab", "131", "--steps", "8"],
                       capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr
    result = json.loads((tmp_path / "out" / "result.json").read_text())
    padded = [c for c in result["clusters"] if c["pattern"] == "padded_linear"]
    assert len(padded) == 1, [c["pattern"] for c in result["clusters"]]
    c = padded[0]
    assert c["pattern_params"] == {"tokens": 32, "in_features": 64, "out_features": 131, "bias": False,
                                   "dtype": "bfloat16"}
    assert c["direction"] == "forward" and c["module_class"].endswith("/Linear") and c["occurrences_per_step"] == 1
    assert not c["memory_bound"] and c["estimate"]["saving_us"] is None   # bench's to price, not the cost model's
    assert c["ops"][0]["name"] == "aten::linear"
    # Measured faster (a stand-in GPU bench), it is patched at run time in the user's own script:
    # padded_linear has a module form and no source rewrite.
    from fusion_advisor import apply as apply_mod
    from fusion_advisor.bench import judge
    from fusion_advisor.core.result import AdvisorResult, Benchmark, ProviderTiming
    from fusion_advisor.recommend import recommend
    result = AdvisorResult.load(tmp_path / "out" / "result.json")
    measured = {"eager": ProviderTiming(900.0, 900.0, 900.0), "triton": ProviderTiming(500.0, 500.0, 500.0)}
    verdict, reason, best = judge(measured, {"triton": "ok"}, "gpu")
    result.benchmarks = [Benchmark(c["id"], "padded_linear", dict(c["pattern_params"]), "forward+backward", measured,
                                   numerics_ok=True, verdict=verdict, reason=reason, timing="gpu", device="H100",
                                   numerics_by_provider={"triton": "ok"}, best_provider=best)]
    plan = apply_mod.plan(recommend(result))
    assert plan.runtime_patterns == ["padded_linear"] and not plan.changed
    assert any("padded_linear has no source rewrite; patched at run time" in n for n in plan.notes), plan.notes


def test_aligned_linears_are_no_candidates(data_dir):
    trace = Trace.load(data_dir / "llama-bf16-h200.json.gz")   # hidden 1024, vocab 1024
    findings = find_clusters(trace, load_profile(gpu_name=trace.device_name), pattern_lookup())
    assert not [c for c in findings.clusters if c.pattern == "padded_linear"]
