"""Verify a patch on the user's own script: run it unpatched and patched for the same steps and
seed, compare the losses, and measure step time and peak memory of each.

Each run is a fresh subprocess (`python -m fusion_advisor.verify RUN_SPEC.json`), so the two runs
share no allocator state, compile cache or RNG stream. Inside it the script runs in-process as
`__main__`; steps are found as `profile` finds them (optimizer.step(), fusion_advisor.step() or a
top-level forward); losses are read from every scalar `.backward()`; the patched run swaps the
fused modules into the model at its first top-level forward (`fusion_advisor.patch`).
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

from fusion_advisor.errors import AdvisorError, ScriptError


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


class _Done(BaseException):
    pass


def _run_in_process(spec: RunSpec) -> RunMeasurement:
    import torch
    from fusion_advisor import api
    from fusion_advisor.capture import _Stepper
    from fusion_advisor.script import run_as_main

    cuda = torch.cuda.is_available()
    losses: list[float] = []
    marks: list[float] = [time.perf_counter()]
    swapped: list[str] = []
    skipped: list[str] = []

    def on_step():
        if cuda:
            torch.cuda.synchronize()
        marks.append(time.perf_counter())
        if stepper.count == spec.warmup and cuda:
            torch.cuda.reset_peak_memory_stats()
        if stepper.count >= spec.warmup + spec.steps:
            raise _Done()

    stepper = _Stepper(on_step)
    orig_backward = torch.Tensor.backward

    def backward(self, *args, **kwargs):
        # Not the losses of patch's own numerics checks (linear_cross_entropy's runs the whole
        # model forward and backward on a small batch): those would read as the script's first losses.
        if self.numel() == 1 and not api.steps_paused():
            losses.append(float(self.detach().float().item()))
        return orig_backward(self, *args, **kwargs)

    patch_hook = None
    if spec.patterns:
        import fusion_advisor
        from torch.nn.modules.module import register_module_forward_pre_hook

        def patch_first_model(module, args):
            patch_hook.remove()
            handle = fusion_advisor.patch(module, patterns=spec.patterns)  # its checks pause step counting
            swapped.extend(f"{s.path}: {type(s.original).__name__} -> {type(s.replacement).__name__}"
                           for s in handle.swaps)
            swapped.extend(f"{f.path}: fused ({f.pattern})" for f in handle.functions)
            skipped.extend(f"{p}: {why}" for p, why in handle.skipped)
        patch_hook = register_module_forward_pre_hook(patch_first_model)

    torch.manual_seed(spec.seed)
    overrides = {os.path.abspath(k): v for k, v in spec.source_overrides.items()}
    torch.Tensor.backward = backward
    stepper.install()
    finder = _OverrideFinder(spec.source_overrides) if spec.source_overrides else None
    if finder:
        sys.meta_path.insert(0, finder)
    try:
        error = run_as_main(spec.script, spec.script_args, _Done, overrides.get(os.path.abspath(spec.script)))
    finally:
        stepper.remove()
        torch.Tensor.backward = orig_backward
        if finder:
            sys.meta_path.remove(finder)
    times = [b - a for a, b in zip(marks, marks[1:])][spec.warmup:]
    return RunMeasurement(
        patched=bool(spec.patterns), steps_run=stepper.count, losses=losses, step_times_s=times,
        median_step_s=statistics.median(times) if times else None,
        peak_mem_bytes=int(torch.cuda.max_memory_allocated()) if cuda else None,
        swapped=swapped, skipped=skipped, error=error)


class _OverrideFinder(importlib.abc.MetaPathFinder):
    """Imports the user's modules from patched text (apply's dry run) instead of their files, and
    the files apply would create (fusion_kernels/...) from their text, as if they were on disk."""

    def __init__(self, overrides: dict[str, str]):
        self.overrides = {os.path.abspath(k): v for k, v in overrides.items()}

    def find_spec(self, name, path, target=None):
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None:
            return self._new_file_spec(name, path)
        if spec.origin is None or os.path.abspath(spec.origin) not in self.overrides:
            return None
        spec.loader = _TextLoader(name, spec.origin, self.overrides[os.path.abspath(spec.origin)])
        return spec

    def _new_file_spec(self, name, path):
        leaf = name.rpartition(".")[2]
        for folder in (path if path is not None else sys.path):
            base = os.path.abspath(os.path.join(folder or os.getcwd(), leaf))
            for origin, package in ((base + ".py", False), (os.path.join(base, "__init__.py"), True)):
                if origin in self.overrides:
                    loader = _TextLoader(name, origin, self.overrides[origin])
                    return importlib.util.spec_from_file_location(
                        name, origin, loader=loader, submodule_search_locations=[base] if package else None)
        return None


class _TextLoader(importlib.machinery.SourceFileLoader):
    """A module's code from a string. The text also goes into linecache: Triton's @jit reads a
    kernel's source through inspect, which reads the file's lines from there."""

    def __init__(self, name: str, origin: str, text: str):
        super().__init__(name, origin)
        self.text = text

    def get_data(self, p):
        if os.path.abspath(p) == os.path.abspath(self.path):
            return self.text.encode("utf-8")
        return super().get_data(p)

    def path_stats(self, p):  # never use a cached .pyc of the file on disk
        raise OSError

    def exec_module(self, module):
        linecache.cache[self.path] = (len(self.text), None, self.text.splitlines(True), self.path)
        super().exec_module(module)


def run_script(spec: RunSpec, timeout_s: float = 1800) -> RunMeasurement:
    """Run one measurement in a fresh subprocess."""
    with tempfile.TemporaryDirectory(prefix="fusion-advisor-verify-") as tmp:
        spec_path = Path(tmp) / "spec.json"
        spec.out = str(Path(tmp) / "measurement.json")
        spec_path.write_text(json.dumps(asdict(spec)))
        proc = subprocess.run([sys.executable, "-m", "fusion_advisor.verify", str(spec_path)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout_s)
        if not os.path.exists(spec.out):
            tail = " | ".join(proc.stdout.strip().splitlines()[-3:])
            raise ScriptError(f"the verification run exited with status {proc.returncode} before measuring: {tail}")
        return RunMeasurement(**json.loads(Path(spec.out).read_text()))


@dataclass
class Verification:
    before: RunMeasurement
    after: RunMeasurement
    max_loss_rel_diff: float | None
    losses_match: bool
    speedup: float | None
    mem_saved_bytes: int | None


def compare(before: RunMeasurement, after: RunMeasurement, loss_rtol: float = 2e-2) -> Verification:
    """Losses step by step within `loss_rtol` (bf16 training drifts a little: the fused kernels round
    differently), and the measured step-time ratio."""
    n = min(len(before.losses), len(after.losses))
    diffs = [abs(a - b) / max(abs(b), 1e-12) for a, b in zip(after.losses[:n], before.losses[:n])]
    worst = max(diffs) if diffs else None
    speedup = (before.median_step_s / after.median_step_s
               if before.median_step_s and after.median_step_s else None)
    mem = (before.peak_mem_bytes - after.peak_mem_bytes
           if before.peak_mem_bytes is not None and after.peak_mem_bytes is not None else None)
    return Verification(before, after, worst, worst is not None and worst <= loss_rtol, speedup, mem)


def verify(script: str, script_args: list[str], patterns: list[str], steps: int = 20, warmup: int = 5,
           seed: int = 0, source_overrides: dict[str, str] | None = None,
           original_sources: dict[str, str] | None = None) -> Verification:
    """Unpatched run (the original sources) vs patched run (runtime swaps of `patterns` plus the
    patched sources)."""
    if not patterns and not source_overrides:
        raise AdvisorError("nothing to verify: no source change and no runtime patch in the plan")
    before = run_script(RunSpec(script, script_args, steps, warmup, seed, [], dict(original_sources or {})))
    after = run_script(RunSpec(script, script_args, steps, warmup, seed, list(patterns), dict(source_overrides or {})))
    for m in (before, after):
        if m.error:
            raise ScriptError(f"the {'patched' if m.patched else 'unpatched'} run failed: "
                              f"{m.error.strip().splitlines()[-1]}")
    return compare(before, after)


def _main(spec_path: str) -> None:
    spec = RunSpec(**json.loads(Path(spec_path).read_text()))
    measurement = _run_in_process(spec)
    Path(spec.out).write_text(json.dumps(asdict(measurement)))
    if measurement.error:
        print(measurement.error, file=sys.stderr)


if __name__ == "__main__":
    # `python -m` put the working directory first on sys.path; `python train.py`, which this run
    # stands for, puts only the script's folder there (run_as_main does). Left in, a folder of the
    # working directory can shadow an installed package (a `kernels/` folder hid Hugging Face's
    # `kernels`, which transformers >= 5.2x imports).
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != os.getcwd()]
    _main(sys.argv[1])
