"""Run a user's script in-process under torch.profiler and record a few steady training steps.

Steps are found without editing the script, in this order of trust:
  1. explicit: the script calls `fusion_advisor.step()`;
  2. optimizer: any `torch.optim.Optimizer.step()` (a global post-hook);
  3. forward: the end of a top-level `nn.Module` forward, for scripts with no optimizer. It is
     only trusted once two forwards ran with no optimizer step between them.
The profiler skips `warmup` steps (the last one is the profiler's own warm-up) and records
`steps` steps; then `timing_steps` more steps run with the profiler off, each CUDA-synchronised,
and their median is the step time every $ figure, "% of the step" and the launch-bound verdict
rest on (the warm-up steps are recorded apart: on a ViT-B/16 they read 47.7 ms against a steady
30.6 ms, which made "use CUDA graphs" look like a 16.6 ms win). By default the script is then stopped.
"""
from __future__ import annotations

import gzip
import json
import os
import platform
import shutil
import statistics
import subprocess
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.optim.optimizer as torch_optimizer

from fusion_advisor import api
from fusion_advisor.core.errors import AdvisorError, OutputError, ScriptError
from fusion_advisor.core.files import atomic_output, write_text_atomic
from fusion_advisor.script import Terminated, run_as_main, sigterm_as_interrupt, sigterm_deferred


class _StopScript(BaseException):
    """Raised at a step boundary once the trace is saved: BaseException, so the script's own
    `except Exception` blocks do not swallow it."""


@dataclass
class CaptureOptions:
    script: str
    script_args: list[str] = field(default_factory=list)
    warmup: int = 3
    steps: int = 3
    stop: bool = True
    out_dir: str = "fusion-report"
    timing_steps: int = 5     # unprofiled steady steps timed after the trace
    rank: int | None = None   # under torchrun: files named trace.rank<k>.json.gz, run.rank<k>.json
    cuda: bool | None = None  # None: use CUDA when available


@dataclass
class CaptureResult:
    trace_path: str | None
    meta_path: str
    meta: dict
    error: str | None = None  # the script's exception, formatted, when it raised
    exited_before_any_step: int | None = None  # sys.exit(code) before any step or forward (e.g. -h)


class _Stepper:
    """Decides what a step is and tells the profiler (see the module docstring)."""

    def __init__(self, on_step: Callable[[], None]):
        self.on_step = on_step
        self.source: str | None = None
        self.count = 0
        self.forwards = 0       # module forward calls seen before a better step source was known
        self._depth = 0
        self._forward_pending = False
        self._handles: list = []

    def install(self) -> None:
        self._handles.append(torch_optimizer.register_optimizer_step_post_hook(self._optimizer_hook))
        self._handles.append(torch.nn.modules.module.register_module_forward_pre_hook(self._pre_forward))
        self._handles.append(torch.nn.modules.module.register_module_forward_hook(self._post_forward))
        api._set_step_listener(self._explicit)

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        api._set_step_listener(None)

    def _remove_forward_hooks(self) -> None:
        # Global module hooks cost a little on every module call and can confuse torch.compile:
        # drop them as soon as a better source of steps is known.
        for h in self._handles[1:]:
            h.remove()
        del self._handles[1:]

    def _step(self) -> None:
        self.count += 1
        self.on_step()

    def _explicit(self) -> None:
        if self.source != "explicit":
            self.source = "explicit"
            for h in self._handles:
                h.remove()
            self._handles.clear()
        self._step()

    def _optimizer_hook(self, optimizer, args, kwargs) -> None:
        if self.source == "explicit":
            return
        if self.source != "optimizer":
            self.source = "optimizer"
            self._remove_forward_hooks()
        self._step()

    def _pre_forward(self, module, args) -> None:
        # Inside a region torch.compile traces, these global hooks run as traced code: the counts
        # would become guards on their own values and the region would recompile every call (a
        # 3-block model under apply --verify: 5 graphs in 5 steps). A compiled region is never the
        # top-level forward a step ends on, so its insides are skipped in pairs.
        if torch.compiler.is_compiling():
            return
        self._depth += 1
        self.forwards += 1

    def _post_forward(self, module, args, output) -> None:
        if torch.compiler.is_compiling():
            return
        self._depth = max(self._depth - 1, 0)
        if self._depth or api._steps_paused or self.source in ("explicit", "optimizer"):
            return
        if self.source == "forward":
            self._step()
        elif self._forward_pending:  # a second forward with no optimizer step between: trust it
            self.source = "forward"
            self._step()
        else:
            self._forward_pending = True


