"""Terminal rendering of an AdvisorResult with rich.

`render_summary` prints the step summary (what `analyze` knows on its own); `render_report` adds
what the later stages found: the launch-bound verdict, the ranked recommendations, the rejected
replacements, the clusters. Every time figure says whether it is measured or an estimate.
"""
from __future__ import annotations

import io

from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from fusion_advisor.report.base import Renderer, fmt_num, fmt_pct, fmt_usd, fmt_us, is_number
from fusion_advisor.report.facts import ReportFacts, report_facts
from fusion_advisor.result import AdvisorResult

_us = fmt_us


def _t(x) -> str:
    """A string from the result, printed as it is (rich markup in it is not interpreted)."""
    return escape(str(x))


def render_summary(result: AdvisorResult, console: Console) -> None:
    run, s = result.run, result.summary
    where = run.get("gpu_name") or "CPU only"
    versions = ", ".join(f"{k} {run[k]}" for k in ("torch", "triton") if run.get(k))
    title = f"[bold]{escape(str(run.get('script') or result.trace_path or 'trace'))}[/] on {_t(where)}"
    if versions:
        title += f" ({_t(versions)})"
    console.print(title)
    basis = (f"steps {', '.join(map(str, s['steps']))} (profiled)" if s.get("steps") else "the whole trace")
    console.print(f"Figures per step over {basis}.")
    for note in result.notes:
        console.print(f"[yellow]note:[/] {escape(str(note))}")

    head = Table(show_header=False, box=None, pad_edge=False)
    head.add_column(style="dim")
    head.add_column(justify="right")
    head.add_row("step wall time (profiled)", _us(s.get("wall_us_per_step")))
    unprof = run.get("step_time_s_unprofiled")
    if is_number(unprof):
        head.add_row("step wall time (unprofiled)", _us(unprof * 1e6))
    if s.get("has_gpu"):
        head.add_row("GPU busy", f"{_us(s.get('gpu_busy_us_per_step'))}  ({fmt_pct(s.get('gpu_busy_pct'))})")
        head.add_row("GPU idle between kernels", _us(s.get("gpu_idle_us_per_step")))
        head.add_row("kernels per step", fmt_num(s.get("kernels_per_step")))
        head.add_row("kernels under 10 µs", f"{_share(s.get('small_kernel_share'))} of kernels, "
                                            f"{_share(s.get('small_kernel_time_share'))} of GPU time")
    console.print(head)

    if s.get("top_kernels"):
        t = Table(title="GPU time per step by kernel", title_justify="left")
        t.add_column("kernel", overflow="fold")
        t.add_column("calls", justify="right")
        t.add_column("time", justify="right")
        t.add_column("%", justify="right")
        for row in s["top_kernels"]:
            t.add_row(_t(row.get("name")), fmt_num(row.get("calls_per_step")), _us(row.get("us_per_step")),
                      _pct(row.get("pct")))
        console.print(t)
    if s.get("top_modules"):
        t = Table(title="GPU time per step by module", title_justify="left")
        t.add_column("module (class path)", overflow="fold")
        t.add_column("time", justify="right")
        t.add_column("%", justify="right")
        for row in s["top_modules"]:
            t.add_row(_t(row.get("module")), _us(row.get("us_per_step")), _pct(row.get("pct")))
        console.print(t)
    if s.get("top_cpu_ops"):
        t = Table(title="CPU time per step by top-level op (no GPU in this trace)", title_justify="left")
        t.add_column("op")
        t.add_column("time", justify="right")
        t.add_column("%", justify="right")
        for row in s["top_cpu_ops"]:
            t.add_row(_t(row.get("op")), _us(row.get("us_per_step")), _pct(row.get("pct")))
        console.print(t)


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
    if not lb or "launch_wait_share" not in lb:  # not from analyzers/launch_bound.py
        return
    console.print(f"[bold]Step verdict:[/] {lb['verdict']} (launch waits: {100 * lb['launch_wait_share']:.0f} % of the "
                  f"GPU window)")
    for r in lb.get("remedies", []):
        if r["applies"]:
            mark = "→" if r["remedy"] == lb.get("primary_remedy") else "·"
            console.print(f"  {mark} {r['title']}: {r['reason']}", highlight=False, markup=False)
    for note in lb.get("notes", []):
        console.print(f"  [yellow]note:[/] {note}")


