"""The HTML report: one self-contained file that opens offline.

The page is `assets/report.html` with its placeholders filled once: the CSS and scripts from
`assets/`, plotly.js (from the plotly package) inlined once, the body built here, the chart specs
(`charts.py`) and the AdvisorResult itself as JSON. Nothing is fetched (the page's Content-Security-
Policy forbids it). Every string from the result is escaped: the body through `el()`, which escapes
(markupsafe.escape) whatever is not already Markup, the JSON through `_script_json`.
"""
from __future__ import annotations

import json
import math
import re
import time
from functools import lru_cache
from importlib import resources
from pathlib import Path

from markupsafe import Markup, escape

from fusion_advisor import __version__
from fusion_advisor.cluster_names import short_source, where_label
from fusion_advisor.report import charts
from fusion_advisor.report.ranks import job_facts
from fusion_advisor.report.base import Renderer, fmt_bytes, fmt_num, fmt_pct, fmt_usd, fmt_us, is_number
from fusion_advisor.report.changes import Change, next_steps, recommendation_changes
from fusion_advisor.report.facts import (BenchRow, RankedRow, ReportFacts, assumptions_text,
                                         launch_bound_headline, report_facts, sentence)
from fusion_advisor.core.files import write_text_atomic
from fusion_advisor.core.result import AdvisorResult


# -- a small element builder: text is escaped unless it is Markup (MarkupSafe) -----------------
def _flat(children):
    for c in children:
        if isinstance(c, (list, tuple)):
            yield from _flat(c)
        elif c is not None and c is not False:
            yield c


def el(tag: str, *children, **attrs) -> Markup:
    """<tag attrs>children</tag>; `class_="x"` -> class="x", `data_figure="y"` -> data-figure="y"."""
    parts = []
    for key, value in attrs.items():
        if value is None or value is False:
            continue
        name = key.rstrip("_").replace("_", "-")
        parts.append(f" {name}" if value is True else f' {name}="{escape(str(value))}"')
    body = Markup("").join(escape(c) if not isinstance(c, Markup) else c for c in _flat(children))
    return Markup(f"<{tag}{''.join(parts)}>{body}</{tag}>")


def tag(basis: str) -> Markup:
    """The measured / estimate label that goes with every figure."""
    return el("span", basis, class_=f"tag {basis}")


def join(*parts) -> Markup:
    return Markup("").join(escape(str(p)) if not isinstance(p, Markup) else p for p in _flat(parts))


def num_cell(text, *extra) -> Markup:
    return el("td", text, *extra, class_="num")


# -- the page ----------------------------------------------------------------------------------
class HTMLRenderer(Renderer):
    name = "html"
    extension = "html"

    def __init__(self, result_path: str | None = None):
        self.result_path = result_path   # named in the `apply` commands the page ends with

    def render(self, result: AdvisorResult) -> str:
        facts = report_facts(result)
        changes = recommendation_changes(result, self.result_path)
        figures, captions = {}, {}
        for key, (fig, caption) in (("waterfall", charts.savings_waterfall(facts)),
                                    ("roofline", charts.roofline(result, facts)),
                                    ("timeline", charts.timeline(result))):
            captions[key] = caption
            if fig is not None:
                figures[key] = fig
        body = el("main", _header(result, facts), _notices(result, facts), _ranked(facts),
                  _details(facts, changes),
                  _chart_section("waterfall", "Savings per step", figures, captions),
                  _chart_section("roofline", "Roofline: kernels and clusters under the GPU's roofs", figures, captions),
                  _chart_section("timeline", "One step on the GPU", figures, captions),
                  _rejected(facts), _clusters(facts), _where_time_goes(result), _ranks(result),
                  _run(result), _apply_it(facts, changes, self.result_path), _footer(result))
        values = {
            "version": str(escape(__version__)),
            "title": str(escape(f"fusion-advisor: {Path(facts.script).name} on {facts.gpu}")),
            "error_capture_js": _asset("error_capture.js"),
            "css": _asset("report.css"),
            "body": body,
            "figures_json": _script_json(figures),
            "result_json": _script_json(result.to_dict()),
            "plotly_js": _plotly_js(),
            "report_js": _asset("report.js"),
        }
        # One pass over the template: a placeholder-like string inside a value is never expanded.
        return re.sub(r"\{\{(\w+)\}\}", lambda m: values[m.group(1)], _asset("report.html"))


