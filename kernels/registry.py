"""The pattern registry: every fused op registers one FusionPattern, once, when its module is
imported. The lookups (`get`, `all_patterns`, `match`, `resolve`) import PATTERN_MODULES on their
first call, so importing the registry (or the cost model) imports no kernel module, Triton, or
custom op.

A FusionPattern ties together what the rest of the loop needs from a fused op:
  - how to recognise it in a traced cluster (`forward_signature` over the cluster's op names,
    `modules` it replaces, and `params_from_ops` to read shapes, dtypes and scalars off the ops);
  - how to rebuild it on the captured shapes (`make_inputs`), the exact PyTorch code it replaces
    (`reference`) and the Triton replacement (`fused`);
  - how many bytes one fused launch moves (`fused_bytes`), which the cost model prices.

Adding a pattern = one new file in kernels/ that calls `register_pattern(__name__, ...)`, and one
line in PATTERN_MODULES below.
"""
from __future__ import annotations

import importlib
import re
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from fusion_advisor.core.dtypes import dtype_from_name, dtype_from_trace, dtype_name  # noqa: F401 (the patterns import them here)
from fusion_advisor.core.records import OpRecord, short_op_name  # noqa: F401
from fusion_advisor.core.result import is_generated


@dataclass(frozen=True)
class Rewrite:
    """A source rewrite a pattern offers to `fusion-advisor apply`: an expression template and its
    replacement, with `$name` placeholders, e.g.
        Rewrite("F.silu($gate) * $up", "swiglu($gate, $up)",
                ("from fusion_advisor.kernels.swiglu import swiglu",))
    `F.x` in a template also matches torch.nn.functional.x / nn.functional.x; `*` and `+` match
    either operand order."""

    match: str
    replace: str
    imports: tuple[str, ...] = ()
    scope: str = "function"   # "function": only inside the traced function (its def line);
                              # "file": anywhere in that file (calls of the traced function itself)


@dataclass(frozen=True)
class FunctionPatch:
    """A function that `fusion_advisor.patch` replaces at runtime, beside the modules it swaps:
    where the model calls a plain function rather than a module (Hugging Face's
    `apply_rotary_pos_emb`, its `loss_function`).

    where="module_global": the global `name` of each Python module that defines one of the model's
        classes (HF's modeling_<model>.py, whose forward looks the name up at call time); the swap
        is process-global for that module while the patch handle lives.
    where="instance": the attribute `name` of the model instance only.

    The numerics check calls the original and the replacement on `example_inputs(model)`, each as
    `called_as(it)` where given (a class is built, then its instance called); or, where `check` is
    given, `check(model, original, replacement)` -> None or a one-line reason runs instead (a
    forward's loss and every parameter's gradient). `used_in(namespace, classes)` (the model's classes
    that look names up there) narrows a module_global
    patch of a name every modeling module has (`nn`) to the modules whose code uses what it changes."""

    name: str                                        # "apply_rotary_pos_emb", "loss_function"
    where: str                                       # "module_global" or "instance"
    replaces: Callable[[Callable], bool]             # is this original one the replacement is equivalent to?
    factory: Callable[[Callable], Callable]          # original -> replacement (same call signature)
    example_inputs: Callable[..., list]              # model -> [Inputs] to check the replacement against
                                                     # the original on (the model's dtype and device); or
                                                     # (model, replacement) -> [Inputs], the calls it serves
    called_as: Callable[[Callable], Callable] | None = None
    check: Callable | None = None
    used_in: Callable[[dict, set], bool] | None = None   # module_global: only namespaces this says use it


@dataclass
class Inputs:
    """Arguments for `reference` and `fused`; `grad_inputs` says which positional args get grads."""

    args: tuple
    kwargs: dict = field(default_factory=dict)
    grad_inputs: tuple[int, ...] = ()


class NotThisForm(ValueError):
    """A module_factory's answer for a module of the right class but not of its form (an nn.Linear of
    aligned width for padded_linear): patch passes over it without listing it as refused."""


