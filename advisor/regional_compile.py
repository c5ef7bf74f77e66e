"""Regional torch.compile: compile the module instances a cluster came from, where bench measured
torch.compile fastest on that cluster, instead of our kernel or nothing.

    handle = compile_regions(model, ["compile:LlamaMLP"])   # every LlamaMLP of this model instance
    ...
    handle.revert()                                         # the original forward objects are back

A pattern name "compile:<ModuleClass>" targets every instance of that class (by class name, like
the rest of the runtime patches) in ONE model; "compile:*" (WHOLE_MODEL) compiles the model itself,
the reference that `apply --verify` compares against (advisor/compile_reference.py); "compile:blocks"
(BLOCKS) compiles the model's repeated blocks, PyTorch's regional-compilation recipe: every class of
which an nn.ModuleList holds two or more instances (a transformer's layers, a CNN stage's blocks),
outermost first. `apply --verify` times that configuration with the patch outside the blocks
(patch(..., compile_blocks=True) leaves the insides of the blocks to the compiler: our kernels would
be opaque custom ops it cannot fuse across) beside the patch alone.

One compile per class: every instance of a class calls one shared
`torch.compile(Class.forward, dynamic=False)` with itself as the first argument. Dynamo lifts the
parameters of an nn.Module argument into graph inputs (inline_inbuilt_nn_modules), so the
instances of a class share one graph per input shape; an attribute that differs between instances
and that the forward reads (HF's `layer_idx`, when a KV cache is used) makes dynamo recompile per
instance, and past dynamo's recompile limit it would run the rest eagerly (see Recompiles below): `graphs`
in `report()` shows it.

The swap sets the instance attribute `forward` (nn.Module.__call__ looks `self.forward` up per
call), so classes and other instances are untouched; `revert()` deletes it again, or puts back the
instance's own `forward` object if it had one. The wrapper counts each call
(`fusion_advisor.calls.hit_eager("compile:<ModuleClass>")`) outside the compiled code, and times the
first call of each class: the forward's compile time the swap adds (it includes one run; the
backward compiles lazily at its first backward, and is not in that figure).

Under `profile` and `apply --verify` the step finder's global module hooks are live during the first
step only; a graph compiled then guards on them, so each class compiles once more in the second
step (dynamo's recompile on the hook count). Keep --warmup >= 3 when timing compiled runs there.

Not compiled, and said why: an instance nested inside another compiled instance (it is compiled
as part of it), one of our fused modules that another cluster's kernel swap put there under the
same class name, and a class whose instance holds more than BACKBONE_SHARE of the model's parameters
(that is whole-model compilation under another name: measure it with WHOLE_MODEL instead) and is the
only instance of its class.

Recompiles: the instances of a class share one code object, and dynamo's recompile limit counts its
graphs together. Instances of different structure (a CNN's stages: other widths, strides, depths)
each need a graph, and the step finder's hooks double them (above): four ResNet stages make eight,
dynamo's default limit, past which the rest would run eagerly. compile_regions raises the limit to
what the compiled instances need (2 graphs each + 2) while the handle lives; revert() puts it back.
"""
from __future__ import annotations

import os
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable

from fusion_advisor import calls

PREFIX = "compile:"
WHOLE_MODEL = "compile:*"
BLOCKS = "compile:blocks"
BACKBONE_SHARE = 0.5
# Tests on CPU use "eager" or "aot_eager" (no C++ toolchain work); real runs use inductor.
DEFAULT_BACKEND = os.environ.get("FUSION_ADVISOR_COMPILE_BACKEND", "inductor")
_ABSENT = object()


def pattern_name(module_class: str) -> str:
    """The runtime-patch name that compiles every instance of `module_class` ("A/B/C" -> C)."""
    return PREFIX + module_class.rsplit("/", 1)[-1]


def is_compile_pattern(name: str) -> bool:
    return isinstance(name, str) and name.startswith(PREFIX)


@dataclass
class CompiledClass:
    """One shared compiled forward and what it did, per pattern name."""

    pattern: str
    instances: list[str] = field(default_factory=list)   # module paths in the model ("" = the model)
    graphs: int = 0                                      # graphs the backend compiled (recompiles included)
    first_call_s: float | None = None                    # host time of the first call: compile + one run


