"""Equivalence checks: does a replacement compute what the module or function it replaces computes?

`fusion_advisor.patch` runs one of these before every swap and swaps only where it passes:
  check_equivalent  a module and its replacement on a random input: forward output, input and
                    parameter gradients (the tolerance table of kernels/tolerances.py), both run
                    from one seed (a dropout inside both draws the same mask);
  check_on_copies   the same (also from one seed) for modules whose forward updates buffers (BatchNorm's running
                    statistics), on deep copies, in training and eval mode, buffers compared too;
  check_function    a function and its replacement on the pattern's example inputs.
The example input of a module is read off the module itself (`_example_input`; an MoE's experts
also get their routing, `_example_args`).
"""
from __future__ import annotations

import copy
from typing import Callable

import torch
from torch import nn

from fusion_advisor.core.errors import AdvisorError
from fusion_advisor.kernels.glu import GatedExperts
from fusion_advisor.kernels.numerics import judge
from fusion_advisor.kernels.registry import Inputs
from fusion_advisor.kernels.tolerances import computed_dtype, tolerance
from fusion_advisor.module_forms import redrawn_copy, rng_kept

_CHECK_SEED = 0   # the checks run the original and the replacement each from this seed


def _example_input(module: nn.Module, shape_hint) -> torch.Tensor:
    """A random (2, 7, features) input in the module's dtype and device: features from its own
    weight (a norm) or its first Linear's in_features (an MLP block); a GroupNorm's (2, channels, 7). A block without a Linear whose
    first child is a convolution or a BatchNorm (a conv -> BN -> activation block) gets an
    (N, channels, *spatial) input of that child (`_channels_input`)."""
    weight = getattr(module, "weight", None)
    if isinstance(module, nn.GroupNorm):   # channels second: (2, C, 7); its weight is per channel
        ref = next((t for t in (module.weight, module.bias) if t is not None), None)
        shape = tuple(shape_hint) if shape_hint else (2, module.num_channels, 7)
        return torch.randn(shape, device=None if ref is None else ref.device, dtype=None if ref is None else ref.dtype)
    if isinstance(weight, torch.Tensor) and weight.dim() >= 1:
        features, ref = weight.shape[-1], weight
    else:
        first = next((m for m in module.modules() if isinstance(m, nn.Linear)), None)
        if first is None:
            channels_input = _channels_input(module, shape_hint)
            if channels_input is not None:
                return channels_input
            raise AdvisorError(f"no example input for {type(module).__name__} (pass check=False to swap unchecked)")
        features, ref = first.in_features, first.weight
    shape = tuple(shape_hint) if shape_hint else (2, 7, features)
    return torch.randn(shape, device=ref.device, dtype=ref.dtype)


def _example_args(module: nn.Module, shape_hint) -> tuple[torch.Tensor, ...]:
    """The arguments of a module's example call: (x,) from `_example_input`; (logits, labels) for a
    CrossEntropyLoss (fp32, on the CPU: the module holds no tensor to say otherwise); or for an MoE's experts
    (batched 3-D `gate_up_proj`; HF's forward(hidden_states, top_k_index, top_k_weights)) 16 tokens,
    each routed to 2 distinct experts with softmax weights."""
    if isinstance(module, nn.CrossEntropyLoss):   # a loss module (DistilBERT's mlm_loss_fct): logits and labels,
        rows, vocab = tuple(shape_hint) if shape_hint else (14, 1000)   # some ignored; no weight to read them off
        labels = torch.randint(0, vocab, (rows,))
        labels[:4] = module.ignore_index
        return 2.0 * torch.randn(rows, vocab), labels
    if not GatedExperts.batched(module):
        return (_example_input(module, shape_hint),)
    weight = module.gate_up_proj
    experts = weight.shape[0]
    hidden = weight.shape[1] if getattr(module, "is_transposed", False) else weight.shape[2]
    tokens, top_k = 16, min(2, experts)
    x = torch.randn(tokens, hidden, device=weight.device, dtype=weight.dtype)
    index = torch.stack([torch.randperm(experts)[:top_k] for _ in range(tokens)]).to(weight.device)
    weights = torch.softmax(torch.randn(tokens, top_k), dim=-1).to(device=weight.device, dtype=weight.dtype)
    return x, index, weights


