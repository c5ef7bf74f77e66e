"""The one rule for judging a replacement's numerics against the PyTorch code it replaces.

The kernel tests (tests/kernel_checks.py) and `fusion-advisor bench` both call `compare`, so a
kernel that passes its tests passes the bench's check on the same shapes, and the other way round.

The rule: on one seeded input set, every forward output has the reference's shape and dtype and is
within the tolerance table (kernels/tolerances.py) of the reference's; with `backward`, the same
random upstream gradients go through both, and every input gradient is within the table too.
Tolerances are those of the least precise float dtype among the inputs. A gradient of an input
smaller than input 0 (a norm's weight, a bias) is a sum over the rows it was broadcast to, so its
atol is scaled by sqrt(rows) (see kernels/tolerances.py).

Where a candidate misses that tolerance, the reference itself is run once more on float64 copies of
the inputs, and its own error against that run is added to the allowance element by element: then
the candidate is the more accurate of the two (seen: CPU F.layer_norm's bf16 weight grad over 252
rows is 0.8 off its float64 value; an fp32-accumulating kernel 0.12). NaN never passes this way.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from fusion_advisor.kernels.registry import FusionPattern, Inputs
from fusion_advisor.kernels.tolerances import least_precise, tolerance

@dataclass
class NumericsResult:
    ok: bool
    detail: str            # "ok" or the first mismatch, one paragraph


def clone_inputs(inputs: Inputs) -> Inputs:
    """An independent copy: same values, same requires_grad, fresh autograd leaves."""
    args = tuple(a.detach().clone().requires_grad_(a.requires_grad) if isinstance(a, torch.Tensor) else a
                 for a in inputs.args)
    return Inputs(args, dict(inputs.kwargs), inputs.grad_inputs)


def tolerance_dtype(inputs: Inputs) -> torch.dtype:
    """The least precise float dtype among the inputs: its rounding bounds every comparison
    (an fp32 output computed from bf16 inputs still carries bf16 rounding)."""
    return least_precise(a.dtype for a in inputs.args if isinstance(a, torch.Tensor))


def tensor_outputs(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    return [o for o in out if isinstance(o, torch.Tensor)]


def reduced_rows(inputs: Inputs, index: int) -> int:
    """How many rows input `index`'s gradient sums over: input 0's element count over its own
    (1 for inputs as large as input 0)."""
    first, arg = inputs.args[0], inputs.args[index]
    if not isinstance(first, torch.Tensor) or not isinstance(arg, torch.Tensor) or arg.numel() == 0:
        return 1
    return max(first.numel() // arg.numel(), 1)


def compare(reference: Callable[..., Any], candidate: Callable[..., Any], inputs: Inputs, backward: bool = True,
            seed: int = 1, reduced_grads: tuple[int, ...] | None = None) -> NumericsResult:
    """Run `reference` and `candidate` on copies of `inputs`; judge forward outputs and (with
    `backward`) every gradient in `inputs.grad_inputs`. `reduced_grads`: positions whose gradient
    is a sum over rows; None infers them (any input smaller than input 0). A candidate that raises
    fails, with the exception as the detail."""
    ref_in, cand_in = clone_inputs(inputs), clone_inputs(inputs)
    tol_dtype = tolerance_dtype(inputs)
    ref_out = tensor_outputs(reference(*ref_in.args, **ref_in.kwargs))
    try:
        cand_out = tensor_outputs(candidate(*cand_in.args, **cand_in.kwargs))
    except Exception as exc:  # a replacement that crashes is a numerics failure, with its message
        return NumericsResult(False, f"forward raised {type(exc).__name__}: {exc}")
    if len(cand_out) != len(ref_out):
        return NumericsResult(False, f"forward returned {len(cand_out)} tensors, the reference {len(ref_out)}")
    truth = _Float64Reference(reference, inputs)
    for k, (r, c) in enumerate(zip(ref_out, cand_out)):
        if c.shape != r.shape or c.dtype != r.dtype:
            return NumericsResult(False, f"forward output {k} is {tuple(c.shape)} {c.dtype}, "
                                         f"the reference's {tuple(r.shape)} {r.dtype}")
        failure = judge(c, r, tolerance(tol_dtype), f"forward output {k}", lambda k=k: truth.output(k))
        if failure:
            return NumericsResult(False, failure)
    if not backward or not inputs.grad_inputs:
        return NumericsResult(True, "ok")
    needs = [i for i, r in enumerate(ref_out) if r.requires_grad]
    if any(not cand_out[i].requires_grad for i in needs):
        return NumericsResult(False, "forward output does not require grad where the reference's does")
    generator = torch.Generator(device=ref_out[0].device).manual_seed(seed)
    grads = [torch.randn(ref_out[i].shape, dtype=ref_out[i].dtype, device=ref_out[i].device, generator=generator)
             for i in needs]
    torch.autograd.backward([ref_out[i] for i in needs], grads)
    truth.upstream = dict(zip(needs, grads))
    try:
        torch.autograd.backward([cand_out[i] for i in needs], grads)
    except Exception as exc:
        return NumericsResult(False, f"backward raised {type(exc).__name__}: {exc}")
    for i in inputs.grad_inputs:
        gr, gc = ref_in.args[i].grad, cand_in.args[i].grad
        if gr is None or gc is None:
            return NumericsResult(False, f"input {i} got no gradient from the "
                                         f"{'candidate' if gc is None else 'reference'}")
        reduced = reduced_grads is None or i in reduced_grads
        rows = reduced_rows(inputs, i) if reduced else 1
        failure = judge(gc, gr, tolerance(tol_dtype, rows), f"grad of input {i}", lambda i=i: truth.grad(i))
        if failure:
            return NumericsResult(False, failure)
    return NumericsResult(True, "ok")


def compare_pattern(pattern: FusionPattern, params: dict, device: torch.device, candidate=None, seed: int = 0,
                    backward: bool = True, reduced_grads: tuple[int, ...] | None = None) -> NumericsResult:
    """`compare` on `pattern.make_inputs(params)` seeded with `seed`; the candidate defaults to
    `pattern.fused`. A pattern with randomness (dropout) is compared on its `numerics_params`
    (the same shapes, the randomness off), where the reference and the kernel must agree."""
    if pattern.numerics_params is not None:
        params = pattern.numerics_params(params)
    torch.manual_seed(seed)
    inputs = pattern.make_inputs(params, device, backward)
    return compare(pattern.reference, candidate or pattern.fused, inputs, backward=backward, seed=seed + 1,
                   reduced_grads=reduced_grads)


def _mismatch(actual: torch.Tensor, expected: torch.Tensor, tol: dict, what: str) -> str | None:
    try:
        torch.testing.assert_close(actual, expected, **tol)
    except AssertionError as exc:
        return f"{what} ({expected.dtype}, atol {tol['atol']:.3g}, rtol {tol['rtol']:.3g}): {exc}"
    return None


class _Float64Reference:
    """The reference run on float64 copies of the inputs, once, only when a judgement needs it."""

    def __init__(self, reference: Callable[..., Any], inputs: Inputs):
        self.reference, self.inputs = reference, inputs
        self.upstream: dict[int, torch.Tensor] = {}
        self._fwd: tuple | None = None
        self._bwd: Inputs | None = None

    def _run(self):
        args = tuple(a.detach().to(torch.float64).requires_grad_(a.requires_grad)
                     if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in self.inputs.args)
        run_in = Inputs(args, dict(self.inputs.kwargs), self.inputs.grad_inputs)
        return tensor_outputs(self.reference(*run_in.args, **run_in.kwargs)), run_in

    def output(self, k: int) -> torch.Tensor | None:
        try:
            if self._fwd is None:
                with torch.no_grad():
                    self._fwd = self._run()
            return self._fwd[0][k]
        except Exception:  # a reference that has no float64 path: judge without it
            return None

    def grad(self, i: int) -> torch.Tensor | None:
        try:
            if self._bwd is None:
                out, run_in = self._run()
                pairs = [(out[k], g) for k, g in self.upstream.items()]
                torch.autograd.backward([o for o, _ in pairs], [g.to(o.dtype) for o, g in pairs])
                self._bwd = run_in
            return self._bwd.args[i].grad
        except Exception:
            return None


def judge(actual: torch.Tensor, expected: torch.Tensor, tol: dict, what: str, truth) -> str | None:
    failure = _mismatch(actual, expected, tol, what)
    if failure is None or actual.isnan().any() or expected.isnan().any():
        return failure
    exact = truth()
    if exact is None or exact.shape != expected.shape:
        return failure
    a, e = actual.detach().double(), expected.detach().double()
    t = exact.detach().double().to(e.device)
    # Within the tolerance plus eager's own error of eager's result, or of the float64 one: a
    # result nearer the truth than eager's, on the other side of it, passes too (fp32 LayerNorm dx
    # at a row of scale 1e-4: ours 1.7e-5 from float64, eager 2.2e-5, the two 3.9e-5 apart).
    eager_error = (e - t).abs()
    over = torch.minimum((a - e).abs() - (tol["atol"] + tol["rtol"] * e.abs() + eager_error),
                         (a - t).abs() - (tol["atol"] + tol["rtol"] * t.abs() + eager_error))
    if (over <= 0).all():
        return None
    j = int(over.argmax())
    return (f"{failure}\n(also beyond the reference's own error against float64 at flat index {j}: candidate "
            f"{a.flatten()[j].item():.6g}, reference {e.flatten()[j].item():.6g}, float64 {t.flatten()[j].item():.6g})")