def render(result: AdvisorResult, result_path: str | None = None) -> str:
    return HTMLRenderer(result_path).render(result)


def write_html(result: AdvisorResult, path: str | Path, result_path: str | None = None) -> str:
    """Render and write atomically; raises OutputError (exit 4) when the path cannot be written."""
    text = render(result, result_path)
    write_text_atomic(Path(path), text)
    return str(path)


def default_html_path(result_path: str | Path) -> Path:
    """report.html beside result.json; beside any other name, the same stem: runs/a.json -> runs/a.html."""
    p = Path(result_path)
    return p.with_name("report.html") if p.name == "result.json" else p.with_suffix(".html")


@lru_cache(maxsize=None)
def _asset(name: str) -> str:
    return resources.files("fusion_advisor.report").joinpath("assets", name).read_text(encoding="utf-8")


@lru_cache(maxsize=1)
def _plotly_js() -> str:
    from plotly.offline import get_plotlyjs
    js = get_plotlyjs()
    # Inside <script>, only "</script" (any case) can end the element early.
    return re.sub(r"</(script)", r"<\\/\1", js, flags=re.IGNORECASE)


def _finite(obj):
    """NaN and infinities to null: JSON.parse rejects them."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def _script_json(obj) -> str:
    """JSON safe inside <script type="application/json">: no <, > or & survive as such."""
    text = json.dumps(_finite(obj), ensure_ascii=False, default=str, allow_nan=False)
    return (text.replace("&", "\\u0026").replace("<", "\\u003c").replace(">", "\\u003e")
            .replace("\u2028", "\\u2028").replace("\u2029", "\\u2029"))


# -- sections ----------------------------------------------------------------------------------
def code(text) -> Markup:
    """A token that must not break mid-way (a file:line, a module path, a kernel name)."""
    return el("code", text, class_="tok")


def ticks(text: str) -> Markup:
    """Plain text whose `backquoted` words are code (the terminal shows the backquotes)."""
    parts = str(text).split("`")
    if len(parts) % 2 == 0:   # an unpaired backquote: the text stays as it is
        return escape(text)
    return join([code(p) if i % 2 else p for i, p in enumerate(parts)])


def scroll(table: Markup) -> Markup:
    """Every table scrolls sideways inside its own box: the page never does."""
    return el("div", table, class_="scroll")


def _header(result: AdvisorResult, facts: ReportFacts) -> Markup:
    created = result.created_unix
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(created)) if is_number(created) else None
    sub = join(code(Path(facts.script).name), " on ", el("strong", facts.gpu),
               f" · {facts.versions}" if facts.versions else "", f" · {when}" if when else "")
    return join(el("h1", "fusion-advisor report"), el("p", sub, class_="sub"), _cards(result, facts))


def _cards(result: AdvisorResult, facts: ReportFacts) -> Markup:
    s = result.summary
    step_label = "Step time" if facts.gpu_run else "Step time (CPU)"
    cards = [_card(step_label, fmt_us(facts.step_us), tag("measured"),
                   detail=f"{facts.step_basis} wall time per step" if facts.step_basis else "no step time")]
    if facts.gpu_busy_pct is not None:
        cards.append(_card("GPU busy", fmt_pct(facts.gpu_busy_pct), tag("measured"),
                           detail=f"{fmt_us(s.get('gpu_busy_us_per_step'))} busy, {fmt_us(s.get('gpu_idle_us_per_step'))} "
                                  f"idle, {fmt_num(s.get('kernels_per_step'))} kernels per step (profiled)"))
    step = facts.step_us if facts.gpu_run else None   # a CPU step is no yardstick for a GPU saving
    saving_lines = []
    if facts.measured_saving_us is not None:
        saving_lines.append(el("div", el("span", fmt_us(facts.measured_saving_us), class_="value"), tag("measured"),
                               _share(facts.measured_saving_us, step)))
    if facts.estimate_saving_us is not None:
        saving_lines.append(el("div", el("span", fmt_us(facts.estimate_saving_us), class_="value"), tag("estimate"),
                               _share(facts.estimate_saving_us, step)))
    if not saving_lines:
        saving_lines.append(el("div", "—", class_="value"))
    detail = ("over all recommendations, assuming they add up" if facts.gpu_run else
              f"on {facts.target_gpu or 'the target GPU'} (estimate); not comparable with this CPU step time")
    cards.append(el("div", el("div", "Potential saving per step", class_="label"), saving_lines,
                    el("div", detail, class_="detail"), class_="card"))
    if facts.gpu_run:
        usd_lines = []
        if facts.usd_per_month_measured is not None:
            usd_lines.append(el("div", el("span", fmt_usd(facts.usd_per_month_measured), class_="value"), tag("measured")))
        if facts.usd_per_month_estimate is not None:
            usd_lines.append(el("div", el("span", fmt_usd(facts.usd_per_month_estimate), class_="value"), tag("estimate")))
        assumptions = next((r.rec.roi.get("assumptions") for r in facts.ranked if (r.rec.roi or {}).get("assumptions")), None)
        cards.append(el("div", el("div", "$ per month", class_="label"), usd_lines or el("div", "—", class_="value"),
                        el("div", assumptions_text(assumptions) if assumptions else "no cost figures in this result",
                           class_="detail"), class_="card"))
    d = facts.device
    if d is None:
        cards.append(_card("Device profile", "none", detail="no estimate in this result used a device profile"))
    else:
        roofs = ", ".join(f"{r.tflops:,.0f} TFLOP/s {r.label}" for r in d.roofs)
        bw = f"{d.bw_gbps:,.0f} GB/s" if d.bw_gbps else "no bandwidth"
        cards.append(el("div", el("div", "Device profile used for estimates", class_="label"),
                        el("div", d.name, class_="value small"),
                        el("div", el("span", d.basis, class_="ok" if d.calibrated else "none"), class_="detail"),
                        el("div", f"{bw}; {roofs}" if roofs else bw, class_="detail"), class_="card"))
    return el("section", cards, class_="cards")


def _card(label: str, value: str, *badges, detail: str = "") -> Markup:
    return el("div", el("div", label, class_="label"), el("div", value, *badges, class_="value"),
              el("div", detail, class_="detail") if detail else None, class_="card")


def _share(us: float, step_us: float | None) -> Markup | None:
    return el("small", f" {100 * us / step_us:.1f} % of the step") if step_us else None


_EVIDENCE = {"gpu_busy_share_unprofiled": ("GPU busy, unprofiled", "share"),
             "launch_wait_share": ("GPU window spent waiting for launches", "share"),
             "memory_bound_share": ("GPU time in memory-bound kernels", "share"),
             "kernels_per_step": ("kernels per step", "num"),
             "cpu_us_per_launch": ("CPU time per launch", "us"),
             "fusion_saving_estimate_us_per_step": ("fusion saving per step (estimate)", "us")}


def _notices(result: AdvisorResult, facts: ReportFacts) -> Markup:
    out = [el("div", el("strong", "Note:"), note, class_="note") for note in result.notes]
    lb = result.launch_bound
    headline = launch_bound_headline(lb)
    if headline:
        head, advice, bound = headline
        evidence = []
        for key, (label, kind) in _EVIDENCE.items():
            v = lb.get(key)
            if is_number(v):
                text = fmt_pct(100 * v, 0) if kind == "share" else fmt_us(v) if kind == "us" else fmt_num(v)
                evidence.append(el("tr", el("th", label), num_cell(text)))
        out.append(el("div", el("p", el("strong", f"The step is {head}.")), el("p", advice) if advice else None,
                      el("details", el("summary", "the evidence"), scroll(el("table", el("tbody", evidence), class_="compact")))
                      if evidence else None,
                      class_="verdict bound" if bound else "verdict", id="launch-bound"))
    if result.clusters and not facts.bench_ran:
        why = facts.bench_not_run_why or ["this result holds no benchmark (bench has not run on it)"]
        out.append(el("div", el("p", el("strong", "Not benchmarked: "), f"{'; '.join(why)}."),
                      el("p", "Every saving in this report is an estimate from the cost model: nothing was timed, "
                              "and no replacement's numerics were checked."), class_="notice", id="not-run"))
    elif not result.clusters:
        out.append(el("div", "This result has no clusters: the cluster analysis found none, or has not run on it.",
                      class_="notice", id="no-clusters"))
    return join(out)


def _now_text(e) -> str:
    """The "now" an estimated saving starts from: the trace's time of the kernels where it timed them
    (cost_model.roofline.cluster_estimate), else the roofline's."""
    if e is None:
        return "—"
    if is_number(e.now_traced_us):
        return f"{fmt_us(e.now_traced_us)} (trace)"
    return fmt_us(e.now_us)