@dataclass(frozen=True)
class FusionPattern:
    name: str                                        # "rms_norm": file kernels/rms_norm.py
    description: str                                 # one line for the report
    reference: Callable[..., Any]                    # the exact PyTorch code replaced
    fused: Callable[..., Any]                        # the Triton functional (autograd-aware)
    make_inputs: Callable[[dict, torch.device, bool], Inputs]  # (params, device, requires_grad)
    fused_bytes: Callable[[dict], dict]              # params -> {"forward": int, "backward": int}
    forward_signature: str = ""                      # regex over space-joined short op names
    params_from_ops: Callable[[Sequence[OpRecord]], dict | None] | None = None
    modules: tuple[str, ...] = ()                    # nn.Module class names it can replace
    module_factory: Callable[[torch.nn.Module], torch.nn.Module] | None = None  # swap for a module
    # A module of this shape is tried with module_factory without a class-name hint (its numerics
    # check still decides): the gated MLPs of Olmo-2, Granite, Cohere... share Llama's attributes.
    module_shape: Callable[[torch.nn.Module], bool] | None = None
    # Its modules' forwards update buffers (BatchNorm's running statistics): patch checks a swap on
    # deep copies, in training and in eval mode, the buffers compared after the step too.
    stateful_modules: bool = False
    # Its module form replaces the block that holds the cluster's modules (a conv -> BN -> ReLU
    # block), not the module the trace names: a result's class hint for it is that module's parent.
    module_is_block: bool = False
    example_params: dict = field(default_factory=dict)  # small shapes for tests and --help
    module_import: str | None = None                 # "fusion_advisor.kernels.rms_norm:RMSNorm": constructor-
                                                     # compatible with `modules`, for source patches
    rewrites: tuple[Rewrite, ...] = ()               # expression rewrites for source patches
    bench_params: tuple[dict, ...] = ()              # LLM-training shapes for benchmarks/bench_kernels.py
    liger: Callable[..., Any] | None = None          # same args as `fused`, runs Liger-Kernel's equivalent
                                                     # (imports liger_kernel lazily; raises ImportError)
    function_patches: tuple[FunctionPatch, ...] = ()  # functions `fusion_advisor.patch` replaces at runtime
    # "time": recommended when it beats eager. "memory": recommended for the peak memory it saves
    # even when slower (linear_cross_entropy), as a trade the report prices and apply takes only
    # when asked (`apply --memory`, `patch(..., memory=True)`).
    goal: str = "time"
    numerics_params: Callable[[dict], dict] | None = None  # params to check numerics against `reference`
                                                     # with, for ops whose outputs are random draws
                                                     # (dropout_add: the same shapes at p=0); None: as given
    replacement_kind: str = "Triton kernel"          # what `fused` is, as the report names it
    # With a result, patch swaps a module only where it fits the params of one of this pattern's
    # recommended clusters (padded_linear: the Linear shapes bench timed, not every misaligned one).
    module_fits: Callable[[torch.nn.Module, dict], bool] | None = None
    # The aten op of `reference` that torch.autocast runs in fp32 ("aten::layer_norm"): a traced bf16 /
    # fp16 input with fp32 weights there ran inside autocast (CUDA's layer_norm refuses that mix
    # outside it: ConvNeXt's forward LayerNorms went untimed on the H100 zoo), so bench times it there.
    autocast_op: str = ""
    counted_as: str = ""                             # the call counter's key (fusion_advisor.calls) when the
                                                     # launcher is another file's: swiglu -> "glu"; "": name

    @property
    def call_key(self) -> str:
        """What `fusion_advisor.calls` counts one call of this pattern's fused op as."""
        return self.counted_as or self.name

    def match(self, ops: Sequence[OpRecord]) -> dict | None:
        """Params if these forward ops are this pattern, else None."""
        if not self.forward_signature or self.params_from_ops is None:
            return None
        seq = " ".join(o.short for o in ops)
        if not re.search(self.forward_signature, seq):
            return None
        return self.params_from_ops(ops)


_REGISTRY: dict[str, FusionPattern] = {}

# The modules that register the hand-written patterns (kernels/<name>.py), imported on first lookup.
PATTERN_MODULES: list[str] = [
    "rms_norm",
    "softmax",
    "bias_act",
    "swiglu",
    "geglu",
    "rope",
    "cross_entropy",
    "linear_cross_entropy",
    "kl_div",
    "embedding_add",
    "dropout_add",
    "add_rms_norm",
    "layer_norm",
    "add_layer_norm",
    "group_norm",
    "batch_norm_act",
    "padded_linear",
]
_loaded = False


def _load_patterns() -> None:
    """Import every pattern module once (each registers its pattern and custom ops on import)."""
    global _loaded
    if _loaded:
        return
    for name in PATTERN_MODULES:
        importlib.import_module(f"fusion_advisor.kernels.{name}")
    _loaded = True


def register(pattern: FusionPattern) -> FusionPattern:
    if pattern.name in _REGISTRY:
        raise ValueError(f"pattern {pattern.name!r} is registered twice")
    _REGISTRY[pattern.name] = pattern
    return pattern


