"""`fusion-advisor apply`: turn a result's recommendations into source patches (a diff), write them
atomically with backups, revert them, and verify the gain.

Where a cluster's source is the user's own file, the recommendation becomes a source rewrite
(advisor/source_patch.py). Where it is library code (transformers, site-packages), we never edit
it: the patch is the instance-scoped runtime swap, `fusion_advisor.patch(model, result)`.
"""
from __future__ import annotations

import difflib
import hashlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from fusion_advisor import channels_last, provider_choice
from fusion_advisor.analyzers.trace import resolve_source_file
from fusion_advisor.cluster_names import module_leaf
from fusion_advisor.core.errors import AdvisorError, OutputError
from fusion_advisor.core.files import clean_leftovers, folder_lock, is_read_only, write_text_atomic
from fusion_advisor.core.result import AdvisorResult, Cluster, is_generated
from fusion_advisor.kernels import all_patterns, get
from fusion_advisor.provider_choice import numerics_failed, timed_for_apply
from fusion_advisor.source_patch import FileRewrite, StatementReplacement, new_file, rewrite_source

BACKUP_DIR = ".fusion-advisor/backups"
GENERATED_FOLDER = "fusion_kernels"   # beside the user's file: one module per generated kernel
LOCK_FILE = ".fusion-advisor/apply.lock"
_LIBRARY_MARKERS = ("site-packages", "dist-packages")