def _saving_cell(x, basis: str = "") -> Markup:
    if not is_number(x):
        return el("td", "—", class_="num none")
    if basis == "estimate" and x <= 0:
        return el("td", "no gain", class_="num none", title=f"the cost model predicts {fmt_us(x)}")
    return num_cell(fmt_us(x))


def _numerics(bench) -> Markup:
    if bench is None or bench.numerics_ok is None:
        return el("span", "not checked", class_="none")
    return el("span", "ok", class_="ok") if bench.numerics_ok else el("span", "failed", class_="bad")


def _where(row_cluster, fallback: str) -> str:
    if row_cluster is None:
        return fallback
    return row_cluster.source or row_cluster.module_class or row_cluster.id


def _ranked(facts: ReportFacts) -> Markup:
    if not facts.ranked:
        return el("section", el("h2", "Recommendations"),
                  el("p", "No recommendation: nothing was both faster and numerically equal on these shapes, "
                          "or no stage has ranked this result yet."), id="ranked")
    usd = facts.gpu_run
    head = el("tr", el("th", "#"), el("th", "recommendation"), el("th", "where"), el("th", "×/step", class_="num"),
              el("th", "saving/step ", tag("measured"), class_="num"), el("th", "saving/step ", tag("estimate"), class_="num"),
              el("th", "$/month", class_="num") if usd else None, el("th", "numerics"))
    rows = []
    for row in facts.ranked:
        rec, c = row.rec, row.cluster
        money = join(fmt_usd(row.usd_per_month), tag(row.basis)) if row.usd_per_month is not None else "—"
        rows.append(el("tr", el("td", f"{rec.rank}"),
                       el("td", el("a", rec.title, href=f"#rec-{rec.rank}"), el("div", rec.pattern or "", class_="caption"),
                          class_="title"),
                       el("td", code(short_source(_where(c, rec.cluster_id)))),
                       num_cell(fmt_num(c.occurrences_per_step) if c else "—"),
                       _saving_cell(rec.measured_saving_us_per_step), _saving_cell(rec.estimate_saving_us_per_step, "estimate"),
                       num_cell(money) if usd else None, el("td", _numerics(row.bench), class_="nowrap"), class_="rec-row",
                       data_rank=rec.rank))
    return el("section", el("h2", "Recommendations, ranked"),
              el("p", "Ranked by time saved per step: measured where bench timed the replacement, else the "
                      "cost model's estimate. Each links to its change below.", class_="caption"),
              scroll(el("table", el("thead", head), el("tbody", rows), id="ranked-table")), id="ranked")


