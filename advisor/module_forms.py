"""Replacements chosen by what a module computes, not by its class name.

`fusion_advisor.patch` asks each form here whether a module instance could be one it replaces and,
if so, for a replacement built from that instance's own parameters and attributes; an equivalence
check against the module's own forward and gradients (`check_norm`, `_check_pointwise`: the rule of
kernels/numerics.py) then decides. Class names are only hints of which form to try first.

Norm forms (rms_norm, layer_norm): a leaf module whose only parameters are a 1-D weight (`weight`,
`scale` or `gamma`) and an optional bias (`bias`, `beta`) of the same size, and no buffers. Its eps
is read under the names models use (`eps`, `variance_epsilon`, `epsilon`, `layer_norm_eps`, ...); a
module without one (nanoGPT's LayerNorm calls F.layer_norm(..., 1e-5)) gets the usual defaults, each
proven or refused by the check. The check runs on a copy of the module with its parameters redrawn
(so a weight that is ignored shows, and which of Llama's `weight * x` and Gemma's `(1 + weight) * x`
the module computes) and on rows whose mean square spans eps, so that a wrong eps shows too.

Pointwise form (pointwise_chain): a leaf module without parameters or buffers whose forward is a
chain of pointwise aten ops on its one input (HF's NewGELUActivation, FastGELUActivation,
QuickGELUActivation, a user's NewGELU). Its forward is recorded at the dispatcher on a small probe
(every op, its real constants, which tensor each op reads: nothing is guessed), and
kernels/codegen generates one Triton kernel each way for that chain, per input dtype and
values of its plain attributes (train/eval mode, a float `beta`: constants in the kernel).
"""
from __future__ import annotations

import copy
import inspect
import math
from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from fusion_advisor import calls
from fusion_advisor.kernels.codegen.ops import Unsupported

EPS_NAMES = ("eps", "variance_epsilon", "epsilon", "layer_norm_eps", "norm_eps", "rms_norm_eps")
DEFAULT_EPS = (1e-5, 1e-6)          # F.layer_norm's / nn.LayerNorm's, and LlamaRMSNorm's
WEIGHT_NAMES = ("weight", "scale", "gamma")
BIAS_NAMES = ("bias", "beta")
POINTWISE_CHAIN = "pointwise_chain"  # the pattern name patch(patterns=[...]) knows this form by
NOT_A_CHAIN = "not a pointwise chain on its input"
_TORCH_LAST_DIM_NORMS = tuple(c for c in (nn.LayerNorm, getattr(nn, "RMSNorm", None)) if c is not None)


# -- norms ----------------------------------------------------------------------------------------
@dataclass
class NormParts:
    weight: nn.Parameter | None     # None: an unweighted RMSNorm (DeepSeek-V4's q/k norms), no parameters at all
    bias: nn.Parameter | None
    eps: tuple[float, ...]          # the module's own eps, else the defaults: each one is checked
    eps_from_module: bool
    channels_first: bool = False    # over dim 1 of (N, C, *spatial): ConvNeXt's data_format="channels_first"
    features: int | None = None     # without a weight: the normalized size its `normalized_shape` says


def norm_parts(module: nn.Module, eps_hints: tuple[float, ...] = ()) -> NormParts | str:
    """The weight, bias and eps candidates of a module that could be a norm over its last dim,
    else why not (one line)."""
    cls = type(module)
    if cls.__module__.startswith("torch.nn.") and cls not in _TORCH_LAST_DIM_NORMS:
        return "a torch.nn module that is not a last-dim norm (GroupNorm, PReLU...)"
    if next(iter(module.children()), None) is not None:
        return "has child modules"
    if next(iter(module.buffers()), None) is not None:
        return "has buffers"
    params = dict(module.named_parameters(recurse=False))
    weight_name = next((n for n in WEIGHT_NAMES if n in params), None)
    if weight_name is None:
        return _unweighted(module, params)
    weight = params.pop(weight_name)
    bias_name = next((n for n in BIAS_NAMES if n in params), None)
    bias = params.pop(bias_name) if bias_name is not None else None
    if params:
        return f"has other parameters ({', '.join(sorted(params))})"
    if weight.dim() != 1 or (bias is not None and tuple(bias.shape) != tuple(weight.shape)):
        return "its weight is not 1-D (or its bias not the weight's shape)"
    if bias is not None and bias.dtype != weight.dtype:
        return "its weight and bias dtypes differ"
    shape = getattr(module, "normalized_shape", None)
    if shape is not None and tuple([shape] if isinstance(shape, int) else shape) != tuple(weight.shape):
        return f"normalized_shape {shape} is not its weight's shape"
    channels_first = getattr(module, "data_format", None) == "channels_first"
    own = _own_eps(module)
    if own:
        return NormParts(weight, bias, tuple(own), True, channels_first)
    if "eps" in vars(module) and vars(module)["eps"] is None:     # nn.RMSNorm(eps=None): the dtype's eps
        return NormParts(weight, bias, (torch.finfo(weight.dtype).eps,), True, channels_first)
    if not eps_hints and "norm" not in cls.__name__.lower():
        return "has no eps attribute and no norm in its name"      # a PReLU-like module: not worth a check
    eps = tuple(dict.fromkeys([*eps_hints, *DEFAULT_EPS]))
    return NormParts(weight, bias, eps, False, channels_first)