def _share(x) -> str:
    return fmt_pct(100 * x) if is_number(x) else "—"


def _pct(x) -> str:
    return f"{x:.1f}" if is_number(x) else "—"


def render_report(result: AdvisorResult, console: Console) -> None:
    """The whole terminal report: the summary, then what the later stages found."""
    render_summary(result, console)
    facts = report_facts(result)
    _device(facts, console)
    render_launch_bound(result, console)
    if facts.ranked:
        render_ranked(facts, console)
    elif result.clusters and facts.bench_ran:
        console.print("No recommendation: no replacement was both faster and numerically equal on these shapes.")
    if facts.rejected:
        _rejected(facts, console)
    if result.clusters and not facts.bench_ran:
        why = "; ".join(facts.bench_not_run_why) or "this result holds no benchmark"
        console.print(f"[yellow]bench did not run:[/] {_t(why)}. Every saving below is an estimate "
                      "(cost model), not a measurement.", highlight=False)
    render_clusters(result, console)


def _device(facts: ReportFacts, console: Console) -> None:
    if facts.device is not None:
        d = facts.device
        console.print(f"Estimates use the device profile [bold]{_t(d.name)}[/] ({d.basis}).", highlight=False)


def _saving(x) -> str:
    return fmt_us(x) if is_number(x) else "—"


def render_ranked(facts: ReportFacts, console: Console) -> None:
    t = Table(title="Recommendations, ranked by time saved per step (measured where timed, else estimate)",
              title_justify="left")
    t.add_column("#", justify="right")
    t.add_column("recommendation", overflow="fold")
    t.add_column("where", overflow="fold")
    t.add_column("saving/step\nmeasured", justify="right")
    t.add_column("saving/step\nestimate", justify="right")
    t.add_column("$/month", justify="right")
    t.add_column("numerics")
    for row in facts.ranked:
        rec, cluster, bench = row.rec, row.cluster, row.bench
        where = (cluster.source or cluster.module_class or cluster.id) if cluster else rec.cluster_id
        usd = f"{fmt_usd(row.usd_per_month)} ({row.basis})" if row.usd_per_month is not None else "—"
        t.add_row(str(rec.rank), _t(rec.title), _t(where),
                  _saving(rec.measured_saving_us_per_step), _saving(rec.estimate_saving_us_per_step),
                  usd, _numerics(bench))
    console.print(t)
    total = []
    if facts.measured_saving_us is not None:
        total.append(f"measured {fmt_us(facts.measured_saving_us)}")
    if facts.estimate_saving_us is not None:
        total.append(f"estimated {fmt_us(facts.estimate_saving_us)}")
    if total and facts.step_us:
        console.print(f"Potential saving per step: {', '.join(total)} of a {fmt_us(facts.step_us)} step "
                      f"({facts.step_basis}).", highlight=False)


def _numerics(bench) -> str:
    if bench is None or bench.numerics_ok is None:
        return "not checked"
    return "ok" if bench.numerics_ok else "FAILED"


def _rejected(facts: ReportFacts, console: Console) -> None:
    t = Table(title="Rejected replacements (timed or checked, and not recommended)", title_justify="left")
    t.add_column("pattern")
    t.add_column("cluster", overflow="fold")
    t.add_column("reason", overflow="fold")
    t.add_column("eager p50\nmeasured", justify="right")
    t.add_column("triton p50\nmeasured", justify="right")
    t.add_column("numerics", overflow="fold")
    for row in facts.rejected:
        b = row.bench
        numerics = _numerics(b) + (f": {b.numerics_detail}" if b.numerics_detail else "")
        t.add_row(_t(b.pattern), _t(b.cluster_id), _t(b.reason or b.verdict),
                  fmt_us(row.p50("eager")), fmt_us(row.p50("triton")), _t(numerics))
    console.print(t)


class TerminalRenderer(Renderer):
    name = "terminal"
    extension = "txt"

    def __init__(self, width: int = 120):
        self.width = width

    def render(self, result: AdvisorResult) -> str:
        buf = io.StringIO()
        console = Console(file=buf, width=self.width, force_terminal=False, color_system=None)
        render_report(result, console)
        return buf.getvalue()


def render(result: AdvisorResult, width: int = 120) -> str:
    """The terminal report as text (the same renderer base as the HTML and JSON renderers)."""
    return TerminalRenderer(width).render(result)