def run_info(cuda: bool) -> dict:
    """Versions and hardware that every figure we report is tied to."""
    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "cuda_runtime": torch.version.cuda,
        "gpu_name": None,
        "gpu_count": 0,
        "driver": None,
    }
    if cuda:
        info["gpu_name"] = torch.cuda.get_device_name(0)
        info["gpu_count"] = torch.cuda.device_count()
        info["driver"] = _driver_version()
    return info


def _version(pkg: str) -> str | None:
    try:
        from importlib.metadata import version
        return version(pkg)
    except Exception:
        return None


def _driver_version() -> str | None:
    smi = shutil.which("nvidia-smi")
    if not smi:
        return None
    try:
        out = subprocess.run([smi, "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
    except Exception:
        return None


def _check_out_dir(out_dir: str) -> Path:
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=out, prefix=".write-test-", delete=True)
        probe.close()
    except OSError as exc:
        raise OutputError(f"cannot write to {out}: {exc.strerror or exc}") from None
    return out


def write_trace_gz(json_path: str, dest: Path, meta: dict) -> None:
    """Gzip an exported Chrome trace to `dest` with our run metadata as a top-level key.
    Written to a temporary file in the same folder and renamed: never half-written."""
    with open(json_path, "r", encoding="utf-8") as fh:
        text = fh.read()
    brace = text.find("{")
    if brace < 0:
        raise AdvisorError("torch.profiler exported an empty trace")
    body = text[:brace + 1] + '\n  "fusion_advisor": ' + json.dumps(meta) + "," + text[brace + 1:]
    with atomic_output(dest, binary=True) as raw, gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=6,
                                                                mtime=0) as gz:
        gz.write(body.encode("utf-8"))


def add_trace_events(path: Path, events: list[dict]) -> None:
    """Append events to a saved trace (.json.gz), rewriting it atomically: the file is either the
    old trace or the new one, never half-written."""
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        doc = json.load(fh)
    doc.setdefault("traceEvents", []).extend(events)
    with atomic_output(path, binary=True) as raw, gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=6,
                                                                mtime=0) as gz:
        gz.write(json.dumps(doc).encode("utf-8"))


