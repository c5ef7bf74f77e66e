"""Verify a patch on the user's own script: run it unpatched and patched for the same steps and
seed, compare the losses, and measure step time and peak memory of each.

Each run is a fresh subprocess (`python -m fusion_advisor.verify RUN_SPEC.json`), so the two runs
share no allocator state, compile cache or RNG stream. Inside it the script runs in-process as
`__main__`; steps are found as `profile` finds them (optimizer.step(), fusion_advisor.step() or a
top-level forward); losses are read from every scalar `.backward()`; the patched run swaps the
fused modules into the model at its first top-level forward (`fusion_advisor.patch`).

The patched run proves that each planned replacement ran: every fused op, generated kernel and
swapped function counts its calls (fusion_advisor.calls), and a replacement that was planned and
never called fails the verification with the reason, so zero calls can never read "losses match".
One that the patch's own check refused at run time (the module holds buffers the chain does not
take, the model's loss is another function) is listed as "refused", with the reason: not applied,
so not claimed; the verification stands on what did run, and fails when nothing did.
Patched source reaches the run however the script loads it: normal imports, importlib's
`spec_from_file_location` + `exec_module`, `SourceFileLoader`, `runpy.run_path`, and
`exec(compile(open(path).read(), path, "exec"))` all read the patched text.
"""
from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import linecache
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from fusion_advisor import calls
from fusion_advisor.core.errors import AdvisorError, ScriptError
from fusion_advisor.core.result import is_generated


@dataclass
class RunSpec:
    script: str
    script_args: list[str]
    steps: int = 20
    warmup: int = 5
    seed: int = 0
    patterns: list[str] = field(default_factory=list)  # runtime swaps; empty: the unpatched run
    source_overrides: dict[str, str] = field(default_factory=dict)  # file path -> text to run instead
    out: str = ""
    patched: bool = False        # the patched run (the unpatched one also runs its files' original text)
    nproc: int = 0               # > 1: a torchrun job of that many local ranks (each rank measured)
    modules: dict[str, list[str]] = field(default_factory=dict)   # pattern -> the module classes it swaps
    gpu_profile_steps: int = 3   # steps after the timed ones, under a CUDA-only profiler (gpu_time)


@dataclass
class RunMeasurement:
    patched: bool
    steps_run: int
    losses: list[float]
    step_times_s: list[float]           # steps after warm-up
    median_step_s: float | None
    peak_mem_bytes: int | None
    swapped: list[str] = field(default_factory=list)   # "path: Old -> New"
    skipped: list[str] = field(default_factory=list)
    error: str | None = None
    calls: dict[str, int] = field(default_factory=dict)   # fusion_advisor.calls over the script's run,
                                                          # patch's own numerics checks excluded
    overrides_read: list[str] = field(default_factory=list)  # patched files the run actually read
    compiled: bool = False                                 # the script called torch.compile
    # regional torch.compile of the patch ("compile:<Class>"): {name: {instances, graphs, first_call_s}}
    regional_compiles: dict[str, dict] = field(default_factory=dict)
    gpu_busy_s: float | None = None     # the GPU's busy time a step, profiled after the timed steps
    gpu_kernels_s: dict[str, float] = field(default_factory=dict)   # its top kernels, s a step


@dataclass
class ReplacementCalls:
    """One planned replacement in the patched run: how often it ran, or why it never did."""

    name: str                # "rms_norm", "generic:1a2b3c4d5e"
    how: str                 # "runtime swap" | "source: model.py" | ...
    calls_per_step: float
    status: str              # "ran" | "never called" | "refused" (by the patch's check) | "not counted"
                             # (inside torch.compile)
    why: str = ""


class _Done(BaseException):
    pass