@dataclass
class CompiledForward:
    """One instance's swapped forward; `restore()` puts back exactly what was there."""

    path: str
    module: Any
    original: Callable            # the instance's own forward object, or the bound class forward
    replacement: Callable
    pattern: str
    restore: Callable[[], None]


@dataclass
class RegionalCompile:
    forwards: list[CompiledForward] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)   # (module path, why)
    classes: dict[str, CompiledClass] = field(default_factory=dict)

    def revert(self) -> None:
        for f in reversed(self.forwards):
            f.restore()
        self.forwards.clear()


# Per process, for `report()`: what the patched run compiled (verify can read it after the run).
_compiled: dict[str, CompiledClass] = {}


def report() -> dict[str, dict]:
    """{pattern: {"instances": n, "graphs": g, "first_call_s": t}} for the compiles of this process."""
    return {name: {"instances": len(c.instances), "graphs": c.graphs, "first_call_s": c.first_call_s}
            for name, c in _compiled.items()}


def compile_regions(model, names: list[str], backend: Any = None, dynamic: bool = False) -> RegionalCompile:
    """Compile the instances of each "compile:<Class>" in `names` (see the module docstring)."""
    from torch import nn

    if not isinstance(model, nn.Module):
        raise TypeError(f"compile_regions() needs an nn.Module, got {type(model).__name__}")
    backend = DEFAULT_BACKEND if backend is None else backend
    handle = RegionalCompile()
    wanted = [n for n in dict.fromkeys(names) if is_compile_pattern(n)]
    targets = _targets(model, wanted, handle)
    shared: dict[tuple[str, type], Callable] = {}
    try:
        for path, module, name in targets:
            record = handle.classes.setdefault(name, _compiled.setdefault(name, CompiledClass(name)))
            record.instances.append(path)
            handle.forwards.append(_swap_forward(path, module, name, record, backend, dynamic, shared))
        per_class = Counter(type(module) for _, module, _ in targets)
        limit_restore = _raise_recompile_limit(2 * max(per_class.values()) + 2) if per_class else None
        if limit_restore is not None:
            # the first forward is restored last (revert goes backwards, here and in patch's handle)
            first = handle.forwards[0]
            first.restore = _then(first.restore, limit_restore)
    except BaseException:
        handle.revert()
        raise
    for name in wanted:
        if name not in handle.classes and not any(s[1].startswith(name + ":") for s in handle.skipped):
            handle.skipped.append(("*", f"{name}: no {name[len(PREFIX):]} module in this model"))
    return handle


def _targets(model, wanted: list[str], handle: RegionalCompile) -> list[tuple[str, Any, str]]:
    """(path, module, pattern) of each instance to compile, outermost first; nested and backbone
    instances go to handle.skipped with the reason."""
    if WHOLE_MODEL in wanted:
        others = [n for n in wanted if n != WHOLE_MODEL]
        handle.skipped.extend(("*", f"{n}: inside the whole-model compile ({WHOLE_MODEL})") for n in others)
        return [("", model, WHOLE_MODEL)]
    by_class = {n[len(PREFIX):]: n for n in wanted if n != BLOCKS}
    if BLOCKS in wanted:
        blocks = repeated_block_classes(model)
        if not blocks:
            handle.skipped.append(("*", f"{BLOCKS}: no nn.ModuleList of this model holds two modules of one class"))
        by_class.update({cls: BLOCKS for cls in blocks if cls not in by_class})
    total = sum(p.numel() for p in model.parameters()) or 1
    instances = Counter(type(module) for module in model.modules())
    chosen: list[tuple[str, Any, str]] = []
    for path, module in model.named_modules():
        name = by_class.get(type(module).__name__)
        if name is None:
            continue
        if type(module).__module__.startswith("fusion_advisor."):
            handle.skipped.append((path, f"{name}: already our fused module (a kernel swap of another cluster)"))
            continue
        outer = next((p for p, _, _ in chosen if p == "" or path.startswith(p + ".")), None)
        if outer is not None:
            handle.skipped.append((path or "(model)", f"{name}: inside the compiled {outer or '(model)'}"))
            continue
        # A backbone is one of a kind; a repeated block holding most parameters is still one of several
        # regions (ResNet-50's last stage holds 61 %: left eager, compiled blocks ran 58.4 ms a step
        # on an H100 where whole-model compile ran 33.4).
        share = sum(p.numel() for p in module.parameters()) / total
        if share > BACKBONE_SHARE and instances[type(module)] == 1:
            handle.skipped.append((path or "(model)", f"{name}: holds {share:.0%} of the model's parameters; "
                                                      f"compiling it is whole-model compilation ({WHOLE_MODEL})"))
            continue
        chosen.append((path, module, name))
    return chosen


