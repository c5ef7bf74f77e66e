"""The stages, wired in order. Each stage reads the previous stage's data and nothing else.

profile: capture (run the script under the profiler) -> analyze (trace -> clusters, estimates)
-> bench (time them) -> rank (recommend orders them; apply says what each change is) -> save.
The CLI parses arguments, calls these and prints. The stages are imported when called: analysing
a trace needs neither the capture, the benchmark harness nor apply."""
from __future__ import annotations

import contextlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from fusion_advisor import __version__
from fusion_advisor.analyzers.layout import layout_transposes
from fusion_advisor.analyzers.clusters import ClusterFindings, find_clusters
from fusion_advisor.analyzers.kernel_classes import class_summary
from fusion_advisor.analyzers.launch_bound import analyze_launch_bound
from fusion_advisor.analyzers.summary import short_kernel_name, summarize
from fusion_advisor.analyzers.trace import Trace
from fusion_advisor.cost_model.device import DeviceProfile, load_profile
from fusion_advisor.cost_model.ops import op_cost
from fusion_advisor.cost_model.roofline import is_memory_bound, kernel_time_us, memory_time_us
from fusion_advisor.core.errors import AdvisorError
from fusion_advisor.kernels.lookup import pattern_lookup
from fusion_advisor.core.result import AdvisorResult

DEFAULT_TARGET_GPU = "h100"   # what a CPU-only trace is priced for when no target is named


def run_info_from_trace(trace: Trace) -> dict:
    """What the run was: our stored metadata when the trace came from `profile`, else what the
    trace itself says (any torch.profiler trace has the device properties)."""
    info = dict(trace.run_info)
    info.setdefault("gpu_name", trace.device_name)
    props = (trace.meta.get("deviceProperties") or [{}])[0]
    if props:
        info.setdefault("num_sms", props.get("numSms"))
        info.setdefault("gpu_memory_bytes", props.get("totalGlobalMem"))
        info.setdefault("compute_capability", f"{props.get('computeMajor')}.{props.get('computeMinor')}")
    info.setdefault("cuda_driver_api", trace.meta.get("cuda_driver_version"))
    info["trace_events"] = trace.n_events
    return info


def choose_profile(trace: Trace, target_gpu: str | None) -> tuple[DeviceProfile, str]:
    """The DeviceProfile every estimate uses, and why it was chosen. A named target wins; else
    the trace's own GPU (its calibration, a committed profile, or its datasheet); a CPU-only
    trace, or a GPU we have no figures for, is priced for DEFAULT_TARGET_GPU (and says so)."""
    if target_gpu is not None:
        return load_profile(target=target_gpu), f"--target-gpu {target_gpu}"
    if trace.has_gpu and trace.device_name:
        run = trace.run_info
        try:
            return (load_profile(gpu_name=trace.device_name, driver=run.get("driver"), torch_version=run.get("torch")),
                    "the GPU the trace was recorded on")
        except AdvisorError:
            return (load_profile(target=DEFAULT_TARGET_GPU),
                    f"no figures for the trace's {trace.device_name} (run `fusion-advisor calibrate` on it, or "
                    f"name one with --target-gpu): default target {DEFAULT_TARGET_GPU}")
    return load_profile(target=DEFAULT_TARGET_GPU), f"default target for a CPU-only trace ({DEFAULT_TARGET_GPU})"


def analyze(trace: Trace, target_gpu: str | None = None, spans: list | None = None) -> AdvisorResult:
    """Trace -> AdvisorResult: step summary, kernel classes, roofline points, a step timeline,
    the memory-bound clusters ranked by estimated saving, and the launch-bound verdict. `spans`,
    when given, is filled with each cluster occurrence's span on the GPU (analyzers/annotations.py)."""
    result = AdvisorResult(tool_version=__version__, trace_path=trace.path)
    result.run = run_info_from_trace(trace)
    result.summary = summarize(trace).to_dict()
    result.notes.extend(trace.notes)
    if not trace.step_ids:
        result.notes.append("no ProfilerStep markers in the trace: figures are for the whole trace, not per step")
    profile, why = choose_profile(trace, target_gpu)
    result.device_profile = dict(profile.to_dict(), label=profile.label(), chosen_because=why)
    if not trace.has_gpu:
        result.notes.append(f"no GPU kernels in the trace (CPU-only run): every GPU figure is an estimate for "
                            f"{profile.label()}; nothing on a GPU was measured")
    elif why != "the GPU the trace was recorded on" and trace.device_name:
        result.notes.append(f"measured times are from the trace's {trace.device_name}; estimates are for "
                            f"{profile.label()} ({why})")

    findings = find_clusters(trace, profile, pattern_lookup())
    result.clusters = findings.clusters
    if spans is not None and trace.has_gpu:
        from fusion_advisor.analyzers.annotations import cluster_spans
        spans.extend(cluster_spans(trace, findings.kernel_cluster))
    result.kernel_classes = class_summary(trace)
    result.kernels = roofline_points(trace, findings, profile) if trace.has_gpu else op_points(trace, findings, profile)
    result.timeline = timeline(trace, findings)
    lb = analyze_launch_bound(trace, findings.kernel_memory_bound, findings.clusters)
    result.launch_bound = lb.to_dict() if lb is not None else None
    result.layout = layout_transposes(trace)
    return result