def _own_eps(module: nn.Module) -> list[float]:
    """The float eps values the module holds under the names models use."""
    return sorted({float(v) for n in EPS_NAMES if isinstance(v := vars(module).get(n), float)})


def _unweighted(module: nn.Module, params: dict) -> NormParts | str:
    """The parts of a norm without parameters, "norm" in its class name, and an eps under a usual
    name (DeepSeek-V4's unweighted RMSNorm) or a `normalized_shape` (OLMo's LayerNorm, its eps the
    usual ones, each checked); else why a module without a weight is not a norm candidate."""
    own = _own_eps(module)
    shape = getattr(module, "normalized_shape", None)
    shape = (shape,) if isinstance(shape, int) else tuple(shape) if isinstance(shape, (tuple, list)) else None
    if params or "norm" not in type(module).__name__.lower() or not (own or shape):
        return "has no 1-D weight"
    features = math.prod(shape) if shape and all(isinstance(d, int) for d in shape) and len(shape) == 1 else None
    return NormParts(None, None, tuple(own) or DEFAULT_EPS, bool(own), features=features)


UNWEIGHTED_PROBE_FEATURES = 64   # the check's row length for a norm with no weight to read it off


def rms_norm_module(weight: nn.Parameter | None, eps: float, gemma: bool = False) -> nn.Module:
    """kernels.rms_norm.RMSNorm around this weight (shared, not copied); gemma: (1 + weight)."""
    from fusion_advisor.kernels.rms_norm import RMSNorm
    new = RMSNorm.__new__(RMSNorm)
    nn.Module.__init__(new)
    new.weight = weight
    new.variance_epsilon = float(eps)
    new.gemma = gemma
    return new


def layer_norm_module(weight: nn.Parameter, bias: nn.Parameter | None, eps: float, one_plus: bool = False) -> nn.Module:
    """kernels.layer_norm.LayerNorm around this weight and bias (shared, not copied); one_plus: the
    weight applies as (1 + weight) (LayerNorm1P)."""
    from fusion_advisor.kernels.layer_norm import LayerNorm, LayerNorm1P
    cls = LayerNorm1P if one_plus else LayerNorm
    new = cls.__new__(cls)
    nn.Module.__init__(new)
    new.normalized_shape = tuple(weight.shape)
    new.eps = float(eps)
    new.elementwise_affine = True
    new.weight = weight
    new.bias = bias
    return new


class NormCandidate(NamedTuple):
    assumed: str                               # "eps=1e-06, 1 + weight": what this candidate takes the module to be
    build: Callable[[nn.Module], nn.Module]    # module -> replacement (reads the weight and bias off it)
    probe: str = "rows"                        # the check's input: "rows" (..., C), "nchw" or "ncl" (C in dim 1)


def unweighted_layer_norm_module(features: int, eps: float) -> nn.Module:
    """kernels.layer_norm.LayerNorm over the last `features` values, without weight or bias."""
    from fusion_advisor.kernels.layer_norm import LayerNorm
    return LayerNorm(features, eps=eps, elementwise_affine=False)