def block_paths(model) -> list[str]:
    """The module paths BLOCKS compiles in this model (outermost instances of its repeated blocks)."""
    return [path for path, _, _ in _targets(model, [BLOCKS], RegionalCompile())]


def repeated_block_classes(model) -> list[str]:
    """Class names of the model's repeated blocks: classes of which one nn.ModuleList holds two or
    more instances with submodules of their own (our own fused modules excepted), in the order the
    model lists them."""
    from torch import nn

    found: dict[str, None] = {}
    for module in model.modules():
        if not isinstance(module, nn.ModuleList):
            continue
        counts: dict[type, int] = {}
        for child in module:
            # a leaf repeated in a list (StableLM's per-head q/k LayerNorms) is not a block
            if not type(child).__module__.startswith("fusion_advisor.") and next(child.children(), None) is not None:
                counts[type(child)] = counts.get(type(child), 0) + 1
        found.update((cls.__name__, None) for cls, n in counts.items() if n >= 2)
    return list(found)


def _swap_forward(path: str, module, name: str, record: CompiledClass, backend, dynamic: bool,
                  shared: dict) -> CompiledForward:
    own = module.__dict__.get("forward", _ABSENT)
    if own is _ABSENT:
        # One compiled function per (pattern, class): instances pass themselves as `self`.
        key = (name, type(module))
        if key not in shared:
            shared[key] = _torch_compile()(type(module).forward, backend=_counting(backend, record), dynamic=dynamic)
        compiled_fn = shared[key]

        def call(*args, **kwargs):
            return compiled_fn(module, *args, **kwargs)
        original = module.forward
    else:
        # The instance already carries its own forward (another patch): compile that object.
        call = _torch_compile()(own, backend=_counting(backend, record), dynamic=dynamic)
        original = own

    def forward(*args, **kwargs):
        calls.hit_eager(name)   # traced, inside the script's own torch.compile, it counts nothing
        if record.first_call_s is not None:
            return call(*args, **kwargs)
        start = time.perf_counter()
        out = call(*args, **kwargs)
        record.first_call_s = round(time.perf_counter() - start, 3)
        return out

    forward.compiled_original = original  # what it wraps, for a reader of the model
    module.forward = forward

    def restore() -> None:
        if own is _ABSENT:
            module.__dict__.pop("forward", None)
        else:
            module.__dict__["forward"] = own
    return CompiledForward(path or "(model)", module, original, forward, name, restore)


def _then(first: Callable[[], None], second: Callable[[], None]) -> Callable[[], None]:
    def both() -> None:
        first()
        second()
    return both


def _raise_recompile_limit(needed: int) -> Callable[[], None] | None:
    """Dynamo's per-code-object recompile limit to at least `needed`; returns what puts it back
    (None where it was high enough)."""
    import torch

    config = torch._dynamo.config
    key = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    before = getattr(config, key)
    if before >= needed:
        return None
    setattr(config, key, needed)

    def restore() -> None:
        if getattr(config, key) == needed:   # unless someone changed it since
            setattr(config, key, before)
    return restore


def _torch_compile():
    """torch.compile itself, not verify's wrapper that notes the SCRIPT calling it (calls inside a
    script's compiled graphs go uncounted; ours are counted outside the compiled code)."""
    import torch
    return getattr(torch.compile, "fusion_advisor_original", torch.compile)


def _counting(backend, record: CompiledClass):
    """The backend, counting each graph it compiles into `record.graphs`."""
    import torch

    inner = torch._dynamo.lookup_backend(backend) if isinstance(backend, str) else backend

    def counted(gm, example_inputs):
        record.graphs += 1
        return inner(gm, example_inputs)
    return counted
