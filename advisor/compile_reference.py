"""Whole-model torch.compile as a reference run for `apply --verify`: the user's script, run as
verify runs it (a fresh subprocess, same seed and steps), with `torch.compile` applied to the
first top-level module at its first forward, i.e. what `model = torch.compile(model)` would give.

It is verify's own patched run with one runtime patch, regional_compile.WHOLE_MODEL ("compile:*"):
patch() compiles the module it is handed, which in verify's run is the first module called. That
forward was already looked up for the first call, so the first step runs eagerly and the compile
happens in the second: keep warmup >= 2 (its time is then out of the median).

    m = compile_reference("train.py", ["--steps", "100"], steps=20, warmup=5)
    m.median_step_s, m.peak_mem_bytes, m.losses

`compiled_blocks` is the other compiled configuration `apply --verify` times: the patch, plus
regional torch.compile of the model's repeated blocks (regional_compile.BLOCKS), checked against the
unpatched run like the patch itself.
"""
from __future__ import annotations

from fusion_advisor.core.errors import AdvisorError
from fusion_advisor.regional_compile import BLOCKS, WHOLE_MODEL, is_compile_pattern
from fusion_advisor.verify import (ReplacementCalls, RunMeasurement, RunSpec, Verification, call_key, compare,
                                   run_script)

BLOCKS_HOW = "runtime swap (regional torch.compile of the repeated blocks)"


def blocks_configuration(with_patch: bool) -> str:
    """The compiled-blocks configuration's name in apply --verify's table and verdict."""
    return "patched + compiled blocks" if with_patch else "compiled blocks"


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


def compiled_blocks(script: str, script_args: list[str], before: RunMeasurement, patterns: list[str],
                    planned: dict[str, str], source_overrides: dict[str, str] | None = None, steps: int = 20,
                    warmup: int = 5, seed: int = 0, modules: dict[str, list[str]] | None = None,
                    timeout_s: float = 1800) -> Verification:
    """The patch outside the repeated blocks plus regional torch.compile of the blocks, against the
    unpatched run `before`: losses, speedup and calls as verify compares them. Inside the blocks the
    compiler takes over (patch(..., compile_blocks=True) leaves our kernels out there, and the plan's
    own regional compiles give way): the proof there is the blocks' own count."""
    if warmup < 2:
        raise AdvisorError("timing compiled blocks needs --warmup >= 2: the compile happens in the first steps")
    names = [p for p in patterns if not is_compile_pattern(p)] + [BLOCKS]
    m = run_script(RunSpec(script, list(script_args), steps, warmup, seed, names, dict(source_overrides or {}),
                           patched=True, modules=dict(modules or {})), timeout_s=timeout_s)
    v = compare(before, m, planned={BLOCKS: BLOCKS_HOW})
    counted = {r.name for r in v.replacements}
    for name, how in planned.items():
        if name in counted or is_compile_pattern(name):
            continue
        n = m.calls.get(call_key(name), 0)   # eager calls outside the blocks still count
        v.replacements.append(ReplacementCalls(name, how, n / max(m.steps_run, 1), "ran" if n else "not counted",
                                               "" if n else "inside the compiled blocks: left to torch.compile"))
    return v


def fastest(rows: dict[str, float | None], spread: float | None = None) -> tuple[str, str]:
    """(name, one-line verdict) of the fastest configuration among measured median step times (s),
    e.g. {"unpatched": .., "patched": .., "torch.compile (whole model)": ..}; the first row is the
    baseline the speedups are against. `spread`: how far the baseline's own two runs differed
    (|rerun - first| / first); a configuration faster than the baseline by no more than that is
    not a measured win, and the baseline stays the answer."""
    measured = {k: v for k, v in rows.items() if v}
    if not measured:
        return "", "no configuration was timed"
    base_name = next(iter(rows))
    base = rows[base_name]
    best = min(measured, key=measured.__getitem__)
    speedups = ", ".join(f"{k} {base / v:.2f}x" for k, v in measured.items() if base and k != base_name)
    against = f"; vs {base_name}: {speedups}" if speedups else ""
    noise = f"; the {base_name} run rerun last differed by {spread:.1%}" if spread is not None else ""
    if spread is not None and base and best != base_name and base / measured[best] - 1 <= spread:
        return base_name, (f"no configuration measurably faster than {base_name}: {best} by "
                           f"{base / measured[best] - 1:.1%}, within the run-to-run spread{noise}{against}")
    return best, f"fastest: {best} ({measured[best] * 1e3:.2f} ms per step){against}{noise}"
