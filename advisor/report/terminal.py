"""Terminal rendering of an AdvisorResult with rich.

`render_report` puts what to change first: a short heading, the launch-bound verdict, the ranked
recommendations (a table from 100 columns, a stacked block per recommendation below that, never
splitting a word or a file:line), what `apply` does for each (its diff with `diff`), the rejected
replacements; then, with `detail` (or when nothing is recommended), `render_summary`'s tables and
the clusters; and last the commands to run. Every time figure says whether it is measured or an
estimate.
"""
from __future__ import annotations

import io
from pathlib import Path

from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from fusion_advisor.cluster_names import short_source
from fusion_advisor.report.ranks import job_facts
from fusion_advisor.report.base import Renderer, fmt_num, fmt_pct, fmt_usd, fmt_us, is_number
from fusion_advisor.report.facts import ReportFacts, report_facts
from fusion_advisor.core.result import AdvisorResult

_us = fmt_us


def _t(x) -> str:
    """A string from the result, printed as it is (rich markup in it is not interpreted)."""
    return escape(str(x))


def render_summary(result: AdvisorResult, console: Console, heading: bool = True) -> None:
    run, s = result.run, result.summary
    if heading:
        where = run.get("gpu_name") or "CPU only"
        versions = ", ".join(f"{k} {run[k]}" for k in ("torch", "triton") if run.get(k))
        title = f"[bold]{escape(str(run.get('script') or result.trace_path or 'trace'))}[/] on {_t(where)}"
        if versions:
            title += f" ({_t(versions)})"
        console.print(title)
    basis = (f"steps {', '.join(map(str, s['steps']))} (profiled)" if s.get("steps") else "the whole trace")
    console.print(f"Figures per step over {basis}.")
    if heading:
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
        t.add_column("kernel", no_wrap=True, overflow="ellipsis")   # cut whole at the edge, never folded
        t.add_column("calls", justify="right")
        t.add_column("time", justify="right")
        t.add_column("%", justify="right")
        for row in s["top_kernels"]:
            t.add_row(_t(row.get("name")), fmt_num(row.get("calls_per_step")), _us(row.get("us_per_step")),
                      _pct(row.get("pct")))
        console.print(t)
    if s.get("top_modules"):
        t = Table(title="GPU time per step by module", title_justify="left")
        t.add_column("module (class path)", no_wrap=True, overflow="ellipsis")
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
            _out(console, _wrap(f"{r['title']}: {r['reason']}", console.width, "    ", f"  {mark} "))
    for note in lb.get("notes", []):
        _out(console, _wrap(f"note: {note}", console.width, "    ", "  "))


def _share(x) -> str:
    return fmt_pct(100 * x) if is_number(x) else "—"


def _pct(x) -> str:
    return f"{x:.1f}" if is_number(x) else "—"


STACKED_BELOW = 100   # columns: narrower terminals get one recommendation per stacked block


def render_report(result: AdvisorResult, console: Console, detail: bool = False, diff: bool = False,
                  result_path: str | None = None, changes: dict | None = None) -> None:
    """The whole terminal report: what to change first (the ranked recommendations, each with what
    `apply` does, its diff with `diff`), the detail tables (kernels, modules, clusters) with
    `detail`, and last the command to run."""
    facts = report_facts(result)
    _heading(result, facts, console)
    _device(facts, console)
    render_launch_bound(result, console)
    if result.clusters and not facts.bench_ran:
        why = "; ".join(facts.bench_not_run_why) or "this result holds no benchmark"
        console.print(f"[yellow]Not benchmarked:[/] {_t(why)}. Every saving below is an estimate "
                      "(cost model), not a measurement.", highlight=False)
    if facts.ranked:
        if changes is None:
            from fusion_advisor.report.changes import recommendation_changes
            changes = recommendation_changes(result, result_path)
        if console.width < STACKED_BELOW:
            render_ranked_stacked(facts, console, changes, diff)
        else:
            render_ranked(facts, console)
            _changes(facts, changes, console, diff)
    elif result.clusters and facts.bench_ran:
        console.print("No recommendation: no replacement was both faster and numerically equal on these shapes.")
    if facts.rejected:
        _rejected(facts, console)
    _ranks(result, console)
    if detail or not facts.ranked:
        console.print()
        render_summary(result, console, heading=False)
        render_clusters(result, console)
    else:
        console.print("[dim](--detail: the kernels, modules and clusters behind these figures)[/]", highlight=False)
    if facts.ranked:
        _next_steps(facts, changes or {}, result_path, console, diff)