_SPATIAL_DIMS = {nn.BatchNorm1d: 1, nn.BatchNorm2d: 2, nn.BatchNorm3d: 3}
_CHANNEL_KEEPING = (nn.modules.padding._ConstantPadNd, nn.modules.padding._ReflectionPadNd,
                    nn.modules.padding._ReplicationPadNd, nn.Identity, nn.modules.dropout._DropoutNd)


def _channels_input(module: nn.Module, shape_hint) -> torch.Tensor | None:
    """An (N, channels, *spatial) input for a block whose first child (past padding, dropout and
    Identity) is a ConvNd (2 samples of its
    in_channels, each spatial size past what its kernel, dilation and stride take) or a BatchNorm
    (4 samples of (N, C, L) for BatchNorm1d, 2 of (N, C, H, W) or (N, C, D, H, W)), in the dtype of
    the child's first floating tensor; None for any other block."""
    # past leading children that keep the channels and hold nothing (EfficientNet's ZeroPad2d before
    # its depthwise conv)
    first = next((c for c in module.children() if not isinstance(c, _CHANNEL_KEEPING)), None)
    tensors = [] if first is None else [t for t in (*first.parameters(), *first.buffers()) if t.is_floating_point()]
    if not tensors:
        return None
    if isinstance(first, nn.modules.conv._ConvNd):
        spatial = tuple(max(8, d * (k - 1) + 1 + 2 * s) for k, d, s in zip(first.kernel_size, first.dilation,
                                                                             first.stride))
        shape = (2, first.in_channels, *spatial)
    elif isinstance(first, nn.modules.batchnorm._BatchNorm):
        dims = next((n for cls, n in _SPATIAL_DIMS.items() if isinstance(first, cls)), 2)
        shape = (4, first.num_features, 6) if dims == 1 else (2, first.num_features, *(6, 5, 4)[:dims])
    else:
        return None
    return torch.randn(tuple(shape_hint) if shape_hint else shape, device=tensors[0].device, dtype=tensors[0].dtype)


def _seeded_forward(module: nn.Module, x: torch.Tensor, *rest) -> torch.Tensor:
    """module(x, *rest) from _CHECK_SEED (the user's RNG streams left as they were): the original and its
    replacement draw the same dropout mask at the same point. Its first output where it returns several."""
    with rng_kept():
        torch.manual_seed(_CHECK_SEED)
        y = module(x, *rest)
    return y[0] if isinstance(y, tuple) else y