def norm_builders(pattern: str, parts: NormParts) -> list[NormCandidate]:
    """Each candidate of this norm form: each eps; for RMSNorm Llama's weight, then Gemma's
    (1 + weight); for LayerNorm over the last dim (its weight, then 1 + weight), then over dim 1 of (N, C, H, W) and of (N, C, L)
    (VitDet's and SqueezeBERT's norms, which say nothing of their layout), or over dim 1 only where
    the module says data_format="channels_first". The builder reads the weight and bias off
    whichever module it is given (the checked copy, or the real one)."""
    if pattern == "rms_norm":
        if parts.bias is not None or parts.channels_first:
            return []                     # RMSNorm has no bias, and is over the last dim: not this form
        # Llama's form first, then Gemma's (1 + weight): the check keeps the one the module computes
        forms = (False,) if parts.weight is None else (False, True)
        return [NormCandidate(f"eps={e:g}" + (", 1 + weight" if gemma else ""),
                              lambda m, e=e, g=gemma: rms_norm_module(norm_parts(m).weight, e, g))
                for gemma in forms for e in parts.eps]
    if pattern != "layer_norm" or (parts.weight is None and parts.features is None):
        return []                         # (a LayerNorm without a weight must say its normalized_shape)
    if parts.weight is None:
        return [NormCandidate(f"eps={e:g}, no weight", lambda m, e=e: unweighted_layer_norm_module(norm_parts(m).features, e))
                for e in parts.eps]
    from fusion_advisor.kernels.channel_norm import ChannelsFirstLayerNorm, output_layout_of
    # nn.LayerNorm's form first, then (1 + weight) (Nemotron's LayerNorm1P): the check keeps the one it computes
    last_dim = [NormCandidate(f"eps={e:g}" + (", 1 + weight" if one_plus else ""),
                              lambda m, e=e, p=one_plus: layer_norm_module(norm_parts(m).weight, norm_parts(m).bias, e, p))
                for one_plus in (False, True) for e in parts.eps]
    over_channels = [NormCandidate(f"eps={e:g}, over dim 1 of {probe.upper()}",
                                   lambda m, e=e: ChannelsFirstLayerNorm(
                                       norm_parts(m).weight, norm_parts(m).bias, e,
                                       output_layout_of(m, norm_parts(m).weight.shape[0])),
                                   probe)
                     for probe in (("nchw",) if parts.channels_first else ("nchw", "ncl")) for e in parts.eps]
    return over_channels if parts.channels_first else last_dim + over_channels


def redrawn_copy(module: nn.Module) -> nn.Module:
    """A copy of the module with every parameter redrawn (weights near 1, biases near 0): the
    check runs there, so the model's own parameters and their grads are never touched, and a
    weight at its init value (ones, zeros) cannot hide how the module uses it."""
    twin = copy.deepcopy(module)
    with torch.no_grad():
        for name, p in twin.named_parameters():
            base = 0.0 if name in BIAS_NAMES else 1.0
            p.copy_(base + 0.3 * torch.randn(p.shape, device=p.device).to(p.dtype))
    return twin


def norm_probe(features: int, dtype: torch.dtype, device: torch.device, shape_hint=None,
               layout: str = "rows") -> torch.Tensor:
    """A random input whose rows' scales run from 1e-4 to 3 (each row with its own offset): the
    rows of small mean square are where eps decides the output, so a norm with another eps than
    the replacement fails the check; the offsets tell mean subtraction apart. layout "nchw" / "ncl":
    an (N, C, H, W) / (N, C, L) input, each position's C values one such row (a trace's shape hint
    is not used)."""
    if layout in ("nchw", "ncl"):
        rows = norm_probe(features, dtype, device, (2, 3, 5, features) if layout == "nchw" else (2, 7, features))
        return rows.movedim(-1, 1).contiguous()
    shape = tuple(shape_hint) if shape_hint else (2, 8, features)
    rows = math.prod(shape[:-1])
    scales = torch.logspace(-4, 0.5, rows, device=device).view(*shape[:-1], 1)
    offsets = 0.5 * torch.randn(*shape[:-1], 1, device=device)
    return ((torch.randn(shape, device=device) + offsets) * scales).to(dtype)