def _ranks(result: AdvisorResult, console: Console) -> None:
    """A torchrun job: one line of headline, one row per rank (report/ranks.py)."""
    job = job_facts(result.distributed)
    if job is None:
        return
    console.print(_t(job.headline), highlight=False)
    t = Table(box=None, pad_edge=False)
    for col in ("rank", "step", "collectives", "exposed"):
        t.add_column(col, justify="left" if col == "rank" else "right", no_wrap=True)
    ms = lambda v: f"{v:,.2f} ms" if v is not None else "—"  # noqa: E731
    for r in job.rows:
        t.add_row(f"{r.rank}{' (slowest)' if r.slowest else ''}", ms(r.step_ms), ms(r.comm_ms), ms(r.exposed_ms))
    console.print(t)


def _heading(result: AdvisorResult, facts: ReportFacts, console: Console) -> None:
    s = result.summary
    console.print(f"[bold]{escape(Path(facts.script).name)}[/] on {_t(facts.gpu)}"
                  + (f" ({_t(facts.versions)})" if facts.versions else ""), highlight=False)
    parts = []
    if facts.step_us is not None:
        parts.append(f"step {fmt_us(facts.step_us)} ({facts.step_basis}{'' if facts.gpu_run else ', CPU'})")
    if facts.gpu_busy_pct is not None:
        parts.append(f"GPU busy {fmt_pct(facts.gpu_busy_pct)}")
    if s.get("kernels_per_step"):
        parts.append(f"{fmt_num(s.get('kernels_per_step'))} kernels per step")
    if parts:
        console.print(", ".join(parts) + " (measured).", highlight=False)
    for note in result.notes:
        console.print(f"[yellow]note:[/] {escape(str(note))}", highlight=False)


def _device(facts: ReportFacts, console: Console) -> None:
    if facts.device is not None:
        d = facts.device
        console.print(f"Estimates use the device profile [bold]{_t(d.name)}[/] ({d.basis}).", highlight=False)


def _saving(x, basis: str = "") -> str:
    if basis == "estimate" and is_number(x) and x <= 0:
        return "no gain"
    return fmt_us(x) if is_number(x) else "—"


def _where(row) -> str:
    """The cluster's source as the trace names it (the title has only the file's name)."""
    c = row.cluster
    return (c.source or c.module_class or c.id) if c else row.rec.cluster_id


RANKED_TITLE = "Recommendations, ranked by time saved per step (measured where timed, else estimate)"


def render_ranked(facts: ReportFacts, console: Console) -> None:
    t = Table(title=RANKED_TITLE, title_justify="left", box=box.SIMPLE_HEAD)
    t.add_column("#", justify="right")
    t.add_column("recommendation", min_width=30, ratio=1)          # wraps at spaces, never inside a word
    t.add_column("where", no_wrap=True)
    t.add_column("saving/step\nmeasured", justify="right", no_wrap=True)
    t.add_column("saving/step\nestimate", justify="right", no_wrap=True)
    if facts.gpu_run:
        t.add_column("$/month", justify="right", no_wrap=True)
    t.add_column("numerics", no_wrap=True)
    for row in facts.ranked:
        rec, bench = row.rec, row.bench
        usd = f"{fmt_usd(row.usd_per_month)} ({row.basis})" if row.usd_per_month is not None else "—"
        cells = [str(rec.rank), _t(rec.title), _t(_where(row)),
                 _saving(rec.measured_saving_us_per_step), _saving(rec.estimate_saving_us_per_step, "estimate")]
        if facts.gpu_run:
            cells.append(usd)
        t.add_row(*cells, _numerics(bench))
    console.print(t)
    _total(facts, console)