def check_on_copies(original: nn.Module, factory: Callable[[nn.Module], nn.Module], shape_hint=None) -> str | None:
    """`check_equivalent` for a module whose forward updates buffers (BatchNorm's running statistics):
    two deep copies with the same redrawn parameters and buffers, one of them swapped by `factory`,
    each run forward and backward in training mode, then in eval mode; their outputs, input and
    parameter gradients and buffers (after each step) must match. The user's module is never run,
    so neither its statistics nor its gradients change. None when they match, else a one-line reason."""
    x = _example_input(original, shape_hint)
    twin = redrawn_copy(original)
    with torch.no_grad():
        for b in twin.buffers():     # running statistics off their initial zeros and ones
            if b.is_floating_point():
                b.add_(0.2 * torch.rand(b.shape, device=b.device).to(b.dtype))
    pair = (copy.deepcopy(twin), factory(copy.deepcopy(twin)))
    rows = max(1, x.numel() // x.shape[1])
    for training in (True, False):
        runs, upstream = [], None
        for mod in pair:
            mod.train(training)
            mod.zero_grad(set_to_none=True)
            xi = x.clone().requires_grad_(True)
            y = _seeded_forward(mod, xi)
            upstream = torch.randn_like(y) if upstream is None else upstream
            y.backward(upstream)
            runs.append({"output": y.detach(), "input grad": xi.grad,
                         **{f"grad of {n}": p.grad for n, p in mod.named_parameters() if p.grad is not None},
                         **{n: b for n, b in mod.named_buffers()}})
        mode = "training" if training else "eval"
        dtype = computed_dtype(x, runs[0]["output"])
        if runs[0].keys() != runs[1].keys():
            return f"{mode}: the swapped module has other gradients or buffers ({sorted(runs[1].keys() ^ runs[0].keys())})"
        for name, want in runs[0].items():
            try:
                summed = rows if name.startswith("grad of") else 1    # a parameter grad sums the positions
                torch.testing.assert_close(runs[1][name], want, **tolerance(dtype, summed))
            except AssertionError as exc:
                return f"{mode}, {name}: {str(exc).strip().splitlines()[0]}"
    return None


def check_equivalent(original: nn.Module, replacement: nn.Module, shape_hint=None) -> str | None:
    """None when the replacement's output and gradients (input and parameters) match the
    original's on a random input, else a one-line reason. Each runs from the same seed, so that a
    dropout inside both (T5's MLP, in training) draws the same mask at the same point. Where they
    differ by more than the tolerance, the original run in float64 decides, as kernels/numerics.py's
    rule does: a difference within eager's own error against float64 passes (an LM head's dx sums
    50,265 products; cuBLAS's bf16 split-K reduction there errs more than a GEMM at a padded width)."""
    x, *rest = _example_args(original, shape_hint)
    params = [p for p in original.parameters() if p.requires_grad]
    saved = [p.grad for p in params]
    try:
        outs, grads = [], []
        for mod in (original, replacement):
            for p in params:
                p.grad = None
            xi = x.clone().requires_grad_(True)
            y = _seeded_forward(mod, xi, *rest)
            g = torch.randn_like(y, generator=None) if not outs else outs[0][1]
            y.backward(g)
            outs.append((y.detach(), g))
            grads.append([xi.grad] + [p.grad for p in params])
        dtype = computed_dtype(x, outs[0][0])
        rows = x.numel() // x.shape[-1]
        truth = _Float64Run(original, x, rest, outs[0][1])
        checks = [("output", outs[1][0], outs[0][0], tolerance(dtype), lambda: truth.value(0)),
                  ("input grad", grads[1][0], grads[0][0], tolerance(dtype), lambda: truth.value(1))]
        names = [n for n, p in original.named_parameters() if p.requires_grad]
        checks += [(f"grad of {n}", a, b, tolerance(dtype, rows), lambda k=k: truth.value(2 + k))
                   for k, (n, a, b) in enumerate(zip(names, grads[1][1:], grads[0][1:]))]
        for what, got, want, tol, exact in checks:
            if got is None or want is None:
                if (got is None) != (want is None):
                    return f"{what}: {'the replacement' if got is None else 'the original'} gave none"
                continue
            failure = judge(got, want, tol, what, exact)
            if failure:
                return failure.strip().splitlines()[0]
        return None
    finally:
        for p, g in zip(params, saved):
            p.grad = g


class _Float64Run:
    """The original module on a float64 copy (its parameters and buffers, the input, the upstream
    gradient): (output, input grad, *parameter grads), run once, only when a judgement needs it;
    None for each where the module has no float64 path."""

    def __init__(self, original: nn.Module, x: torch.Tensor, rest, upstream: torch.Tensor):
        self.original, self.x, self.rest, self.upstream = original, x, rest, upstream
        self._values: list | None = None

    def value(self, k: int) -> torch.Tensor | None:
        if self._values is None:
            try:
                twin = copy.deepcopy(self.original).double()
                xi = self.x.detach().double().requires_grad_(True)
                rest = [r.double() if isinstance(r, torch.Tensor) and r.is_floating_point() else r for r in self.rest]
                y = _seeded_forward(twin, xi, *rest)
                y.backward(self.upstream.double())
                self._values = [y.detach(), xi.grad] + [p.grad for p in twin.parameters() if p.requires_grad]
            except Exception:   # no float64 path (a Triton kernel, a cast inside): judge without it
                self._values = []
        return self._values[k] if k < len(self._values) else None


def check_function(original: Callable, replacement: Callable, examples: list[Inputs]) -> str | None:
    """None when the replacement's outputs and gradients match the original's on every example
    (the same inputs, the same upstream gradient), else a one-line reason."""
    for inputs in examples:
        outs, grads = [], []
        upstream = None
        for fn in (original, replacement):
            args = [a.detach().clone().requires_grad_(i in inputs.grad_inputs) if isinstance(a, torch.Tensor) else a
                    for i, a in enumerate(inputs.args)]
            out = fn(*args, **inputs.kwargs)
            tensors = [out] if isinstance(out, torch.Tensor) else [o for o in out if isinstance(o, torch.Tensor)]
            if upstream is None:
                upstream = [torch.randn_like(t) for t in tensors]
            torch.autograd.backward(tensors, upstream)
            outs.append([t.detach() for t in tensors])
            grads.append([args[i].grad for i in inputs.grad_inputs])
        try:
            for got, want in zip(outs[1] + grads[1], outs[0] + grads[0]):
                torch.testing.assert_close(got, want, **tolerance(want.dtype))
        except AssertionError as exc:
            return str(exc).strip().splitlines()[0]
    return None
