"""Whole-model torch.compile as a reference run for `apply --verify`: the user's script, run as
verify runs it (a fresh subprocess, same seed and steps), with `torch.compile` applied to the
first top-level module at its first forward, i.e. what `model = torch.compile(model)` would give.

It is verify's own patched run with one runtime patch, regional_compile.WHOLE_MODEL ("compile:*"):
patch() compiles the module it is handed, which in verify's run is the first module called. That
forward was already looked up for the first call, so the first step runs eagerly and the compile
happens in the second: keep warmup >= 2 (its time is then out of the median).

    m = compile_reference("train.py", ["--steps", "100"], steps=20, warmup=5)
    m.median_step_s, m.peak_mem_bytes, m.losses
"""
from __future__ import annotations

from fusion_advisor.core.errors import AdvisorError
from fusion_advisor.regional_compile import WHOLE_MODEL
from fusion_advisor.verify import RunMeasurement, RunSpec, run_script


def compile_reference(script: str, script_args: list[str], steps: int = 20, warmup: int = 5, seed: int = 0,
                      patterns: list[str] | None = None, source_overrides: dict[str, str] | None = None,
                      timeout_s: float = 1800) -> RunMeasurement:
    """The script with whole-model torch.compile: median step time, peak memory, losses. With the
    plan's `patterns` (and its patched sources) it is "patched + compile": the runtime swaps go in
    first, then the whole model is compiled around them (its own regional compiles give way)."""
    if warmup < 2:
        raise AdvisorError("the compile reference needs --warmup >= 2: the compile happens in the second step")
    names = [*(patterns or []), WHOLE_MODEL]
    return run_script(RunSpec(script, list(script_args), steps, warmup, seed, names, dict(source_overrides or {})),
                      timeout_s=timeout_s)


def fastest(rows: dict[str, float | None]) -> tuple[str, str]:
    """(name, one-line verdict) of the fastest configuration among measured median step times (s),
    e.g. {"unpatched": .., "patched": .., "torch.compile (whole model)": ..}; the first row is the
    baseline the speedups are against."""
    measured = {k: v for k, v in rows.items() if v}
    if not measured:
        return "", "no configuration was timed"
    base_name = next(iter(rows))
    base = rows[base_name]
    best = min(measured, key=measured.__getitem__)
    speedups = ", ".join(f"{k} {base / v:.2f}x" for k, v in measured.items() if base and k != base_name)
    return best, f"fastest: {best} ({measured[best] * 1e3:.2f} ms per step){'; vs ' + base_name + ': ' + speedups if speedups else ''}"