def _total(facts: ReportFacts, console: Console) -> None:
    total = []
    if facts.measured_saving_us is not None:
        total.append(f"measured {fmt_us(facts.measured_saving_us)}")
    if facts.estimate_saving_us is not None:
        total.append(f"estimated {fmt_us(facts.estimate_saving_us)}")
    if total and facts.step_us and facts.gpu_run:
        console.print(f"Potential saving per step: {', '.join(total)} of a {fmt_us(facts.step_us)} step "
                      f"({facts.step_basis}).", highlight=False)
    elif total:
        console.print(f"Potential saving per step on the target GPU: {', '.join(total)}.", highlight=False)


def _wrap(text: str, width: int, indent: str, first: str = "") -> list[str]:
    """Word-wrapped lines that never split a word or a file:line (a token wider than the line
    stays whole and runs past it)."""
    import textwrap
    return textwrap.wrap(text, width=max(width, 20), initial_indent=first or indent, subsequent_indent=indent,
                         break_long_words=False, break_on_hyphens=False) or [first or indent]


def _out(console: Console, lines: list[str], style: str | None = None) -> None:
    for line in lines:
        console.print(Text(line, style=style or ""), soft_wrap=True, highlight=False)


def render_ranked_stacked(facts: ReportFacts, console: Console, changes: dict, diff: bool) -> None:
    """Narrow terminals: each recommendation as a block, its title on its own lines, then where,
    the saving and $, then what `apply` does."""
    width = console.width
    console.print(Text("Recommendations, ranked by time saved per step", style="bold"), soft_wrap=True)
    console.print(Text("(measured where timed, else estimate)", style="dim"), soft_wrap=True)
    for row in facts.ranked:
        rec, c = row.rec, row.cluster
        console.print()
        first = f"#{rec.rank} "
        _out(console, _wrap(rec.title, width, " " * len(first), first), "bold")
        pad = " " * len(first)
        if c is not None:   # a whole-step change (CUDA graphs, channels_last) has no one place
            where = f"where: {_where(row)}, {fmt_num(c.occurrences_per_step)}× per step"
            _out(console, _wrap(where, width, pad + "  ", pad))
        saving = [f"saving/step: {_saving(rec.measured_saving_us_per_step)} measured",
                  f"{_saving(rec.estimate_saving_us_per_step, 'estimate')} estimate"]
        if facts.gpu_run and row.usd_per_month is not None:
            saving.append(f"{fmt_usd(row.usd_per_month)}/month ({row.basis})")
        if c is not None:
            saving.append(f"numerics {_numerics(row.bench)}")
        _out(console, _wrap(", ".join(saving), width, pad + "  ", pad))
        change = changes.get(rec.rank)
        if change is not None:
            _change_lines(change, console, width, pad, diff)
    console.print()
    _total(facts, console)


def _changes(facts: ReportFacts, changes: dict, console: Console, diff: bool) -> None:
    console.print(Text("What `apply` does", style="bold"), soft_wrap=True)
    for row in facts.ranked:
        change = changes.get(row.rec.rank)
        if change is None:
            continue
        first = f"#{row.rec.rank} "
        _out(console, _wrap(change.action, console.width, " " * len(first), first))
        _change_lines(change, console, console.width, " " * len(first), diff, action=False)