def rank(result: AdvisorResult, roi_options=None) -> AdvisorResult:
    """Rank the recommendations (recommend) and record what applying each one changes (apply)."""
    from fusion_advisor.apply import describe_patches
    from fusion_advisor.recommend import recommend

    return describe_patches(recommend(result, roi_options))


def bench_and_recommend(result: AdvisorResult, bench_options=None, roi_options=None, progress=None) -> AdvisorResult:
    """The stages after `analyze`: time the matched clusters, then rank."""
    from fusion_advisor.bench import bench

    bench(result, bench_options, progress=progress)
    return rank(result, roi_options)


# -- the whole run: capture -> analyze -> bench -> recommend -> save --------------------------------
class Watch:
    """How a caller follows `profile` (the CLI's _Watch draws progress bars and prints notes): any
    object with these methods will do; here every hook does nothing."""

    def notice(self, message: str) -> None:
        """A note for the user while capturing (a previous run set aside, ...)."""

    @contextlib.contextmanager
    def capturing(self):
        """Around the capture; yields its progress callback (n, warmup, active, step source), or None."""
        yield None

    def captured(self, captured) -> None:
        """Right after the capture (capture.CaptureResult): e.g. show the script's traceback."""

    @contextlib.contextmanager
    def analysing(self):
        yield

    @contextlib.contextmanager
    def benchmarking(self):
        """Around bench; yields its progress callback (done, total, label), or None."""
        yield None


@dataclass
class ProfileRun:
    captured: Any                          # capture.CaptureResult: the trace, run.json, the script's error
    result: AdvisorResult | None = None    # None: nothing was recorded to analyse
    result_path: Path | None = None


def profile(options, target_gpu: str | None = None, roi_options=None, bench: bool = True,
            watch: Watch | None = None) -> ProfileRun:
    """Run the script under the profiler (capture.CaptureOptions), analyse the trace it wrote,
    time and rank the replacements, and save OUT/result.json. A script that stopped before any
    step was recorded yields a ProfileRun without a result."""
    from fusion_advisor.capture import capture

    watch = watch or Watch()
    with watch.capturing() as on_step:
        captured = capture(options, progress=on_step, notice=watch.notice)
    watch.captured(captured)
    if captured.exited_before_any_step is not None or captured.trace_path is None:
        return ProfileRun(captured)
    with watch.analysing():
        result = analyze_and_annotate(captured.trace_path, target_gpu)
    result_path = finish(result, Path(options.out_dir), roi_options, bench, watch)
    return ProfileRun(captured, result, result_path)


def finish(result: AdvisorResult, out_dir: Path, roi_options=None, bench: bool = True,
           watch: Watch | None = None) -> Path:
    """The stages after analyze, for one run or a merged torchrun job: bench and rank (or, with
    bench off, estimates only), each change's diff stored while the sources are on this disk
    (a copied result still shows them), then OUT/result.json."""
    watch = watch or Watch()
    if bench:
        with watch.benchmarking() as on_cluster:
            bench_and_recommend(result, None, roi_options, progress=on_cluster)
    else:
        result.notes.append("bench was switched off (--no-bench): every saving is an estimate")
    if result.recommendations:
        from fusion_advisor.report.changes import fill_patch_diffs
        fill_patch_diffs(result)
    result_path = out_dir / "result.json"
    result.save(result_path)
    return result_path