def _run_in_process(spec: RunSpec) -> RunMeasurement:
    import torch
    from fusion_advisor import api
    from fusion_advisor.capture import _Stepper
    from fusion_advisor.script import run_as_main

    cuda = torch.cuda.is_available()
    losses: list[float] = []
    unread_losses: list = []   # read at the step's end: .item() mid-step would sync the host with the GPU
    marks: list[float] = [time.perf_counter()]
    swapped: list[str] = []
    skipped: list[str] = []
    check_calls: dict[str, int] = {}
    timed_end = spec.warmup + spec.steps
    window = _GpuWindow(torch, spec.gpu_profile_steps if cuda else 0)

    def read_losses():
        losses.extend(float(t.float().item()) for t in unread_losses)
        unread_losses.clear()

    def on_step():
        if cuda:
            torch.cuda.synchronize()
        marks.append(time.perf_counter())
        read_losses()
        if stepper.count == spec.warmup and cuda:
            torch.cuda.reset_peak_memory_stats()
        if stepper.count == timed_end:
            window.start()
        if stepper.count >= timed_end + window.steps:
            raise _Done()

    stepper = _Stepper(on_step)
    orig_backward = torch.Tensor.backward

    def backward(self, *args, **kwargs):
        # Not the losses of patch's own numerics checks (linear_cross_entropy's runs the whole
        # model forward and backward on a small batch): those would read as the script's first losses.
        if self.numel() == 1 and not api.steps_paused():
            unread_losses.append(self.detach())
        return orig_backward(self, *args, **kwargs)

    patch_hook = None
    if spec.patterns:
        import fusion_advisor
        from torch.nn.modules.module import register_module_forward_pre_hook

        def patch_first_model(module, args):
            patch_hook.remove()
            before_checks = calls.snapshot()
            handle = fusion_advisor.patch(module, patterns=spec.patterns,   # its checks pause step counting
                                          modules=spec.modules)
            for name, n in calls.snapshot().items():   # the checks' own calls are not the script's
                check_calls[name] = check_calls.get(name, 0) + n - before_checks.get(name, 0)
            swapped.extend(f"{s.path}: {s.described()}" for s in handle.swaps)
            swapped.extend(f"{f.path}: fused ({f.pattern})" for f in handle.functions)
            skipped.extend(f"{p}: {why}" for p, why in handle.skipped)
        patch_hook = register_module_forward_pre_hook(patch_first_model)

    torch.manual_seed(spec.seed)
    overrides = {os.path.abspath(k): v for k, v in spec.source_overrides.items()}
    torch.Tensor.backward = backward
    compiled = _note_compile(torch)
    stepper.install()
    sources = _PatchedSources(overrides)
    calls.reset()
    try:
        with sources:
            error = run_as_main(spec.script, spec.script_args, _Done, overrides.get(os.path.abspath(spec.script)))
    finally:
        stepper.remove()
        torch.Tensor.backward = orig_backward
        compiled.restore()
        gpu = window.stop(stepper.count - timed_end)
    read_losses()
    counted = {k: n - check_calls.get(k, 0) for k, n in calls.snapshot().items()}
    read = sorted(sources.read | ({os.path.abspath(spec.script)} & set(overrides)))
    times = [b - a for a, b in zip(marks, marks[1:])][spec.warmup:timed_end]
    return RunMeasurement(
        patched=spec.patched, steps_run=stepper.count, losses=losses,
        step_times_s=times, median_step_s=statistics.median(times) if times else None,
        peak_mem_bytes=int(torch.cuda.max_memory_allocated()) if cuda else None,
        swapped=swapped, skipped=skipped, error=error, calls={k: n for k, n in counted.items() if n > 0},
        overrides_read=read, compiled=compiled.called, regional_compiles=_regional_compiles(),
        gpu_busy_s=gpu.busy_s if gpu else None, gpu_kernels_s=gpu.kernels_s if gpu else {})


class _GpuWindow:
    """The CUDA-only profiler over the `steps` steps after the timed ones (none on a CPU run). A
    script that runs its own profiler keeps it: this window then measures nothing."""

    def __init__(self, torch, steps: int):
        self.torch, self.steps, self.prof = torch, steps, None

    def start(self) -> None:
        if not self.steps:
            return
        try:
            prof = self.torch.profiler.profile(activities=[self.torch.profiler.ProfilerActivity.CUDA])
            prof.start()
            self.prof = prof
        except Exception:   # another profiler is running: no window
            self.steps = 0

    def stop(self, steps_profiled: int):
        """GpuTime over the steps profiled (the script may end before the window's last step)."""
        from fusion_advisor.gpu_time import gpu_time
        prof, self.prof = self.prof, None
        if prof is None:
            return None
        try:
            prof.stop()
            return gpu_time(prof.profiler.kineto_results.events(), steps_profiled)
        except Exception:
            return None


def _regional_compiles() -> dict[str, dict]:
    module = sys.modules.get("fusion_advisor.regional_compile")   # imported only if the patch compiled
    return module.report() if module is not None else {}


class _note_compile:
    """Notes whether the script calls torch.compile: calls inside a compiled graph run without our
    counter (the custom op stands in for the launcher there), so zero calls then prove nothing."""

    def __init__(self, torch):
        self.torch, self.original, self.called = torch, torch.compile, False

        def compile_noted(*args, **kwargs):
            self.called = True
            return self.original(*args, **kwargs)
        compile_noted.fusion_advisor_original = self.original   # regional compile (ours) is not the script's
        torch.compile = compile_noted

    def restore(self) -> None:
        self.torch.compile = self.original


