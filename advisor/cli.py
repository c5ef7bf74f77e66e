"""The `fusion-advisor` command line."""
from __future__ import annotations

import contextlib
import dataclasses
import difflib
import functools
import json
import os
import sys
from dataclasses import asdict
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from fusion_advisor import __version__
from fusion_advisor.core.errors import EXIT_NOT_VERIFIED, EXIT_SCRIPT_FAILED, AdvisorError, EnvironmentProblem

HELP = """\
Find the memory-bound kernel chains in a PyTorch training script, time fused Triton replacements
on its own shapes, and say what each would save.

\b
Typical use:
  fusion-advisor profile train.py -- --batch-size 8     # profile, analyse, report
  fusion-advisor analyze fusion-report/trace.json.gz    # re-analyse a saved (or any) Kineto trace
  fusion-advisor report fusion-report/result.json       # re-render a saved result (terminal + HTML)

\b
Exit codes: 0 ok · 1 the profiled script failed · 2 bad input (usage, missing or broken file)
            3 missing GPU or dependency · 4 an output could not be written
            5 apply --verify could not prove the patch (a replacement never ran, or losses differ)
"""

app = typer.Typer(help=HELP, add_completion=False, no_args_is_help=True, rich_markup_mode=None,
                  pretty_exceptions_show_locals=False,
                  context_settings={"help_option_names": ["-h", "--help"]})
err = Console(stderr=True, soft_wrap=True)


