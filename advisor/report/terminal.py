"""Terminal rendering of an AdvisorResult with rich."""
from __future__ import annotations

import io

from rich.console import Console
from rich.table import Table

from fusion_advisor.result import AdvisorResult


def _us(x: float | None) -> str:
    if x is None:
        return "—"
    if x >= 1000:
        return f"{x / 1000:,.2f} ms"
    return f"{x:,.1f} µs"


def render_summary(result: AdvisorResult, console: Console) -> None:
    run, s = result.run, result.summary
    where = run.get("gpu_name") or "CPU only"
    versions = ", ".join(f"{k} {run[k]}" for k in ("torch", "triton") if run.get(k))
    title = f"[bold]{run.get('script') or result.trace_path or 'trace'}[/] on {where}"
    if versions:
        title += f" ({versions})"
    console.print(title)
    basis = (f"steps {', '.join(map(str, s['steps']))} (profiled)" if s.get("steps") else "the whole trace")
    console.print(f"Figures per step over {basis}.")
    for note in result.notes:
        console.print(f"[yellow]note:[/] {note}")

    head = Table(show_header=False, box=None, pad_edge=False)
    head.add_column(style="dim")
    head.add_column(justify="right")
    head.add_row("step wall time (profiled)", _us(s.get("wall_us_per_step")))
    unprof = run.get("step_time_s_unprofiled")
    if unprof:
        head.add_row("step wall time (unprofiled)", _us(unprof * 1e6))
    if s.get("has_gpu"):
        head.add_row("GPU busy", f"{_us(s['gpu_busy_us_per_step'])}  ({s['gpu_busy_pct']:.1f} %)")
        head.add_row("GPU idle between kernels", _us(s["gpu_idle_us_per_step"]))
        head.add_row("kernels per step", f"{s['kernels_per_step']:,.0f}")
        head.add_row("kernels under 10 µs", f"{100 * s['small_kernel_share']:.1f} % of kernels, "
                                            f"{100 * s['small_kernel_time_share']:.1f} % of GPU time")
    console.print(head)

    if s.get("top_kernels"):
        t = Table(title="GPU time per step by kernel", title_justify="left")
        t.add_column("kernel", overflow="fold")
        t.add_column("calls", justify="right")
        t.add_column("time", justify="right")
        t.add_column("%", justify="right")
        for row in s["top_kernels"]:
            t.add_row(row["name"], f"{row['calls_per_step']:g}", _us(row["us_per_step"]), f"{row['pct']:.1f}")
        console.print(t)
    if s.get("top_modules"):
        t = Table(title="GPU time per step by module", title_justify="left")
        t.add_column("module (class path)", overflow="fold")
        t.add_column("time", justify="right")
        t.add_column("%", justify="right")
        for row in s["top_modules"]:
            t.add_row(row["module"], _us(row["us_per_step"]), f"{row['pct']:.1f}")
        console.print(t)
    if s.get("top_cpu_ops"):
        t = Table(title="CPU time per step by top-level op (no GPU in this trace)", title_justify="left")
        t.add_column("op")
        t.add_column("time", justify="right")
        t.add_column("%", justify="right")
        for row in s["top_cpu_ops"]:
            t.add_row(row["op"], _us(row["us_per_step"]), f"{row['pct']:.1f}")
        console.print(t)


def render(result: AdvisorResult, width: int = 120) -> str:
    """The terminal report as text (the same renderer base as the HTML and JSON renderers)."""
    buf = io.StringIO()
    console = Console(file=buf, width=width, force_terminal=False, color_system=None)
    render_summary(result, console)
    return buf.getvalue()
