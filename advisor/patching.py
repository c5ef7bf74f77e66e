"""Runtime patching: swap modules of ONE model instance for fused ones, checked, revertible.

    handle = fusion_advisor.patch(model, result)        # the recommendations bench measured faster
    handle = fusion_advisor.patch(model, patterns=["rms_norm"])
    handle = fusion_advisor.patch(model, result, memory=True)  # also the memory trades (linear_cross_entropy)
    handle = fusion_advisor.patch(model, result, compile_blocks=True)  # plus torch.compile of the repeated blocks
    ...
    handle.revert()                                     # the model is exactly as before

    with fusion_advisor.patched(model, result):         # reverted on exit
        train(model)

Modules: only the given instance changes (its submodules are replaced with `setattr` on their
parents); classes and other instances are untouched. Replacements share the original parameters
(no copies), so an optimizer built before patching keeps working.

Functions: patterns with `function_patches` also replace plain functions the model calls. Hugging
Face's `apply_rotary_pos_emb` (rope) is a global of the modeling module (e.g.
transformers.models.llama.modeling_llama) that the attention forward looks up at call time, so
that swap is PROCESS-GLOBAL for that module while the handle lives: every model of that family in
the process runs the fused function until `revert()`. The loss (cross_entropy) is the instance's
`loss_function` attribute (HF's property setter stores it on the instance): this model only.
linear_cross_entropy replaces the instance's `forward` (a causal LM's, in training with labels: the
loss from the LM head's input, logits=None); it is checked on the whole model (loss and parameter
gradients) through its FunctionPatch's `check`.

Regional compilation: a name "compile:<ModuleClass>" (where bench measured torch.compile fastest on
the cluster, see advisor/regional_compile.py) compiles that class's instances in this model, one
shared compiled forward per class; each instance's swapped forward is listed among the functions,
and revert() takes it out. Compile's numerics were checked by bench on the cluster. With
compile_blocks=True the model's repeated blocks (regional_compile.BLOCKS) are compiled instead, our
swapped modules inside them: the configuration `apply --verify` times as "patched + compiled blocks".

Modules are chosen by what they compute (advisor/module_forms.py): any leaf module shaped like a
norm (a 1-D weight, an optional bias, an eps) is tried as rms_norm, then layer_norm, built from its
own weight, bias and eps (T5LayerNorm, a user's RMSNorm with `epsilon`, nanoGPT's LayerNorm, per-head
q/k norms), and any leaf module whose forward is a chain of pointwise ops on its input (NewGELU and
kin) runs as a kernel generated from that chain (pattern name "pointwise_chain", or the result's
"generic:<hash>"). Class names are hints, tried first; with a result (or `modules={pattern: [class
names]}`) only the classes its clusters came from, and the pattern's own, are tried. Checks run once
per (pattern, class, shapes, dtypes, attributes) signature, so a deep model costs a few checks.

Blocks (batch_norm_act): a block of leaf modules with a BatchNorm child followed by an activation
child (torchvision's Conv2dNormActivation, HF's ResNetConvLayer, an nn.Sequential) is swapped for a
shallow copy of itself whose BN runs fused with the activation and whose activation is an Identity;
the block's own forward runs unchanged, and the check decides whether that computes the same (a
BasicBlock whose one ReLU also runs after the residual add does not). Such a pattern says
`stateful_modules`: its check runs on deep copies, in training and eval mode, and compares the
running statistics too, so checking never moves the model's own.

Each replacement is checked on random inputs against what it replaces (forward output and every
gradient, the tolerance table of kernels/tolerances.py) before it goes in; one that fails is left
out and reported, never silently applied. `revert()` puts back the very objects that were there.
"""
from __future__ import annotations

import contextlib
import inspect
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch
from torch import nn

