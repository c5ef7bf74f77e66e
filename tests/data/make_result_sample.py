"""Build tests/data/result-sample.json: an AdvisorResult for the report tests.

    python tests/data/make_result_sample.py      # rewrites tests/data/result-sample.json

What is real: everything `pipeline.analyze` gives for the H200 trace
tests/data/llama-bf16-h200.json.gz (run, summary, kernels, timeline, clusters with their
estimates, the device profile, the launch-bound verdict).
What is invented: the benchmarks and the recommendations (and their dollars), built on the real
clusters, so that the report tests see every kind of row: measured, estimate-only, rejected for
numerics, rejected for speed, not run. The result's `notes` say so, and the report prints notes.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from fusion_advisor.analyzers.trace import Trace
from fusion_advisor.pipeline import analyze

HERE = Path(__file__).resolve().parent
TRACE = HERE / "llama-bf16-h200.json.gz"
OUT = HERE / "result-sample.json"
USD_PER_GPU_HOUR = 3.50


def main() -> None:
    result = analyze(Trace.load(str(TRACE))).to_dict()
    result["trace_path"] = "tests/data/llama-bf16-h200.json.gz"
    result["created_unix"] = 1795314254.0
    step_us = result["run"]["step_time_s_unprofiled"] * 1e6
    result["benchmarks"], result["recommendations"] = bench_and_recommend(result["clusters"], step_us)
    result["notes"] = [
        "SYNTHETIC TEST FIXTURE (tests/data/make_result_sample.py): the analysis is real (H200 trace); "
        "the benchmark timings, numerics verdicts and recommendations are invented for the report tests. "
        "Nothing here was benchmarked."]
    OUT.write_text(compact_json(result) + "\n")
    print(f"wrote {OUT} ({OUT.stat().st_size:,} bytes)")


DIFF_RMS = """\
--- a/examples/llama_train.py
+++ b/examples/llama_train.py
@@ -13,6 +13,7 @@
 import torch
 import torch.nn.functional as F
 from torch import nn
+from fusion_advisor.kernels.rms_norm import RMSNorm
 
 
 class LlamaRMSNorm(nn.Module):
@@ -92,8 +93,8 @@ class LlamaDecoderLayer(nn.Module):
     def __init__(self, hidden, heads, intermediate):
         super().__init__()
-        self.input_layernorm = LlamaRMSNorm(hidden)
+        self.input_layernorm = RMSNorm(hidden)
         self.self_attn = LlamaAttention(hidden, heads)
-        self.post_attention_layernorm = LlamaRMSNorm(hidden)
+        self.post_attention_layernorm = RMSNorm(hidden)
         self.mlp = LlamaMLP(hidden, intermediate)
"""

DIFF_SWIGLU = """\
--- a/examples/llama_train.py
+++ b/examples/llama_train.py
@@ -81,7 +81,7 @@ class LlamaMLP(nn.Module):
         self.down_proj = nn.Linear(intermediate, hidden, bias=False)
 
     def forward(self, x):