def _change_lines(change, console: Console, width: int, pad: str, diff: bool, action: bool = True) -> None:
    if action:
        _out(console, _wrap("apply: " + change.action.replace("`apply` ", ""), width, pad + "  ", pad))
    for line in change.runtime:
        _out(console, _wrap(line, width, pad + "    ", pad + "  "))
    if change.by_hand:
        _out(console, _wrap(change.by_hand, width, pad + "  ", pad), "dim")
    if diff:
        for note in change.notes:
            if note not in change.action:
                _out(console, _wrap(note, width, pad + "  ", pad), "dim")
        if change.diff:
            _print_diff(change.diff, console)
        elif change.kernel_code:
            _out(console, [f"{pad}the generated kernel, {change.kernel_file}:"])
            _print_diff("".join(f"+{ln}\n" for ln in change.kernel_code.splitlines()), console)


def _print_diff(text: str, console: Console) -> None:
    """A unified diff, line by line, never re-wrapped (a long line runs past the terminal's edge)."""
    for line in text.splitlines():
        style = ("bold" if line.startswith(("+++", "---")) else "cyan" if line.startswith("@@")
                 else "green" if line.startswith("+") else "red" if line.startswith("-") else None)
        console.print(Text(line, style=style or ""), soft_wrap=True, highlight=False)


def _next_steps(facts: ReportFacts, changes: dict, result_path: str | None, console: Console, diff: bool) -> None:
    from fusion_advisor.report.changes import next_steps
    steps = next_steps([r.rec for r in facts.ranked], changes, result_path)
    console.print()
    if not steps:
        console.print("`apply` would change nothing here (each recommendation says why).", highlight=False, markup=False)
        return
    if not diff:
        console.print("See each change: add --diff.", highlight=False, markup=False)
    for text, command in steps:
        _out(console, _wrap(text + (":" if command else "."), console.width, ""))
        if command:
            console.print(Text("  " + command, style="bold"), soft_wrap=True)


def _numerics(bench) -> str:
    if bench is None or bench.numerics_ok is None:
        return "not checked"
    return "ok" if bench.numerics_ok else "FAILED"


def _rejected(facts: ReportFacts, console: Console) -> None:
    if console.width < STACKED_BELOW:
        console.print()
        console.print(Text("Rejected replacements (timed or checked, not recommended)", style="bold"), soft_wrap=True)
        for row in facts.rejected:
            b = row.bench
            where = short_source(row.cluster.source) if row.cluster is not None and row.cluster.source else b.cluster_id
            _out(console, _wrap(f"{b.pattern} @ {where}: {b.reason or b.verdict}", console.width, "    ", "  · "))
        return
    t = Table(title="Rejected replacements (timed or checked, and not recommended)", title_justify="left",
              box=box.SIMPLE_HEAD)
    t.add_column("pattern", no_wrap=True)
    t.add_column("where", no_wrap=True)
    t.add_column("reason", ratio=1, min_width=24)
    t.add_column("eager p50\nmeasured", justify="right", no_wrap=True)
    t.add_column("triton p50\nmeasured", justify="right", no_wrap=True)
    t.add_column("numerics", no_wrap=True)
    for row in facts.rejected:
        b = row.bench
        where = short_source(row.cluster.source) if row.cluster is not None and row.cluster.source else b.cluster_id
        t.add_row(_t(b.pattern), _t(where), _t(b.reason or b.verdict),
                  fmt_us(row.p50("eager")), fmt_us(row.p50("triton")), _t(_numerics(b)))
    console.print(t)


class TerminalRenderer(Renderer):
    name = "terminal"
    extension = "txt"

    def __init__(self, width: int = 120, detail: bool = False, diff: bool = False, result_path: str | None = None):
        self.width, self.detail, self.diff, self.result_path = width, detail, diff, result_path

    def render(self, result: AdvisorResult) -> str:
        buf = io.StringIO()
        console = Console(file=buf, width=self.width, force_terminal=False, color_system=None)
        render_report(result, console, detail=self.detail, diff=self.diff, result_path=self.result_path)
        return buf.getvalue()


def render(result: AdvisorResult, width: int = 120, detail: bool = False, diff: bool = False,
           result_path: str | None = None) -> str:
    """The terminal report as text (the same renderer base as the HTML renderer)."""
    return TerminalRenderer(width, detail, diff, result_path).render(result)