from fusion_advisor import api, calls, channels_last, regional_compile
from fusion_advisor.core.errors import AdvisorError
from fusion_advisor.core.result import is_generated
from fusion_advisor.equivalence import check_equivalent, check_function, check_on_copies
from fusion_advisor.kernels import all_patterns, get
from fusion_advisor.kernels.registry import FunctionPatch, FusionPattern, NotThisForm
from fusion_advisor.module_forms import (NOT_A_CHAIN, POINTWISE_CHAIN, UNWEIGHTED_PROBE_FEATURES, PointwiseChainModule,
                                         check_norm, module_state, norm_builders, norm_parts, norm_probe, one_line,
                                         pointwise_refusal, redrawn_copy, rng_kept)

_OPTIONS = {"check", "patterns", "device_check_shape", "memory", "modules", "include_estimates", "compile_blocks"}
LEFT_TO_COMPILE = "left to torch.compile"
_NORM_FORMS = ("rms_norm", "layer_norm")   # tried in this order on a norm-shaped module


@dataclass
class Swap:
    path: str
    parent: nn.Module
    attr: str
    original: nn.Module
    replacement: nn.Module
    pattern: str

    def described(self) -> str:
        """"LlamaRMSNorm -> RMSNorm"; a block swapped for a copy of its own class (batch_norm_act) says
        which children changed: "ResNetConvLayer -> ResNetConvLayer (normalization -> BatchNormAct, ...)"."""
        new = type(self.replacement).__name__
        if type(self.replacement) is type(self.original):
            changed = [f"{name} -> {type(child).__name__}" for name, child in self.replacement.named_children()
                       if self.original._modules.get(name) is not child]
            # an attribute the copy holds of its own (an MoE's experts: `_apply_gate -> fused packed silu gate`)
            changed += [f"{name} -> {value!r}" for name, value in vars(self.replacement).items()
                        if callable(value) and vars(self.original).get(name) is not value]
            new += f" ({', '.join(changed)})" if changed else ""
        return f"{type(self.original).__name__} -> {new}"


@dataclass
class FunctionSwap:
    path: str                      # "transformers.models.llama.modeling_llama.apply_rotary_pos_emb"
    original: Callable
    replacement: Callable
    pattern: str
    restore: Callable[[], None]    # puts `original` back exactly


@dataclass
class PatchHandle:
    swaps: list[Swap] = field(default_factory=list)
    functions: list[FunctionSwap] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (module or function path, reason)

    def revert(self) -> None:
        """Put every original function and module back, last swapped first."""
        for f in reversed(self.functions):
            f.restore()
        self.functions.clear()
        for s in reversed(self.swaps):
            setattr(s.parent, s.attr, s.original)
        self.swaps.clear()

    def __enter__(self) -> "PatchHandle":
        return self

    def __exit__(self, *exc) -> None:
        self.revert()

    def summary(self) -> str:
        lines = [f"swapped {len(self.swaps)} module(s), {len(self.functions)} function(s)"]
        lines += [f"  {s.path}: {s.described()} ({s.pattern})" for s in self.swaps]
        lines += [f"  {f.path}: {_name(f.original)} -> fused ({f.pattern})" for f in self.functions]
        lines += [f"  skipped {p}: {why}" for p, why in self.skipped]
        return "\n".join(lines)