def _chart_section(key: str, title: str, figures: dict, captions: dict) -> Markup:
    chart = None
    if key in figures:
        height = int(figures[key]["layout"].get("height") or 420)
        chart = el("div", class_="chart", data_figure=key, id=f"chart-{key}", style=f"height:{height}px")
    return el("section", el("h2", title), chart, el("p", captions.get(key, ""), class_="caption"), id=key)


def _details(facts: ReportFacts, changes: dict[int, Change]) -> Markup:
    if not facts.ranked:
        return Markup("")
    return el("section", el("h2", "Each recommendation and its change"),
              [_recommendation(row, changes.get(row.rec.rank), i == 0) for i, row in enumerate(facts.ranked)],
              id="details")


def _recommendation(row: RankedRow, change: Change | None, first: bool) -> Markup:
    rec, c, b = row.rec, row.cluster, row.bench
    parts = [el("h3", f"#{rec.rank} ", rec.title)]
    if rec.detail:
        parts.append(el("p", ticks(rec.detail), class_="caption"))
    parts.append(_change(rec, change, first))
    facts_list = [("cluster", code(rec.cluster_id))]
    if c is not None:
        facts_list += [("source", code(c.source or "unknown")), ("module", code(c.module_class or "—")),
                       ("direction", c.direction), ("pattern", code(c.pattern or "none")),
                       ("occurrences per step", fmt_num(c.occurrences_per_step)),
                       ("launches per step", fmt_num(c.launches_per_step)),
                       ("dtypes", ", ".join(map(str, c.dtypes)) or "—")]
        if c.split_reason:
            facts_list.append(("chain ends because", c.split_reason))
        for note in c.notes:
            facts_list.append(("note", note))
    if rec.memory_saved_bytes:
        facts_list.append(("memory saved", fmt_bytes(rec.memory_saved_bytes)))
    evidence = [el("dl", [[el("dt", k), el("dd", v)] for k, v in facts_list], class_="facts"), _before_after(row)]
    if b is not None:
        detail = f": {b.numerics_detail}" if b.numerics_detail else ""
        evidence.append(el("p", el("strong", "Numerics "), f"({b.passes}): ", _numerics(b), detail))
    else:
        evidence.append(el("p", el("strong", "Numerics: "), el("span", "not checked: no benchmark for this cluster",
                                                                class_="none")))
    roi = rec.roi or {}
    if roi and is_number(roi.get("usd_per_month")) and row.gpu_run:
        evidence.append(el("p", el("strong", "Return: "),
                           f"{fmt_usd(roi.get('usd_per_month'))} per month, {fmt_usd(roi.get('usd_per_day'))} per day, "
                           f"{fmt_num(roi.get('gpu_hours_per_day'))} GPU-hours per day ", tag(row.basis),
                           el("div", assumptions_text(roi.get("assumptions")), class_="caption")))
    if c is not None:
        evidence.append(_ops_and_kernels(c))
    parts.append(el("details", el("summary", "Evidence: figures, numerics, ops and kernels"), evidence,
                    class_="evidence"))
    return el("article", parts, class_="rec", id=f"rec-{rec.rank}")


