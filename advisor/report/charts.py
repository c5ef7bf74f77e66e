"""The report's charts as plotly figure specs (plain dicts: `{"data": [...], "layout": {...}}`),
built here so they can be tested without a browser; the HTML page hands them to Plotly.newPlot.

Plotly reads a few HTML tags and entities in text, so every string from the result goes through
`_text` (escaped) before it lands in a label or a hover text.
"""
from __future__ import annotations

import html
import math

from fusion_advisor.cluster_names import where_label
from fusion_advisor.report.base import fmt_us, is_number
from fusion_advisor.report.facts import ReportFacts, waterfall
from fusion_advisor.core.result import AdvisorResult

MEASURED = "#2f6f4f"      # measured figures: solid green
ESTIMATE = "#9a7b2f"      # estimates: ochre, hatched
MEMORY_BOUND = "#3b6ea8"
COMPUTE_BOUND = "#c0612b"
OTHER_KERNEL = "#b8bcc2"
CLUSTER_COLORS = ["#d1495b", "#2e86ab", "#edae49", "#66a182", "#8d6a9f", "#00798c", "#e07a5f", "#3d405b"]
FONT = {"family": "system-ui, -apple-system, 'Segoe UI', Roboto, sans-serif", "size": 12}
MAX_TIMELINE_KERNELS = 6000   # an SVG bar each: past this the page gets slow


def _text(s) -> str:
    return html.escape(str(s), quote=False)


def _layout(**kw) -> dict:
    # The legend sits under the plot and pushes the bottom margin (plotly's automargin): it never
    # covers the data, and the chart's box has a fixed height (see report.js).
    base = {"font": FONT, "margin": {"l": 70, "r": 20, "t": 30, "b": 40}, "hovermode": "closest",
            "paper_bgcolor": "white", "plot_bgcolor": "white",
            "legend": {"orientation": "h", "x": 0, "y": -0.16, "yanchor": "top"}}
    base.update(kw)
    return base