def recommended_patterns(result, memory: bool = False, include_estimates: bool = False) -> list[str]:
    """Pattern names of an AdvisorResult's recommendations that bench measured faster than eager
    with their numerics checked (the untimed ones too with include_estimates); memory trades
    (kind "memory": slower, less memory) only with memory=True, and only timed ones. A generated
    kernel ("generic:<hash>") is included where its cluster came from a module (a runtime swap of
    that module's forward); elsewhere it is a source rewrite (`fusion-advisor apply`)."""
    from fusion_advisor import provider_choice
    from fusion_advisor.core.result import AdvisorResult
    from fusion_advisor.provider_choice import numerics_failed, timed_for_apply

    if isinstance(result, dict):
        result = AdvisorResult.from_dict(result)
    hinted = module_hints(result)
    clusters = {c.id: c for c in result.clusters}
    launch_bound = result.host_counts()
    names = []
    for rec in result.recommendations:
        name = rec.pattern
        if rec.kind == channels_last.NAME and include_estimates and channels_last.NAME not in names:
            names.append(channels_last.NAME)   # priced on the transposes' measured time: an estimate
            continue
        if (rec.kind == "memory" and not memory) or not name:
            continue
        cluster = clusters.get(rec.cluster_id)
        bench = result.primary_benchmark(cluster) if cluster is not None else None
        # The provider is apply's choice (provider_choice): regional compile only where it pays.
        choice = provider_choice.choose(rec, cluster, bench, launch_bound, memory)
        if choice.provider == "compile":
            if choice.runtime_pattern not in names:
                names.append(choice.runtime_pattern)
            continue
        if choice.provider is None and rec.kind != "memory":
            continue   # measured, and nothing beat eager in the step's terms (apply.plan says the same)
        if (is_generated(name) and name not in hinted) or name in names:
            continue
        if timed_for_apply(rec, bench) or (include_estimates and not numerics_failed(bench)):
            names.append(name)
    return names


def module_hints(result) -> dict[str, set[str]]:
    """pattern name -> the module classes (leaf class names) its recommended clusters came from; for
    a pattern whose module form is a block (`module_is_block`: a BatchNorm2d's cluster swaps the
    conv -> BN -> ReLU block holding it), the leaf's parent class."""
    hints: dict[str, set[str]] = {}
    for name, cluster in _recommended_clusters(result):
        path = (_field(cluster, "module_class") or "").split("/") if cluster is not None else [""]
        leaf = path[-2] if _is_block_pattern(name) and len(path) >= 2 else path[-1]
        if name and leaf:
            hints.setdefault(name, set()).add(leaf)
    return hints


def _is_block_pattern(name: str | None) -> bool:
    if not name or is_generated(name):
        return False
    try:
        return get(name).module_is_block
    except KeyError:
        return False


def _params_hints(result) -> dict[str, list[dict]]:
    """pattern name -> the params of its recommended clusters (what bench timed)."""
    out: dict[str, list[dict]] = {}
    for name, cluster in _recommended_clusters(result):
        if cluster is not None and name:
            out.setdefault(name, []).append(dict(_field(cluster, "pattern_params") or {}))
    return out


def _recommended_clusters(result):
    """(pattern name, cluster or None) of each recommendation of a result (an AdvisorResult or its dict)."""
    clusters = {_field(c, "id"): c for c in getattr(result, "clusters", []) or []}
    for rec in getattr(result, "recommendations", []) or []:
        yield _field(rec, "pattern"), clusters.get(_field(rec, "cluster_id"))


def _eps_hints(result) -> dict[str, tuple[float, ...]]:
    """module class -> the eps its traced norm clusters recorded (tried when the module has no eps attribute)."""
    out: dict[str, list[float]] = {}
    for c in getattr(result, "clusters", []) or []:
        leaf = (_field(c, "module_class") or "").rsplit("/", 1)[-1]
        eps = (_field(c, "pattern_params") or {}).get("eps")
        if leaf and isinstance(eps, (int, float)) and float(eps) not in out.setdefault(leaf, []):
            out[leaf].append(float(eps))
    return {k: tuple(v) for k, v in out.items()}


def _field(obj, name: str):
    return obj.get(name) if isinstance(obj, dict) else getattr(obj, name, None)


@dataclass
class _Target:
    """One pattern that swaps modules: its registered pattern (None for a pointwise chain), the
    class names tried first, and whether only those are tried (a result said where it applies)."""
    name: str
    pattern: FusionPattern | None
    hints: frozenset[str]
    only_hinted: bool
    params: tuple[dict, ...] = ()   # the result's recommended clusters' params (for pattern.module_fits)