def _fail(message: str, code: int) -> None:
    from fusion_advisor.report.safe_text import strip_controls
    err.print(f"[bold red]error:[/] {escape(strip_controls(message))}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def handles_errors(fn):
    """Turn AdvisorError into a one-line message and its exit code."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except AdvisorError as exc:
            _fail(str(exc), exc.exit_code)
    return wrapper


def _print_result(result, as_json: bool, out_console: Console, detail: bool = False, diff: bool = False,
                  result_path: Path | None = None) -> None:
    if as_json:
        sys.stdout.write(result.to_json() + "\n")
        return
    from fusion_advisor.report.safe_text import terminal_safe
    from fusion_advisor.report.terminal import render_report
    render_report(terminal_safe(result), out_console, detail=detail, diff=diff,
                  result_path=str(result_path) if result_path is not None else None)


def _write_report_html(result, result_path: Path) -> Path:
    """report.html beside the saved result (OutputError, exit 4, when it cannot be written)."""
    from fusion_advisor.report import default_html_path, write_html
    html_path = default_html_path(result_path)
    write_html(result, html_path, str(result_path))
    return html_path


# The report's options, the same on `profile` and `report`.
DIFF_HELP = "Show each recommendation's change in the terminal: the diff `apply` writes, or its runtime patch."
DETAIL_HELP = "Also print the detail tables: GPU time by kernel and by module, the memory-bound clusters."
QUIET_HELP = "Print no terminal report: only the files written, and errors."
VERBOSE_HELP = "Print everything: --detail and --diff."
OPEN_HELP = "Open the HTML report in the web browser, when this machine has one."


def _open_in_browser(path: Path) -> None:
    import webbrowser
    try:
        browser = webbrowser.get()
    except webbrowser.Error:
        err.print(f"no web browser found here; open {path} yourself", highlight=False)
        return
    if not browser.open(path.resolve().as_uri()):
        err.print(f"the web browser did not open; open {path} yourself", highlight=False)


def _progress_console() -> Console:
    """stderr, its terminal-ness fixed now: while the script runs, fd 2 is a pipe (stderr_filter)."""
    return Console(stderr=True, force_terminal=sys.stderr.isatty() or None)


def _version_callback(value: bool):
    if value:
        typer.echo(f"fusion-advisor {__version__}")
        raise typer.Exit()


@app.callback()
def _main(version: bool = typer.Option(False, "--version", callback=_version_callback, is_eager=True,
                                       help="Print the version and exit.")):
    pass


GPU_COST_HELP = ("Dollars per GPU-hour for the ROI figures [default: 2.50, a round 2026 on-demand H100/H200 "
                 "rate on specialty GPU clouds].")
STEPS_PER_DAY_HELP = "Training steps per day per GPU [default: from the run's measured step time, around the clock]."
GPUS_HELP = "GPUs that run this step (data parallel): savings scale with them."


def _roi_options(gpu_hourly_cost: Optional[float], steps_per_day: Optional[float], gpus: int):
    from fusion_advisor.recommend import DEFAULT_GPU_HOURLY_COST, RoiOptions
    return RoiOptions(gpu_hourly_cost=DEFAULT_GPU_HOURLY_COST if gpu_hourly_cost is None else gpu_hourly_cost,
                      steps_per_day=steps_per_day, gpus=gpus, cost_is_default=gpu_hourly_cost is None)


@contextlib.contextmanager
def _bench_progress():
    """A progress bar with one tick per benchmarked cluster, on stderr."""
    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TimeElapsedColumn(), console=err, transient=True, disable=not err.is_terminal)
    task = progress.add_task("benchmarking", total=None)

    def on_cluster(done: int, total: int, label: str) -> None:
        progress.update(task, description=f"benchmarking {label}", completed=done, total=max(total, 1))

    with progress:
        yield on_cluster


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
@handles_errors
def profile(
    ctx: typer.Context,
    script: Path = typer.Argument(..., help="Your training script. Its own arguments go after `--`."),
    warmup: int = typer.Option(3, "--warmup", "-w", min=0,
                               help="Steps to run before recording (the first steps allocate, compile and autotune)."),
    steps: int = typer.Option(3, "--steps", "-n", min=1, help="Steps to record."),
    timing_steps: int = typer.Option(5, "--timing-steps", min=0,
                                     help="Unprofiled steps to time after the recorded ones: their median is the "
                                          "step time that $ figures and the launch-bound verdict use."),
    stop: bool = typer.Option(True, "--stop/--no-stop", help="Stop the script once the steps are recorded."),
    out: Path = typer.Option(Path("fusion-report"), "--out", "-o", help="Folder for the trace, metadata and report."),
    as_json: bool = typer.Option(False, "--json", help="Print the AdvisorResult JSON on stdout (the script's own "
                                                       "output goes to stderr)."),
    gpu_hourly_cost: Optional[float] = typer.Option(None, "--gpu-hourly-cost", help=GPU_COST_HELP),
    steps_per_day: Optional[float] = typer.Option(None, "--steps-per-day", help=STEPS_PER_DAY_HELP),
    gpus: int = typer.Option(1, "--gpus", help=GPUS_HELP),
    bench: bool = typer.Option(True, "--bench/--no-bench", help="Time and check the matched replacements on the "
                                                               "GPU (needs a GPU; off: estimates only)."),
    diff: bool = typer.Option(False, "--diff", help=DIFF_HELP),
    detail: bool = typer.Option(False, "--detail", help=DETAIL_HELP),
    quiet: bool = typer.Option(False, "--quiet", "-q", help=QUIET_HELP),
    verbose: bool = typer.Option(False, "--verbose", "-v", help=VERBOSE_HELP),
    open_html: bool = typer.Option(False, "--open", help=OPEN_HELP),
    target_gpu: Optional[str] = typer.Option(None, "--target-gpu", metavar="GPU",
                                             help="Price the estimates for this GPU (h100, h200, a100, ...); a CPU-only "
                                                  "run defaults to h100."),
    nproc_per_node: int = typer.Option(0, "--nproc-per-node", metavar="N", min=0,
                                       help="Launch SCRIPT as a torchrun job of N local ranks (DDP, FSDP): every rank "
                                            "is profiled (trace.rank<k>.json.gz) and one result is merged, priced on "
                                            "the slowest rank, dollars for all N GPUs."),
):
    """Run SCRIPT under torch.profiler, record a few steady steps, and analyse them.

    \b
    A step is found without editing the script: an optimizer.step(), else the end of a top-level
    module forward. A script can also say it: `fusion_advisor.step()`; and name a range with
    `with fusion_advisor.region("attention"): ...`.

    \b
    Examples:
      fusion-advisor profile examples/llama_train.py
      fusion-advisor profile train.py --warmup 5 --steps 2 -o runs/today -- --batch-size 8
    """
    if nproc_per_node:
        return _profile_job(script, list(ctx.args), nproc_per_node, out, warmup, steps, timing_steps, stop, as_json,
                            _roi_options(gpu_hourly_cost, steps_per_day, max(gpus, nproc_per_node)), bench,
                            target_gpu)
    from fusion_advisor import pipeline
    from fusion_advisor.capture import CaptureOptions

    for note in _mistyped_options(ctx):
        err.print(f"[yellow]note:[/] {note}", highlight=False)
    opts = CaptureOptions(script=str(script), script_args=list(ctx.args), warmup=warmup, steps=steps,
                          stop=stop, out_dir=str(out), timing_steps=timing_steps)
    run = pipeline.profile(opts, target_gpu, _roi_options(gpu_hourly_cost, steps_per_day, gpus), bench,
                           _Watch(as_json, warmup, timing_steps))
    result_capture = run.captured
    status = result_capture.exited_before_any_step
    if status is not None:   # e.g. `-- -h`: its output was shown once, and that is all it does
        message = (f"the script exited (status {status}) before any step: nothing to profile; "
                   f"wrote {result_capture.meta_path}")
        if status == 0:
            err.print(f"[yellow]note:[/] {message}", highlight=False)
            raise typer.Exit(0)
        _fail(message, EXIT_SCRIPT_FAILED)
    if result_capture.trace_path is None:
        written = f"; wrote {result_capture.meta_path}"
        _fail(("the script failed before any step was recorded" if result_capture.error else
               "nothing was recorded") + written, EXIT_SCRIPT_FAILED if result_capture.error else 2)
    result, result_path = run.result, run.result_path
    html_path = _write_report_html(result, result_path)
    if as_json or not quiet:
        _print_result(result, as_json, Console(), detail=detail or verbose, diff=diff or verbose,
                      result_path=result_path)
    err.print(f"wrote {result_capture.trace_path}\nwrote {result_capture.meta_path}\nwrote {result_path}\n"
              f"wrote {html_path}", highlight=False)
    if open_html:
        _open_in_browser(html_path)
    if result_capture.error:
        stopped = result_capture.error.startswith(("interrupted", "terminated"))
        _fail(f"the script was stopped: {result_capture.error.strip()}; the steps recorded before it are kept"
              if stopped else "the script raised (traceback above); the steps recorded before it are kept",
              EXIT_SCRIPT_FAILED)


class _Watch:
    """What `profile` shows while pipeline.profile runs (its Watch hooks): the step progress bar
    during capture (the script's stdout on stderr under --json, Kineto's noise filtered), its
    notes, the script's traceback, a spinner while analysing, a bar per benchmarked cluster."""

    def __init__(self, as_json: bool = False, warmup: int = 0, timing_steps: int = 0):
        self.as_json, self.warmup, self.timing_steps = as_json, warmup, timing_steps

    def notice(self, message: str) -> None:
        err.print(f"[yellow]note:[/] {escape(message)}")

    @contextlib.contextmanager
    def capturing(self):
        from fusion_advisor.stderr_filter import without_kineto_lines

        console = _progress_console()
        progress = Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                            TimeElapsedColumn(), console=console, transient=True, disable=not console.is_terminal)
        task = progress.add_task("warm-up steps", total=max(self.warmup, 1))
        timing_steps = self.timing_steps

        def on_step(n: int, w: int, a: int, source: str | None) -> None:
            if n < w:
                progress.update(task, description=f"warm-up steps (by {source or '?'})", completed=n, total=w)
            elif n - w <= a:
                progress.update(task, description=f"recording steps (by {source})", completed=n - w, total=a)
            else:
                progress.update(task, description="timing steady steps (profiler off)", completed=n - w - a,
                                total=timing_steps)

        redirect = contextlib.redirect_stdout(sys.stderr) if self.as_json else contextlib.nullcontext()
        with redirect, without_kineto_lines(), progress:
            yield on_step

    def captured(self, captured) -> None:
        if captured.error:
            err.print(captured.error.rstrip(), highlight=False, markup=False)

    def analysing(self):
        return err.status("analysing the trace", spinner="dots")

    def benchmarking(self):
        return _bench_progress()


def _mistyped_options(ctx: typer.Context) -> list[str]:
    """Unknown options typed before `--` go to the script; say so when one looks like ours
    (`--step 5` for `--steps 5`)."""
    raw = _ARGV if _ARGV is not None else sys.argv[1:]
    before = raw[:raw.index("--")] if "--" in raw else raw
    ours = sorted({o for p in ctx.command.params for o in [*p.opts, *p.secondary_opts] if o.startswith("--")})
    notes = []
    for arg in before:
        name = arg.split("=", 1)[0]
        if not name.startswith("--") or arg not in ctx.args or name in ours:
            continue
        close = difflib.get_close_matches(name, ours, n=1, cutoff=0.8)
        if close:
            notes.append(f"{name} is not a fusion-advisor option (did you mean {close[0]}?): it goes to the script "
                         f"as one of its own; the script's options belong after `--`")
    return notes