def _diff_pre(text: str, ident: str) -> Markup:
    lines = []
    for line in str(text).splitlines():
        kind = ("file" if line.startswith(("+++", "---")) else "hunk" if line.startswith("@@")
                else "add" if line.startswith("+") else "del" if line.startswith("-") else "ctx")
        lines.append(el("span", line or " ", class_=kind))
    return el("pre", lines, class_="diff", id=ident)


def _copyable(summary, pre: Markup, ident: str, open_: bool) -> Markup:
    return el("details", el("summary", summary),
              el("button", "Copy", type="button", class_="copy", data_copy=ident, title="copy to the clipboard"),
              pre, class_="change-box", open=open_)


def _change(rec, change: Change | None, first: bool) -> Markup:
    """The change itself: the diff `apply` writes, the runtime patch it makes, or what to do by hand."""
    if change is None:
        return el("div", el("p", "No change was planned for this recommendation.", class_="none"), class_="change")
    out = [el("p", el("strong", "What apply does: "), ticks(change.action), class_="action")]
    n = rec.rank
    if change.diff:
        count = sum(1 for ln in change.diff.splitlines() if ln[:1] in "+-" and ln[:3] not in ("+++", "---"))
        out.append(_copyable(ticks(f"The diff `apply` writes ({count} lines changed)"), _diff_pre(change.diff, f"diff-{n}"),
                             f"diff-{n}", first))
    if change.runtime:
        lines = "".join(f"- {_swap_from(x)}\n+ {_swap_to(x)}\n" for x in change.runtime)
        out.append(_copyable(ticks("The runtime patch (this model instance; `apply --verify` runs it)"),
                             _diff_pre(lines, f"runtime-{n}"), f"runtime-{n}", first and not change.diff))
        out.append(_copyable("To keep it: add to your script", el("pre", change.runtime_snippet, class_="code",
                                                                    id=f"snippet-{n}"), f"snippet-{n}", False))
    if change.kernel_code:
        out.append(_copyable(f"The generated kernel ({change.kernel_file})",
                             el("pre", change.kernel_code, class_="code", id=f"kernel-{n}"), f"kernel-{n}",
                             first and not change.diff and not change.runtime))
    for note in change.notes:
        if note not in change.action:   # the action may already say it
            out.append(el("p", ticks(note), class_="caption"))
    if change.by_hand:
        out.append(el("p", el("strong", "By hand: "), ticks(change.by_hand), class_="caption"))
    return el("div", out, class_="change")