def analyze_and_annotate(trace_path: str, target_gpu: str | None = None) -> AdvisorResult:
    """Analyse our own saved trace and write its clusters into it as annotation tracks (Perfetto
    shows them beside the kernels). A trace that cannot be rewritten keeps its kernels only."""
    from fusion_advisor.analyzers.annotations import span_events
    from fusion_advisor.capture import add_trace_events
    from fusion_advisor.cluster_names import where_label

    spans: list = []
    result = analyze(Trace.load(trace_path), target_gpu=target_gpu, spans=spans)
    if spans:
        names = {c.id: where_label(c) for c in result.clusters}
        try:
            add_trace_events(Path(trace_path), span_events(spans, names))
        except (OSError, ValueError) as exc:
            result.notes.append(f"the clusters were not written into {trace_path} as annotation tracks: {exc}")
    return result


# -- roofline points ------------------------------------------------------------------------------
def _kernel_costs(trace: Trace, findings: ClusterFindings, profile: DeviceProfile) -> tuple[np.ndarray, ...]:
    """(bytes, FLOPs, roofline µs, below the ridge point) per row of trace.kernels, NaN where the
    cost model has no rule. An op's cost is split evenly over the compute kernels it launched; a
    memcpy or memset counts the bytes the trace records for it (a copy reads and writes them)."""
    k = trace.kernels
    n = len(k)
    nbytes, flops, est, below = np.full(n, np.nan), np.full(n, np.nan), np.full(n, np.nan), np.full(n, np.nan)
    kinds = k["kind"].to_numpy()
    recorded = pd.to_numeric(k["bytes"], errors="coerce").to_numpy() if "bytes" in k else np.full(n, np.nan)
    for i in np.flatnonzero(kinds != "kernel"):
        if not np.isnan(recorded[i]):
            nbytes[i] = (2.0 if kinds[i] == "memcpy" else 1.0) * recorded[i]
            flops[i] = 0.0
            est[i] = memory_time_us(nbytes[i], profile)
            below[i] = 1.0
    compute = np.flatnonzero(kinds == "kernel")
    op_rows = k["op_row"].to_numpy()[compute]
    for op_row, rows in pd.Series(compute).groupby(op_rows):
        if op_row < 0:
            continue
        cost = op_cost(findings.op_columns.record(int(op_row)))
        if cost is None:
            continue
        rows = rows.to_numpy()
        nbytes[rows] = cost.bytes / len(rows)
        flops[rows] = cost.flops / len(rows)
        est[rows] = kernel_time_us(cost, profile) / len(rows)
        below[rows] = float(is_memory_bound(cost, profile))
    return nbytes, flops, est, below


def roofline_points(trace: Trace, findings: ClusterFindings, profile: DeviceProfile) -> list[dict]:
    """One roofline point per kernel name (`name`: the trace's full name, unique; `short_name` to
    show), per step: measured time, the cost model's bytes, FLOPs
    and roofline time of the ops that launched it (None where any call has no cost rule),
    achieved bandwidth, memory-boundness, and the cluster most of its calls belong to."""
    k = trace.kernels
    steps = trace.step_ids
    sel = k["step"].isin(steps).to_numpy() if steps else np.ones(len(k), dtype=bool)
    n_steps = max(len(steps), 1)
    nbytes, flops, est, below = _kernel_costs(trace, findings, profile)
    # memory_bound on the chart is the roofline's verdict (below the ridge point: a tiny GEMM can
    # be); where the cost model has no rule, the kernel class's.
    fallback = findings.kernel_memory_bound.reindex(k.index).fillna(False).to_numpy(dtype=float)
    below = np.where(np.isnan(below), fallback, below)
    frame = pd.DataFrame({"name": k["name"].to_numpy(), "dur": k["dur"].to_numpy(), "bytes": nbytes, "flops": flops,
                          "est": est,
                          "cls": findings.kernel_classes.reindex(k.index).to_numpy(),
                          "mb": below,
                          "cluster": findings.kernel_cluster.reindex(k.index).to_numpy()})[sel]
    points = []
    for name, g in frame.groupby("name", sort=False):
        measured = float(g["dur"].sum()) / n_steps
        known = g["bytes"].notna().all()
        b = float(g["bytes"].sum()) / n_steps if known else None
        f = float(g["flops"].sum()) / n_steps if known else None
        e = float(g["est"].sum()) / n_steps if known else None
        gbps = b / measured / 1e3 if b is not None and measured > 0 else None
        clusters = Counter(c for c in g["cluster"] if isinstance(c, str))
        points.append({
            "name": name, "short_name": short_kernel_name(name), "kernel_class": g["cls"].iloc[0],
            "calls_per_step": round(len(g) / n_steps, 3), "measured_us_per_step": round(measured, 3),
            "bytes_estimate": b, "flops_estimate": f,
            "estimate_us_per_step": round(e, 3) if e is not None else None,
            "intensity": (f / b) if b else None,
            "achieved_gbps": round(gbps, 3) if gbps is not None else None,
            "pct_of_peak_bw": round(100.0 * gbps * 1e9 / profile.hbm_bytes_per_s, 2) if gbps is not None else None,
            "memory_bound": bool(g["mb"].mean() >= 0.5),
            "cluster_id": clusters.most_common(1)[0][0] if clusters else None,
        })
    points.sort(key=lambda p: -p["measured_us_per_step"])
    return points