def patch(model: nn.Module, result=None, **options) -> PatchHandle:
    """Swap the modules (this instance only) and functions (see the module docstring: a modeling
    module's global is process-global) that the recommended (or named) patterns replace."""
    unknown = set(options) - _OPTIONS
    if unknown:
        raise TypeError(f"patch(): unknown option(s) {', '.join(sorted(unknown))}; known: {', '.join(sorted(_OPTIONS))}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"patch() needs an nn.Module, got {type(model).__name__}")
    names = options.get("patterns")
    from fusion_advisor.core.result import AdvisorResult
    if isinstance(result, (str, bytes)) or hasattr(result, "__fspath__"):
        result = AdvisorResult.load(result)
    elif isinstance(result, dict):   # json.load(f) of a result file: the same as its path
        result = AdvisorResult.from_dict(result)
    elif result is not None and not isinstance(result, AdvisorResult):
        raise TypeError(f"patch(): result must be an AdvisorResult, a result file's path or its JSON as a dict; "
                        f"got {type(result).__name__}")
    if names is None:
        if result is None:
            raise AdvisorError("patch() needs a result (AdvisorResult) or patterns=[...]")
        names = recommended_patterns(result, memory=bool(options.get("memory", False)),
                                     include_estimates=bool(options.get("include_estimates", False)))
    blocks: list[str] = []
    if options.get("compile_blocks") or regional_compile.BLOCKS in names:   # asked by name: apply --verify's run
        # the measured "patched + compiled blocks" of apply --verify: torch.compile inside the
        # repeated blocks (they hold the regions), our kernels outside them. Inside, ours would be
        # opaque custom ops that the compiler cannot fuse across.
        names = [n for n in names if not regional_compile.is_compile_pattern(n)] + [regional_compile.BLOCKS]
        blocks = regional_compile.block_paths(model)
    compile_names = [n for n in names if regional_compile.is_compile_pattern(n)]
    hints = module_hints(result) if result is not None else {}
    params_hints = _params_hints(result) if result is not None else {}
    for name, classes in (options.get("modules") or {}).items():
        hints.setdefault(name, set()).update(classes)
    patterns, targets = [], []
    for n in names:
        if n in compile_names or n == channels_last.NAME:
            continue   # regional torch.compile and the memory format: after the swaps, below
        if n == POINTWISE_CHAIN or is_generated(n):
            targets.append(_Target(n, None, frozenset(hints.get(n, ())), bool(hints.get(n))))
            continue
        p = get(n)
        patterns.append(p)
        if p.modules and p.module_factory is not None:
            targets.append(_Target(n, p, frozenset(p.modules) | frozenset(hints.get(n, ())), bool(hints.get(n)),
                                   tuple(params_hints.get(n, ()))))
    handle = PatchHandle()
    for p in patterns:
        if not (p.modules and p.module_factory is not None) and not p.function_patches:
            handle.skipped.append(("*", f"pattern {p.name} has no module or function form: use `fusion-advisor apply` "
                                        "(source patch)"))
    check = options.get("check", True)
    try:
        # The checks below run modules: under `profile` they are not steps, and their random inputs
        # do not move the user's RNG (apply --verify compares a seeded run's losses with and without).
        with api._paused_steps(), rng_kept():
            _ModuleSwapper(model, targets, handle, check, options.get("device_check_shape"),
                           _eps_hints(result) if result is not None else {}, blocks).run()
            for p in patterns:
                for fp in p.function_patches:
                    if blocks and fp.where == "module_global":
                        handle.skipped.append(("*", f"{p.name}: {fp.name} is called inside the compiled blocks: "
                                                    f"{LEFT_TO_COMPILE}"))
                        continue
                    _swap_function(model, p.name, fp, handle, check)
            if compile_names:
                _compile_regions(model, compile_names, handle)
            if channels_last.NAME in names:
                restore, converted = channels_last.convert(model)
                handle.functions.append(FunctionSwap(f"(model) memory format: {converted} 4-D tensors and the inputs",
                                                     None, None, channels_last.NAME, restore))
    except BaseException:
        handle.revert()
        raise
    return handle


def _ours(module: nn.Module) -> bool:
    return type(module).__module__.startswith("fusion_advisor.")


class _ModuleSwapper:
    """Swaps the modules of one model that the targets replace (see the module docstring), each
    replacement built from that module and checked first; one check per signature."""

    def __init__(self, model, targets, handle, check, shape_hint, eps_hints, blocks=()):
        self.model, self.targets, self.handle, self.blocks = model, targets, handle, tuple(blocks)
        self.check, self.shape_hint, self.eps_hints = check, shape_hint, eps_hints
        self.verdicts: dict[tuple, str | None] = {}        # signature -> None (passed) or why not
        self.chain_caches: dict[tuple, tuple[dict, dict]] = {}
        # A pointwise module's kernel is made and checked at the model's dtype and device (other
        # dtypes on their first call); a model without tensors runs where the kernels do.
        first = next((t for t in (*model.parameters(), *model.buffers()) if t.is_floating_point()), None)
        self.dtype = first.dtype if first is not None else torch.float32
        self.device = first.device if first is not None else torch.device(
            "cuda" if torch.cuda.is_available() else "cpu")

    def run(self) -> None:
        swapped: list[str] = []
        for path, parent, attr, module in list(_candidates(self.model)):
            if any(path.startswith(p + ".") for p in swapped):
                continue   # inside a module already replaced: no longer in the model
            if _ours(module) or _ours(parent):
                continue   # a replacement of a live handle (patched twice), or the original it runs
            cls = type(module).__name__
            block = next((b for b in self.blocks if path.startswith(b + ".")), None)
            if block is not None:
                if any(cls in t.hints for t in self.targets):
                    self.handle.skipped.append((path, f"inside the compiled block {block}: {LEFT_TO_COMPILE}"))
                continue
            reasons = []
            if _sharded(module):
                # FSDP2 puts the gathered parameters on the module it wrapped at each forward: a
                # replacement holding the sharded ones would compute with shards.
                if any(cls in t.hints or t.name in _NORM_FORMS for t in self.targets):
                    self.handle.skipped.append((path, "its parameters are sharded (FSDP2's fully_shard): call "
                                                      "fusion_advisor.patch on the model before fully_shard"))
                continue
            for t in sorted(self.targets, key=lambda t: cls not in t.hints):   # hinted first
                if t.only_hinted and cls not in t.hints and not _holds_hinted(t, module):
                    continue
                replacement, why = self._replacement(t, module, cls in t.hints)
                if replacement is not None:
                    setattr(parent, attr, replacement)
                    self.handle.swaps.append(Swap(path, parent, attr, module, replacement, t.name))
                    swapped.append(path)
                    break
                if why:
                    reasons.append(why)
            else:
                if reasons:
                    self.handle.skipped.append((path, "; ".join(reasons)))

    def _replacement(self, t: _Target, module: nn.Module, hinted: bool) -> tuple[nn.Module | None, str | None]:
        """(replacement, None), or (None, why not: None where the module is simply not of this form)."""
        if t.pattern is None:
            return self._pointwise(t, module, hinted)
        if t.name in _NORM_FORMS:
            parts = norm_parts(module, self.eps_hints.get(type(module).__name__, ()))
            if not isinstance(parts, str):
                return self._norm(t, module, parts)
        fits = t.pattern.module_fits
        if fits is not None and t.params and not any(fits(module, p) for p in t.params):
            return None, None   # not a shape bench timed for this result
        shaped = t.pattern.module_shape is not None and t.pattern.module_shape(module)
        if not shaped and (not hinted or (t.pattern.module_is_block and type(module).__name__ not in t.pattern.modules)):
            # (a block hint from a result is the class of the block's parent, e.g. "Sequential": only
            # the ones of the block's shape are tried)
            return None, None
        return self._by_factory(t, module)

    def _signature(self, t: _Target, module: nn.Module, *extra) -> tuple:
        attrs = tuple(sorted((k, v) for k, v in vars(module).items()
                             if not k.startswith("_") and isinstance(v, (bool, int, float, str, type(None)))))
        # A function held as an attribute (torchtitan's FeedForward built with F.silu or F.gelu) is
        # part of what the instance computes: two instances that differ there get a check each.
        functions = tuple(sorted((k, f"{getattr(v, '__module__', '')}.{getattr(v, '__qualname__', type(v).__name__)}")
                                 for k, v in vars(module).items()
                                 if callable(v) and not isinstance(v, (nn.Module, torch.Tensor, type))))
        tensors = tuple((n, tuple(p.shape), p.dtype, p.device.type, p.requires_grad)
                        for n, p in [*module.named_parameters(), *module.named_buffers()])
        return (t.name, type(module), attrs, functions, tensors, *extra)

    def _norm(self, t: _Target, module: nn.Module, parts) -> tuple[nn.Module | None, str | None]:
        builders = norm_builders(t.name, parts)
        if not builders:
            return None, None
        problems = []
        for candidate in builders:
            key = self._signature(t, module, candidate.assumed)
            if key not in self.verdicts:
                self.verdicts[key] = self._check_norm(module, candidate, parts) if self.check else None
            if self.verdicts[key] is None:
                return candidate.build(module), None
            problems.append(f"{candidate.assumed}: {self.verdicts[key]}")
        where = "its own eps" if parts.eps_from_module else "no eps attribute, the usual ones tried"
        return None, f"{t.name}: numerics check failed ({where}): " + "; ".join(problems)

    def _check_norm(self, module: nn.Module, candidate, parts) -> str | None:
        try:
            twin = redrawn_copy(module)
            if parts.weight is not None:
                features, dtype, device = parts.weight.shape[0], parts.weight.dtype, parts.weight.device
            else:   # no weight to read the row length off: its normalized_shape, else any, in the model's dtype
                features, dtype, device = parts.features or UNWEIGHTED_PROBE_FEATURES, self.dtype, self.device
            x = norm_probe(features, dtype, device, self.shape_hint, candidate.probe)
            return check_norm(twin, candidate.build(twin), x, channels_first=candidate.probe != "rows")
        except Exception as exc:  # e.g. a CPU tensor for a CUDA-only kernel, a module that cannot be copied
            return one_line(exc)

    def _by_factory(self, t: _Target, module: nn.Module) -> tuple[nn.Module | None, str | None]:
        try:
            replacement = t.pattern.module_factory(module)
        except NotThisForm:
            return None, None       # of the class, not of the form (an aligned nn.Linear): not a refusal
        except Exception as exc:  # a module that looks alike but is not: leave it alone, say why
            return None, f"{t.name}: cannot wrap {type(module).__name__} ({exc})"
        stateful = t.pattern.stateful_modules
        # A block's forward depends on its children: their classes and attributes key its verdict too.
        children = tuple((n, type(c), module_state(c)) for n, c in module.named_children()) if stateful else ()
        key = self._signature(t, module, *children)
        if key not in self.verdicts:
            try:
                with _kernel_calls(t.pattern.call_key) as ran:
                    if not self.check:
                        self.verdicts[key] = None
                    elif stateful:
                        self.verdicts[key] = check_on_copies(module, t.pattern.module_factory, self.shape_hint)
                    else:
                        self.verdicts[key] = check_equivalent(module, replacement, self.shape_hint)
                if self.check and self.verdicts[key] is None and not ran():
                    # Matching numerics prove nothing where our kernel never ran (Mixtral's eager experts
                    # forward writes act(gate) * up inline and never calls the `_apply_gate` we fused).
                    self.verdicts[key] = f"its forward never reached our {t.pattern.call_key} kernel in the check"
            except Exception as exc:  # e.g. a CPU tensor for a CUDA-only kernel
                self.verdicts[key] = one_line(exc)
        if self.verdicts[key] is not None:
            return None, f"{t.name}: numerics check failed: {self.verdicts[key]}"
        return replacement, None

    def _pointwise(self, t: _Target, module: nn.Module, hinted: bool) -> tuple[nn.Module | None, str | None]:
        refusal = pointwise_refusal(module)
        if refusal:
            return None, f"{t.name}: {type(module).__name__} {refusal}" if hinted else None
        # Instances of one class with the same attributes share their kernels (one capture and
        # one check per dtype for the whole model).
        shared = self.chain_caches.setdefault(self._signature(t, module), ({}, {}))
        replacement = PointwiseChainModule(module, t.name, shared)
        if replacement.kernel_for(self.dtype, self.device) is None:
            why = replacement.refusals[(self.dtype, self.device.type, module_state(module))]
            # A module that is no chain at all (Identity, Dropout, a reshaping forward) is not worth
            # a line, unless a result pointed at its class.
            return None, f"{t.name}: {why}" if hinted or not why.startswith(NOT_A_CHAIN) else None
        return replacement, None


@contextlib.contextmanager
def _kernel_calls(key: str):
    """Yields a function that says how many calls of our kernel counted as `key` (fusion_advisor.calls)
    were made since the block began: a check whose outputs match proves nothing where it is 0."""
    before = calls.snapshot().get(key, 0)
    yield lambda: calls.snapshot().get(key, 0) - before


def _holds_hinted(t: _Target, module: nn.Module) -> bool:
    """A module of the pattern's shape that holds a module of a hinted class: the gated MLP around the
    activation module a trace named (T5's T5DenseGatedActDense around its NewGELUActivation, whose
    cluster is the GELU and the mul by up). A result's hints are the traced leaves; the module form
    that fuses them may be their parent, under a class name no pattern lists."""
    if t.pattern is None or t.pattern.module_shape is None:
        return False
    return t.pattern.module_shape(module) and any(type(m).__name__ in t.hints for m in module.modules() if m is not module)


def _sharded(module: nn.Module) -> bool:
    """Parameters that are DTensors (FSDP2, tensor parallel): not plain tensors a kernel can take."""
    return any(type(p).__name__ == "DTensor" or type(getattr(p, "data", None)).__name__ == "DTensor"
               for p in module.parameters(recurse=False))


def _compile_regions(model: nn.Module, names: list[str], handle: PatchHandle) -> None:
    """Regional torch.compile ("compile:<ModuleClass>", where bench measured compile fastest): each
    compiled instance's forward is a FunctionSwap, so revert() and the verify listing cover it."""
    compiled = regional_compile.compile_regions(model, names)
    handle.functions.extend(FunctionSwap(f"{f.path}.forward", f.original, f.replacement, f.pattern, f.restore)
                            for f in compiled.forwards)
    handle.skipped.extend(compiled.skipped)


def _function_sites(model: nn.Module, fp: FunctionPatch) -> list[tuple[str, Any, Callable]]:
    """(path, owner, current function) for each place `fp` would swap in this model."""
    if fp.where == "instance":
        current = getattr(model, fp.name, None)
        return [(f"{type(model).__name__}.{fp.name} (this instance)", model, current)] if current is not None else []
    if fp.where != "module_global":
        raise ValueError(f"FunctionPatch {fp.name}: unknown where={fp.where!r}")
    # The globals a forward looks names up in: its function's (through decorators), and the
    # class's module (a script loaded without a sys.modules entry has only the first).
    namespaces, classes = {}, {}   # by id: each namespace, and the model's classes that look names up in it
    for m in model.modules():
        forward = inspect.unwrap(getattr(type(m), "forward", None) or (lambda: None))
        module = sys.modules.get(type(m).__module__)
        for namespace in (getattr(forward, "__globals__", None), vars(module) if module else None):
            if namespace is None or str(namespace.get("__name__", "")).startswith(("torch.", "fusion_advisor.")):
                continue   # (torch's own modules, e.g. nn.modules.loss for a loss submodule, and ours, a module
                           # swapped in, are not modeling code)
            namespaces.setdefault(id(namespace), namespace)
            classes.setdefault(id(namespace), set()).add(type(m))
    sites = []
    for key, namespace in namespaces.items():
        current = namespace.get(fp.name)
        if current is not None and (fp.used_in is None or fp.used_in(namespace, classes[key])):
            sites.append((f"{namespace.get('__name__', '?')}.{fp.name}", namespace, current))
    return sites


def _swap_function(model: nn.Module, pattern: str, fp: FunctionPatch, handle: PatchHandle, check: bool) -> None:
    """Replace `fp.name` at each of its sites in this model, checking the replacement first."""
    for path, owner, original in _function_sites(model, fp):
        if hasattr(original, "fused_original"):
            handle.skipped.append((path, f"{pattern}: already replaced (by another live patch handle)"))
            continue
        if not fp.replaces(original):
            handle.skipped.append((path, f"{pattern}: {_name(original)} is not the function this pattern replaces"))
            continue
        replacement = fp.factory(original)
        if check:
            key = get(pattern).call_key
            try:
                with _kernel_calls(key) as ran:
                    if fp.check is not None:   # e.g. a forward: its loss and every parameter's gradient
                        problem = fp.check(model, original, replacement)
                    else:
                        called = fp.called_as or (lambda f: f)
                        problem = check_function(called(original), called(replacement), _examples(fp, model, replacement))
                if not problem and not ran():
                    # equal outputs because the replacement handed every call back to the original
                    # (GLM's partial rotary: a half-width cos that rope_variant leaves to it)
                    problem = f"the replacement never reached our {key} kernel in the check"
            except Exception as exc:  # e.g. a CPU tensor for a CUDA-only kernel
                problem = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
            if problem:
                handle.skipped.append((path, f"{pattern}: numerics check failed: {problem}"))
                continue
        restore = _set_attribute(owner, fp.name, replacement)
        handle.functions.append(FunctionSwap(path, original, replacement, pattern, restore))


def _examples(fp: FunctionPatch, model: nn.Module, replacement: Callable) -> list:
    """fp.example_inputs(model), or (model, replacement) where it takes both: a replacement that
    serves only some calls (rope's cos widths) says which, and the check must reach those."""
    takes_replacement = len(inspect.signature(fp.example_inputs).parameters) >= 2
    return fp.example_inputs(model, replacement) if takes_replacement else fp.example_inputs(model)


def _set_attribute(owner, name: str, value) -> Callable[[], None]:
    """Set `name` on owner (a module's globals dict, or an instance) to value; returns a function
    that undoes it exactly. On an instance the attribute may be a property whose setter stores
    elsewhere (HF's loss_function sets `_loss_function`): every entry of the instance's __dict__
    the set added or changed is put back as it was (or removed), so the property resolves as before."""
    if isinstance(owner, dict):  # a module's globals
        original = owner[name]
        owner[name] = value

        def restore_global() -> None:
            owner[name] = original
        return restore_global
    before = dict(vars(owner))
    setattr(owner, name, value)
    changed = [k for k, v in vars(owner).items() if k not in before or before[k] is not v]

    def restore() -> None:
        for k in changed:
            if k in before:
                vars(owner)[k] = before[k]
            else:
                vars(owner).pop(k, None)
    return restore


def _name(fn) -> str:
    return getattr(fn, "__qualname__", None) or type(fn).__name__


@contextlib.contextmanager
def patched(model: nn.Module, result=None, **options):
    handle = patch(model, result, **options)
    try:
        yield handle
    finally:
        handle.revert()


def _candidates(model: nn.Module) -> Iterable[tuple[str, nn.Module, str, nn.Module]]:
    for parent_path, parent in model.named_modules():
        for attr, child in parent.named_children():
            yield (f"{parent_path}.{attr}" if parent_path else attr), parent, attr, child


def available_module_patterns() -> list[FusionPattern]:
    return [p for p in all_patterns() if p.modules and p.module_factory is not None]