def _swap_from(line: str) -> str:
    return line.split(" -> ", 1)[0]


def _swap_to(line: str) -> str:
    return line.split(" -> ", 1)[-1]


def _before_after(row: RankedRow) -> Markup:
    rec, c, b = row.rec, row.cluster, row.bench
    e = c.estimate if c is not None else None
    m = BenchRow(b, c) if b is not None else None
    timing = lambda p: _timing_text(b, p) if b is not None else "—"  # noqa: E731
    if b is not None and b.measured:
        measured_head = join("measured ", tag("measured"), el("div", f"bench, {b.passes}, p50 [p20–p80]", class_="caption"))
    else:
        why = (b.reason if b is not None and b.reason else "no benchmark for this cluster")
        measured_head = join("measured: not timed", el("div", why, class_="caption"))
    estimate_head = join("estimate ", tag("estimate"),
                         el("div", f"cost model, {e.profile}" if e and e.profile else "cost model", class_="caption"))
    rows = [
        ("per occurrence, as it runs now", _now_text(e), timing("eager")),
        ("per occurrence, fused (Triton)", fmt_us(e.fused_us) if e else "—", timing("triton")),
    ]
    for provider, label in (("compile", "per occurrence, torch.compile"), ("liger", "per occurrence, Liger-Kernel")):
        if b is not None and provider in b.measured:
            rows.append((label, "—", timing(provider)))
    if m is not None and m.speedup:
        rows.append(("speed-up over eager", "—", f"{m.speedup:.2f}×"))
    if e is not None:
        rows.append(("bytes per occurrence, now → fused", f"{fmt_bytes(e.bytes_now)} → {fmt_bytes(e.bytes_fused)}", "—"))
    est = rec.estimate_saving_us_per_step
    rows.append(("saving per step", "no gain" if is_number(est) and est <= 0 else fmt_us(est),
                 fmt_us(rec.measured_saving_us_per_step)))
    table_rows = [el("tr", el("td", label), num_cell(est_), num_cell(meas)) for label, est_, meas in rows]
    trace_note = (f"In the trace (measured, profiled): {fmt_us(c.measured_us_per_occurrence)} per occurrence, "
                  f"{fmt_us(c.measured_us_per_step)} per step." if c is not None else "")
    return join(scroll(el("table", el("thead", el("tr", el("th", ""), el("th", estimate_head, class_="num"),
                                                 el("th", measured_head, class_="num"))),
                          el("tbody", table_rows), class_="before-after")),
                el("p", trace_note, class_="caption") if trace_note else None)


def _timing_text(bench, provider: str) -> str:
    t = bench.measured.get(provider)
    if t is None or not is_number(t.p50_us):
        return "—"
    return f"{fmt_us(t.p50_us)} [{fmt_us(t.p20_us)}–{fmt_us(t.p80_us)}]"


def _ops_and_kernels(c) -> Markup:
    op_rows = []
    for op in c.ops:
        if not isinstance(op, dict):
            continue
        op_rows.append(el("tr", el("td", code(op.get("name", "?"))),
                          el("td", code(json.dumps(op.get("dims", []), default=str))),
                          el("td", code(", ".join(map(str, op.get("types") or []))))))
    ops = el("details", el("summary", f"{len(c.ops)} ops of one occurrence"),
             scroll(el("table", el("thead", el("tr", el("th", "op"), el("th", "input dims"), el("th", "input types"))),
                       el("tbody", op_rows))))
    kernels = el("details", el("summary", f"{len(c.kernels)} kernels of one occurrence"),
                 el("div", el("ol", [el("li", code(k)) for k in c.kernels]), class_="scroll"))
    return join(ops, kernels)