def _profile_job(script: Path, script_args: list[str], nproc: int, out: Path, warmup: int, steps: int,
                 timing_steps: int, stop: bool, as_json: bool, roi_options, bench: bool, target_gpu: str | None):
    """`profile --nproc-per-node N`: every rank through torchrun, then one merged result."""
    from fusion_advisor import distributed, pipeline

    if not script.is_file():
        raise AdvisorError(f"script not found: {script}")
    out.mkdir(parents=True, exist_ok=True)
    from fusion_advisor.capture import _set_aside_previous_run
    _set_aside_previous_run(out, lambda m: err.print(f"[yellow]note:[/] {m}", highlight=False), job=True)
    rank_args = ["--warmup", str(warmup), "--steps", str(steps), "--timing-steps", str(timing_steps),
                 "--stop" if stop else "--no-stop"]
    redirect = contextlib.redirect_stdout(sys.stderr) if as_json else contextlib.nullcontext()
    with redirect:
        err.print(f"launching {nproc} ranks with torch.distributed.run", highlight=False)
        status = distributed.launch(str(script), script_args, nproc, out, rank_args)
    traces = distributed.rank_traces(out)
    result = distributed.merge(traces, target_gpu)
    result_path = pipeline.finish(result, out, roi_options, bench, _Watch())
    html_path = _write_report_html(result, result_path)
    _print_result(result, as_json, Console(), result_path=result_path)
    err.print("\n".join(f"wrote {t}" for t in traces) + f"\nwrote {result_path}\nwrote {html_path}", highlight=False)
    if status != 0:
        _fail(f"a rank exited with status {status} (its output above); the traces the ranks wrote are kept",
              EXIT_SCRIPT_FAILED)