# -- roofline --------------------------------------------------------------------------------
def roofline(result: AdvisorResult, facts: ReportFacts) -> tuple[dict | None, str]:
    """Kernels and clusters under the device's bandwidth and compute roofs, log-log.
    Returns (figure or None, a caption saying what is plotted and what could not be)."""
    points, left_out, left_out_us = [], 0, 0.0
    for k in result.kernels:
        flops, nbytes = k.get("flops_estimate"), k.get("bytes_estimate")
        us, calls = k.get("measured_us_per_step"), k.get("calls_per_step")
        if not all(is_number(v) and v > 0 for v in (flops, nbytes, us, calls)):
            left_out += 1
            left_out_us += us if is_number(us) else 0.0
            continue
        # flops_estimate and bytes_estimate are per step, like measured_us_per_step.
        points.append({"x": flops / nbytes, "y": flops / us / 1e6, "us": us, "k": k})

    cluster_now, cluster_fused = [], []
    for c in result.clusters:
        e = c.estimate
        if not all(is_number(v) and v > 0 for v in (e.flops, e.bytes_now, c.measured_us_per_occurrence)):
            continue
        cluster_now.append((c, e.flops / e.bytes_now, e.flops / c.measured_us_per_occurrence / 1e6))
        if is_number(e.bytes_fused) and e.bytes_fused > 0 and is_number(e.fused_us) and e.fused_us > 0:
            cluster_fused.append((c, e.flops / e.bytes_fused, e.flops / e.fused_us / 1e6))

    device = facts.device
    if not points and not cluster_now:
        return None, ("No kernel in this result has both a byte and a FLOP estimate with a measured time, "
                      "so there is nothing to place on a roofline (the cost model has not run on it).")
    xs = [p["x"] for p in points] + [x for _, x, _ in cluster_now + cluster_fused]
    ys = [p["y"] for p in points] + [y for _, _, y in cluster_now + cluster_fused]
    x_lo, x_hi = min(xs) / 3, max(xs) * 3
    data = []
    if device and device.bw_gbps:
        ridges = [r.tflops * 1e3 / device.bw_gbps for r in device.roofs]
        x_lo, x_hi = min([x_lo] + [r / 30 for r in ridges]), max([x_hi] + [r * 30 for r in ridges])
        xs_roof = _logspace(x_lo, x_hi, 60)
        peak_lines = device.roofs or []
        if not peak_lines:
            data.append(_roof_trace(xs_roof, [device.bw_gbps * x / 1e3 for x in xs_roof],
                                    f"memory roof {device.bw_gbps:,.0f} GB/s", "#444"))
        for i, roof in enumerate(peak_lines):
            ys_roof = [min(device.bw_gbps * x / 1e3, roof.tflops) for x in xs_roof]
            name = f"roof {device.bw_gbps:,.0f} GB/s, {roof.tflops:,.0f} TFLOP/s {_text(roof.label)}"
            data.append(_roof_trace(xs_roof, ys_roof, name, "#333" if i == 0 else "#888", dash="solid" if i == 0 else "dot"))
        ys += [r.tflops for r in peak_lines]
    max_us = max([p["us"] for p in points] or [1.0])
    for bound, label, color in ((True, "memory-bound kernels", MEMORY_BOUND), (False, "compute-bound kernels", COMPUTE_BOUND)):
        sel = [p for p in points if bool(p["k"].get("memory_bound")) is bound]
        if not sel:
            continue
        data.append({
            "type": "scatter", "mode": "markers", "name": label,
            "x": [p["x"] for p in sel], "y": [p["y"] for p in sel],
            "marker": {"color": color, "opacity": 0.75, "line": {"width": 0.5, "color": "white"},
                       "size": [6 + 22 * math.sqrt(p["us"] / max_us) for p in sel]},
            "hovertext": [_kernel_hover(p) for p in sel], "hoverinfo": "text"})
    if cluster_now:
        data.append({"type": "scatter", "mode": "markers", "name": "clusters as they run (measured time)",
                     "x": [x for _, x, _ in cluster_now], "y": [y for _, _, y in cluster_now],
                     "marker": {"symbol": "diamond", "size": 13, "color": MEASURED, "line": {"width": 1, "color": "white"}},
                     "hovertext": [_cluster_hover(c, "as it runs now: estimated FLOPs and bytes, measured time")
                                   for c, _, _ in cluster_now], "hoverinfo": "text"})
    if cluster_fused:
        now = {c.id: (x, y) for c, x, y in cluster_now}
        lx, ly = [], []
        for c, x, y in cluster_fused:
            if c.id in now:
                lx += [now[c.id][0], x, None]
                ly += [now[c.id][1], y, None]
        data.append({"type": "scatter", "mode": "lines", "x": lx, "y": ly, "showlegend": False, "hoverinfo": "skip",
                     "line": {"color": ESTIMATE, "width": 1, "dash": "dot"}})
        data.append({"type": "scatter", "mode": "markers", "name": "clusters fused (estimate)",
                     "x": [x for _, x, _ in cluster_fused], "y": [y for _, _, y in cluster_fused],
                     "marker": {"symbol": "diamond-open", "size": 13, "color": ESTIMATE, "line": {"width": 2}},
                     "hovertext": [_cluster_hover(c, "as one fused kernel: estimate (cost model)")
                                   for c, _, _ in cluster_fused], "hoverinfo": "text"})
    shapes, annotations = [], []
    if device and device.bw_gbps and device.roofs:
        ridge = device.roofs[0].tflops * 1e3 / device.bw_gbps
        shapes.append({"type": "line", "x0": ridge, "x1": ridge, "yref": "paper", "y0": 0, "y1": 1,
                       "line": {"color": "#999", "width": 1, "dash": "dash"}})
        annotations += [
            {"x": math.log10(ridge), "y": 1, "yref": "paper", "xanchor": "right", "yanchor": "top", "showarrow": False,
             "text": "← memory-bound  ", "font": {"color": MEMORY_BOUND}},
            {"x": math.log10(ridge), "y": 1, "yref": "paper", "xanchor": "left", "yanchor": "top", "showarrow": False,
             "text": "  compute-bound →", "font": {"color": COMPUTE_BOUND}}]
    y_lo, y_hi = min(ys) / 3, max(ys) * 2
    layout = _layout(
        height=520, shapes=shapes, annotations=annotations,
        xaxis={"type": "log", "title": {"text": "intensity, FLOP per byte (estimate)"},
               "range": [math.log10(x_lo), math.log10(x_hi)], "gridcolor": "#eee", "automargin": True},
        yaxis={"type": "log", "title": {"text": "TFLOP/s (est. FLOPs ÷ measured time)"},
               "range": [math.log10(y_lo), math.log10(y_hi)], "gridcolor": "#eee", "automargin": True})
    caption = (f"{len(points)} kernels (one point per kernel name, size by GPU time per step) and "
               f"{len(cluster_now)} clusters.")
    if device is None or not device.bw_gbps:
        caption += " No device profile with a bandwidth in this result: the roofs are not drawn."
    if left_out:
        caption += (f" {left_out} kernels ({fmt_us(left_out_us)} per step) are not placed: they do no arithmetic "
                    "(copies, fills) or have no byte estimate, and a log-log chart has no zero.")
    return {"data": data, "layout": layout}, caption