-        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
+        return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))
"""


def timing(p50: float) -> dict:
    return {"p20_us": round(p50 * 0.97, 2), "p50_us": round(p50, 2), "p80_us": round(p50 * 1.04, 2),
            "peak_mem_bytes": None}


def roi(saving_us: float, step_us: float) -> dict:
    share = saving_us / step_us
    return {"gpu_hours_per_day": round(24 * share, 3), "usd_per_day": round(24 * share * USD_PER_GPU_HOUR, 2),
            "usd_per_month": round(30 * 24 * share * USD_PER_GPU_HOUR, 2),
            "assumptions": f"1 GPU training around the clock at ${USD_PER_GPU_HOUR:.2f}/GPU-hour; "
                           "saving taken from the unprofiled step time"}


def bench_and_recommend(clusters: list[dict], step_us: float):
    by_pattern = {c["pattern"]: c for c in clusters if c["direction"] == "forward"}
    rms_fwd = by_pattern["rms_norm"]
    rms_bwd = next(c for c in clusters if c["pattern"] == "rms_norm" and c["direction"] == "backward")
    swiglu, rope = by_pattern["swiglu"], by_pattern["rope"]
    generic = next(c for c in clusters if c["pattern"] is None)

    # Per occurrence, forward+backward for rms_norm (one benchmark covers both directions).
    eager_rms = rms_fwd["measured_us_per_occurrence"] + rms_bwd["measured_us_per_occurrence"]
    benches = [
        {"cluster_id": rms_fwd["id"], "pattern": "rms_norm", "params": {"shape": [4, 1024, 1024], "dtype": "bfloat16"},
         "passes": "forward+backward",
         "measured": {"eager": timing(eager_rms), "triton": timing(eager_rms * 0.31),
                      "compile": timing(eager_rms * 0.36), "liger": timing(eager_rms * 0.33)},
         "numerics_ok": True, "numerics_detail": "forward max abs err 7.8e-3, dx 3.9e-3, dweight 1.2e-2 (bf16 tolerances)",
         "verdict": "recommended", "reason": ""},
        {"cluster_id": swiglu["id"], "pattern": "swiglu", "params": {"shape": [4, 1024, 2816], "dtype": "bfloat16"},
         "passes": "forward+backward",
         "measured": {"eager": timing(swiglu["measured_us_per_occurrence"] * 2.6),
                      "triton": timing(swiglu["measured_us_per_occurrence"] * 1.5),
                      "compile": timing(swiglu["measured_us_per_occurrence"] * 1.55)},
         "numerics_ok": True, "numerics_detail": "forward max abs err 3.9e-3, da 7.8e-3, db 7.8e-3 (bf16 tolerances)",
         "verdict": "recommended", "reason": ""},
        {"cluster_id": rope["id"], "pattern": "rope", "params": {"shape": [4, 8, 1024, 128], "dtype": "bfloat16"},
         "passes": "forward+backward",
         "measured": {"eager": timing(rope["measured_us_per_occurrence"] * 2.1),
                      "triton": timing(rope["measured_us_per_occurrence"] * 0.9)},
         "numerics_ok": False, "numerics_detail": "dq max abs err 6.2e-2 > bf16 tolerance 1.6e-2 (atol) at [3, 7, 1023, 64]",
         "verdict": "rejected", "reason": "failed numerics (backward)"},
        {"cluster_id": generic["id"], "pattern": "generic", "params": {}, "passes": "backward", "measured": {},
         "numerics_ok": None, "numerics_detail": "", "verdict": "not run",
         "reason": "no registered pattern matches this chain"},
    ]
    # A replacement that passed numerics but was not faster than eager on these shapes.
    ce = by_pattern["cross_entropy"]["measured_us_per_occurrence"] * 2.2
    benches.insert(2, {"cluster_id": by_pattern["cross_entropy"]["id"], "pattern": "cross_entropy",
                       "params": {"shape": [4096, 1024], "dtype": "float32"}, "passes": "forward+backward",
                       "measured": {"eager": timing(ce), "triton": timing(ce * 1.05), "compile": timing(ce * 0.97)},
                       "numerics_ok": True, "numerics_detail": "loss abs err 2.4e-4, dlogits 9.8e-4",
                       "verdict": "rejected", "reason": "not faster than eager (0.95x) on these shapes"})

    rms_saving = (eager_rms - eager_rms * 0.31) * rms_fwd["occurrences_per_step"]
    sw_saving = swiglu["measured_us_per_occurrence"] * (2.6 - 1.5) * swiglu["occurrences_per_step"]
    gen_est = generic["estimate"]["saving_us"] * generic["occurrences_per_step"]
    recs = [
        {"cluster_id": rms_fwd["id"], "pattern": "rms_norm",
         "title": "Fuse RMSNorm (forward + backward) into one Triton kernel each way",
         "measured_saving_us_per_step": round(rms_saving, 2),
         "estimate_saving_us_per_step": round((rms_fwd["estimate"]["saving_us"] + rms_bwd["estimate"]["saving_us"])
                                              * rms_fwd["occurrences_per_step"], 2),
         "confidence": "measured", "memory_saved_bytes": 4 * 1024 * 1024 * 4 * 8,
         "patch": {"kind": "module_swap", "modules": ["LlamaRMSNorm"], "diff": DIFF_RMS},
         "roi": roi(rms_saving, step_us)},
        {"cluster_id": swiglu["id"], "pattern": "swiglu", "title": "Fuse SiLU(gate) * up (SwiGLU)",
         "measured_saving_us_per_step": round(sw_saving, 2),
         "estimate_saving_us_per_step": round(swiglu["estimate"]["saving_us"] * swiglu["occurrences_per_step"], 2),
         "confidence": "measured", "memory_saved_bytes": None,
         "patch": {"kind": "source", "modules": ["LlamaMLP"], "diff": DIFF_SWIGLU},
         "roi": roi(sw_saving, step_us)},
        {"cluster_id": generic["id"], "pattern": None,
         "title": "Let torch.compile fuse the rotate-half backward chain (no hand-written kernel for it)",
         "measured_saving_us_per_step": None, "estimate_saving_us_per_step": round(gen_est, 2),
         "confidence": "estimate", "memory_saved_bytes": None, "patch": {},
         "roi": roi(gen_est, step_us)},
    ]
    # Kept in this order (measured, estimate, measured), whatever the figures: the tests read each kind.
    recs[1], recs[2] = recs[2], recs[1]
    for rank, r in enumerate(recs, 1):
        r["rank"] = rank
    return benches, recs


def compact_json(obj) -> str:
    """Indented JSON with each timeline/kernel row on one line: small, and still diffable."""
    def default(o):
        if isinstance(o, (np.integer, np.floating, np.bool_)):
            return o.item()
        if isinstance(o, (set, tuple)):
            return list(o)
        raise TypeError(type(o))
    rows = {key: obj[key] for key in ("timeline", "kernels")}
    skeleton = dict(obj, timeline="@timeline@", kernels="@kernels@")
    text = json.dumps(skeleton, indent=1, default=default)
    for key, value in rows.items():
        lines = ",\n  ".join(json.dumps(r, default=default, ensure_ascii=False) for r in value)
        text = text.replace(f'"@{key}@"', "[\n  " + lines + "\n ]")
    return text


if __name__ == "__main__":
    main()