class _Session:
    """One run of the script under the profiler."""

    def __init__(self, opts: CaptureOptions, cuda: bool, whole_run: bool, progress=None):
        self.opts, self.cuda, self.whole_run, self.progress = opts, cuda, whole_run, progress
        self.exported_json: str | None = None
        self.trace_ready = False
        self.recorded_steps: list[int] = []
        self.traced_at: int | None = None   # the step count when the trace was saved
        self.boundaries: list[float] = []  # wall-clock time of every step boundary
        self.prof: torch.profiler.profile | None = None
        self.stepper = _Stepper(self._on_step)
        self.exit_code: object = _NOT_EXITED   # what the script passed to sys.exit, if it did
        self._tmpdir = tempfile.mkdtemp(prefix="fusion-advisor-")

    def _schedule(self):
        warmup = self.opts.warmup
        return torch.profiler.schedule(wait=max(warmup - 1, 0), warmup=1 if warmup > 0 else 0,
                                       active=self.opts.steps, repeat=1)

    def _on_trace_ready(self, prof) -> None:
        path = os.path.join(self._tmpdir, "trace.json")
        prof.export_chrome_trace(path)
        self.exported_json = path
        self.trace_ready = True

    def _on_step(self) -> None:
        with sigterm_deferred():   # never stop the script inside the profiler's own step()/stop()
            self._step_profiler()

    def _step_profiler(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()  # step wall times are only true once the GPU caught up
        self.boundaries.append(time.perf_counter())
        n = self.stepper.count
        first_active = self.opts.warmup
        if self.prof is not None and not self.trace_ready:
            if first_active <= n - 1 < first_active + self.opts.steps:
                self.recorded_steps.append(n - 1)
            self.prof.step()
        if self.trace_ready and self.traced_at is None:
            self.traced_at = n
            try:
                self.prof.stop()   # the steady steps below run with nothing of the profiler left on
            except Exception:
                pass
        if self.progress is not None:
            self.progress(n, self.opts.warmup, self.opts.steps, self.stepper.source)
        if self.trace_ready and self.opts.stop and not self.whole_run \
                and n - self.traced_at >= self.opts.timing_steps:
            raise _StopScript()

    def run(self) -> tuple[str | None, float]:
        """Run the script; returns (formatted exception or None, seconds)."""
        activities = [torch.profiler.ProfilerActivity.CPU]
        if self.cuda:
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        kwargs = dict(activities=activities, record_shapes=True, with_stack=True, with_modules=True,
                      on_trace_ready=self._on_trace_ready)
        if not self.whole_run:
            kwargs["schedule"] = self._schedule()
        t0 = time.perf_counter()
        self.boundaries.append(t0)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*Incorrect schedule.*")
            self.prof = torch.profiler.profile(**kwargs)
            self.stepper.install()
            error = None
            try:
                try:
                    with sigterm_deferred():
                        self.prof.start()
                except Terminated:
                    error = "terminated (SIGTERM)"
                else:
                    error = run_as_main(self.opts.script, self.opts.script_args, _StopScript,
                                        on_exit=lambda code: setattr(self, "exit_code", code))
            finally:  # whatever happened, keep what was traced
                self.stepper.remove()
                try:
                    with sigterm_deferred():
                        if not self.trace_ready:
                            self.prof.stop()  # while recording, this saves the partial trace
                except Terminated:
                    error = error or "terminated (SIGTERM)"
                except Exception:
                    pass
        return error, time.perf_counter() - t0

    def step_times(self) -> dict:
        """The run's step wall times, split: warm-up (before the trace), profiled, and the steady
        steps timed after it; `step_time_s_unprofiled` is the steady median, or says what stood in."""
        b = self.boundaries
        step_s = [b[i + 1] - b[i] for i in range(len(b) - 1)]
        recorded = sorted(self.recorded_steps)
        first = recorded[0] if recorded else len(step_s)
        warmup = step_s[:first]
        steady = step_s[self.traced_at:] if self.traced_at is not None else []
        if len(steady) >= 2:
            basis = f"median of {len(steady)} unprofiled steps after the trace"
            if len(steady) < self.opts.timing_steps:
                basis += f" (the script ended before {self.opts.timing_steps})"
            step = _median(steady)
        elif len(warmup) > 1:
            basis = "median of the warm-up steps after the first (the script ended before steady steps could be timed)"
            step = _median(warmup[1:])
        else:
            basis, step = "none: too few unprofiled steps", None
        return {"step_time_s_unprofiled": step, "step_time_basis": basis,
                "step_times_s_steady": [round(s, 6) for s in steady],
                "step_times_s_warmup": [round(s, 6) for s in warmup],
                "step_time_s_profiled": _median([step_s[i] for i in recorded if i < len(step_s)])}

    def cleanup(self) -> None:
        shutil.rmtree(self._tmpdir, ignore_errors=True)

    @property
    def exited_before_any_step(self) -> bool:
        """The script called sys.exit before any step and before any module forward: it printed
        its help, or gave up on its arguments. Running it again would only repeat that."""
        return self.exit_code is not _NOT_EXITED and self.stepper.count == 0 and self.stepper.forwards == 0


_NOT_EXITED = object()
# What a profile writes into its folder: one run's files at a time (see `_set_aside_previous_run`).
RUN_FILES = ("trace.json.gz", "run.json", "result.json", "report.html")
PREVIOUS_RUN_DIR = "previous"


def _set_aside_previous_run(out: Path, notice: Callable[[str], None], job: bool = False) -> None:
    """Move an earlier run's files to out/previous/ (replacing what was there), so that a run that
    fails early never leaves a new run.json beside an old trace, result and report. job: a
    torchrun job's folder (its rank files too)."""
    names = list(RUN_FILES)
    if job:
        names += sorted(p.name for pattern in ("trace.rank*.json.gz", "run.rank*.json") for p in out.glob(pattern))
    old = [out / name for name in names if (out / name).is_file()]
    if not old:
        return
    previous = out / PREVIOUS_RUN_DIR
    try:
        previous.mkdir(exist_ok=True)
        for p in old:
            os.replace(p, previous / p.name)
        for stale in previous.iterdir():   # what remains there belongs to an even older run
            if stale.is_file() and not any(p.name == stale.name for p in old):
                stale.unlink()
    except OSError as exc:
        raise OutputError(f"cannot move the previous run's files out of {out}: {exc.strerror or exc}") from None
    notice(f"moved the previous run's {', '.join(p.name for p in old)} to {previous}/")


def capture(opts: CaptureOptions, progress=None, notice: Callable[[str], None] = print) -> CaptureResult:
    """Profile `opts.script`; write trace.json.gz and run.json under `opts.out_dir`. SIGTERM is
    Ctrl-C here: the steps recorded so far are kept and the temporary folder goes."""
    with sigterm_as_interrupt():
        return _capture(opts, progress, notice)


def _capture(opts: CaptureOptions, progress, notice: Callable[[str], None]) -> CaptureResult:
    cwd = os.getcwd()   # the script may chdir: every path below is relative to where we started
    script = Path(opts.script)
    if not script.is_file():
        raise AdvisorError(f"script not found: {opts.script}")
    if opts.steps < 1:
        raise AdvisorError("--steps must be at least 1")
    if opts.warmup < 0:
        raise AdvisorError("--warmup cannot be negative")
    out = _check_out_dir(opts.out_dir)
    _set_aside_previous_run(out, notice)
    cuda = torch.cuda.is_available() if opts.cuda is None else opts.cuda
    if not cuda:
        notice("no CUDA GPU: profiling CPU ops only; GPU figures will be estimates for a target GPU")
    wall0 = time.perf_counter()
    session = _Session(opts, cuda, whole_run=False, progress=progress)
    error, seconds = session.run()
    sessions = [session]
    if (error is None and not session.trace_ready and session.stepper.count < opts.warmup + 1
            and not session.exited_before_any_step):
        # The script ended before anything was recorded: run it again, recording all of it.
        n = session.stepper.count
        notice(f"the script ran {n} step{'s' if n != 1 else ''}, fewer than --warmup {opts.warmup} needs; "
               "running it again and recording the whole run" if n else
               "the script never stepped (no optimizer.step(), no module forward, no fusion_advisor.step()); "
               "running it again and recording the whole run")
        session = _Session(opts, cuda, whole_run=True, progress=progress)
        error, seconds = session.run()
        sessions.append(session)
    try:
        meta = run_info(cuda)
        recorded = set(session.recorded_steps)
        meta.update({
            "script": os.path.abspath(opts.script),
            "argv": [opts.script, *opts.script_args],
            "cwd": cwd,
            "step_source": session.stepper.source or "none",
            "steps_seen": session.stepper.count,
            "steps_recorded": sorted(recorded),
            "whole_run": session.whole_run,
            "warmup": opts.warmup,
            **session.step_times(),
            "profiling_wall_s": round(time.perf_counter() - wall0, 3),
            "script_wall_s": round(seconds, 3),
            "script_error": error.strip().splitlines()[-1] if error else None,
            "script_exit_status": None if session.exit_code is _NOT_EXITED else session.exit_code,
            "created_unix": round(time.time(), 3),
        })
        if opts.rank is not None:
            meta.update({"rank": opts.rank, "world_size": int(os.environ.get("WORLD_SIZE", 1)),
                         "local_rank": int(os.environ.get("LOCAL_RANK", 0))})
        trace_path = None
        if session.exported_json:
            trace_path = out / ("trace.json.gz" if opts.rank is None else f"trace.rank{opts.rank}.json.gz")
            write_trace_gz(session.exported_json, trace_path, meta)
        meta_path = out / ("run.json" if opts.rank is None else f"run.rank{opts.rank}.json")
        write_text_atomic(meta_path, json.dumps(meta, indent=2, default=str) + "\n")
    finally:
        for s in sessions:
            s.cleanup()
    return CaptureResult(str(trace_path) if trace_path else None, str(meta_path), meta, error,
                         exited_before_any_step=_exit_status(session.exit_code) if session.exited_before_any_step
                         else None)


def _exit_status(code) -> int:
    """The process status sys.exit(code) gives: None is 0, a message is 1."""
    return 0 if code is None else code if isinstance(code, int) else 1


def _median(xs: list[float]) -> float | None:
    return round(statistics.median(xs), 6) if xs else None


__all__ = ["CaptureOptions", "CaptureResult", "capture", "ScriptError"]