def _logspace(lo: float, hi: float, n: int) -> list[float]:
    a, b = math.log10(lo), math.log10(hi)
    return [10 ** (a + (b - a) * i / (n - 1)) for i in range(n)]


def _roof_trace(xs, ys, name: str, color: str, dash: str = "solid") -> dict:
    return {"type": "scatter", "mode": "lines", "name": name, "x": xs, "y": ys, "hoverinfo": "name",
            "line": {"color": color, "width": 2, "dash": dash}}


def _kernel_hover(p: dict) -> str:
    k = p["k"]
    lines = [f"<b>{_text(k.get('name', '?'))}</b>",
             f"{_text(k.get('kernel_class') or 'kernel')}, {k.get('calls_per_step', 0):g} calls per step",
             f"measured: {fmt_us(k.get('measured_us_per_step'))} per step",
             f"estimate: {p['x']:.3g} FLOP/byte"]
    if is_number(k.get("achieved_gbps")):
        lines.append(f"{k['achieved_gbps']:,.0f} GB/s (estimated bytes ÷ measured time)")
    if k.get("cluster_id"):
        lines.append(f"in cluster {_text(k['cluster_id'])}")
    return "<br>".join(lines)


def _cluster_hover(c, what: str) -> str:
    return "<br>".join([f"<b>{_text(where_label(c))}</b>",
                        f"{_text(c.pattern or 'generic')}: {len(c.kernels)} kernels", what])