def _rejected(facts: ReportFacts) -> Markup:
    parts = [el("h2", "Rejected replacements")]
    if facts.rejected:
        head = el("tr", el("th", "pattern"), el("th", "cluster"), el("th", "why rejected"), el("th", "numerics"),
                  el("th", "eager p50 ", tag("measured"), class_="num"), el("th", "Triton p50 ", tag("measured"), class_="num"),
                  el("th", "torch.compile p50 ", tag("measured"), class_="num"), el("th", "speed-up", class_="num"))
        rows = []
        for r in facts.rejected:
            b = r.bench
            rows.append(el("tr", el("td", code(b.pattern)), el("td", code(short_source(_where(r.cluster, b.cluster_id)))),
                           el("td", b.reason or b.verdict, class_="why"),
                           el("td", _numerics(b), el("div", b.numerics_detail, class_="caption") if b.numerics_detail else None),
                           num_cell(fmt_us(r.p50("eager"))), num_cell(fmt_us(r.p50("triton"))),
                           num_cell(fmt_us(r.p50("compile"))),
                           num_cell(f"{r.speedup:.2f}×" if r.speedup else "—"), class_="rejected-row"))
        parts.append(el("p", "Replacements that failed the numerics check or were not faster on these shapes: "
                             "not recommended.", class_="caption"))
        parts.append(scroll(el("table", el("thead", head), el("tbody", rows), id="rejected-table")))
    else:
        parts.append(el("p", "None." if facts.bench_ran else "None: no replacement was benchmarked.", class_="caption"))
    if facts.not_run:
        items = [el("li", code(short_source(_where(r.cluster, r.bench.cluster_id))), " (", code(r.bench.pattern), "): ",
                    sentence(r.bench.reason or "not run")) for r in facts.not_run]
        parts.append(el("details", el("summary", f"Not benchmarked ({len(items)})"), el("ul", items)))
    return el("section", parts, id="rejected")


def _clusters(facts: ReportFacts) -> Markup:
    if not facts.clusters:
        return Markup("")
    head = el("tr", el("th", "cluster"), el("th", "dir"), el("th", "pattern"), el("th", "×/step", class_="num"),
              el("th", "kernels", class_="num"), el("th", "time/step ", tag("measured"), class_="num"),
              el("th", "now → fused per occurrence ", tag("estimate"), class_="num"),
              el("th", "saving/step ", tag("estimate"), class_="num"), el("th", "chain ends because"))
    rows = []
    for c in facts.clusters:
        e = c.estimate
        per_step = e.saving_us * c.occurrences_per_step if is_number(e.saving_us) and is_number(c.occurrences_per_step) else None
        rows.append(el("tr", el("td", code(where_label(c)), el("div", code(c.module_class or ""), class_="caption")),
                       el("td", c.direction), el("td", code(c.pattern or "—")), num_cell(fmt_num(c.occurrences_per_step)),
                       num_cell(str(len(c.kernels))), num_cell(fmt_us(c.measured_us_per_step)),
                       num_cell(f"{_now_text(e)} → {fmt_us(e.fused_us)}"), _saving_cell(per_step, "estimate"),
                       el("td", c.split_reason or "", class_="why")))
    return el("section", el("h2", "Memory-bound clusters"),
              el("p", "Chains of kernels, producer to consumer, that one fused kernel could replace.", class_="caption"),
              el("details", el("summary", f"{len(rows)} clusters"),
                 scroll(el("table", el("thead", head), el("tbody", rows), id="clusters-table"))), id="clusters")


def _where_time_goes(result: AdvisorResult) -> Markup:
    s = result.summary
    tables = []
    if result.kernel_classes:
        rows = [el("tr", el("td", r.get("class", "?")), num_cell(fmt_num(r.get("calls_per_step"))),
                   num_cell(fmt_us(r.get("measured_us_per_step"))), num_cell(fmt_pct(r.get("pct"))))
                for r in result.kernel_classes]
        tables.append(el("table", el("thead", el("tr", el("th", "kernel class"), el("th", "calls/step", class_="num"),
                                                  el("th", "time/step ", tag("measured"), class_="num"), el("th", "%", class_="num"))),
                         el("tbody", rows), class_="compact"))
    if s.get("top_modules"):
        rows = [el("tr", el("td", code(r.get("module", "?"))), num_cell(fmt_us(r.get("us_per_step"))),
                   num_cell(fmt_pct(r.get("pct")))) for r in s["top_modules"]]
        tables.append(el("table", el("thead", el("tr", el("th", "module (class path)"),
                                                  el("th", "time/step ", tag("measured"), class_="num"), el("th", "%", class_="num"))),
                         el("tbody", rows), class_="compact"))
    if s.get("top_kernels"):
        rows = [el("tr", el("td", code(r.get("name", "?"))), num_cell(fmt_num(r.get("calls_per_step"))),
                   num_cell(fmt_us(r.get("us_per_step"))), num_cell(fmt_pct(r.get("pct")))) for r in s["top_kernels"]]
        tables.append(el("table", el("thead", el("tr", el("th", "kernel"), el("th", "calls/step", class_="num"),
                                                  el("th", "time/step ", tag("measured"), class_="num"), el("th", "%", class_="num"))),
                         el("tbody", rows), id="top-kernels", class_="compact"))
    if s.get("top_cpu_ops"):
        rows = [el("tr", el("td", code(r.get("op", "?"))), num_cell(fmt_us(r.get("us_per_step"))),
                   num_cell(fmt_pct(r.get("pct")))) for r in s["top_cpu_ops"]]
        tables.append(el("table", el("thead", el("tr", el("th", "top-level op (no GPU in this trace)"),
                                                  el("th", "CPU time/step ", tag("measured"), class_="num"),
                                                  el("th", "%", class_="num"))),
                         el("tbody", rows), class_="compact"))
    if not tables:
        return Markup("")
    return el("section", el("h2", "Where the time goes"),
              el("p", "Per step, from the trace (profiled).", class_="caption"),
              el("details", el("summary", "kernel classes, modules, kernels"), [scroll(t) for t in tables]), id="where")


