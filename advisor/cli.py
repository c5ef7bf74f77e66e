"""The `fusion-advisor` command line."""
from __future__ import annotations

import contextlib
import functools
import json
import sys
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from fusion_advisor import __version__
from fusion_advisor.errors import EXIT_SCRIPT_FAILED, AdvisorError

HELP = """\
Find the memory-bound kernel chains in a PyTorch training script, time fused Triton replacements
on its own shapes, and say what each would save.

\b
Typical use:
  fusion-advisor profile train.py -- --batch-size 8     # profile, analyse, report
  fusion-advisor analyze fusion-report/trace.json.gz    # re-analyse a saved (or any) Kineto trace

\b
Exit codes: 0 ok · 1 the profiled script failed · 2 bad input (usage, missing or broken file)
            3 missing GPU or dependency · 4 an output could not be written
"""

app = typer.Typer(help=HELP, add_completion=False, no_args_is_help=True, rich_markup_mode=None,
                  pretty_exceptions_show_locals=False,
                  context_settings={"help_option_names": ["-h", "--help"]})
err = Console(stderr=True, soft_wrap=True)


def _fail(message: str, code: int) -> None:
    err.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
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


def _print_result(result, as_json: bool, out_console: Console) -> None:
    if as_json:
        sys.stdout.write(result.to_json() + "\n")
        return
    from fusion_advisor.report.terminal import render_summary
    render_summary(result, out_console)


def _version_callback(value: bool):
    if value:
        typer.echo(f"fusion-advisor {__version__}")
        raise typer.Exit()


@app.callback()
def _main(version: bool = typer.Option(False, "--version", callback=_version_callback, is_eager=True,
                                       help="Print the version and exit.")):
    pass


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
@handles_errors
def profile(
    ctx: typer.Context,
    script: Path = typer.Argument(..., help="Your training script. Its own arguments go after `--`."),
    warmup: int = typer.Option(3, "--warmup", "-w", min=0,
                               help="Steps to run before recording (the first steps allocate, compile and autotune)."),
    steps: int = typer.Option(3, "--steps", "-n", min=1, help="Steps to record."),
    stop: bool = typer.Option(True, "--stop/--no-stop", help="Stop the script once the steps are recorded."),
    out: Path = typer.Option(Path("fusion-report"), "--out", "-o", help="Folder for the trace, metadata and report."),
    as_json: bool = typer.Option(False, "--json", help="Print the AdvisorResult JSON on stdout (the script's own "
                                                       "output goes to stderr)."),
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
    from fusion_advisor.capture import CaptureOptions, capture

    opts = CaptureOptions(script=str(script), script_args=list(ctx.args), warmup=warmup, steps=steps,
                          stop=stop, out_dir=str(out))
    progress = Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                        TimeElapsedColumn(), console=err, transient=True)
    task = progress.add_task("warm-up steps", total=max(warmup, 1))

    def on_step(n: int, w: int, a: int, source: str | None) -> None:
        if n < w:
            progress.update(task, description=f"warm-up steps (by {source or '?'})", completed=n, total=w)
        else:
            progress.update(task, description=f"recording steps (by {source})", completed=min(n - w, a), total=a)

    redirect = contextlib.redirect_stdout(sys.stderr) if as_json else contextlib.nullcontext()
    with redirect, progress:
        result_capture = capture(opts, progress=on_step, notice=lambda m: err.print(f"[yellow]note:[/] {m}"))
    if result_capture.error:
        err.print(result_capture.error.rstrip(), highlight=False, markup=False)
    if result_capture.trace_path is None:
        written = f"; wrote {result_capture.meta_path}"
        _fail(("the script failed before any step was recorded" if result_capture.error else
               "nothing was recorded") + written, EXIT_SCRIPT_FAILED if result_capture.error else 2)
    result = _analyze_path(result_capture.trace_path)
    result_path = out / "result.json"
    result.save(result_path)
    _print_result(result, as_json, Console())
    err.print(f"wrote {result_capture.trace_path}\nwrote {result_capture.meta_path}\nwrote {result_path}",
              highlight=False)
    if result_capture.error:
        _fail("the script raised (traceback above); the steps recorded before it are kept", EXIT_SCRIPT_FAILED)


def _analyze_path(trace_path: str, target_gpu: str | None = None):
    from fusion_advisor.analyzers.trace import Trace
    from fusion_advisor.pipeline import analyze
    return analyze(Trace.load(trace_path), target_gpu=target_gpu)


@app.command()
@handles_errors
def analyze(
    trace: Path = typer.Argument(..., help="A Kineto trace from torch.profiler (.json or .json.gz), ours or your own."),
    as_json: bool = typer.Option(False, "--json", help="Print the AdvisorResult JSON on stdout."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Also save the AdvisorResult JSON here."),
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
    if out is not None:
        result.save(out)
    _print_result(result, as_json, Console())
    if out is not None:
        err.print(f"wrote {out}", highlight=False)


@app.command()
@handles_errors
def calibrate(
    quick: bool = typer.Option(False, "--quick", help="Fewer sizes and samples (about a third of the time)."),
    as_json: bool = typer.Option(False, "--json", help="Print the DeviceProfile JSON on stdout."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Also write the profile JSON here."),
):
    """Measure this machine's GPU for the cost model: copy bandwidth by transfer size, matmul peaks
    per dtype, kernel launch costs, L2 size. Takes under a minute.

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
    cal = profile.calibration
    written = [profile.save(cache_path(profile.name, cal.get("driver"), cal.get("torch")))]
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


def main(argv: List[str] | None = None) -> None:
    app(args=argv, prog_name="fusion-advisor")


if __name__ == "__main__":
    main()