# -- step timeline ---------------------------------------------------------------------------
def timeline(result: AdvisorResult) -> tuple[dict | None, str]:
    """One step on the GPU: a bar per kernel on its stream, the clusters' kernels in colour."""
    rows = [r for r in result.timeline if is_number(r.get("start_us")) and is_number(r.get("dur_us"))]
    if not rows:
        return None, "No step timeline in this result."
    shown = rows[:MAX_TIMELINE_KERNELS]
    caption = (f"{len(rows)} kernels of one step, measured (the trace's times, from the step's first kernel). "
               "Gaps are GPU idle time. Kernels in a cluster are coloured by cluster.")
    if len(shown) < len(rows):
        caption += f" The first {len(shown)} are drawn."
    by_time = {}
    for r in shown:
        by_time[r.get("cluster_id")] = by_time.get(r.get("cluster_id"), 0.0) + r["dur_us"]
    cluster_ids = sorted((c for c in by_time if c), key=lambda c: -by_time[c])
    lanes = sorted({str(r.get("stream", "?")) for r in shown})
    names = {c.id: where_label(c) for c in result.clusters}
    data = []
    for i, cid in enumerate([None] + cluster_ids):
        sel = [r for r in shown if r.get("cluster_id") == cid]
        color = OTHER_KERNEL if cid is None else CLUSTER_COLORS[(i - 1) % len(CLUSTER_COLORS)]
        data.append({
            "type": "bar", "orientation": "h", "name": "kernels outside clusters" if cid is None else _text(names.get(cid, cid)),
            "base": [r["start_us"] for r in sel], "x": [r["dur_us"] for r in sel],
            "y": [f"stream {r.get('stream', '?')}" for r in sel], "width": 0.6,
            # A 1-px outline keeps a 2-µs kernel visible on a 30-ms axis.
            "marker": {"color": color, "line": {"color": color, "width": 1}},
            "hovertext": [_timeline_hover(r) for r in sel], "hoverinfo": "text"})
    # Room for the legend under the plot: about two names a row.
    layout = _layout(height=260 + 45 * len(lanes) + 22 * ((len(data) + 1) // 2), barmode="overlay", bargap=0.2,
                     legend={"orientation": "h", "x": 0, "y": -0.25, "yanchor": "top"},
                     margin={"l": 70, "r": 20, "t": 20, "b": 40},
                     xaxis={"title": {"text": "µs from the step's first kernel (measured)"}, "gridcolor": "#eee",
                            "zeroline": False, "automargin": True},
                     yaxis={"categoryorder": "array", "categoryarray": [f"stream {s}" for s in lanes],
                            "automargin": True})
    return {"data": data, "layout": layout}, caption


def _timeline_hover(r: dict) -> str:
    lines = [f"<b>{_text(r.get('name', '?'))}</b>",
             f"starts at {r['start_us']:,.1f} µs, runs {r['dur_us']:,.1f} µs (measured)"]
    if r.get("kernel_class"):
        lines.append(_text(r["kernel_class"]))
    if r.get("cluster_id"):
        lines.append(f"cluster {_text(r.get('cluster_label') or r['cluster_id'])}")
    return "<br>".join(lines)


# -- savings waterfall -----------------------------------------------------------------------
def savings_waterfall(facts: ReportFacts) -> tuple[dict | None, str]:
    """Step time, then the step after each recommendation in rank order."""
    steps = waterfall(facts)
    if not steps:
        why = ("no step time" if facts.step_us is None else
               "no GPU step time (a CPU run's step is no yardstick for GPU savings)" if not facts.gpu_run else
               "no recommendation with a saving")
        return None, f"No waterfall: {why} in this result."
    ms = lambda us: us / 1000.0  # noqa: E731
    labels = [f"step now ({facts.step_basis}, measured)"] + [_text(s["label"]) for s in steps] + ["step after all"]
    data = [{"type": "bar", "name": "step time", "x": [labels[0], labels[-1]],
             "y": [ms(facts.step_us), ms(steps[-1]["after_us"])],
             "marker": {"color": ["#5b6470", "#8a949e"]},
             "text": [fmt_us(facts.step_us), fmt_us(steps[-1]["after_us"])], "textposition": "outside",
             "cliponaxis": False,
             "hovertext": [f"step time ({facts.step_basis}): measured", "what the savings would leave (projection)"],
             "hoverinfo": "text+y"}]
    for basis, color in (("measured", MEASURED), ("estimate", ESTIMATE)):
        sel = [(labels[i + 1], s) for i, s in enumerate(steps) if s["basis"] == basis]
        if not sel:
            continue
        marker = {"color": color}
        if basis == "estimate":
            marker["pattern"] = {"shape": "/", "fillmode": "overlay", "fgcolor": "white", "size": 7, "solidity": 0.35}
        data.append({"type": "bar", "name": f"saving ({basis})", "x": [lab for lab, _ in sel],
                     "base": [ms(s["after_us"]) for _, s in sel], "y": [ms(s["saving_us"]) for _, s in sel],
                     "marker": marker, "text": [f"−{fmt_us(s['saving_us'])}" for _, s in sel],
                     "textposition": "outside", "cliponaxis": False,
                     "hovertext": [f"{_text(s['title'])}<br>saves {fmt_us(s['saving_us'])} per step ({basis})"
                                   for _, s in sel], "hoverinfo": "text"})
    # Savings of a few % vanish on an axis from zero: start it near the end value, and say so.
    after_all = steps[-1]["after_us"]
    yaxis = {"title": {"text": "step time (ms)"}, "gridcolor": "#eee", "automargin": True}
    if after_all > 0.85 * facts.step_us:
        yaxis["range"] = [ms(after_all) * 0.9, ms(facts.step_us) * 1.1]   # room for the labels above the bars
        yaxis["title"]["text"] = "step time (ms; the axis does not start at 0)"
    else:
        yaxis["rangemode"] = "tozero"
    layout = _layout(height=460, barmode="overlay", showlegend=True, yaxis=yaxis, margin={"l": 70, "r": 20, "t": 40, "b": 40},
                     legend={"orientation": "h", "x": 0, "y": -0.3, "yanchor": "top"},
                     xaxis={"categoryorder": "array", "categoryarray": labels, "type": "category", "automargin": True,
                            "tickangle": -30})
    caption = ("From the step time, each recommendation's saving in rank order: measured where bench timed it "
               "(solid), else the cost model's estimate (hatched). The savings are assumed to add up; the last bar "
               "is a projection, not a measurement.")
    return {"data": data, "layout": layout}, caption
