"""Terminal tables for `fusion-advisor bench` and `recommend`: what was timed, what to change."""
from __future__ import annotations

from rich.console import Console
from rich.table import Table

from fusion_advisor.result import AdvisorResult


def _us(x: float | None) -> str:
    if x is None:
        return "—"
    return f"{x / 1000:,.2f} ms" if abs(x) >= 1000 else f"{x:,.1f} µs"


def _bytes(n: int | None) -> str:
    if n is None:
        return "—"
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:,.1f} {unit}"
    return f"{n} B"


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
    if not result.recommendations:
        console.print("No recommendation: nothing measured or estimated saves time.")
        return
    t = Table(title="Recommendations, ranked", title_justify="left")
    t.add_column("#", justify="right")
    t.add_column("what", overflow="fold")
    t.add_column("measured / step", justify="right")
    t.add_column("estimate / step", justify="right")
    t.add_column("memory", justify="right")
    t.add_column("$ / month", justify="right")
    for r in result.recommendations:
        usd = r.roi.get("usd_per_month")
        t.add_row(str(r.rank), r.title, _us(r.measured_saving_us_per_step), _us(r.estimate_saving_us_per_step),
                  _bytes(r.memory_saved_bytes), "—" if usd is None else f"${usd:,.2f}")
    console.print(t)
    first = result.recommendations[0].roi.get("assumptions", {})
    if first:
        console.print(f"ROI: ${first.get('gpu_hourly_cost_usd')}/GPU-hour ({first.get('gpu_hourly_cost_source')}); "
                      f"{first.get('gpus')} GPU(s); steps/day from {first.get('steps_per_day_source')}; "
                      f"{first.get('days_per_month')}-day month.", highlight=False)