def check_norm(twin: nn.Module, replacement: nn.Module, x: torch.Tensor, channels_first: bool = False) -> str | None:
    """None when `replacement` (built on `twin`'s weight and bias) matches twin's own forward on x:
    output, and the gradients of x, weight and bias, by kernels/numerics.py's rule (the tolerance
    table; where eager's own bf16/fp16 rounding is the larger error, as in a norm's dx where its
    terms cancel, its float64 run decides). Else a one-line reason."""
    from torch.func import functional_call

    from fusion_advisor.kernels.numerics import compare
    from fusion_advisor.kernels.registry import Inputs

    parts = norm_parts(twin)
    names = {id(p): n for n, p in twin.named_parameters()}
    tensors = [t for t in (parts.weight, parts.bias) if t is not None]
    own = [names[id(t)] for t in tensors]
    theirs = ["weight", "bias"][:len(own)]
    params = [t.detach().clone().requires_grad_(True) for t in tensors]

    def reference(x, *ps):
        return functional_call(twin, dict(zip(own, ps)), (x,))

    def candidate(x, *ps):
        return functional_call(replacement, dict(zip(theirs, ps)), (x,))
    inputs = Inputs((x.detach().requires_grad_(True), *params), grad_inputs=tuple(range(1 + len(params))))
    with torch.enable_grad():
        verdict = compare(reference, candidate, inputs)
    if not verdict.ok:
        return verdict.detail.strip().splitlines()[0]
    return layout_mismatch(twin, replacement, x, channels_first)


def layout_mismatch(original: nn.Module, replacement: nn.Module, x: torch.Tensor,
                    channels_first: bool = False) -> str | None:
    """Why the replacement's output is laid out otherwise than the original's on x (and, for a norm
    over dim 1 of an (N, C, *spatial) x, on x in channels_last order too), or None. The values can
    match and the step still lose: a convolution after it picks its kernels by its input's memory order (ConvNeXt's
    depthwise convs ran 52 ms a step slower on the H100 zoo behind a norm that returned NCHW where
    Hugging Face's returns channels_last)."""
    probes = [x, x.movedim(1, -1).contiguous().movedim(-1, 1)] if channels_first else [x]
    with torch.no_grad():
        for probe in probes:
            want, got = original(probe), replacement(probe)
            if not (isinstance(want, torch.Tensor) and isinstance(got, torch.Tensor)) or want.shape != got.shape:
                continue
            if any(a != b for a, b, n in zip(want.stride(), got.stride(), want.shape) if n > 1):
                order = "contiguous" if probe.is_contiguous() else "channels_last"
                return (f"its output's strides {tuple(got.stride())} are not the module's {tuple(want.stride())} "
                        f"(a {order} input): the layers after it would run other kernels")
    return None





# -- pointwise chains -----------------------------------------------------------------------------
_TRACE_TYPES = {torch.float32: "float", torch.float16: "c10::Half", torch.bfloat16: "c10::BFloat16",
                torch.float64: "double", torch.int64: "long int", torch.int32: "int", torch.bool: "bool"}
_DTYPE_CODES = {torch.float16: 5, torch.float32: 6, torch.float64: 7, torch.bfloat16: 15, torch.int64: 4,
                torch.int32: 3, torch.bool: 11}
_PASS_THROUGH = {"detach", "alias"}   # autograd's saved-tensor aliases: the same value


