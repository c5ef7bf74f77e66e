"""Build tests/data/result-sample.json: a synthetic AdvisorResult for the report tests.

    .venv/bin/python tests/data/make_result_sample.py      # rewrites tests/data/result-sample.json

What is real: `run`, `summary`, the kernel names, calls and measured times per step (`kernels`,
`kernel_classes`, `timeline`, each cluster's kernels and `measured_us_*`) come from the H200 trace
tests/data/llama-bf16-h200.json.gz through `pipeline.analyze` and the Trace frames.
What is invented: bytes and FLOPs (a crude per-op rule here, not the cost model), the device
profile (H200 datasheet figures), every estimate, every benchmark timing, the numerics verdicts,
the recommendations and their dollars. The result's `notes` say so, and the report prints notes.
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np

from fusion_advisor.analyzers.summary import short_kernel_name
from fusion_advisor.analyzers.trace import Trace
from fusion_advisor.pipeline import analyze

HERE = Path(__file__).resolve().parent
TRACE = HERE / "llama-bf16-h200.json.gz"
OUT = HERE / "result-sample.json"

DEVICE = {"name": "NVIDIA H200 (datasheet)", "calibrated": False, "bw_gbps": 4800.0,
          "tflops": {"bf16": 989.0, "fp32": 67.0}, "launch_us": 2.5}
ITEMSIZE = {"float": 4, "c10::BFloat16": 2, "c10::Half": 2, "double": 8, "long int": 8, "int": 4, "bool": 1}
USD_PER_GPU_HOUR = 3.50


def kernel_class(name: str, op: str) -> str:
    if re.search(r"nvjet|gemm|cutlass|xmma", name):
        return "gemm"
    if re.search(r"sdpa|flash|fmha", name):
        return "attention"
    if name.startswith(("Memcpy", "Memset")) or "copy" in name or op in ("aten::cat", "aten::copy_"):
        return "copy"
    if "reduce" in name or "softmax" in name.lower():
        return "reduction"
    if "elementwise" in name:
        return "elementwise"
    return "other"


def bytes_and_flops(op: str, dims: list, types: list, klass: str) -> tuple[int, int]:
    """A rough per-op rule (inputs read once, one output the size of the largest input)."""
    sizes = []
    for d, t in zip(dims or [], types or []):
        if t == "TensorList":
            sizes += [math.prod(x) * 2 for x in d]
        elif t in ITEMSIZE and isinstance(d, list) and d:
            sizes.append(math.prod(d) * ITEMSIZE[t])
    if not sizes:
        return 0, 0
    if klass == "gemm" and len(dims) >= 2 and len(dims[0]) == 2 and len(dims[1]) == 2:
        (m, k), (_, n) = dims[0], dims[1]
        return 2 * (m * k + k * n + m * n), 2 * m * n * k
    if klass == "attention" and len(dims) >= 3 and len(dims[0]) == 4:
        b, h, s, d = dims[0]
        return sum(sizes) + sizes[0], 4 * b * h * s * s * d // 2  # causal: half the square
    if op == "aten::copy_":  # dst, src: one write, one read
        return sum(sizes[:2]), 0
    if op == "aten::fill_":
        return sizes[0], 0
    if klass == "reduction":  # the output is small
        return sum(sizes), max(sizes) // ITEMSIZE.get(types[0], 4)
    total = sum(sizes) + max(sizes)
    flops = 0 if klass == "copy" else max(sizes) // 2
    return int(total), int(flops)


def main() -> None:
    trace = Trace.load(str(TRACE))
    result = analyze(trace).to_dict()
    result["trace_path"] = "tests/data/llama-bf16-h200.json.gz"
    result["created_unix"] = 1795314254.0
    steps = trace.step_ids
    k = trace.kernel_ops()
    k = k[k["step"].isin(steps)].copy()
    ops = trace.ops
    leaf = ops.loc[k["op_row"].clip(lower=0).to_numpy()]
    k["short"] = [short_kernel_name(n) for n in k["name"]]
    k["leaf"] = leaf["name"].to_numpy()
    k["klass"] = [kernel_class(n, o) for n, o in zip(k["name"], leaf["name"])]
    bf = [bytes_and_flops(o, d, t, c) for o, d, t, c in zip(leaf["name"], leaf["input_dims"], leaf["input_types"], k["klass"])]
    # An op that launches several kernels: its bytes and FLOPs are shared out by kernel time.
    share = k["dur"] / k.groupby(["step", "op_row"])["dur"].transform("sum")
    k["bytes"] = (np.array([b for b, _ in bf]) * share).round().astype("int64")
    k["flops"] = (np.array([f for _, f in bf]) * share).round().astype("int64")
    n_steps = len(steps)
    ridge = DEVICE["tflops"]["bf16"] * 1e3 / DEVICE["bw_gbps"]

    clusters = build_clusters(k, ops, n_steps)
    in_cluster = {}
    for c in clusters:
        for name in c["kernels"]:
            in_cluster.setdefault(name, c["id"])

    kernels = []
    for name, g in k.groupby("short", sort=False):
        calls = len(g) / n_steps
        us = float(g["dur"].sum()) / n_steps
        per_call_bytes, per_call_flops = float(g["bytes"].mean()), float(g["flops"].mean())
        per_call_us = us / calls
        # The rough rule overcounts some ops (gathers, fused cuDNN helpers): keep every point under
        # the bandwidth roof, as a real byte count would be.
        cap = 0.95 * DEVICE["bw_gbps"] * 1e3 * per_call_us
        if per_call_bytes > cap:
            per_call_flops *= cap / per_call_bytes
            per_call_bytes = cap
        intensity = per_call_flops / per_call_bytes if per_call_bytes else None
        gbps = per_call_bytes / per_call_us / 1e3 if per_call_bytes else None
        kernels.append({
            "name": name, "kernel_class": g["klass"].iloc[0], "calls_per_step": round(calls, 2),
            "measured_us_per_step": round(us, 3),
            "bytes_estimate": int(per_call_bytes) or None, "flops_estimate": int(per_call_flops),
            "intensity": round(intensity, 4) if intensity is not None else None,
            "achieved_gbps": round(gbps, 1) if gbps is not None else None,
            "pct_of_peak_bw": round(100 * gbps / DEVICE["bw_gbps"], 2) if gbps is not None else None,
            "memory_bound": intensity is None or intensity < ridge,
            "cluster_id": in_cluster.get(name)})
    kernels.sort(key=lambda r: -r["measured_us_per_step"])

    total = float(k["dur"].sum()) / n_steps
    by_class = k.groupby("klass").agg(calls=("dur", "size"), us=("dur", "sum")).sort_values("us", ascending=False)
    kernel_classes = [{"class": c, "calls_per_step": round(r.calls / n_steps, 2),
                       "measured_us_per_step": round(r.us / n_steps, 3),
                       "pct": round(100 * r.us / n_steps / total, 2)} for c, r in by_class.iterrows()]

    first = k[k["step"] == steps[0]].sort_values("ts")
    t0 = float(first["ts"].min())
    timeline = [{"name": s, "stream": int(st), "start_us": round(float(ts) - t0, 3), "dur_us": round(float(d), 3),
                 "kernel_class": c, "cluster_id": cluster_of_row(row, clusters)}
                for row, s, st, ts, d, c in zip(first.index, first["short"], first["stream"], first["ts"],
                                                first["dur"], first["klass"])]

    result.update(device_profile=DEVICE, kernel_classes=kernel_classes, kernels=kernels, timeline=timeline,
                  clusters=[{k_: v for k_, v in c.items() if not k_.startswith("_")} for c in clusters])
    step_us = result["run"]["step_time_s_unprofiled"] * 1e6
    result["launch_bound"] = {
        "launch_bound": True,
        "verdict": f"launch-bound: the GPU is busy {result['summary']['gpu_busy_pct']:.1f} % of the step",
        "advice": "Fewer launches matter more than faster kernels here: capture the step in CUDA graphs "
                  "(torch.compile(mode='reduce-overhead')), then fuse.",
        "gpu_busy_pct": result["summary"]["gpu_busy_pct"],
        "gpu_idle_us_per_step": result["summary"]["gpu_idle_us_per_step"],
        "kernels_per_step": result["summary"]["kernels_per_step"]}
    result["benchmarks"], result["recommendations"] = bench_and_recommend(clusters, step_us)
    result["notes"] = [
        "SYNTHETIC TEST FIXTURE (tests/data/make_result_sample.py): the run, summary, kernel names and trace "
        "times are real (H200 trace); bytes, FLOPs, estimates, benchmark timings, numerics verdicts and "
        "recommendations are invented for the report tests. Nothing here was benchmarked."]
    OUT.write_text(compact_json(result) + "\n")
    print(f"wrote {OUT} ({OUT.stat().st_size:,} bytes)")


def cluster_of_row(row, clusters) -> str | None:
    for c in clusters:
        if row in c["_rows"]:
            return c["id"]
    return None


def build_clusters(k, ops, n_steps: int) -> list[dict]:
    """Four chains read off the trace: RMSNorm forward and backward, SwiGLU, RoPE (rotate-half),
    plus the loss's log_softmax + nll_loss chain."""
    bwd = k["backward"].astype(bool)  # an object column: `~` on it would not negate
    rms = k["module_class"].fillna("").str.endswith("LlamaDecoderLayer/LlamaRMSNorm")
    attn = k["module_class"].fillna("") == "LlamaModel/LlamaDecoderLayer/LlamaAttention"
    mlp = k["module_class"].fillna("") == "LlamaModel/LlamaDecoderLayer/LlamaMLP"
    pointwise = k["klass"].isin(["elementwise", "copy"]) & ~k["leaf"].str.contains("attention")
    loss = k["module_class"].isna() & k["op_name"].isin(["aten::to", "aten::cross_entropy_loss"])
    specs = [
        ("rms_norm-fwd-llama_train.py:22", "forward", "rms_norm", rms & ~bwd, "llama_train.py:22",
         "LlamaModel/LlamaDecoderLayer/LlamaRMSNorm", None),
        ("rms_norm-bwd-llama_train.py:22", "backward", "rms_norm", rms & bwd, "llama_train.py:22",
         "LlamaModel/LlamaDecoderLayer/LlamaRMSNorm", None),
        ("swiglu-fwd-llama_train.py:84", "forward", "swiglu", mlp & ~bwd, "llama_train.py:84",
         "LlamaModel/LlamaDecoderLayer/LlamaMLP", None),
        ("rope-fwd-llama_train.py:36", "forward", "rope", attn & ~bwd & pointwise,
         "llama_train.py:36", "LlamaModel/LlamaDecoderLayer/LlamaAttention", None),
        ("cross_entropy-fwd-llama_train.py:145", "forward", "cross_entropy", loss & ~bwd,
         "llama_train.py:145", None, None),
        ("generic-bwd-llama_train.py:30", "backward", None, attn & bwd & pointwise,
         "llama_train.py:30", "LlamaModel/LlamaDecoderLayer/LlamaAttention",
         "a cat backward (a slice copy) between the chains breaks producer-to-consumer order"),
    ]
    clusters = []
    for cid, direction, pattern, mask, source, module_class, split in specs:
        sel = k[mask]
        instances = sel.groupby([sel["step"], sel["module"].fillna("(top level)")], sort=False)
        occurrences = instances.ngroups / n_steps
        one = next(iter(instances))[1].sort_values("ts")
        leaf = ops.loc[one["op_row"].clip(lower=0).to_numpy()]
        op_records = [{"name": n, "dims": d, "types": t, "concrete": c, "module": module_class}
                      for n, d, t, c in zip(leaf["name"], leaf["input_dims"], leaf["input_types"], leaf["concrete"])]
        us_step = float(sel["dur"].sum()) / n_steps
        bytes_now = int(one["bytes"].sum())
        flops = int(one["flops"].sum())
        big = max(one["bytes"])
        bytes_fused = int(big * (0.9 if direction == "forward" else 1.6))
        launches = len(one)
        now_us = bytes_now / DEVICE["bw_gbps"] / 1e3 + launches * DEVICE["launch_us"]
        fused_us = bytes_fused / DEVICE["bw_gbps"] / 1e3 + DEVICE["launch_us"]
        saving = now_us - fused_us
        clusters.append({
            "id": cid, "direction": direction, "pattern": pattern, "pattern_params": {},
            "module_class": module_class, "source": source, "ops": op_records,
            "kernels": list(one["short"]), "dtypes": sorted({t for t in leaf["input_types"].explode().dropna()
                                                             if t in ITEMSIZE}),
            "occurrences_per_step": occurrences, "launches_per_step": len(sel) / n_steps,
            "measured_us_per_step": round(us_step, 3),
            "measured_us_per_occurrence": round(us_step / occurrences, 3),
            "estimate": {"profile": DEVICE["name"], "bytes_now": bytes_now, "bytes_fused": bytes_fused, "flops": flops,
                         "now_us": round(now_us, 2), "fused_us": round(fused_us, 2), "saving_us": round(saving, 2),
                         "saving_lo_us": round(0.7 * saving, 2), "saving_hi_us": round(1.2 * saving, 2),
                         "unknown_ops": []},
            "split_reason": split, "memory_bound": True, "_rows": set(sel.index)})
    return clusters


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
    rms_fwd, rms_bwd = by_pattern["rms_norm"], next(c for c in clusters if c["id"].startswith("rms_norm-bwd"))
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
    recs.sort(key=lambda r: -(r["measured_saving_us_per_step"] or r["estimate_saving_us_per_step"]))
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