@app.command(name="profile-rank", hidden=True,
             context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
@handles_errors
def profile_rank(
    ctx: typer.Context,
    script: Path = typer.Argument(..., help="The training script; its arguments after `--`."),
    warmup: int = typer.Option(3, "--warmup", "-w", min=0),
    steps: int = typer.Option(3, "--steps", "-n", min=1),
    timing_steps: int = typer.Option(5, "--timing-steps", min=0),
    stop: bool = typer.Option(True, "--stop/--no-stop"),
    out: Path = typer.Option(Path("fusion-report"), "--out", "-o"),
):
    """One rank of a torchrun job (RANK, WORLD_SIZE from the environment): profile it and write
    OUT/trace.rank<k>.json.gz and OUT/run.rank<k>.json; `profile --nproc-per-node` merges them.

    \b
    Under your own launcher:
      torchrun --nproc-per-node 8 -m fusion_advisor.cli profile-rank -o runs/job train.py -- ARGS
    """
    from fusion_advisor import distributed
    from fusion_advisor.capture import CaptureOptions, capture

    rank, _ = distributed.rank_from_env()
    opts = CaptureOptions(script=str(script), script_args=list(ctx.args), warmup=warmup, steps=steps,
                          stop=stop, out_dir=str(out), timing_steps=timing_steps, rank=rank)
    captured = capture(opts, notice=lambda m: err.print(f"[yellow]rank {rank} note:[/] {m}"))
    if captured.error:
        err.print(captured.error.rstrip(), highlight=False, markup=False)
        _fail(f"rank {rank}: the script raised (traceback above)", EXIT_SCRIPT_FAILED)


def _analyze_path(trace_path: str, target_gpu: str | None = None):
    from fusion_advisor.analyzers.trace import Trace
    from fusion_advisor.pipeline import analyze
    return analyze(Trace.load(trace_path), target_gpu=target_gpu)


@app.command()
@handles_errors
def analyze(
    trace: Path = typer.Argument(..., help="A Kineto trace from torch.profiler (.json or .json.gz), ours or your own."),
    as_json: bool = typer.Option(False, "--json", help="Print the AdvisorResult JSON on stdout."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Also save the AdvisorResult JSON here, and the "
                                                                 "HTML report beside it."),
    target_gpu: Optional[str] = typer.Option(
        None, "--target-gpu", metavar="GPU",
        help="Price the estimates for this GPU (h100, h100-pcie, h200, a100, l40s, ...) instead of the "
             "trace's own; a CPU-only trace defaults to h100."),
):
    """Analyse an existing trace: where GPU time goes, the memory-bound kernel chains (clusters)
    with what fusing each would save, and whether the step waits on kernel launches.

    \b
    Any trace that torch.profiler writes works; record it with record_shapes=True,
    with_stack=True and with_modules=True to get shapes, source lines and module scopes.
    A trace recorded without a GPU is analysed for a target GPU: every GPU figure is then an
    estimate.

    \b
    Examples:
      fusion-advisor analyze fusion-report/trace.json.gz --json > result.json
      fusion-advisor analyze cpu-trace.json.gz --target-gpu h200
    """
    result = _analyze_path(str(trace), target_gpu)
    html_path = None
    if out is not None:
        result.save(out)
        html_path = _write_report_html(result, out)
    _print_result(result, as_json, Console())
    if out is not None:
        err.print(f"wrote {out}\nwrote {html_path}", highlight=False)


@app.command()
@handles_errors
def report(
    result_path: Path = typer.Argument(..., metavar="RESULT", help="A saved AdvisorResult (result.json from "
                                                                   "`profile`, or `analyze -o`)."),
    html: Optional[Path] = typer.Option(None, "--html", help="Where to write the HTML report [default: report.html "
                                                             "beside result.json; beside NAME.json, NAME.html]."),
    as_json: bool = typer.Option(False, "--json", help="Print the AdvisorResult JSON on stdout instead of the "
                                                       "terminal report."),
    no_terminal: bool = typer.Option(False, "--no-terminal", help="Print no terminal report (as --quiet)."),
    diff: bool = typer.Option(False, "--diff", help=DIFF_HELP),
    detail: bool = typer.Option(False, "--detail", help=DETAIL_HELP),
    quiet: bool = typer.Option(False, "--quiet", "-q", help=QUIET_HELP),
    verbose: bool = typer.Option(False, "--verbose", "-v", help=VERBOSE_HELP),
    open_html: bool = typer.Option(False, "--open", help=OPEN_HELP),
):
    """Re-render a saved result: the terminal report and one self-contained HTML file, without profiling.

    \b
    The HTML file opens offline (plotly.js and the result are inside it): the ranked recommendations,
    each with its change (the diff `apply` writes, or its runtime patch), a waterfall of the savings,
    a roofline, one step's timeline, and the `apply` commands to run.

    \b
    Examples:
      fusion-advisor report fusion-report/result.json
      fusion-advisor report fusion-report/result.json --diff       # each change in the terminal
      fusion-advisor report runs/a.json --html /tmp/a.html -q --open
    """
    from fusion_advisor.report import HTMLRenderer, default_html_path, load_result, malformed_result_errors
    from fusion_advisor.core.files import write_text_atomic

    result = load_result(result_path)
    html_path = html if html is not None else default_html_path(result_path)
    with malformed_result_errors(str(result_path)):  # a malformed result writes nothing
        page = HTMLRenderer(str(result_path)).render(result)
        if as_json or not (no_terminal or quiet):
            _print_result(result, as_json, Console(), detail=detail or verbose, diff=diff or verbose,
                          result_path=result_path)
    write_text_atomic(html_path, page)
    err.print(f"wrote {html_path}", highlight=False)
    if open_html:
        _open_in_browser(html_path)


@app.command(name="apply")
@handles_errors
def apply_cmd(
    result_path: Path = typer.Argument(..., metavar="RESULT", help="An AdvisorResult from `profile` or `bench`."),
    write: bool = typer.Option(False, "--write", help="Write the changes (atomically, with backups under "
                                                       "./.fusion-advisor/backups). Default: print the diff only."),
    revert: bool = typer.Option(False, "--revert", help="Restore the files of the latest --write from their backups."),
    verify_run: bool = typer.Option(False, "--verify", help="Run the script unpatched and patched for the same steps "
                                                            "and seed; compare losses, step time and peak memory."),
    steps: int = typer.Option(20, "--steps", "-n", min=1, help="Steps to compare with --verify."),
    warmup: int = typer.Option(5, "--warmup", "-w", min=0, help="Steps before timing with --verify."),
    compile_reference: Optional[bool] = typer.Option(
        None, "--compile-reference/--no-compile-reference",
        help="With --verify, also time the script under whole-model torch.compile and name the fastest "
             "configuration measured [default: on with a CUDA GPU]."),
    compile_blocks: Optional[bool] = typer.Option(
        None, "--compile-blocks/--no-compile-blocks",
        help="With --verify, also time the patch plus regional torch.compile of the model's repeated blocks "
             "(its transformer layers, CNN stages' blocks), checked like the patch [default: on with a CUDA GPU]."),
    rerun_unpatched: Optional[bool] = typer.Option(
        None, "--rerun-unpatched/--no-rerun-unpatched",
        help="With --verify, run the unpatched script again after the other configurations: how far its two "
             "step times differ is the run-to-run spread, and a configuration that gains less than that is not "
             "named faster [default: on with a CUDA GPU]."),
    memory: bool = typer.Option(False, "--memory", help="Also apply the memory trades (recommendations that lower "
                                                        "peak memory at a measured time cost, e.g. the LM head's "
                                                        "linear_cross_entropy: logits never materialised)."),
    include_estimates: bool = typer.Option(False, "--include-estimates",
                                           help="Also apply recommendations that bench did not time on a GPU "
                                                "(estimates only; --verify marks them). Default: only what was "
                                                "measured faster than eager with its numerics checked."),
    skip: Optional[list[str]] = typer.Option(
        None, "--skip", metavar="NAME",
        help="Leave this replacement out (repeatable): a recommendation's pattern, or the name --verify gives "
             "it (rope, layer_norm, generic:<hash>, compile:<Class>)."),
    as_json: bool = typer.Option(False, "--json", help="Print the plan (and verification) as JSON."),
    force: bool = typer.Option(False, "--force", help="With --revert: restore files edited since --write too "
                                                      "(the edited text is kept in the backup folder)."),
):
    """Patch your source with the recommendations: a unified diff by default.

    \b
    Your own files get source rewrites (libcst keeps your formatting): module swaps such as
    LlamaRMSNorm(...) -> FusedRMSNorm(...), and expression rewrites such as
    F.silu(g) * u -> swiglu(g, u). Library code (transformers, site-packages) is never edited:
    there the patch is the instance-scoped `fusion_advisor.patch(model, "result.json")`.

    \b
    Examples:
      fusion-advisor apply fusion-report/result.json             # show the diff
      fusion-advisor apply fusion-report/result.json --verify    # measure it, still writing nothing
      fusion-advisor apply fusion-report/result.json --write     # apply it
      fusion-advisor apply fusion-report/result.json --revert    # undo the last --write
      fusion-advisor apply fusion-report/result.json --revert --force   # even over edits made since
      fusion-advisor apply fusion-report/result.json --verify --memory   # with the memory trades
      fusion-advisor apply fusion-report/result.json --verify --skip rope  # all but one replacement
    """

    from fusion_advisor import apply as apply_mod
    from fusion_advisor.core.files import leftover_temps
    from fusion_advisor.core.result import AdvisorResult

    root = Path.cwd()
    if revert:
        if write:
            raise AdvisorError("--write and --revert together make no sense; choose one")
        try:
            restored = apply_mod.revert(root, force=force)
        except apply_mod.RevertConflict as exc:
            sys.stdout.write(exc.diff)
            raise
        for path in restored:
            err.print(f"restored {path}", highlight=False)
        return
    if force:
        raise AdvisorError("--force goes with --revert only")
    result = AdvisorResult.load(result_path)
    moved = apply_mod.relocate(result, root)
    script = (result.run or {}).get("script")
    if script and not Path(script).is_file() and (verify_run or write):
        raise AdvisorError(f"the profiled script {script} is not on this disk (run apply from the folder you "
                           f"profiled in, or with the checkout it came from)")
    if not result.recommendations and verify_run and result.benchmarks and _wanted_on_gpu(compile_blocks):
        # bench timed the clusters and none was worth fusing: the compiled blocks may still be
        plan = apply_mod.ApplyPlan(notes=["no recommendation: bench found no cluster worth replacing"])
    else:
        plan = apply_mod.plan(result, memory=memory, include_estimates=include_estimates, skip=skip or ())
    if moved:
        plan.notes.insert(0, moved)
    leftovers = [t for f in plan.changed for t in leftover_temps(f.path)]
    if leftovers and not write:
        plan.notes.append(f"{len(leftovers)} temporary file(s) of an interrupted write lie beside your sources "
                          f"({', '.join(map(str, leftovers))}); the next --write removes them")
    diff = plan.diff(str(root))
    report = {"diff": diff, "runtime_patterns": plan.runtime_patterns, "notes": plan.notes,
              "replacements": plan.replacements, "estimates": plan.estimates, "runtime_modules": plan.runtime_modules,
              "providers": plan.providers,
              "changes": [{"path": f.path, **asdict(c)} for f in plan.changed for c in f.changes]}
    if not as_json:
        sys.stdout.write(diff or "(no source change)\n")
        from fusion_advisor.report.safe_text import strip_controls
        for note in plan.notes:
            err.print(f"[yellow]note:[/] {escape(strip_controls(note))}", highlight=False)
        for c in plan.providers:
            err.print(f"provider for #{c['rank']} ({c['module'] or c['cluster_id']}): {c['provider'] or 'nothing'} - "
                      f"{c['why']}", highlight=False)
    v = None
    if verify_run:
        v = _verify_configurations(result, plan, report, steps, warmup, compile_blocks, compile_reference,
                                   rerun_unpatched, as_json)
    if write and not plan.changed:
        err.print("nothing to write: the sources already hold every change (or none applies)", highlight=False)
    elif write:
        backup = apply_mod.write(plan, root, notice=lambda m: err.print(f"[yellow]note:[/] {escape(m)}", highlight=False))
        report["backup"] = str(backup)
        for f in plan.changed:
            err.print(f"wrote {f.path}", highlight=False)
        err.print(f"backups in {backup} (undo: fusion-advisor apply {result_path} --revert)", highlight=False)
    if as_json:
        from fusion_advisor.core.result import dumps_strict
        sys.stdout.write(dumps_strict(report) + "\n")
    refused = [r for r in v.replacements if r.status == "refused"] if v is not None else []
    if refused and not as_json:
        err.print(f"[yellow]note:[/] {len(refused)} planned replacement(s) refused by the patch's own check, not "
                  f"applied: {'; '.join(f'{r.name}: {r.why}' for r in refused)}", highlight=False)
    if v is not None and v.never_called:
        first = v.never_called[0]
        more = f" (and {len(v.never_called) - 1} more)" if len(v.never_called) > 1 else ""
        _fail(f"not verified: {first.name} ({first.how}) never ran: {first.why}{more}; "
              f"`--skip {first.name}` verifies the rest", EXIT_NOT_VERIFIED)
    if v is not None and not v.proven:
        _fail("not verified: no planned replacement was counted in the patched run", EXIT_NOT_VERIFIED)
    if v is not None and not v.losses_match:
        _fail("the patched run's losses differ from the unpatched run's beyond tolerance", EXIT_NOT_VERIFIED)


SLOWER_BELOW = 0.98   # a patched/unpatched step ratio under this is slower: past ~2 % run-to-run noise


def _verify_configurations(result, plan, report: dict, steps: int, warmup: int, compile_blocks: bool | None,
                           compile_reference: bool | None, rerun_unpatched: bool | None, as_json: bool):
    """apply --verify: the unpatched and the patched run, then the compiled configurations (the
    repeated blocks compiled, with the patch outside them where it proved itself; whole-model compile
    as the reference), and the fastest of them. With nothing to patch, the compiled blocks alone are
    still tried against the unpatched run: where every cluster read "use torch.compile" that is the
    measured way to have it. Fills report["verification"]; returns the patch's Verification, or None
    where there was no patch to run."""
    from fusion_advisor.verify import unpatched_run, verify
    run = result.run or {}
    if not run.get("script"):
        raise AdvisorError("the result does not say which script it came from; --verify needs it")
    nothing = "nothing to verify: no recommendation of this result can be applied (see the notes)"
    torchrun = "rank" in run
    if not plan.replacements and (torchrun or not _wanted_on_gpu(compile_blocks)):
        raise AdvisorError(nothing)
    args = list(run.get("argv", [])[1:])
    originals = {f.path: f.before for f in plan.changed}
    v = None
    if plan.replacements:
        v = verify(run["script"], args, plan.runtime_patterns, steps=steps, warmup=warmup,
                   source_overrides={f.path: f.after for f in plan.changed},
                   original_sources=originals, planned=plan.replacements,
                   nproc=int(run.get("world_size") or 0) if torchrun else 0, modules=plan.runtime_modules)
        report["verification"] = {**asdict(v), "proven": v.proven, "why_slower": _why_slower(v)}
        before = v.before
    else:
        before = unpatched_run(run["script"], args, steps=steps, warmup=warmup)
        report["verification"] = {"before": asdict(before), "proven": False}
    with_patch = v is not None and v.proven and v.losses_match
    blocks = _compiled_blocks(run, steps, warmup, compile_blocks, before, plan if with_patch else None)
    if blocks is not None:
        report["verification"]["compiled_blocks"] = blocks
    layout = _channels_last_blocks(result, run, steps, warmup, compile_blocks, before, plan, with_patch)
    if layout is not None:
        report["verification"]["compiled_blocks_channels_last"] = layout
    reference = _compile_reference(run, steps, warmup, compile_reference, plan.notes)
    if reference is not None:
        report["verification"]["compile_reference"] = reference
    spread = None
    if _wanted_on_gpu(rerun_unpatched) and not torchrun:
        # last, so the two unpatched runs bracket the others: drift over the runs shows as spread
        again = unpatched_run(run["script"], args, steps=steps, warmup=warmup, original_sources=originals)
        if before.median_step_s and again.median_step_s:
            spread = abs(again.median_step_s - before.median_step_s) / before.median_step_s
        report["verification"]["unpatched_again"] = {**_run_row(again), "spread": spread}
    best, verdict = _fastest_configuration(before, v if with_patch else None, blocks, reference, spread, layout)
    report["verification"]["fastest"] = {"configuration": best, "verdict": verdict}
    if reference is not None and "median_step_s" in reference:
        reference.update(fastest=best, verdict=verdict)
    if not as_json:
        _print_verification(before, v, plan.estimates, reference, blocks, verdict, spread, layout)
    if v is None and _verified_step_s(blocks) is None:
        why = ("was not made" if not blocks else "failed: " + blocks["error"] if blocks.get("error") else
               "found no repeated blocks to compile" if not blocks.get("proven") else
               "ran, but its losses differ from the unpatched run's")
        raise AdvisorError(f"{nothing}; the compiled-blocks run {why}")
    return v


def _why_slower(v) -> str | None:
    """Why the patched step is slower, from the runs' GPU-busy windows (gpu_time.why_slower)."""
    from fusion_advisor.gpu_time import why_slower
    if v.speedup is None or v.speedup >= SLOWER_BELOW:
        return None
    return why_slower(v.before.median_step_s, v.before.gpu_busy_s, v.after.median_step_s, v.after.gpu_busy_s,
                      v.before.gpu_kernels_s, v.after.gpu_kernels_s)


def _wanted_on_gpu(wanted: bool | None) -> bool:
    if wanted is None:
        import torch
        wanted = torch.cuda.is_available()   # inductor on a CPU compiles C++ for minutes: opt in there
    return wanted


def _compiled_blocks(run: dict, steps: int, warmup: int, wanted: bool | None, before, plan=None) -> dict | None:
    """Regional torch.compile of the repeated blocks, with the patch of `plan` outside them (None:
    no patch, the blocks alone), timed and checked against the unpatched run `before`
    (compile_reference.compiled_blocks). None when not wanted or possible."""
    if not _wanted_on_gpu(wanted):
        return None
    if "rank" in run:
        if plan is not None:
            plan.notes.append("no compiled-blocks run for a torchrun job")
        return None
    from fusion_advisor.apply import ApplyPlan
    from fusion_advisor.compile_reference import blocks_configuration, compiled_blocks
    from fusion_advisor.core.errors import ScriptError
    patch = plan if plan is not None else ApplyPlan()   # the blocks alone: an empty patch outside them
    name = blocks_configuration(with_patch=plan is not None)
    try:
        b = compiled_blocks(run["script"], list(run.get("argv", [])[1:]), before, patch.runtime_patterns,
                            patch.replacements, {f.path: f.after for f in patch.changed}, steps=steps,
                            warmup=max(warmup, 2), modules=patch.runtime_modules)
    except ScriptError as exc:
        return {"configuration": name, "error": str(exc)}
    m = b.after
    if m.error:
        return {"configuration": name, "error": m.error.strip().splitlines()[-1]}
    return {"configuration": name, **_run_row(m), "losses_match": b.losses_match, "proven": b.proven,
            "speedup": b.speedup, "max_loss_rel_diff": b.max_loss_rel_diff,
            "replacements": [asdict(r) for r in b.replacements], "regional_compiles": m.regional_compiles,
            "skipped": m.skipped}


def _channels_last_blocks(result, run: dict, steps: int, warmup: int, wanted: bool | None, before, plan,
                          with_patch: bool) -> dict | None:
    """Where the result recommends channels_last (priced on cuDNN's NCHW <-> NHWC transposes: an
    estimate) and the plan leaves it out (no --include-estimates), the compiled blocks again with the
    model and its 4-D inputs in channels_last, timed and checked as they are: the estimate measured,
    a configuration like the others. Why: whole-model compile puts convolutions in channels_last
    itself (inductor's layout optimisation), and ResNet's compiled blocks stayed 13 ms a step behind
    it on the H100 zoo. None where there is no such recommendation or no compiled-blocks run."""
    from fusion_advisor import channels_last
    from fusion_advisor.apply import ApplyPlan
    from fusion_advisor.compile_reference import blocks_configuration
    if not any(getattr(r, "kind", None) == channels_last.NAME for r in result.recommendations or []):
        return None
    if channels_last.NAME in plan.runtime_patterns:
        return None   # --include-estimates: the patched run has it already
    base = plan if with_patch else ApplyPlan()
    layout = dataclasses.replace(base, runtime_patterns=list(base.runtime_patterns),
                                 replacements=dict(base.replacements))
    layout.add_runtime(channels_last.NAME, "runtime change (memory format)")
    b = _compiled_blocks(run, steps, warmup, wanted, before, layout)
    if b is not None:
        b["configuration"] = blocks_configuration(with_patch) + " + " + channels_last.NAME
    return b


def _verified_step_s(blocks: dict | None) -> float | None:
    return blocks.get("median_step_s") if blocks and blocks.get("proven") and blocks.get("losses_match") else None


def _fastest_configuration(before, v, blocks: dict | None, reference: dict | None,
                           spread: float | None = None, layout: dict | None = None) -> tuple[str, str]:
    """The fastest configuration measured, among those whose losses matched the unpatched run's
    (`v`: the patch's verification where it proved itself, else None; whole-model compile is the
    reference: its own losses are shown, not gated)."""
    from fusion_advisor.compile_reference import fastest
    rows = {"unpatched": before.median_step_s, "patched": v.after.median_step_s if v is not None else None}
    for extra in (blocks, layout):
        if extra:
            rows[extra["configuration"]] = _verified_step_s(extra)
    rows["torch.compile (whole model)"] = (reference or {}).get("median_step_s")
    return fastest(rows, spread)


def _compile_reference(run: dict, steps: int, warmup: int, wanted: bool | None, notes: list[str]) -> dict | None:
    """Whole-model torch.compile of the same script, timed as verify times (issue 13): the
    reference row and the fastest configuration measured. None when not wanted or not possible."""
    if not _wanted_on_gpu(wanted):
        return None
    if "rank" in run:
        notes.append("no torch.compile reference for a torchrun job")
        return None
    from fusion_advisor.compile_reference import compile_reference
    from fusion_advisor.core.errors import ScriptError
    try:
        m = compile_reference(run["script"], list(run.get("argv", [])[1:]), steps=steps, warmup=max(warmup, 2))
    except ScriptError as exc:
        return {"error": str(exc), "verdict": "torch.compile reference failed: " + str(exc)}
    if m.error:
        return {"error": m.error.strip().splitlines()[-1], "verdict": "the torch.compile reference run failed"}
    return _run_row(m)


def _run_row(m) -> dict:
    """A compiled configuration's column: median step time, peak memory, first and last loss."""
    return {"median_step_s": m.median_step_s, "peak_mem_bytes": m.peak_mem_bytes, "losses": m.losses[:1] + m.losses[-1:],
            "gpu_busy_s": m.gpu_busy_s}


def _print_verification(before, v, estimates: list[str] = (), reference: dict | None = None,
                        blocks: dict | None = None, verdict: str = "", spread: float | None = None,
                        layout: dict | None = None) -> None:
    """The measured configurations side by side; `v` (the patch's verification) None: no patch ran."""
    from rich.table import Table

    t = Table(title="apply --verify (measured)", title_justify="left")
    t.add_column("")
    columns = [("unpatched", _run_row(before))]
    if v is not None:
        columns.append(("patched", _run_row(v.after)))
    columns += [(name, row) for name, row in (((blocks or {}).get("configuration"), blocks),
                                              ((layout or {}).get("configuration"), layout),
                                              ("torch.compile (whole model)", reference))
                if row and "median_step_s" in row]
    for name, _ in columns:
        t.add_column(name, justify="right")
    ms = lambda s: f"{s * 1e3:,.2f} ms" if s else "—"  # noqa: E731
    gb = lambda b: f"{b / 2**30:,.2f} GiB" if b is not None else "—"  # noqa: E731
    first_last = lambda xs: f"{xs[0]:.4f}, {xs[-1]:.4f}" if xs else "—"  # noqa: E731
    t.add_row("median step time", *(ms(row["median_step_s"]) for _, row in columns))
    if any(row.get("gpu_busy_s") is not None for _, row in columns):   # a CUDA run's profiled window
        t.add_row("GPU busy a step", *(ms(row.get("gpu_busy_s")) for _, row in columns))
    t.add_row("peak memory", *(gb(row["peak_mem_bytes"]) for _, row in columns))
    t.add_row("losses (first, last)", *(first_last(row["losses"]) for _, row in columns))
    Console().print(t)
    for name, c in ((blocks or {}).get("regional_compiles") or {}).items():
        if isinstance(c, dict) and c.get("first_call_s"):
            Console().print(f"{blocks['configuration']}: {c.get('instances')} blocks, {c.get('graphs')} graph(s); the "
                            f"first call took {c['first_call_s']:.1f} s (its compile and one run; {name})", highlight=False)
    for extra in (blocks, layout):
        if extra and extra.get("error"):
            Console().print(f"{extra['configuration']}: not measured ({extra['error']})", highlight=False)
        elif extra and not (extra.get("proven") and extra.get("losses_match")):
            Console().print(f"{extra['configuration']}: not a candidate (its losses differ or its blocks never "
                            f"compiled)", highlight=False)
    if reference and reference.get("error"):
        Console().print(reference["verdict"], highlight=False)
    if verdict and (blocks or reference or spread is not None):   # more than the patch's own ratio
        Console().print(verdict, highlight=False)
    if verdict.startswith("fastest: ") and "+ channels_last (" in verdict:
        call = "RESULT" if verdict.startswith("fastest: patched") else "patterns=[]"
        Console().print("  to run it: model = model.to(memory_format=torch.channels_last) and each image batch "
                        f"x.to(memory_format=torch.channels_last), then fusion_advisor.patch(model, {call}, "
                        "compile_blocks=True) after building the model", highlight=False)
    elif verdict.startswith("fastest: torch.compile (whole model)"):
        Console().print("  to run it: model = torch.compile(model) after building the model; the patch is not "
                        "needed for it", highlight=False)
    elif verdict.startswith("fastest: patched + compiled blocks"):
        Console().print("  to run it: fusion_advisor.patch(model, RESULT, compile_blocks=True) after building the "
                        "model (with your source patches written: apply --write)", highlight=False)
    elif verdict.startswith("fastest: compiled blocks"):
        Console().print("  to run it: fusion_advisor.patch(model, patterns=[], compile_blocks=True) after building "
                        "the model (torch.compile of each repeated block, nothing of ours)", highlight=False)
    if v is None:
        return
    r = Table(title="replacements in the patched run (calls counted)", title_justify="left")
    r.add_column("replacement", no_wrap=True)
    r.add_column("applied as", ratio=1)            # words: these wrap at a narrow terminal, nothing else
    r.add_column("calls / step", justify="right", no_wrap=True)
    r.add_column("", min_width=3, ratio=1)
    for row in v.replacements:
        mark = " (estimate)" if row.name in estimates else ""
        calls = f"{row.calls_per_step:,.1f}" if row.status == "ran" else "—"
        r.add_row(row.name + mark, row.how, calls, row.status if row.status == "ran" else f"{row.status}: {row.why}")
    Console().print(r)
    if not v.proven:
        Console().print("losses not compared: the patch did not demonstrably run (see above)")
    elif v.speedup and v.max_loss_rel_diff is not None:
        agree = "match" if v.losses_match else "DIFFER"
        Console().print(f"speedup {v.speedup:.2f}x; losses {agree} (max relative difference {v.max_loss_rel_diff:.2e})")
        if v.speedup < SLOWER_BELOW:
            Console().print("the patch made the step slower: keep the unpatched script (do not --write it)",
                            highlight=False)
            if why := _why_slower(v):
                Console().print(why, highlight=False)
    else:
        Console().print("no timing")
    for s in v.after.swapped:
        Console().print(f"  runtime swap: {s}", highlight=False)
    for s in v.after.skipped:
        Console().print(f"  [yellow]skipped:[/] {s}", highlight=False)


@app.command()
@handles_errors
def bench(
    result_path: Path = typer.Argument(..., metavar="RESULT", help="An AdvisorResult from profile or analyze."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Where to write the result [default: RESULT.json]."),
    providers: str = typer.Option("eager,triton,compile,liger", "--providers",
                                  help="What to time, comma-separated: eager, triton, compile, liger, cuda_graph "
                                       "(cuda_graph is added by itself when the step is launch-bound)."),
    cpu: bool = typer.Option(False, "--cpu", help="CPU mode for tests: Triton in its interpreter, tiny shapes; "
                                                  "checks numerics, times nothing that counts."),
    gpu_hourly_cost: Optional[float] = typer.Option(None, "--gpu-hourly-cost", help=GPU_COST_HELP),
    steps_per_day: Optional[float] = typer.Option(None, "--steps-per-day", help=STEPS_PER_DAY_HELP),
    gpus: int = typer.Option(1, "--gpus", help=GPUS_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print the AdvisorResult JSON on stdout."),
):
    """Time each matched cluster's replacement on its captured shapes, check its numerics, rank.

    \b
    For every cluster matched to a registered pattern: eager PyTorch, our Triton kernel,
    torch.compile and Liger-Kernel, forward and forward+backward, p20/p50/p80 with the
    profiler off; forward and every gradient checked against the eager code. A replacement that
    fails numerics or is not faster than eager is rejected, with the figures.

    \b
    Example:
      fusion-advisor bench fusion-report/result.json --providers eager,triton,compile
    """
    if cpu and "fusion_advisor.kernels" not in sys.modules:
        import os
        os.environ.setdefault("TRITON_INTERPRET", "1")   # read when the kernels are defined, so set it first
    from fusion_advisor.bench import BenchOptions, parse_providers
    from fusion_advisor.pipeline import bench_and_recommend
    from fusion_advisor.report.bench_terminal import render_benchmarks, render_recommendations
    from fusion_advisor.core.result import AdvisorResult

    result = AdvisorResult.load(result_path)
    options = BenchOptions(providers=parse_providers(providers), mode="cpu" if cpu else "auto")
    if not cpu:
        _require_gpu(f"bench needs a CUDA GPU to time anything; {result_path} is left as it was "
                     f"(--cpu checks numerics in the Triton interpreter)")
    roi_options = _roi_options(gpu_hourly_cost, steps_per_day, gpus)
    with _bench_progress() as on_cluster:
        bench_and_recommend(result, options, roi_options, progress=on_cluster)
    # CPU mode times nothing that counts: it never replaces a result's measurements by itself.
    dest = out if cpu else (out or result_path)
    if dest is not None:
        result.save(dest)
    if as_json:
        sys.stdout.write(result.to_json() + "\n")
    else:
        console = Console()
        from fusion_advisor.report.safe_text import terminal_safe
        render_benchmarks(terminal_safe(result), console)
        render_recommendations(terminal_safe(result), console)
    err.print(f"wrote {dest}" if dest is not None else
              "--cpu: nothing written (CPU mode times nothing that counts; -o FILE keeps its result)", highlight=False)


def _require_gpu(message: str) -> None:
    """EnvironmentProblem (exit 3) unless a CUDA GPU runs the kernels (not the Triton interpreter)."""
    import torch

    from fusion_advisor.kernels.common import interpreting
    if not torch.cuda.is_available() or interpreting():
        raise EnvironmentProblem(message)


@app.command()
@handles_errors
def recommend(
    result_path: Path = typer.Argument(..., metavar="RESULT", help="An AdvisorResult, benchmarked or not."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Where to write the result [default: RESULT.json]."),
    gpu_hourly_cost: Optional[float] = typer.Option(None, "--gpu-hourly-cost", help=GPU_COST_HELP),
    steps_per_day: Optional[float] = typer.Option(None, "--steps-per-day", help=STEPS_PER_DAY_HELP),
    gpus: int = typer.Option(1, "--gpus", help=GPUS_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print the AdvisorResult JSON on stdout."),
):
    """Rank what to change from a saved result's benchmarks (estimates where none ran), with ROI.

    \b
    Re-run it with your own prices and scale; nothing is timed again:
      fusion-advisor recommend fusion-report/result.json --gpu-hourly-cost 4.10 --gpus 64
    """
    from fusion_advisor.pipeline import rank
    from fusion_advisor.report.bench_terminal import render_recommendations
    from fusion_advisor.core.result import AdvisorResult

    result = rank(AdvisorResult.load(result_path), _roi_options(gpu_hourly_cost, steps_per_day, gpus))
    dest = out or result_path
    result.save(dest)
    if as_json:
        sys.stdout.write(result.to_json() + "\n")
    else:
        from fusion_advisor.report.safe_text import terminal_safe
        render_recommendations(terminal_safe(result), Console())
    err.print(f"wrote {dest}", highlight=False)


@app.command()
@handles_errors
def calibrate(
    quick: bool = typer.Option(False, "--quick", help="Fewer sizes and samples (about a third of the time)."),
    as_json: bool = typer.Option(False, "--json", help="Print the DeviceProfile JSON on stdout."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Also write the profile JSON here."),
    kernel_tiles: bool = typer.Option(False, "--kernel-tiles",
                                      help="Also search the norm kernels' tiles on this GPU (bf16 and fp32, every "
                                           "row length; a few minutes) and cache them: our RMSNorm / LayerNorm / "
                                           "GroupNorm kernels run the fastest tile from then on. An H100 needs "
                                           "none: its table ships with the package."),
):
    """Measure this machine's GPU for the cost model: copy bandwidth by transfer size, matmul peaks
    per dtype, kernel launch costs, L2 size. Takes under a minute (plus a few with --kernel-tiles).

    \b
    The profile is cached per (GPU, driver, torch) in $XDG_CACHE_HOME/fusion-advisor (default
    ~/.cache/fusion-advisor); later analyses of traces from this GPU use it instead of datasheet
    figures.

    \b
    Example:
      fusion-advisor calibrate --out h200.json
    """
    from fusion_advisor.cost_model.calibrate import calibrate as run_calibration
    from fusion_advisor.cost_model.device import cache_path

    progress = Progress(TextColumn("{task.description:<28}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                        TimeElapsedColumn(), console=err, transient=True)
    tasks: dict[str, int] = {}

    def on_step(what: str, done: int, total: int) -> None:
        stage = what.split()[0]
        if stage not in tasks:
            tasks[stage] = progress.add_task(stage, total=total)
        progress.update(tasks[stage], description=what, completed=done, total=total)

    with progress:
        profile = run_calibration(quick=quick, progress=on_step)
        tiles_path = _search_kernel_tiles(progress) if kernel_tiles else None
    cal = profile.calibration
    written = [profile.save(cache_path(profile.name, cal.get("driver"), cal.get("torch")))]
    if tiles_path:
        written.append(Path(tiles_path))
    if out is not None:
        written.append(profile.save(out))
    if as_json:
        sys.stdout.write(json.dumps(profile.to_dict(), indent=2) + "\n")
    else:
        console = Console()
        console.print(f"{profile.label()}  driver {cal.get('driver')}  torch {cal.get('torch')}  "
                      f"triton {cal.get('triton')}", highlight=False)
        console.print(f"  copy bandwidth        {profile.hbm_bytes_per_s / 1e12:8.2f} TB/s (read + written)",
                      highlight=False)
        for key, flops in profile.peak_flops.items():
            console.print(f"  matmul {key:<14} {flops / 1e12:8.1f} TFLOP/s", highlight=False)
        for key, rate in profile.element_rates.items():
            console.print(f"  {key + ' loop':<21} {rate / 1e9:8.0f} G elements/s", highlight=False)
        console.print(f"  kernel back to back   {profile.min_kernel_us:8.2f} µs (GPU)\n"
                      f"  eager launch          {profile.launch_us:8.2f} µs (CPU)\n"
                      f"  L2                    {profile.l2_bytes / 2**20:8.0f} MiB   SMs {profile.num_sms}",
                      highlight=False)
    err.print("\n".join(f"wrote {p}" for p in written), highlight=False)


def _search_kernel_tiles(progress: Progress) -> str:
    """calibrate --kernel-tiles: norm_tune's search over every row length, bf16 and fp32, both
    families, on large launches and on small ones, its candidates compiled in parallel first;
    returns the tile file it wrote."""
    import torch
    from fusion_advisor.kernels import norm_tune

    dtypes = [torch.bfloat16, torch.float32]
    total = len(norm_tune.ROW_LENGTHS) * len(dtypes) * len(norm_tune.FAMILIES) * 2 * 2   # passes x sizes
    task = progress.add_task("kernel tiles", total=total)

    def on_log(line: str) -> None:
        if line.startswith(("  fwd", "  bwd")):   # one per (row length, dtype, family, pass) searched
            progress.update(task, description="kernel tiles " + line.split(":")[0].strip(), advance=1)

    # A compile process allocates the tuning tensors (six of up to 2^27 bytes, 0.75 GiB) and a CUDA
    # context: 2 GiB of free GPU memory each.
    jobs = max(1, min(12, (os.cpu_count() or 2) - 1, torch.cuda.mem_get_info()[0] // (2 << 30)))
    norm_tune.tune(norm_tune.ROW_LENGTHS, dtypes, torch.device("cuda"), log=on_log, jobs=jobs)
    return norm_tune.tune(norm_tune.ROW_LENGTHS, dtypes, torch.device("cuda"), log=on_log, small=True)


_ARGV: list[str] | None = None   # the command line as typed (click drops the `--` that splits it)


def main(argv: List[str] | None = None) -> None:
    global _ARGV
    _ARGV = list(sys.argv[1:] if argv is None else argv)
    app(args=argv, prog_name="fusion-advisor")


if __name__ == "__main__":
    main()