def _run(result: AdvisorResult) -> Markup:
    run = result.run
    rows = [el("tr", el("th", k), el("td", code(" ".join(map(str, v)) if isinstance(v, list) else str(v))))
            for k, v in run.items() if v not in (None, "", [])]
    if result.trace_path:
        rows.append(el("tr", el("th", "trace"), el("td", code(result.trace_path))))
    return el("section", el("h2", "The run"), el("details", el("summary", "versions, command line, step source"),
                                                 scroll(el("table", el("tbody", rows), class_="compact"))), id="run")


def _ranks(result: AdvisorResult) -> Markup:
    """A torchrun job: each rank's step and communication time (report/ranks.py)."""
    job = job_facts(result.distributed)
    if job is None:
        return Markup("")
    ms = lambda v: f"{v:,.2f} ms" if v is not None else "—"  # noqa: E731
    head = el("tr", *(el("th", h) for h in ("rank", "step (unprofiled)", "collectives", "exposed",
                                             "collectives per step")))
    rows = [el("tr", el("td", f"{r.rank}" + (" (slowest)" if r.slowest else "")), num_cell(ms(r.step_ms)),
               num_cell(ms(r.comm_ms)), num_cell(ms(r.exposed_ms)), el("td", code(r.collectives)))
            for r in job.rows]
    basis = {"gpu kernels": "NCCL kernels; exposed: the part no compute kernel overlaps",
             "cpu ops": "the collectives' CPU ops (gloo: the calling thread waits on them)"}.get(job.basis, "")
    return el("section", el("h2", "Ranks"), el("p", job.headline + (f" ({basis})" if basis else "")),
              scroll(el("table", el("thead", head), el("tbody", rows))), id="ranks")


def _apply_it(facts: ReportFacts, changes: dict[int, Change], result_path: str | None) -> Markup:
    if not facts.ranked:
        return Markup("")
    steps = next_steps([r.rec for r in facts.ranked], changes, result_path)
    if not steps:
        return el("section", el("h2", "Apply it"),
                  el("p", ticks("`apply` would change nothing here: each recommendation above says why.")), id="apply")
    applied = [r.rec.rank for r in facts.ranked if changes.get(r.rec.rank) and changes[r.rec.rank].applied_by_apply]
    what = ticks(f"`apply` puts in recommendation{'s' if len(applied) != 1 else ''} "
                 f"{', '.join(f'#{n}' for n in applied)}; the others say above why it leaves them.")
    items = [el("li", ticks(text) if not command else join(ticks(text), ":"),
                el("pre", command, class_="code cmd") if command else None) for text, command in steps]
    return el("section", el("h2", "Apply it"), el("p", what), el("ol", items), id="apply")


def _footer(result: AdvisorResult) -> Markup:
    return el("footer", f"fusion-advisor {result.tool_version or __version__}, result schema {result.schema_version}. "
                        "The AdvisorResult JSON is embedded in this file (script#fa-result); "
                        "`fusion-advisor report` re-renders it without profiling.")