def pointwise_refusal(module: nn.Module) -> str | None:
    """Why a module cannot be a pointwise chain on its input (None: it may be; the capture decides)."""
    if next(iter(module.children()), None) is not None:
        return "has child modules"
    if next(iter(module.parameters()), None) is not None or next(iter(module.buffers()), None) is not None:
        return "has parameters or buffers"
    # Its forward is called on a probe to record it: only a forward of one tensor (a loss's
    # (input, target), a rotary embedding's (x, positions) are not chains on one input).
    try:
        required = [p for p in inspect.signature(module.forward).parameters.values()
                    if p.default is p.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    except (TypeError, ValueError):
        return "its forward's signature cannot be read"
    if len(required) != 1:
        return f"its forward takes {len(required)} required arguments, not one tensor"
    return None


def rng_kept():
    """A context in which random draws (the checks' inputs, a recorded forward's dropout) leave the
    user's RNG streams, CPU and CUDA, as they were: a seeded run draws the same numbers patched."""
    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    return torch.random.fork_rng(devices=list(range(torch.cuda.device_count())) if cuda else [])


class _Recorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.calls: list[tuple] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        self.calls.append((func, args, kwargs, out))
        return out


def _arg_record(value) -> tuple[tuple, str, str]:
    """(dims, type, concrete) of one argument, as graph.py reads a traced one; every value the
    dispatcher passes is known, so numbers are recorded constants ("Scalar" with its value)."""
    if isinstance(value, torch.Tensor):
        if value.dtype not in _TRACE_TYPES:
            raise Unsupported(f"a {value.dtype} tensor argument")
        return tuple(value.shape), _TRACE_TYPES[value.dtype], ""
    if value is None:
        return (), "", ""
    if isinstance(value, torch.dtype):
        return (), "Scalar", str(_DTYPE_CODES.get(value, -1))
    if isinstance(value, (bool, int, float, str)):
        return (), "Scalar", value if isinstance(value, str) else repr(value)
    if isinstance(value, (list, tuple)) and all(isinstance(v, (int, float)) for v in value):
        return (), "Scalar", repr(list(value))
    return (), "", ""                     # memory_format, layout, device: ignored slots


@dataclass
class CapturedChain:
    records: list           # OpRecords, graph.py's input
    bind: dict              # (op, value slot) -> "v<k>": every read of a chain value, exact
    n_ops: int              # the module's own ops (without the leading identity cast)


def capture_chain(module: nn.Module, probe: torch.Tensor) -> CapturedChain:
    """The module's forward on `probe` as a chain for kernels/codegen, read at the dispatcher.
    Raises Unsupported when it is not a chain of pointwise ops on its one input."""
    from fusion_advisor.kernels.codegen import ops as op_table
    from fusion_advisor.core.records import OpRecord

    with torch.no_grad(), _Recorder() as rec:
        out = module(probe)
    if not isinstance(out, torch.Tensor):
        raise Unsupported(f"its forward returns {type(out).__name__}, not one tensor")
    # Op 0 is `to(x, x.dtype)`, the input itself as a chain value: every later op that reads the
    # input then reads a value of the chain, which graph.py's exact mode requires of ops after the first.
    dims, type_name, _ = _arg_record(probe)
    records = [OpRecord("aten::to", (dims, (), (), (), ()), (type_name, "Scalar", "", "", ""),
                        ("", str(_DTYPE_CODES[probe.dtype]), "", "", ""))]
    refs = {id(probe): "v0"}
    bind: dict[tuple[int, int], str] = {}
    for func, args, kwargs, result in rec.calls:
        short = func._schema.name.split("::", 1)[-1]
        if short in _PASS_THROUGH and args and id(args[0]) in refs:
            refs[id(result)] = refs[id(args[0])]
            continue
        spec, inplace = op_table.lookup(short)
        if inplace and args and id(args[0]) == id(probe):
            raise Unsupported(f"{short} modifies its input in place")
        if spec.kind == "reduction":
            raise Unsupported(f"{short} reduces over a dim: not a pointwise module")
        if not isinstance(result, torch.Tensor):
            raise Unsupported(f"{short} returns more than one tensor")
        schema = func._schema.arguments
        values = [args[j] if j < len(args) else kwargs.get(a.name, a.default_value if a.has_default_value() else None)
                  for j, a in enumerate(schema)]
        while len(values) > len(spec.slots) and values[-1] is None:
            values.pop()
        k = len(records)
        value_at = [j for j, s in enumerate(spec.slots) if s.role == "value"]
        for j, v in enumerate(values):
            if isinstance(v, torch.Tensor):
                if id(v) not in refs:
                    raise Unsupported(f"{short} reads a tensor that is neither the input nor a value of the chain")
                if j in value_at:
                    bind[(k, value_at.index(j))] = refs[id(v)]
        arg_records = [_arg_record(v) for v in values]
        records.append(OpRecord(f"aten::{short}", tuple(a[0] for a in arg_records),
                                tuple(a[1] for a in arg_records), tuple(a[2] for a in arg_records)))
        refs[id(result)] = f"v{k}"
    if refs.get(id(out)) != f"v{len(records) - 1}" or len(records) == 1:
        raise Unsupported("its output is not the last op's value")
    return CapturedChain(records, bind, len(records) - 1)


class PointwiseChainModule(nn.Module):
    """Runs a pointwise module's forward as one generated Triton kernel each way.

    The kernel is generated from the module's own forward, recorded on a 64-element probe on the
    first call with each input dtype (and train/eval mode, and values of its plain attributes), and
    checked against that forward (output and input gradient) before it is used; where no kernel
    can be generated or it fails the check, the original forward runs. Inputs of any shape run
    flattened (the chain is elementwise on one input). Every fused call counts as `count_as` in
    fusion_advisor.calls."""

    def __init__(self, original: nn.Module, count_as: str, shared: tuple[dict, dict] | None = None):
        super().__init__()
        self.original = original      # a child: train()/eval() reach it (its forward may depend on them)
        self.count_as = count_as
        # (dtype, device type, module_state) -> fused, None: the original runs; the same key -> why. `shared`: the
        # dicts of another instance of the same class and attributes (the same chain).
        self.kernels: dict[tuple, Callable | None]
        self.refusals: dict[tuple, str]
        self.kernels, self.refusals = shared if shared is not None else ({}, {})

    def kernel_for(self, dtype: torch.dtype, device: torch.device) -> Callable | None:
        """The fused forward for inputs of this dtype on this device, or None (then `refusals`
        says why: "not a chain: ..." where the forward is no pointwise chain on one input)."""
        key = (dtype, device.type, module_state(self.original))
        if key not in self.kernels:
            self.kernels[key] = None
            with rng_kept():
                try:
                    chain = capture_chain(self.original, torch.randn(64, device=device).to(dtype))
                    if chain.n_ops < 2:
                        raise Unsupported("its forward is one op, already one kernel each way: nothing to fuse")
                except Exception as exc:   # Unsupported, or a forward that cannot take the probe
                    self.refusals[key] = f"{NOT_A_CHAIN}: {one_line(exc)}"
                    return None
                try:
                    fused = _generated_forward(self.original, chain)
                    problem = _check_pointwise(self.original, fused, dtype, device)
                except Exception as exc:   # e.g. a kernel that cannot run on this device
                    problem = one_line(exc)
            if problem:
                self.refusals[key] = problem
            else:
                self.kernels[key] = fused
        return self.kernels[key]

    def forward(self, x):
        fused = self.kernel_for(x.dtype, x.device) if isinstance(x, torch.Tensor) else None
        if fused is None:
            return self.original(x)
        calls.hit_eager(self.count_as)
        return fused(x)

    def extra_repr(self) -> str:
        return f"{type(self.original).__name__} as a generated Triton kernel ({self.count_as})"


def module_state(module: nn.Module) -> tuple:
    """The module's plain attributes (training, a float `beta`...): the recorded chain holds their
    values as constants, so a new value (eval(), a temperature schedule) records a new chain."""
    return tuple(v for v in vars(module).values() if isinstance(v, (bool, int, float, str)))


def _generated_forward(module: nn.Module, chain: CapturedChain) -> Callable:
    """x -> the generated kernel's output for x (any shape), from the module's recorded chain."""
    from fusion_advisor.kernels.codegen import build_pattern

    pattern = build_pattern(chain.records, bind=chain.bind, source=f"module {type(module).__qualname__}",
                            exact=True)
    fused = pattern.fused

    def run(x: torch.Tensor) -> torch.Tensor:
        return fused(x.reshape(-1)).view(x.shape)
    run.pattern_name = pattern.name
    return run


def one_line(exc: BaseException) -> str:
    """An exception as one line: its type and the first line of its message."""
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"


def _check_pointwise(module: nn.Module, fused: Callable, dtype: torch.dtype, device: torch.device) -> str | None:
    """None when `fused` matches the module's forward (output and input gradient) on a random
    (2, 7, 33) input of this dtype, by kernels/numerics.py's rule (the tolerance table; where the
    eager chain's own rounding in bf16/fp16 is the larger error, its float64 run decides), else a
    one-line reason."""
    from fusion_advisor.kernels.numerics import compare
    from fusion_advisor.kernels.registry import Inputs

    x = (2.0 * torch.randn(2, 7, 33, device=device)).to(dtype).requires_grad_(True)
    with torch.enable_grad():
        verdict = compare(module, fused, Inputs((x,), grad_inputs=(0,)))
    return None if verdict.ok else verdict.detail.strip().splitlines()[0]