@dataclass
class ApplyPlan:
    files: list[FileRewrite] = field(default_factory=list)
    runtime_patterns: list[str] = field(default_factory=list)  # for library code: fusion_advisor.patch
    # pattern -> the module classes it swaps at run time (fusion_advisor.patch(..., modules=...)): a
    # generated kernel ("generic:<hash>") replaces the forward of those modules only
    runtime_modules: dict[str, list[str]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    providers: list[dict] = field(default_factory=list)  # per recommendation: provider_choice.ProviderChoice
    # What --verify must see run, {replacement: how it is applied}: "runtime swap", or "source: FILE"
    # for a rewrite that landed in the plan's files.
    replacements: dict[str, str] = field(default_factory=dict)
    estimates: list[str] = field(default_factory=list)   # applied without a measurement (--include-estimates)

    def add_runtime(self, name: str, how: str) -> None:
        """A runtime patch fusion_advisor.patch applies, and how --verify lists it (the first how stays)."""
        if name not in self.runtime_patterns:
            self.runtime_patterns.append(name)
            self.replacements[name] = how

    @property
    def changed(self) -> list[FileRewrite]:
        """Files whose text changes (a rewrite that reproduces the file changes nothing)."""
        return [f for f in self.files if f.changes and f.after != f.before]

    def diff(self, root: str | None = None) -> str:
        out = []
        for f in self.changed:
            name = os.path.relpath(f.path, root) if root else f.path
            out.extend(difflib.unified_diff(f.before.splitlines(True), f.after.splitlines(True),
                                            "/dev/null" if f.created else f"a/{name}", f"b/{name}"))
        return "".join(out)


def _is_library(path: Path) -> bool:
    return any(m in path.parts for m in _LIBRARY_MARKERS)


def module_pattern_for(module_class: str):
    """The registered pattern with a module form that replaces this module class, if any."""
    return next((p for p in all_patterns() if module_class in p.modules and p.module_factory is not None), None)


def _norm_part(pattern):
    """The norm inside an add + norm pattern (add_rms_norm -> rms_norm): at run time its module is
    swapped by what it computes (fusion_advisor.patch), whatever its class (T5LayerNorm)."""
    part = {"add_rms_norm": "rms_norm", "add_layer_norm": "layer_norm"}.get(pattern.name)
    return get(part) if part else None


def _untimed_reason(bench) -> str:
    if bench is None:
        return "not benchmarked"
    if bench.numerics_ok is False:
        return f"its numerics check failed ({bench.numerics_detail.split(';')[0] or bench.reason})"
    return f"not timed on a GPU ({bench.reason.split(';')[0] or bench.verdict})"


def relocate(result: AdvisorResult, here: Path) -> str | None:
    """A result copied with its checkout to another folder or machine: run from elsewhere than the
    recorded working directory, where the script lies at the same relative path, every recorded
    path under the old working directory moves under `here` (so the copy is patched, never the
    original). Returns a note, or None when nothing moved. The recorded cwd stays in
    run["recorded_cwd"]."""
    run = result.run or {}
    script, cwd = run.get("script"), run.get("cwd")
    if not script or not cwd or Path(cwd).resolve() == here.resolve():
        return None
    try:
        rel = Path(script).relative_to(cwd)
    except ValueError:
        return None
    if not (here / rel).is_file():
        return None
    old, new = str(cwd).rstrip("/") + "/", str(here).rstrip("/") + "/"
    run.update(script=str(here / rel), cwd=str(here), recorded_cwd=cwd)
    for c in result.clusters:   # a generated kernel's call site
        call = (c.pattern_params.get("chain") or {}).get("call") if isinstance(c.pattern_params, dict) else None
        if isinstance(call, dict) and str(call.get("path", "")).startswith(old):
            call["path"] = new + call["path"][len(old):]
    return f"the result was recorded in {cwd}; its paths are read under {here}"


def plan(result: AdvisorResult, memory: bool = False, include_estimates: bool = False,
         skip: Sequence[str] = ()) -> ApplyPlan:
    """What `apply` would change, file by file; nothing is written. Only what bench measured
    faster than eager with its numerics checked, unless include_estimates (then the untimed ones
    are listed in `estimates`). Memory trades (recommendations of kind "memory": less peak memory
    for more time) only with memory=True, and only measured ones. `skip`: replacements left out by
    name, the recommendation's pattern or the name verify gives it (`add_layer_norm` or the
    `layer_norm` it runs as at run time, `generic:<hash>`, `compile:<Class>`)."""
    skip = set(skip)
    known = _names_in(result) if skip else set()
    if skip - known:
        raise AdvisorError(f"--skip {sorted(skip - known)[0]}: no recommendation of this result is called that (its "
                           f"names: {', '.join(sorted(known)) or 'none'})")
    if not result.recommendations:
        raise AdvisorError("the result has no recommendations to apply (run `fusion-advisor profile` on a GPU "
                           "to benchmark the candidates)")
    clusters = {c.id: c for c in result.clusters}
    run = result.run or {}
    out = ApplyPlan()
    per_file: dict[Path, dict] = {}
    script = Path(run["script"]).resolve() if run.get("script") and Path(run["script"]).is_file() else None
    generated: dict[Path, list[StatementReplacement]] = {}
    host_counts = result.host_counts()
    for rec in result.recommendations:
        if rec.kind == channels_last.NAME:
            _plan_channels_last(rec, out, include_estimates)
            continue
        if not rec.pattern:
            continue
        cluster = clusters.get(rec.cluster_id)
        bench = result.primary_benchmark(cluster) if cluster is not None else None
        choice = provider_choice.choose(rec, cluster, bench, host_counts, memory)
        out.providers.append(choice.as_dict())
        if rec.pattern in skip or (choice.provider == "compile" and choice.runtime_pattern in skip):
            out.notes.append(f"#{rec.rank} {rec.title}: left out (--skip)")
            continue
        if choice.provider == "compile":
            _plan_compile(rec, choice, out)
            continue
        if choice.provider is None and rec.kind != "memory":
            # measured, and nothing beat eager in the step's own terms (host time counted where the
            # host is on the critical path: AdvisorResult.host_counts)
            out.notes.append(f"#{rec.rank} {rec.title}: not applied: {choice.why}")
            continue
        if rec.kind == "memory" and not memory:
            out.notes.append(f"#{rec.rank} {rec.title}: a memory trade, not applied without --memory")
            continue
        if bench is not None and bench.verdict == "rejected" and rec.kind != "memory":
            # e.g. "use torch.compile": the advice stands, but our kernel lost to eager here.
            out.notes.append(f"#{rec.rank} {rec.title}: our {rec.pattern} kernel was not faster than eager on this "
                             f"workload ({bench.reason.split(';')[0]}); not applied")
            continue
        if not timed_for_apply(rec, bench):
            if not include_estimates or numerics_failed(bench):
                out.notes.append(f"#{rec.rank} {rec.title}: {_untimed_reason(bench)}; not applied (an estimate is "
                                 f"never applied without --include-estimates)")
                continue
            out.estimates.append(rec.pattern)
        if is_generated(rec.pattern):
            _plan_generated(rec, cluster, out, generated)
            continue
        pattern = get(rec.pattern)
        source = cluster.source if cluster else None
        file_name, _, line = (source or "").rpartition(":")
        path = resolve_source_file(file_name, run) if file_name else None
        own = (pattern.modules and pattern.module_factory) or pattern.function_patches
        # A pattern with a runtime form and no source form (padded_linear swaps an nn.Linear it cannot
        # name in source) is patched at run time in the user's own code too.
        runtime_only = own and not (pattern.module_import or pattern.rewrites)
        library = path is not None and _is_library(path)
        if path is None or library or runtime_only:
            leaf = (cluster.module_class or "").rsplit("/", 1)[-1] if cluster else ""
            runtime = pattern if own else module_pattern_for(leaf) or _norm_part(pattern)
            where = ("library code" if library else
                     f"{source}: {pattern.name} has no source rewrite" if path is not None else
                     f"{source or 'an unknown source'} (not found on disk)")
            if runtime is None:
                out.notes.append(f"#{rec.rank} {rec.title}: {where}, and {pattern.name} has no runtime swap for "
                                 f"{leaf or 'this code'}; not applied")
                continue
            if runtime.name in skip:
                out.notes.append(f"#{rec.rank} {rec.title}: left out (--skip {runtime.name})")
                continue
            out.add_runtime(runtime.name, "runtime swap")
            if leaf and leaf not in out.runtime_modules.setdefault(runtime.name, []):
                out.runtime_modules[runtime.name].append(leaf)   # swapped by structure: T5LayerNorm too
            out.notes.append(f"#{rec.rank} {rec.title}: {where}; patched at run time with "
                             f"fusion_advisor.patch(model, result) ({runtime.name}) instead of editing it")
            continue
        targets = per_file.setdefault(path, {"swaps": {}, "rewrites": []})
        leaf = (cluster.module_class or "").rsplit("/", 1)[-1] if cluster else ""
        if not pattern.module_import and not pattern.rewrites:
            # e.g. add_rms_norm: its (x, residual) signature needs a hand edit of the caller; the
            # module it contains (LlamaRMSNorm) can still be swapped for the plain fused kernel.
            inner = module_pattern_for(leaf)
            if inner is None:
                out.notes.append(f"#{rec.rank} {rec.title}: {pattern.name} needs a hand edit at {source} "
                                 f"(no automatic rewrite)")
                continue
            if inner.name in skip:
                out.notes.append(f"#{rec.rank} {rec.title}: left out (--skip {inner.name})")
                continue
            out.notes.append(f"#{rec.rank} {rec.title}: applied as {inner.name} (the {leaf} part); the residual "
                             f"add stays separate until the caller is edited to use {pattern.name}")
            pattern = inner
        if pattern.module_import and leaf in pattern.modules:
            mod, _, cls = pattern.module_import.partition(":")
            # Instantiations may sit in any of the user's files: the class's own file and the script.
            for f in {path, script} - {None}:
                per_file.setdefault(f, {"swaps": {}, "rewrites": []})["swaps"][leaf] = (mod, cls, pattern.name)
        for rw in pattern.rewrites:
            lines = set() if rw.scope == "file" or not line.isdigit() else {int(line)}
            targets["rewrites"].append((rw, lines, pattern.name))
    for path in generated:
        per_file.setdefault(path, {"swaps": {}, "rewrites": []})
    for path, t in per_file.items():
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise AdvisorError(f"cannot read {path}: {exc.strerror or exc}") from None
        out.files.append(rewrite_source(str(path), text, t["swaps"], t["rewrites"], generated.get(path, [])))
        out.notes.extend(out.files[-1].notes)
    _drop_unused_kernels(out, generated)
    generated_names = {r.why: r.pattern for rs in generated.values() for r in rs}
    for f in out.changed:
        for c in f.changes:
            name = generated_names.get(c.why, c.why)
            if f.created or not (is_generated(name) or _is_pattern(name)):
                continue
            out.replacements.setdefault(name, f"source: {os.path.basename(f.path)}")
    return out


def _names_in(result: AdvisorResult) -> set[str]:
    """What --skip accepts: each recommendation's pattern, the runtime pattern it may run as (the norm
    part of an add + norm), and a regional compile's "compile:<Class>"."""
    from fusion_advisor.regional_compile import pattern_name
    names = set()
    clusters = {c.id: c for c in result.clusters}
    for rec in result.recommendations:
        if not rec.pattern:
            continue
        names.add(rec.pattern)
        cluster = clusters.get(rec.cluster_id)
        if cluster is not None and cluster.module_class:
            names.add(pattern_name(cluster.module_class))
            inner = module_pattern_for(cluster.module_class.rsplit("/", 1)[-1])
            names |= {inner.name} if inner is not None else set()
        if not is_generated(rec.pattern) and _is_pattern(rec.pattern):
            part = _norm_part(get(rec.pattern))
            names |= {part.name} if part is not None else set()
    return names


def _plan_channels_last(rec, out: ApplyPlan, include_estimates: bool) -> None:
    """The channels_last recommendation: priced on the transposes' measured time, an estimate; with
    --include-estimates the runtime change "channels_last" (advisor/channels_last.py)."""
    if not include_estimates:
        out.notes.append(f"#{rec.rank} {rec.title}: an estimate (the transposes' time); by hand, or at run time "
                         f"with --include-estimates (then --verify measures it)")
        return
    if channels_last.NAME not in out.runtime_patterns:
        out.estimates.append(channels_last.NAME)
    out.add_runtime(channels_last.NAME, "runtime change (memory format)")
    out.notes.append(f"#{rec.rank} {rec.title}: applied at run time (fusion_advisor.patch: the model's 4-D weights "
                     f"and its 4-D inputs in torch.channels_last)")


def _plan_compile(rec, choice: provider_choice.ProviderChoice, out: ApplyPlan) -> None:
    """A cluster whose provider is regional torch.compile: the runtime patch "compile:<ModuleClass>"."""
    out.add_runtime(choice.runtime_pattern, "runtime swap (regional torch.compile)")
    out.notes.append(f"#{rec.rank} {rec.title}: applied as regional torch.compile ({choice.runtime_pattern}, "
                     f"at run time: fusion_advisor.patch); the figures are in its provider line")


def _is_pattern(name: str) -> bool:
    try:
        get(name)
        return True
    except KeyError:
        return False


def _drop_unused_kernels(out: ApplyPlan, generated: dict[Path, list[StatementReplacement]]) -> None:
    """A chain whose statements are no longer where the trace saw them (the file was edited since)
    is not rewritten: its kernel file is not written either, and the plan says why."""
    applied = {c.why for f in out.files for c in f.changes}
    for path, replacements in generated.items():
        for r in replacements:
            if r.why in applied:
                continue
            stem = r.imports[0].split(" import ")[0].rsplit(".", 1)[-1]
            out.files = [f for f in out.files if not _in_kernels_folder(f.path, stem)]
            out.notes.append(f"{path}: lines {r.first_line}-{r.last_line} no longer hold the traced chain (edited "
                             f"since the profile?); not rewritten: run `fusion-advisor profile` again")
    if not any(_in_kernels_folder(f.path) and Path(f.path).stem.startswith("g_") for f in out.files):
        out.files = [f for f in out.files if not _in_kernels_folder(f.path, "__init__")]


def _in_kernels_folder(path: str, stem: str | None = None) -> bool:
    p = Path(path)
    return p.parent.name == GENERATED_FOLDER and (stem is None or p.stem == stem)


_PACKAGE_INIT = '"""Triton kernels generated by fusion-advisor: each file says what it replaces."""\n'


def _plan_generated(rec, cluster, out: ApplyPlan, generated: dict[Path, list[StatementReplacement]]) -> None:
    """A generated kernel: its module goes to fusion_kernels/<generated_stem>.py beside the source file,
    and the chain's statements become one call of it. Only where the dataflow was read off the
    source (then the call's arguments are known exactly)."""
    from fusion_advisor.kernels import resolve
    from fusion_advisor.kernels.codegen import pattern_source
    from fusion_advisor.kernels.codegen.candidate import source_call
    from fusion_advisor.kernels.codegen.source_bind import lines_of

    if cluster is None or cluster.direction != "forward":
        return   # a backward cluster shares its forward cluster's kernel (the generated backward)
    stem = generated_stem(rec.pattern)
    call = source_call(cluster.pattern_params)
    path = Path(call.path) if call is not None else None
    if call is None or not path.is_file() or _is_library(path):
        if _plan_module_swap(rec, cluster, out):
            return
        out.notes.append(f"#{rec.rank} {rec.title}: the chain's dataflow was guessed from the trace, not read off "
                         f"the source; not rewritten (see the report for the generated kernel)" if call is None else
                         f"#{rec.rank} {rec.title}: {call.path} is not an editable file of yours; not rewritten")
        return
    if lines_of(path.read_text(encoding="utf-8"), call.first_line, call.last_line) != call.text:
        out.notes.append(f"#{rec.rank} {rec.title}: {call.path} lines {call.first_line}-{call.last_line} no longer "
                         f"hold the traced chain (edited since the profile?); not rewritten: profile again")
        return
    pattern = resolve(rec.pattern, cluster.pattern_params)
    folder = path.parent / GENERATED_FOLDER
    in_package = (path.parent / "__init__.py").is_file()
    local = f"fused_{stem}"
    code = call.call_text(local)
    code = f"return {code}" if call.target is None else f"{call.target} = {code}"
    imports = (f"from {'.' if in_package else ''}{GENERATED_FOLDER}.{stem} import fused as {local}",)
    why = f"#{rec.rank}: lines {call.first_line}-{call.last_line} as one generated Triton kernel each way"
    generated.setdefault(path, []).append(StatementReplacement(call.first_line, call.last_line, code, imports, why,
                                                                       rec.pattern))
    planned = {f.path for f in out.files}
    init = folder / "__init__.py"
    if not init.exists() and str(init) not in planned:
        out.files.append(new_file(str(init), _PACKAGE_INIT, "the package of the generated kernels"))
    target = folder / f"{stem}.py"
    text = pattern_source(pattern)
    if str(target) not in planned and not (target.exists() and target.read_text(encoding="utf-8") == text):
        out.files.append(new_file(str(target), text, f"#{rec.rank}: the generated kernel", replace=target.exists()))


def _plan_module_swap(rec, cluster, out: ApplyPlan) -> bool:
    """A generated kernel with no source rewrite, whose chain ran inside a module (HF's
    NewGELUActivation): that module's forward is swapped at run time, if it is exactly the chain
    (fusion_advisor.patch records its forward, generates the kernel and checks it)."""
    leaf = (cluster.module_class or "").rsplit("/", 1)[-1]
    if not leaf:
        return False
    claimed = next((name for name, classes in out.runtime_modules.items()
                    if name != rec.pattern and is_generated(name) and leaf in classes), None)
    if claimed is not None:
        # One swap records the module's forward and serves every shape it is called with (T5's
        # encoder and decoder NewGELUActivation traced as two chains): a second name would never run.
        out.notes.append(f"#{rec.rank} {rec.title}: {leaf}'s forward is already swapped for {claimed}, which "
                         f"covers this chain too")
        return True
    out.add_runtime(rec.pattern, f"runtime swap ({leaf})")
    classes = out.runtime_modules.setdefault(rec.pattern, [])
    if leaf not in classes:
        classes.append(leaf)
    out.notes.append(f"#{rec.rank} {rec.title}: no source rewrite; {leaf}'s forward patched at run time with "
                     f"fusion_advisor.patch(model, result) where it is exactly this chain (checked numerically)")
    return True


# -- what each recommendation's patch is, recorded in the result for the report ------------------
def generated_stem(pattern_name: str) -> str:
    """A generated kernel's module name in fusion_kernels/: "generic:1a2b" -> "g_1a2b"."""
    return "g_" + pattern_name.split(":", 1)[1]


def qualified(obj) -> str:
    """The import path of a pattern's module factory or function, as the report names it."""
    owner = getattr(obj, "__self__", None)   # a classmethod factory: name its class
    target = owner if isinstance(owner, type) else obj
    return f"{getattr(target, '__module__', '?')}.{getattr(target, '__qualname__', repr(target))}"


def describe_patches(result: AdvisorResult) -> AdvisorResult:
    """Fill each recommendation's `patch`: the kind of change (module swap, function call,
    generated kernel, torch.compile, Liger, CUDA graphs) and what it is. The source diff is added
    later (report.changes.fill_patch_diffs)."""
    from fusion_advisor.kernels import resolve

    clusters = {c.id: c for c in result.clusters}
    for rec in result.recommendations:
        if rec.kind == "cuda_graphs":
            rec.patch = {"kind": "cuda_graphs", "description": "torch.compile(model, mode=\"reduce-overhead\"), or "
                                                               "torch.cuda.graphs around the static part of the step"}
            continue
        if rec.kind == channels_last.NAME:
            rec.patch = {"kind": channels_last.NAME, "description": "model = model.to(memory_format=torch.channels_last), "
                                                                 "and each image batch x.to(memory_format=torch.channels_last)"}
            continue
        cluster = clusters.get(rec.cluster_id)
        if cluster is None or not cluster.pattern:
            continue
        bench = result.primary_benchmark(cluster)
        measured = rec.confidence == "measured" and rec.kind != "memory" and bench is not None
        try:
            pattern = resolve(cluster.pattern, cluster.pattern_params)
        except KeyError:
            pattern = None
        rec.patch = _patch(bench.best_provider if measured else "triton", cluster, pattern)
    return result


def _patch(provider: str, cluster: Cluster, pattern) -> dict:
    module = module_leaf(cluster)
    if provider == "compile":
        target = module or "the model"
        return {"kind": "torch_compile", "target": target,
                "description": f"wrap {target} in torch.compile (it fuses this chain itself)"}
    if provider == "liger":
        doc = (getattr(pattern.liger, "__doc__", "") or "").strip().splitlines() if pattern else []
        return {"kind": "liger", "description": doc[0] if doc else "Liger-Kernel's equivalent kernel"}
    if pattern is None:
        return {"kind": "none", "description": f"pattern {cluster.pattern!r} is not registered here"}
    if is_generated(pattern.name):
        call = (cluster.pattern_params.get("chain") or {}).get("call")
        where = f"{call['path']}:{call['first_line']}-{call['last_line']}" if call else cluster.source
        from fusion_advisor.kernels.codegen import pattern_source
        return {"kind": "generated", "module": f"{GENERATED_FOLDER}/{generated_stem(pattern.name)}.py",
                "source": where, "code": pattern_source(pattern),
                "description": (f"write the generated kernel to {GENERATED_FOLDER}/ and call it instead of lines "
                                f"{where}" if call else "the generated kernel (the source was not read: a hand edit)")}
    if module and module in pattern.modules and pattern.module_factory is not None:
        fused = qualified(pattern.module_factory)
        return {"kind": "module_swap", "modules": [{"from": module, "to": fused}],
                "description": f"every {module} becomes {fused} (same parameters, shared)"}
    fn = qualified(pattern.fused)
    return {"kind": "function", "function": fn, "source": cluster.source,
            "description": f"call {fn} where {cluster.source or 'the chain'} computes {pattern.name}"}


def write(p: ApplyPlan, root: Path, notice=None) -> Path:
    """Write every changed file atomically, after backing all of them up; returns the backup folder.
    A file is always either its old or its new self: each is written to a temporary file beside
    it and renamed. If one write fails, the files already written are restored. Holds the apply
    lock of `root` throughout; `notice(message)` hears of leftovers of an earlier, killed write."""
    changed = p.changed
    if not changed:
        raise AdvisorError("nothing to write: no source change in the plan")
    with apply_lock(root):
        for message in clean_leftovers([f.path for f in changed]) + _drop_interrupted_backups(root):
            (notice or print)(message)
        for f in changed:
            if f.created:
                if Path(f.path).exists():
                    raise AdvisorError(f"{f.path} appeared since the plan was made; run apply again")
                continue
            current = Path(f.path).read_text(encoding="utf-8")
            if current != f.before:
                raise AdvisorError(f"{f.path} changed since the plan was made; run apply again")
            if is_read_only(Path(f.path)):
                raise OutputError(f"{f.path} is read-only; nothing was written (make it writable to apply)")
        return _write_locked(changed, root)


def _write_locked(changed: list[FileRewrite], root: Path) -> Path:
    backup = root / BACKUP_DIR / time.strftime("%Y%m%d-%H%M%S")
    try:
        backup.mkdir(parents=True, exist_ok=False)
    except FileExistsError:
        backup = Path(tempfile.mkdtemp(prefix=backup.name + "-", dir=backup.parent))
    except OSError as exc:
        raise OutputError(f"cannot create the backup folder {backup}: {exc.strerror or exc}") from None
    manifest = []
    for i, f in enumerate(changed):
        # What --write leaves (its hash, and a copy for the diff --revert shows when it was edited).
        written_copy = backup / f"{i:03d}-{Path(f.path).name}.written"
        write_text_atomic(written_copy, f.after)
        entry = {"path": f.path, "backup": None, "written": str(written_copy), "written_sha256": _sha256(f.after)}
        if not f.created:   # a created file has nothing to back up: --revert deletes it
            saved = backup / f"{i:03d}-{Path(f.path).name}"
            shutil.copy2(f.path, saved)
            entry["backup"] = str(saved)
        manifest.append(entry)
    _save_manifest(backup, manifest, complete=False)
    written: list[dict] = []
    try:
        for f, entry in zip(changed, manifest):
            if f.created:
                Path(f.path).parent.mkdir(parents=True, exist_ok=True)
            write_text_atomic(Path(f.path), f.after)
            written.append(entry)
    except BaseException:
        for entry in reversed(written):
            _restore(entry)
        raise
    _save_manifest(backup, manifest, complete=True)
    return backup


class RevertConflict(AdvisorError):
    """Files edited since --write: reverting would lose those edits. `diff` shows them."""

    def __init__(self, message: str, diff: str):
        super().__init__(message)
        self.diff = diff


def revert(root: Path, backup: Path | None = None, force: bool = False) -> list[str]:
    """Restore the files of the latest (or the given) backup; returns their paths.

    A file that is no longer what --write left (the user edited it since) is not touched: a
    RevertConflict carries the diff of those edits. With `force`, it is restored all the same and
    the edited text is kept in the backup folder, which then stays (manifest.reverted.json)."""
    base = root / BACKUP_DIR
    if backup is None and not base.is_dir():
        raise AdvisorError(f"no backup to revert under {base}")
    with apply_lock(root):
        if backup is None:
            candidates = sorted(d for d in base.glob("*") if (d / "manifest.json").is_file()) if base.is_dir() else []
            if not candidates:
                raise AdvisorError(f"no backup to revert under {base}")
            backup = candidates[-1]
        manifest = _load_manifest(backup)
        edited = [e for e in manifest if _edited_since_write(e)]
        if edited and not force:
            raise RevertConflict(
                f"{', '.join(e['path'] for e in edited)} changed since `apply --write` (diff above); nothing was "
                f"reverted. Keep your edits, or `--revert --force` (your edited text is kept in {backup})",
                _edits_diff(edited))
        for i, e in enumerate(edited):
            e["edited"] = str(backup / f"edited-{i:03d}-{Path(e['path']).name}")
            shutil.copy2(e["path"], e["edited"])
        for entry in reversed(manifest):
            _restore(entry)
        if edited:   # the only copy of the user's edits: keep it, and out of the next --revert's way
            write_text_atomic(backup / "manifest.reverted.json", json.dumps(manifest, indent=2))
            (backup / "manifest.json").unlink()
        else:
            shutil.rmtree(backup)
    return [e["path"] for e in manifest]


def apply_lock(root: Path):
    """One `apply --write` or `--revert` at a time in a folder."""
    return folder_lock(root / LOCK_FILE, "`fusion-advisor apply --write/--revert`")


def _drop_interrupted_backups(root: Path) -> list[str]:
    """Backups of a --write killed before it wrote anything (every file still its backed-up self,
    no created file present): nothing to revert, so they go. Others stay for --revert."""
    base = root / BACKUP_DIR
    messages = []
    for folder in sorted(base.glob("*")) if base.is_dir() else []:
        try:
            data = json.loads((folder / "manifest.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if not isinstance(data, dict) or data.get("complete", True):
            continue
        if all(_untouched(e) for e in data.get("files", [])):
            shutil.rmtree(folder, ignore_errors=True)
            messages.append(f"removed {folder}: the backup of an interrupted --write that changed nothing")
    return messages


def _untouched(entry: dict) -> bool:
    path = Path(entry["path"])
    if entry.get("backup") is None:
        return not path.exists()
    return path.is_file() and path.read_bytes() == Path(entry["backup"]).read_bytes()


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _save_manifest(backup: Path, manifest: list[dict], complete: bool) -> None:
    write_text_atomic(backup / "manifest.json", json.dumps({"complete": complete, "files": manifest}, indent=2))


def _load_manifest(backup: Path) -> list[dict]:
    data = json.loads((backup / "manifest.json").read_text(encoding="utf-8"))
    return data["files"] if isinstance(data, dict) else data   # a bare list: written before the hashes


def _edited_since_write(entry: dict) -> bool:
    """True when the file holds text that neither --write wrote nor the backup has: the user's."""
    path = Path(entry["path"])
    if not path.is_file() or "written_sha256" not in entry:
        return False   # deleted (restoring loses nothing), or a backup older than the hashes
    current = path.read_bytes()
    if hashlib.sha256(current).hexdigest() == entry["written_sha256"]:
        return False
    # An interrupted --write may not have reached this file: it is still the backed-up text.
    return entry.get("backup") is None or current != Path(entry["backup"]).read_bytes()


def _edits_diff(entries: list[dict]) -> str:
    out = []
    for e in entries:
        written = Path(e["written"]).read_text(encoding="utf-8") if Path(e.get("written") or "").is_file() else ""
        current = Path(e["path"]).read_text(encoding="utf-8", errors="replace")
        out.extend(difflib.unified_diff(written.splitlines(True), current.splitlines(True),
                                        f"{e['path']} (as --write left it)", f"{e['path']} (now)"))
    return "".join(out)


def _restore(entry: dict) -> None:
    """Put a written file back: its backup, or, for a file apply created, nothing (and its folder
    goes too once empty)."""
    path = Path(entry["path"])
    if entry.get("backup") is None:
        path.unlink(missing_ok=True)
        folder = path.parent
        if folder.is_dir() and {p.name for p in folder.iterdir()} <= {"__pycache__"}:
            shutil.rmtree(folder)   # only what importing our files left there
        return
    write_text_atomic(path, Path(entry["backup"]).read_text(encoding="utf-8"))
