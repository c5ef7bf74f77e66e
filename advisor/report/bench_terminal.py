"""Terminal tables for `fusion-advisor bench` and `recommend`: what was timed, what to change."""
from __future__ import annotations

from rich.console import Console
from rich.table import Table

from fusion_advisor.report.base import fmt_us as _us
from fusion_advisor.report.facts import assumptions_text, report_facts
from fusion_advisor.report.terminal import render_ranked
from fusion_advisor.core.result import AdvisorResult


def render_benchmarks(result: AdvisorResult, console: Console) -> None:
    if not result.benchmarks:
        console.print("No cluster matched a registered pattern: nothing to benchmark.")
        return
    providers = sorted({p for b in result.benchmarks for p in b.measured},
                       key=lambda p: ("eager", "triton", "compile", "liger", "cuda_graph").index(p)
                       if p in ("eager", "triton", "compile", "liger", "cuda_graph") else 9)
    t = Table(title="Benchmarks (p50 per call, profiler off)", title_justify="left")
    t.add_column("cluster", overflow="fold")
    t.add_column("pattern")
    t.add_column("pass")
    for p in providers:
        t.add_column(p, justify="right")
    t.add_column("numerics")
    t.add_column("verdict")
    t.add_column("why", overflow="fold")
    for b in result.benchmarks:
        cpu = b.timing == "cpu-interpreter"
        cells = [(_us(b.measured[p].p50_us) + (" (cpu)" if cpu else "")) if p in b.measured else "—"
                 for p in providers]
        numerics = {True: "ok", False: "FAILED", None: "—"}[b.numerics_ok]
        style = {"recommended": "green", "rejected": "red"}.get(b.verdict, "yellow")
        t.add_row(b.cluster_id, b.pattern, b.passes, *cells, numerics, f"[{style}]{b.verdict}[/]", b.reason)
    console.print(t)


def render_recommendations(result: AdvisorResult, console: Console) -> None:
    """The ranked table of the report (terminal.render_ranked) and the ROI assumptions in words."""
    if not result.recommendations:
        console.print("No recommendation: nothing measured or estimated saves time.")
        return
    render_ranked(report_facts(result), console)
    first = result.recommendations[0].roi.get("assumptions")
    if first:
        console.print(f"ROI: {assumptions_text(first)}.", highlight=False)