# What a pattern file kernels/<name>.py defines under these names, register_pattern takes from it.
_BY_CONVENTION = ("reference", "make_inputs", "fused_bytes", "params_from_ops")


def register_pattern(module_name: str, **fields) -> FusionPattern:
    """register(FusionPattern(...)) for the pattern file `module_name` (call it with __name__ at the
    end of the file): the name is the file's stem, `fused` its functional of that name, and
    reference / make_inputs / fused_bytes / params_from_ops the file's functions so named; `fields`
    gives the rest, and overrides any of these."""
    module = sys.modules[module_name]
    name = fields.setdefault("name", module_name.rsplit(".", 1)[-1])
    fields.setdefault("fused", getattr(module, name))
    for field_name in _BY_CONVENTION:
        if field_name not in fields and hasattr(module, field_name):
            fields[field_name] = getattr(module, field_name)
    return register(FusionPattern(**fields))


def get(name: str) -> FusionPattern:
    _load_patterns()
    try:
        return _REGISTRY[name]
    except KeyError:
        known = ", ".join(sorted(_REGISTRY)) or "none"
        raise KeyError(f"no fusion pattern named {name!r} (known: {known})") from None


def all_patterns() -> list[FusionPattern]:
    _load_patterns()
    return [_REGISTRY[k] for k in sorted(_REGISTRY)]


def match(ops: Sequence[OpRecord]) -> tuple[FusionPattern, dict] | None:
    """The first registered pattern that matches the ops (longest signature first)."""
    _load_patterns()
    for pattern in sorted(_REGISTRY.values(), key=lambda p: -len(p.forward_signature)):
        params = pattern.match(ops)
        if params is not None:
            return pattern, params
    return None


def resolve(name: str, params: dict | None = None) -> FusionPattern:
    """A pattern by name: a registered one, or a generated one ("generic:<hash>") rebuilt from the
    cluster's pattern_params. KeyError when neither."""
    if not is_generated(name):
        return get(name)
    from fusion_advisor.kernels.codegen.candidate import pattern_from_params
    pattern = pattern_from_params(params or {})
    if pattern.name != name:
        raise KeyError(f"the params rebuild {pattern.name}, not {name} (a different fusion-advisor version?)")
    return pattern



def with_residual_add(add: OpRecord | None, params: dict | None) -> dict | None:
    """A norm's params extended by the residual add that feeds it (the add + norm patterns): the
    add must take two tensors of the normalised shape (a broadcast add, e.g. token + position
    embeddings, is not a residual add) with alpha 1; x's dtype becomes `dtype`, the residual's
    `residual_dtype` where it differs; the norm's weight keeps its dtype (`weight_dtype`). None when
    the add does not qualify."""
    if add is None or params is None or len(add.dims) < 2 or len(add.types) < 2:
        return None
    if [list(d) for d in add.dims[:2]] != [params["shape"], params["shape"]]:
        return None
    if len(add.concrete) > 2 and add.concrete[2] not in ("", "1"):
        return None
    x_dtype, r_dtype = dtype_from_trace(add.types[0]), dtype_from_trace(add.types[1])
    if x_dtype is None or r_dtype is None:
        return None
    # The norm's weight keeps its own traced dtype (fp32 master weights under autocast), which
    # defaulted to the norm input's dtype until `dtype` becomes x's here.
    norm_weight = params.get("weight_dtype", params["dtype"])
    params["dtype"] = dtype_name(x_dtype)
    if norm_weight != params["dtype"] and (params.get("weight", True) or params.get("bias", True)):
        params["weight_dtype"] = norm_weight
    if r_dtype != x_dtype:
        params["residual_dtype"] = dtype_name(r_dtype)
    return params


def param_dtype(params: dict, key: str = "dtype") -> torch.dtype:
    """The dtype a pattern's params name under `key` ("weight_dtype", "residual_dtype", ...), the
    params' "dtype" where they name none (the operand has the input's dtype)."""
    return dtype_from_name(params.get(key, params["dtype"]))


def training_shapes(params: Callable[[int, int], dict]) -> tuple[dict, ...]:
    """bench_params over LLM-training sizes: `params(tokens, hidden)` for 4K, 16K and 32K tokens a
    step by hidden sizes 1024, 4096 and 8192."""
    return tuple(params(tokens, hidden) for tokens in (4096, 16384, 32768) for hidden in (1024, 4096, 8192))