class _PatchedSources:
    """While active, every way a script reads one of the overridden files gets the patched text:
    the import system's file loader (normal imports, `spec_from_file_location` + `exec_module`,
    `SourceFileLoader`), `io.open_code` (runpy.run_path), `open()` (exec(compile(open(p).read(), ...)))
    and linecache (Triton's @jit reads a kernel's source through inspect). Files apply would create
    (fusion_kernels/...) import from their text. `read` collects the overridden paths served."""

    def __init__(self, overrides: dict[str, str]):
        self.overrides = overrides
        self.read: set[str] = set()

    def _text(self, path) -> str | None:
        try:
            key = os.path.abspath(os.fsdecode(path))
        except TypeError:   # a file descriptor, not a path
            return None
        text = self.overrides.get(key)
        if text is not None:
            self.read.add(key)
        return text

    def __enter__(self):
        import builtins
        import io
        from importlib import _bootstrap_external as external

        if not self.overrides:
            self._undo = []
            return self
        me = self
        get_data, path_stats = external.FileLoader.get_data, external.SourceLoader.path_stats
        open_code, builtin_open = io.open_code, builtins.open

        def patched_get_data(loader, path):
            text = me._text(path)
            return text.encode("utf-8") if text is not None else get_data(loader, path)

        def patched_path_stats(loader, path):
            if os.path.abspath(path) in me.overrides:
                raise OSError("patched text: no bytecode cache")   # never the .pyc of the file on disk
            return path_stats(loader, path)

        def patched_open_code(path):
            text = me._text(path)
            return io.BytesIO(text.encode("utf-8")) if text is not None else open_code(path)

        def patched_open(file, mode="r", *args, **kwargs):
            text = me._text(file) if isinstance(file, (str, bytes, os.PathLike)) and set(mode) <= set("rbt") else None
            if text is None:
                return builtin_open(file, mode, *args, **kwargs)
            return io.BytesIO(text.encode("utf-8")) if "b" in mode else io.StringIO(text)

        external.FileLoader.get_data = patched_get_data
        external.SourceLoader.path_stats = patched_path_stats
        io.open_code, builtins.open, io.open = patched_open_code, patched_open, patched_open
        for path, text in self.overrides.items():
            linecache.cache[path] = (len(text), None, text.splitlines(True), path)
        finder = _NewFileFinder(self.overrides, self.read)
        sys.meta_path.insert(0, finder)
        self._undo = [lambda: setattr(external.FileLoader, "get_data", get_data),
                      lambda: setattr(external.SourceLoader, "path_stats", path_stats),
                      lambda: setattr(io, "open_code", open_code),
                      lambda: setattr(builtins, "open", builtin_open),
                      lambda: setattr(io, "open", builtin_open),
                      lambda: sys.meta_path.remove(finder)]
        return self

    def __exit__(self, *exc):
        for undo in self._undo:
            undo()
        return False


class _NewFileFinder(importlib.abc.MetaPathFinder):
    """Imports the files apply would create (fusion_kernels/...) from their text, as if they were on
    disk. Files that exist are served by the patched file loader (see _PatchedSources)."""

    def __init__(self, overrides: dict[str, str], read: set[str]):
        self.overrides, self.read = overrides, read

    def find_spec(self, name, path, target=None):
        leaf = name.rpartition(".")[2]
        for folder in (path if path is not None else sys.path):
            base = os.path.abspath(os.path.join(folder or os.getcwd(), leaf))
            for origin, package in ((base + ".py", False), (os.path.join(base, "__init__.py"), True)):
                if origin in self.overrides and not os.path.exists(origin):
                    self.read.add(origin)
                    return importlib.util.spec_from_file_location(
                        name, origin, submodule_search_locations=[base] if package else None)
        return None


