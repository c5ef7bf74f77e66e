"""What `fusion-advisor apply` would change for each recommendation, worked out from a saved result.

Each recommendation is planned on its own (advisor/apply.py's `plan` on the result restricted to
that one recommendation), so the report shows, under each, the exact unified diff `apply` would
write for it, or the runtime patch it would make (modules swapped for what, functions replaced),
or why `apply` leaves it alone. Nothing is written and no script runs.

A diff needs the user's source files on this disk; where they are not (a result copied to another
machine, library code), the runtime patch is described from the patterns, and a diff stored in the
result at profile time (`patch["diff"]`) is shown instead.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path

from fusion_advisor.cluster_names import module_leaf, short_source
from fusion_advisor.core.result import AdvisorResult, Recommendation

RESULT_PLACEHOLDER = "fusion-report/result.json"


@dataclass
class Change:
    rank: int
    action: str                                   # one sentence: what `apply` does for it
    applied_by_apply: bool                        # False: `apply` leaves it (memory trade without --memory counts as applied)
    diff: str = ""                                # unified diff, paths relative to the run's folder
    runtime: list[str] = field(default_factory=list)   # "every LlamaMLP -> fusion_advisor....SwiGLUMLP"
    runtime_snippet: str = ""                     # the lines to add to the script for a runtime patch
    kernel_file: str = ""                         # a generated kernel's module path (shown when no diff has it)
    kernel_code: str = ""
    notes: list[str] = field(default_factory=list)
    by_hand: str = ""                             # what to do yourself (torch.compile, Liger), when apply does not


def recommendation_changes(result: AdvisorResult, result_path: str | None = None) -> dict[int, Change]:
    """{rank: Change} for every recommendation of the result."""
    out = {}
    for rec in result.recommendations:
        try:
            out[rec.rank] = _change(result, rec, result_path)
        except Exception as exc:  # noqa: BLE001 - a report must render even when planning cannot run here
            out[rec.rank] = Change(rec.rank, f"`apply` could not be planned here ({type(exc).__name__}: {exc})",
                                   False, diff=str(rec.patch.get("diff") or ""))
    return out


def fill_patch_diffs(result: AdvisorResult) -> None:
    """Store each recommendation's diff in `patch["diff"]` (at profile time, while the sources are on
    this disk), so a copy of the result shows them elsewhere."""
    for rank, change in recommendation_changes(result).items():
        rec = next(r for r in result.recommendations if r.rank == rank)
        if change.diff:
            rec.patch["diff"] = change.diff
        if change.runtime:
            rec.patch["runtime"] = change.runtime


def apply_commands(result_path: str | None, memory: bool = False) -> list[str]:
    path = _shell_path(result_path or RESULT_PLACEHOLDER)
    extra = " --memory" if memory else ""
    return [f"fusion-advisor apply {path} --verify{extra}", f"fusion-advisor apply {path} --write{extra}"]


def next_steps(recommendations: list[Recommendation], changes: dict[int, Change],
               result_path: str | None) -> list[tuple[str, str]]:
    """What to run after reading the report, as (what it does, the command or code) pairs; the
    command is "" for a step that is only said. Empty when `apply` would change nothing."""
    applied = [(r, changes[r.rank]) for r in recommendations if r.rank in changes and changes[r.rank].applied_by_apply]
    speed = [(r, c) for r, c in applied if r.kind != "memory"]
    memory = any(r.kind == "memory" for r, _ in applied)
    if not applied:
        return []
    chosen = speed or applied
    verify, write = apply_commands(result_path, memory=not speed)
    steps = [("See the change and measure it, unpatched against patched (writes nothing)", verify)]
    if any(c.diff for _, c in chosen):
        steps.append(("Then write it (with backups; --revert undoes it)", write))
    if any(c.runtime for _, c in chosen):
        path = _py_str(result_path or RESULT_PLACEHOLDER)
        steps.append(("Library code is never edited: to keep its runtime patch, add this to your script after "
                      "building the model", f"fusion_advisor.patch(model, {path})"))
    if memory and speed:
        steps.append(("The memory trade too: add --memory to these commands", ""))
    return steps


def _shell_path(path: str) -> str:
    import shlex
    return shlex.quote(str(path))


def _change(result: AdvisorResult, rec: Recommendation, result_path: str | None) -> Change:
    patch = rec.patch or {}
    if rec.kind == "channels_last":
        return Change(rec.rank, "`apply` does this at run time only with --include-estimates (the saving is the "
                                "transposes' measured time, not a measured step); by hand:", False,
                      by_hand=str(patch.get("description") or ""))
    if rec.kind == "cuda_graphs" or not rec.pattern:
        return Change(rec.rank, "`apply` does not do this: it is a change to how the step runs, made by hand.", False,
                      by_hand=str(patch.get("description") or ""))
    from fusion_advisor import apply as apply_mod
    from fusion_advisor.core.errors import AdvisorError

    one = dataclasses.replace(result, recommendations=[rec])
    try:
        plan = apply_mod.plan(one, memory=True)
    except AdvisorError as exc:
        return Change(rec.rank, f"`apply` cannot plan it here: {exc}", False, diff=str(patch.get("diff") or ""))
    diff = plan.diff(_diff_root(result, [f.path for f in plan.changed])) if plan.changed else ""
    notes = [_strip_title(n, rec) for n in plan.notes]
    change = Change(rec.rank, "", bool(plan.changed or plan.runtime_patterns), diff=diff, notes=notes)
    if not diff and patch.get("diff"):
        change.diff = str(patch["diff"])   # planned at profile time, on the machine that ran it
        change.notes.append("this diff was planned when the result was made: the source is not on this disk")
    for name in plan.runtime_patterns:
        change.runtime += _runtime_lines(name, result, rec)
    if not change.runtime and patch.get("runtime") and not plan.changed:
        change.runtime = [str(x) for x in patch["runtime"]]
    if change.runtime:
        change.runtime_snippet = ("import fusion_advisor\n"
                                  f"handle = fusion_advisor.patch(model, {_py_str(result_path or RESULT_PLACEHOLDER)}"
                                  f"{', memory=True' if rec.kind == 'memory' else ''})  # after building the model")
    if patch.get("kind") == "generated" and patch.get("code") and "fusion_kernels/" not in change.diff:
        change.kernel_file, change.kernel_code = str(patch.get("module") or "the generated kernel"), str(patch["code"])
    change.applied_by_apply = bool(change.diff or change.runtime)
    change.action = _action(rec, change, plan)
    best = _best_provider(result, rec)
    cluster = next((c for c in result.clusters if c.id == rec.cluster_id), None)
    if best == "compile":
        target = _module_leaf(result, rec) or (f"the code at {short_source(cluster.source)}"
                                               if cluster is not None and cluster.source else "the code")
        change.by_hand = f"torch.compile measured faster here: instead of `apply`, wrap {target} in torch.compile yourself."
    elif best == "liger":
        change.by_hand = "Liger-Kernel measured faster here: instead of `apply`, use Liger-Kernel's equivalent yourself."
    return change


def _action(rec: Recommendation, change: Change, plan) -> str:
    memory = " (a memory trade: only with --memory)" if rec.kind == "memory" else ""
    if change.diff and change.runtime:
        return f"`apply` edits your source and patches the model at run time{memory}."
    if change.diff:
        files = sorted({Path(f.path).name for f in plan.changed}) if plan.changed else []
        where = f" ({', '.join(files)})" if files else ""
        return f"`apply` edits your source{where}{memory}."
    if change.runtime:
        return f"`apply` patches the model at run time (library code is never edited){memory}."
    return "`apply` leaves this one alone" + (f": {change.notes[0]}" if change.notes else ".")


def _strip_title(note: str, rec: Recommendation) -> str:
    prefix = f"#{rec.rank} {rec.title}: "
    return note[len(prefix):] if note.startswith(prefix) else note


def _runtime_lines(name: str, result: AdvisorResult, rec: Recommendation) -> list[str]:
    from fusion_advisor.apply import qualified
    from fusion_advisor.kernels import get

    try:
        pattern = get(name)
    except KeyError:
        return [f"pattern {name} (not registered here)"]
    leaf = _module_leaf(result, rec)
    lines = []
    if pattern.modules and pattern.module_factory is not None:
        if leaf and leaf not in pattern.modules:
            # patch swaps by what a module computes: the cluster's own module class is the one to
            # name (a T5LayerNorm), not the pattern's class-name hints (LlamaRMSNorm, Qwen2RMSNorm...)
            lines.append(f"every {leaf} of the model that computes the same -> {qualified(pattern.module_factory)} "
                         f"(its own parameters; swapped where a numerics check against its forward passes)")
        else:
            for m in [leaf] if leaf else list(pattern.modules):
                lines.append(f"every {m} of the model -> {qualified(pattern.module_factory)} (same parameters)")
    for fp in pattern.function_patches:
        where = ("the modeling module's global" if fp.where == "module_global" else "the model instance's")
        lines.append(f"{where} {fp.name} -> the fused {pattern.name} ({qualified(pattern.fused)})")
    return lines or [f"{pattern.name}: no runtime form (needs a source edit)"]


def _module_leaf(result: AdvisorResult, rec: Recommendation) -> str | None:
    cluster = next((c for c in result.clusters if c.id == rec.cluster_id), None)
    return module_leaf(cluster) if cluster is not None else None


def _best_provider(result: AdvisorResult, rec: Recommendation) -> str | None:
    cluster = next((c for c in result.clusters if c.id == rec.cluster_id), None)
    bench = result.primary_benchmark(cluster) if cluster is not None else None
    return bench.best_provider if bench is not None else None


def _diff_root(result: AdvisorResult, paths: list[str]) -> str | None:
    """The folder the diff's paths are relative to: where the run ran, else the script's folder,
    whichever holds every changed file (else the paths stay absolute)."""
    run = result.run or {}
    for root in (run.get("cwd"), str(Path(run["script"]).parent) if run.get("script") else None):
        if root and os.path.isdir(root) and all(Path(p).resolve().is_relative_to(Path(root).resolve()) for p in paths):
            return str(root)
    return None


def _py_str(s: str) -> str:
    return repr(str(s))