def op_points(trace: Trace, findings: ClusterFindings, profile: DeviceProfile) -> list[dict]:
    """CPU-only trace: one point per name of the ops that would launch kernels on the target GPU,
    every figure an estimate (nothing was measured on a GPU: `measured_us_per_step` is None)."""
    n_steps = max(len(trace.step_ids), 1)
    by_name: dict[str, dict] = {}
    for row, cls in zip(findings.unit_ops, findings.unit_classes):
        record = findings.op_columns.record(row)
        cost = op_cost(record)
        p = by_name.setdefault(record.name, {
            "name": record.name, "short_name": record.short, "kernel_class": cls, "calls_per_step": 0.0,
            "measured_us_per_step": None, "bytes_estimate": 0.0, "flops_estimate": 0.0, "estimate_us_per_step": 0.0,
            "intensity": None, "achieved_gbps": None, "pct_of_peak_bw": None, "memory_bound": True,
            "cluster_id": None, "_clusters": Counter(), "_unknown": False})
        p["calls_per_step"] += 1 / n_steps
        if cost is None:
            p["_unknown"] = True
        else:
            p["bytes_estimate"] += cost.bytes / n_steps
            p["flops_estimate"] += cost.flops / n_steps
            p["estimate_us_per_step"] += kernel_time_us(cost, profile) / n_steps
            p["memory_bound"] = p["memory_bound"] and is_memory_bound(cost, profile)
        if row in findings.op_cluster:
            p["_clusters"][findings.op_cluster[row]] += 1
    points = []
    for p in by_name.values():
        clusters, unknown = p.pop("_clusters"), p.pop("_unknown")
        p["cluster_id"] = clusters.most_common(1)[0][0] if clusters else None
        if unknown:   # some calls have no cost rule: no partial sums
            p.update(bytes_estimate=None, flops_estimate=None, estimate_us_per_step=None, memory_bound=None)
        elif p["bytes_estimate"]:
            p["intensity"] = p["flops_estimate"] / p["bytes_estimate"]
        p["calls_per_step"] = round(p["calls_per_step"], 3)
        points.append(p)
    return sorted(points, key=lambda p: -(p["estimate_us_per_step"] or 0.0))


# -- timeline -------------------------------------------------------------------------------------
def timeline(trace: Trace, findings: ClusterFindings) -> list[dict]:
    """The GPU activity of one representative step (the one with the median GPU window)."""
    k = trace.kernels
    if k.empty:
        return []
    steps = trace.step_ids
    if steps:
        windows = k[k["step"].isin(steps)].groupby("step").apply(lambda g: g["end"].max() - g["ts"].min())
        if windows.empty:
            return []
        ordered = windows.sort_values(kind="stable")
        step = ordered.index[(len(ordered) - 1) // 2]
        g = k[k["step"] == step]
    else:
        g = k
    g = g.sort_values("ts", kind="stable")
    t0 = float(g["ts"].min())
    cls = findings.kernel_classes.reindex(g.index).to_numpy()
    cid = findings.kernel_cluster.reindex(g.index).to_numpy()
    return [{"name": short_kernel_name(name), "stream": int(stream), "start_us": round(float(ts) - t0, 3),
             "dur_us": round(float(dur), 3), "kernel_class": c, "cluster_id": i if isinstance(i, str) else None}
            for name, stream, ts, dur, c, i in zip(g["name"], g["stream"], g["ts"], g["dur"], cls, cid)]