def run_script(spec: RunSpec, timeout_s: float = 1800) -> RunMeasurement:
    """Run one measurement in a fresh subprocess. Without a CUDA GPU both runs use Triton's
    interpreter (CPU tensors), as the tests do: numerics and call counts hold, timings are CPU's."""
    env = dict(os.environ)
    if not _cuda_available():
        env.setdefault("TRITON_INTERPRET", "1")
    with tempfile.TemporaryDirectory(prefix="fusion-advisor-verify-") as tmp:
        spec_path = Path(tmp) / "spec.json"
        spec.out = str(Path(tmp) / "measurement.json")
        spec_path.write_text(json.dumps(asdict(spec)))
        launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={spec.nproc}"]
                    if spec.nproc > 1 else [sys.executable])
        proc = subprocess.run([*launcher, "-m", "fusion_advisor.verify", str(spec_path)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout_s)
        outs = [spec.out] if spec.nproc <= 1 else [f"{spec.out}.rank{k}" for k in range(spec.nproc)]
        if not all(os.path.exists(o) for o in outs):
            tail = " | ".join(proc.stdout.strip().splitlines()[-3:])
            which = "patched" if spec.patched else "unpatched"
            raise ScriptError(f"the {which} verification run exited with status {proc.returncode} before "
                              f"measuring: {tail}")
        ranks = [RunMeasurement(**json.loads(Path(o).read_text())) for o in outs]
        return ranks[0] if len(ranks) == 1 else slowest_rank(ranks)


def slowest_rank(ranks: list[RunMeasurement]) -> RunMeasurement:
    """A job's measurement: rank 0's losses, calls and swaps (every rank runs the same code), each
    step's time the slowest rank's (the step ends when the last rank's does), the highest peak, and
    the GPU time of the busiest rank."""
    first = ranks[0]
    n = min(len(r.step_times_s) for r in ranks)
    times = [max(r.step_times_s[i] for r in ranks) for i in range(n)]
    peaks = [r.peak_mem_bytes for r in ranks if r.peak_mem_bytes is not None]
    error = next((r.error for r in ranks if r.error), None)
    busiest = max((r for r in ranks if r.gpu_busy_s is not None), key=lambda r: r.gpu_busy_s, default=first)
    return RunMeasurement(patched=first.patched, steps_run=min(r.steps_run for r in ranks), losses=first.losses,
                          step_times_s=times, median_step_s=statistics.median(times) if times else None,
                          peak_mem_bytes=max(peaks) if peaks else None, swapped=first.swapped, skipped=first.skipped,
                          error=error, calls=first.calls, overrides_read=first.overrides_read, compiled=first.compiled,
                          gpu_busy_s=busiest.gpu_busy_s, gpu_kernels_s=busiest.gpu_kernels_s)


def _cuda_available() -> bool:
    import torch
    return torch.cuda.is_available()


@dataclass
class Verification:
    before: RunMeasurement
    after: RunMeasurement
    max_loss_rel_diff: float | None
    losses_match: bool
    speedup: float | None
    mem_saved_bytes: int | None
    replacements: list[ReplacementCalls] = field(default_factory=list)

    @property
    def never_called(self) -> list[ReplacementCalls]:
        return [r for r in self.replacements if r.status == "never called"]

    @property
    def proven(self) -> bool:
        """Every planned replacement ran (or ran inside torch.compile, where calls go uncounted),
        and at least one was counted: only then can the runs' comparison speak for the patch."""
        return not self.never_called and any(r.status == "ran" for r in self.replacements)


def compare(before: RunMeasurement, after: RunMeasurement, loss_rtol: float = 2e-2,
            planned: dict[str, str] | None = None) -> Verification:
    """Losses step by step within `loss_rtol` (bf16 training drifts a little: the fused kernels round
    differently), the measured step-time ratio, and the calls of each planned replacement
    ({name: how it was applied}). Losses never "match" when no planned replacement ran."""
    n = min(len(before.losses), len(after.losses))
    diffs = [abs(a - b) / max(abs(b), 1e-12) for a, b in zip(after.losses[:n], before.losses[:n])]
    worst = max(diffs) if diffs else None
    speedup = (before.median_step_s / after.median_step_s
               if before.median_step_s and after.median_step_s else None)
    mem = (before.peak_mem_bytes - after.peak_mem_bytes
           if before.peak_mem_bytes is not None and after.peak_mem_bytes is not None else None)
    rows = replacement_calls(planned, after) if planned is not None else []
    v = Verification(before, after, worst, worst is not None and worst <= loss_rtol, speedup, mem, rows)
    if planned is not None and not v.proven:
        v.losses_match = False
    return v


def call_key(name: str) -> str:
    """The counter a replacement's calls land in (fusion_advisor.calls)."""
    if is_generated(name) or name.startswith("compile:"):
        return name
    from fusion_advisor.kernels import get
    try:
        return get(name).call_key
    except KeyError:
        return name


def replacement_calls(planned: dict[str, str], after: RunMeasurement) -> list[ReplacementCalls]:
    """One row per planned replacement: calls per step in the patched run, or why it never ran."""
    steps = max(after.steps_run, 1)
    rows = []
    for name, how in planned.items():
        n = after.calls.get(call_key(name), 0)
        if n:
            rows.append(ReplacementCalls(name, how, n / steps, "ran"))
        elif after.compiled:
            rows.append(ReplacementCalls(name, how, 0.0, "not counted",
                                         "the script calls torch.compile: calls inside compiled graphs are not counted"))
        elif (refusal := _refusal(name, how, after)) is not None:
            rows.append(ReplacementCalls(name, how, 0.0, "refused", refusal))
        else:
            rows.append(ReplacementCalls(name, how, 0.0, "never called", _why_never_called(name, how, after)))
    return rows


def _refusal(name: str, how: str, after: RunMeasurement) -> str | None:
    """Why the patch's own check refused the runtime swap of `name`, if it did: patch's skipped
    entries read "path: pattern: reason"."""
    if how.startswith("source: "):
        return None
    return next((entry.split(f": {name}: ", 1)[1] for entry in after.skipped if f": {name}: " in entry), None)


def _why_never_called(name: str, how: str, after: RunMeasurement) -> str:
    if how.startswith("source: "):
        path = how[len("source: "):]
        if not any(os.path.basename(r) == os.path.basename(path) for r in after.overrides_read):
            return (f"the run never read the patched {os.path.basename(path)} (loaded in a way the verification "
                    f"cannot reach?); not patched")
        return f"the patched code in {os.path.basename(path)} never ran on the script's path"
    # a refused swap is a row of its own (_refusal); "*: pattern NAME has no ... form" says none fits
    unpatchable = [entry.split(": ", 1)[1] for entry in after.skipped if entry.startswith(f"*: pattern {name} ")]
    if unpatchable:
        return unpatchable[0]
    return "no module or function of the model was swapped for it (no runtime swap fits the model's modules)"


def verify(script: str, script_args: list[str], patterns: list[str], steps: int = 20, warmup: int = 5,
           seed: int = 0, source_overrides: dict[str, str] | None = None,
           original_sources: dict[str, str] | None = None, planned: dict[str, str] | None = None,
           nproc: int = 0, modules: dict[str, list[str]] | None = None) -> Verification:
    """Unpatched run (the original sources) vs patched run (runtime swaps of `patterns` plus the
    patched sources). `planned`: {replacement name: how it is applied}, each of which must run
    (default: the runtime patterns). nproc > 1: both runs are torchrun jobs of that many ranks
    (losses of rank 0, each step's time the slowest rank's)."""
    if not patterns and not source_overrides:
        raise AdvisorError("nothing to verify: no source change and no runtime patch in the plan")
    if planned is None:
        planned = {p: "runtime swap" for p in patterns}
    before = unpatched_run(script, script_args, steps, warmup, seed, original_sources, nproc)
    after = run_script(RunSpec(script, script_args, steps, warmup, seed, list(patterns),
                               dict(source_overrides or {}), patched=True, nproc=nproc, modules=dict(modules or {})))
    if after.error:
        raise ScriptError(f"the patched run failed: {after.error.strip().splitlines()[-1]}")
    return compare(before, after, planned=planned)


def unpatched_run(script: str, script_args: list[str], steps: int = 20, warmup: int = 5, seed: int = 0,
                  original_sources: dict[str, str] | None = None, nproc: int = 0) -> RunMeasurement:
    """The script as it was before the plan (`original_sources`: the files the plan changes, as they
    were, whatever is on disk now), measured as verify measures: verify's baseline, and apply
    --verify's rerun of it and its baseline where there is no patch to run."""
    m = run_script(RunSpec(script, script_args, steps, warmup, seed, [], dict(original_sources or {}), nproc=nproc))
    if m.error:
        raise ScriptError(f"the unpatched run failed: {m.error.strip().splitlines()[-1]}")
    return m


def _main(spec_path: str) -> None:
    spec = RunSpec(**json.loads(Path(spec_path).read_text()))
    measurement = _run_in_process(spec)
    out = spec.out if spec.nproc <= 1 else f"{spec.out}.rank{os.environ.get('RANK', '0')}"
    Path(out).write_text(json.dumps(asdict(measurement)))
    if measurement.error:
        print(measurement.error, file=sys.stderr)


if __name__ == "__main__":
    # `python -m` put the working directory first on sys.path; `python train.py`, which this run
    # stands for, puts only the script's folder there (run_as_main does). Left in, a folder of the
    # working directory can shadow an installed package (a `kernels/` folder hid Hugging Face's
    # `kernels`, which transformers >= 5.2x imports).
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != os.getcwd()]
    _main(sys.argv[1])
