"""The generated module's host path: eager calls launch directly (not through torch.ops), launch
plans are computed once per (shapes, dtypes, devices), and torch.compile still goes through the
custom ops."""
import os
import pathlib
import tempfile

import pytest
import torch

from fusion_advisor.kernels.codegen import build_pattern, generated
from fusion_advisor.kernels.codegen.runtime import MAX_GRID_Y, row_programs
from fusion_advisor.core.records import OpRecord

os.environ.setdefault("FUSION_ADVISOR_CACHE", str(pathlib.Path(tempfile.gettempdir()) / "fusion-advisor-tests"))

S = (6, 10)


def _bias_gelu_residual():
    """bias (10,) -> gelu -> * residual: a full input, a "cols" gradient (the bias), another full one."""
    return [OpRecord("aten::add", (S, (10,), ()), ("float", "float", "Scalar"), ("", "", "1")),
            OpRecord("aten::gelu", (S, ()), ("float", ""), ("", "tanh")),
            OpRecord("aten::mul", (S, S), ("float", "float"), ("", ""))]


def _inputs(shape, device):
    x = torch.randn(shape, device=device, requires_grad=True)
    b = torch.randn(shape[-1], device=device, requires_grad=True)
    r = torch.randn(shape, device=device, requires_grad=True)
    return x, b, r


def _check(fused, pattern, args):
    out = fused(*args)
    ref = pattern.reference(*args)
    torch.testing.assert_close(out, ref)
    dout = torch.randn_like(ref)
    grads = torch.autograd.grad(out, args, dout)
    ref_grads = torch.autograd.grad(ref, args, dout)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, atol=1e-5, rtol=1e-5)


def test_eager_calls_do_not_go_through_torch_ops(monkeypatch, device):
    pattern = build_pattern(_bias_gelu_residual())
    chain = generated(pattern)

    def refuse(*args, **kwargs):
        raise AssertionError("an eager call went through torch.ops")

    for suffix in ("fwd", "bwd"):
        monkeypatch.setattr(torch.ops.fusion_kernels, f"{chain.module_name}_{suffix}", refuse)
    args = _inputs(S, device)
    _check(chain.module.fused, pattern, args)
    with torch.no_grad():
        torch.testing.assert_close(chain.module.fused(*args), pattern.reference(*args))


def test_launch_plans_are_computed_once_per_shape(monkeypatch, device):
    pattern = build_pattern(_bias_gelu_residual())
    module = generated(pattern).module
    monkeypatch.setattr(module, "PLANS", {})
    planned = []
    plan_launches = module.plan_launches
    monkeypatch.setattr(module, "plan_launches", lambda spec, tensors: planned.append(1) or plan_launches(spec, tensors))
    args = _inputs(S, device)
    _check(module.fused, pattern, args)
    _check(module.fused, pattern, args)
    assert len(planned) == 1 and len(module.PLANS) == 1      # forward and backward of both calls: one plan
    _check(module.fused, pattern, _inputs((21, 13), device))       # another shape of the same structure
    assert len(planned) == 2 and len(module.PLANS) == 2
    with pytest.raises(TypeError, match="in0 must be a tensor"):   # a bad call is refused, not cached
        module.fused(1.0, args[1], args[2])
    assert len(module.PLANS) == 2


def test_compiled_fused_uses_the_custom_ops(device):
    """fullgraph: the compiler sees the custom ops (opaque, with fakes), never a Triton launch."""
    from torch._dynamo.backends.registry import lookup_backend
    pattern = build_pattern(_bias_gelu_residual())
    chain = generated(pattern)
    graphs = []

    def aot_eager_recording(gm, example_inputs):
        graphs.append(gm)
        return lookup_backend("aot_eager")(gm, example_inputs)

    compiled = torch.compile(chain.module.fused, fullgraph=True, backend=aot_eager_recording)
    args = _inputs(S, device)
    _check(compiled, pattern, args)
    with torch.no_grad():
        torch.testing.assert_close(compiled(*args), pattern.reference(*args))
    code = "\n".join(m.code for g in graphs for m in g.modules() if isinstance(m, torch.fx.GraphModule))
    assert len(graphs) == 2     # with and without grad
    assert f"fusion_kernels.{chain.module_name}_fwd" in code and f"fusion_kernels.{chain.module_name}_bwd" in code


def test_backward_loops_over_row_tiles_only_for_column_sums():
    # a column accumulator: about 4 programs per SM, each summing a run of row tiles
    assert row_programs(10_000, 2, None, num_sms=132, accumulate=True) == (264, 38)
    # none: one tile per program, up to the grid's y limit
    assert row_programs(10_000, 2, None, num_sms=132, accumulate=False) == (10_000, 1)
    programs, per_program = row_programs(200_000, 1, None, accumulate=False)
    assert programs <= MAX_GRID_Y and programs * per_program >= 200_000 and per_program == 4
