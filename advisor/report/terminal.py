"""Terminal rendering of an AdvisorResult with rich."""
from __future__ import annotations

import io

from rich import box
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
    render_clusters(result, console)
    render_launch_bound(result, console)


CLUSTER_ROWS = 10


def _cut(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def _cluster_title(c) -> str:
    if c.pattern:
        return c.pattern
    return _cut(" ".join(op["name"].split("::")[-1] for op in c.ops), 20)


def render_clusters(result: AdvisorResult, console: Console) -> None:
    """The clusters, ranked by estimated saving per step (estimates on the result's profile)."""
    if not result.clusters:
        return
    measured = bool(result.summary.get("has_gpu"))
    label = (result.device_profile or {}).get("label", "")
    # Fits 80 columns: long names are cut here, the JSON has them whole.
    t = Table(title=f"Memory-bound clusters, per step (estimates for {label})", title_justify="left",
              box=box.SIMPLE_HEAD, pad_edge=False)
    t.add_column("#", justify="right")
    t.add_column("pattern / ops", no_wrap=True)
    t.add_column("module", no_wrap=True)
    t.add_column("kern", justify="right")
    t.add_column("×", justify="right")
    t.add_column("measured", justify="right", no_wrap=True)
    t.add_column("est. save", justify="right", no_wrap=True)
    for i, c in enumerate(result.clusters[:CLUSTER_ROWS], 1):
        saving = c.estimate.saving_us
        saving_text = _us(saving * c.occurrences_per_step) if saving is not None else "unknown"
        where = f"{_cut((c.module_class or '').rsplit('/', 1)[-1], 12)} {'fwd' if c.direction == 'forward' else 'bwd'}"
        t.add_row(str(i), _cluster_title(c), where, str(len(c.kernels) if measured else len(c.ops)),
                  f"{c.occurrences_per_step:g}", _us(c.measured_us_per_step) if measured else "—", saving_text)
    console.print(t)
    if len(result.clusters) > CLUSTER_ROWS:
        console.print(f"[dim]… and {len(result.clusters) - CLUSTER_ROWS} more clusters in the JSON (--json)[/]")


def render_launch_bound(result: AdvisorResult, console: Console) -> None:
    lb = result.launch_bound
    if not lb:
        return
    console.print(f"[bold]Step verdict:[/] {lb['verdict']} (launch waits: {100 * lb['launch_wait_share']:.0f} % of the "
                  f"GPU window)")
    for r in lb.get("remedies", []):
        if r["applies"]:
            mark = "→" if r["remedy"] == lb.get("primary_remedy") else "·"
            console.print(f"  {mark} {r['title']}: {r['reason']}", highlight=False, markup=False)
    for note in lb.get("notes", []):
        console.print(f"  [yellow]note:[/] {note}")


def render(result: AdvisorResult, width: int = 120) -> str:
    """The terminal report as text (the same renderer base as the HTML and JSON renderers)."""
    buf = io.StringIO()
    console = Console(file=buf, width=width, force_terminal=False, color_system=None)
    render_summary(result, console)
    return buf.getvalue()
