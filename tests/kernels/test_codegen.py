"""Generic fusion: generated kernels against the eager chain they replace, forward and backward."""
import math
import os
import pathlib
import tempfile

import pytest
import torch

from codegen_chains import random_chain
from fusion_advisor.core.errors import AdvisorError
from fusion_advisor.kernels.codegen.graph import eager_args
from fusion_advisor.kernels.codegen import (Unsupported, build_graph, build_pattern, generated, pattern_source,
                                            split_supported)
from fusion_advisor.kernels.registry import FusionPattern, Inputs, OpRecord
from fusion_advisor.kernels.tolerances import tolerance
from kernel_checks import check_against_reference

# Masked-out lanes of the last tile compute 0/0 and -inf - -inf that are never stored; the
# interpreter's numpy warns about them.
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning",
                                        "ignore:divide by zero encountered:RuntimeWarning",
                                        "ignore:overflow encountered:RuntimeWarning")

_PRECISION = {torch.bfloat16: 0, torch.float16: 1, torch.float32: 2}
# Generated modules go to a scratch folder, not the user's ~/.cache.
os.environ.setdefault("FUSION_ADVISOR_CACHE", str(pathlib.Path(tempfile.gettempdir()) / "fusion-advisor-tests"))


def _least_precise(pattern: FusionPattern) -> torch.dtype:
    """Inputs and every value of the chain: an fp32 chain with a cast to bf16 carries bf16 rounding."""
    graph = generated(pattern).graph
    dtypes = [x.dtype for x in graph.inputs if x.dtype in _PRECISION] + [n.dtype for n in graph.nodes]
    return min(dtypes, key=_PRECISION.__getitem__)


def _copy(inputs: Inputs, dtype: torch.dtype | None = None) -> tuple:
    out = []
    for a in inputs.args:
        b = a.detach().clone()
        if dtype is not None and b.is_floating_point():
            b = b.to(dtype)
        out.append(b.requires_grad_(a.requires_grad))
    return tuple(out)


def _tensors(out) -> list[torch.Tensor]:
    return [out] if isinstance(out, torch.Tensor) else [o for o in out if isinstance(o, torch.Tensor)]


def _assert_close_to_eager(actual, eager, truth, dtype, rows=1, what="output"):
    """|fused - eager| within the dtype's tolerance, widened where eager itself is off the fp64
    result (eager rounds every op's output to bf16/fp16 and can land on the other side of a
    clamp or relu kink, where the gradient jumps, or underflow to 0): the kernel must be as good
    as eager, or within the tolerance of the fp64 result."""
    assert actual.shape == eager.shape and actual.dtype == eager.dtype, (what, actual.shape, actual.dtype,
                                                                         eager.shape, eager.dtype)
    if not actual.is_floating_point():
        assert torch.equal(actual, eager), what
        return
    tol = tolerance(dtype, rows)
    a, e, t = actual.double(), eager.double(), truth.double()
    allowed = tol["atol"] + tol["rtol"] * e.abs() + (e - t).abs().nan_to_num(0.0)
    err = (a - e).abs()
    near_truth = (a - t).abs() <= tol["atol"] + tol["rtol"] * t.abs()     # eager is the one off
    bad = (err > allowed) & ~near_truth & ~(a.isnan() & e.isnan())
    if bad.any():
        i = tuple(bad.nonzero()[0].tolist())
        raise AssertionError(f"{what}: {int(bad.sum())} of {bad.numel()} elements off ({dtype}); at {i}: fused "
                             f"{a[i].item():.6g}, eager {e[i].item():.6g}, fp64 {t[i].item():.6g}")


def _truth(pattern: FusionPattern, args: tuple, scalars: dict):
    """The chain in fp64, rounding only at its explicit casts (as the kernel does): the yardstick
    for how far eager's per-op rounding strays."""
    graph = generated(pattern).graph
    env = {**{x.name: a for x, a in zip(graph.inputs, args)}, **scalars}
    for node in graph.nodes:
        pos, kw = eager_args(node, lambda o: env[o.ref] if o.kind in ("value", "input", "scalar") else o.value)
        if node.spec.kind == "cast":
            env[node.name] = pos[0].to(node.dtype).double()
            continue
        if node.reduction:        # no dtype or half_to_float arguments: stay in fp64
            pos = [pos[0], pos[1]] + [False if isinstance(a, bool) and node.reduction in ("softmax", "log_softmax")
                                      else None if isinstance(a, torch.dtype) else a for a in pos[2:]]
            kw = {k: v for k, v in kw.items() if k != "dtype"}
        env[node.name] = getattr(torch.ops.aten, node.eager_name)(*pos, **kw)
    return env[graph.nodes[-1].name]


def check_chain(pattern: FusionPattern, device: torch.device, seed: int = 0) -> None:
    torch.manual_seed(seed)
    chain = generated(pattern)
    base = pattern.make_inputs(pattern.example_params, device, True)
    tol_dtype = _least_precise(pattern)
    eager_in, fused_in, truth_in = _copy(base), _copy(base), _copy(base, torch.float64)
    eager = _tensors(pattern.reference(*eager_in, **base.kwargs))
    fused = _tensors(pattern.fused(*fused_in, **base.kwargs))
    truth = _tensors(_truth(pattern, truth_in, base.kwargs))
    assert len(fused) == len(eager)
    for f, e, t in zip(fused, eager, truth):
        _assert_close_to_eager(f, e, t, tol_dtype)
    grads = [torch.randn_like(e) for e in eager if e.requires_grad]
    torch.autograd.backward([e for e in eager if e.requires_grad], grads)
    torch.autograd.backward([f for f in fused if f.requires_grad], grads)
    torch.autograd.backward([t for t in truth if t.requires_grad], [g.double() for g in grads])
    loop = math.prod(chain.graph.loop_shape)
    for k in base.grad_inputs:
        x = chain.graph.inputs[k]
        rows = loop // max(math.prod(x.shape), 1)
        assert fused_in[k].grad is not None, f"{x.name} got no gradient"
        _assert_close_to_eager(fused_in[k].grad, eager_in[k].grad, truth_in[k].grad, tol_dtype, rows,
                               f"grad of {x.name} {tuple(x.shape)}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("seed", range(16))
def test_random_chain_matches_eager(seed, dtype, device):
    ops = random_chain(seed * 3 + _PRECISION[dtype], dtype)
    check_chain(build_pattern(ops), device, seed)


@pytest.mark.parametrize("seed", range(100, 108))
def test_random_chain_with_reduction_tail(seed, device):
    ops = random_chain(seed, torch.float32, with_reduction=True)
    assert generated(build_pattern(ops)).graph.reduction is not None
    check_chain(build_pattern(ops), device, seed)


# -- hand-written chains: the formats of real traces --------------------------------------------
def _op(name, dims, types, concrete):
    return OpRecord(name, tuple(dims), tuple(types), tuple(concrete))


X = (4, 8, 6, 5)


def conv_tail(t="float", shape=X):
    """The pointwise tail of examples/conv_pointwise.py as the profiler records it."""
    c = (shape[1], 1, 1)
    return [_op("aten::add", [shape, c, ()], [t, t, "Scalar"], ["", "", "1"]),
            _op("aten::mul", [shape, ()], [t, "double"], ["", ""]),
            _op("aten::clamp", [shape, (), ()], [t, "Scalar", "Scalar"], ["", "-6.", "6."]),
            _op("aten::mul", [shape, ()], [t, "double"], ["", ""]),
            _op("aten::sigmoid", [shape], [t], [""]),
            _op("aten::mul", [shape, shape], [t, t], ["", ""]),
            _op("aten::clamp_max", [shape, ()], [t, "Scalar"], ["", "4."])]


def quick_gelu_tail(y, bias, scale):
    y = (y + bias) * scale
    y = y.clamp(-6.0, 6.0)
    y = y * torch.sigmoid(1.702 * y)
    return y.clamp_max(4.0)


def test_bind_makes_the_kernel_the_users_function(device):
    """y * sigmoid(1.702 * y): both mul arguments have y's shape. Unbound, y becomes an extra
    input (the header says so); bound to v2, the kernel computes the user's function."""
    unbound = build_pattern(conv_tail())
    assert len(generated(unbound).graph.inputs) == 3
    assert "self` was taken as the chain value" in pattern_source(unbound)
    bound = build_pattern(conv_tail(), bind={(5, 0): "v2"})
    assert [x.name for x in generated(bound).graph.inputs] == ["in0", "in1"]
    torch.manual_seed(0)
    y = torch.randn(X, device=device, requires_grad=True)
    bias = torch.randn(X[1], 1, 1, device=device, requires_grad=True)
    out = bound.fused(y, bias, s0=1.5, s1=1.702)
    want = quick_gelu_tail(y, bias, 1.5)
    torch.testing.assert_close(out, want, **tolerance(torch.float32))
    g = torch.randn_like(want)
    got = torch.autograd.grad(out, (y, bias), g)
    ref = torch.autograd.grad(want, (y, bias), g)
    torch.testing.assert_close(got[0], ref[0], **tolerance(torch.float32))
    torch.testing.assert_close(got[1], ref[1], **tolerance(torch.float32, X[0] * X[2] * X[3]))
    check_chain(bound, device)


@pytest.mark.parametrize("t,dtype", [("c10::BFloat16", "bfloat16"), ("c10::Half", "float16")])
def test_conv_tail_low_precision_with_kernel_checks(t, dtype, device):
    pattern = build_pattern(conv_tail(t))
    assert pattern.example_params["inputs"][0]["dtype"] == dtype
    check_against_reference(pattern, pattern.example_params, device)


def test_trace_formats_alpha_inplace_gelu_tanh_casts(device):
    s, t = (6, 40), "c10::BFloat16"
    ops = [_op("aten::_to_copy", [s, (), (), (), (), (), ()], [t, "Scalar", "", "", "", "Scalar", ""],
               ["", "6", "", "", "", "False", ""]),
           _op("aten::add_", [s, (40,), ()], ["float", "float", "Scalar"], ["", "", "0.29999999999999999"]),
           _op("aten::gelu", [s, ()], ["float", ""], ["", "tanh"]),
           _op("aten::rsub", [s, (), ()], ["float", "Scalar", "Scalar"], ["", "3", "1"]),
           _op("aten::sub_", [s, (6, 1), ()], ["float", "float", "Scalar"], ["", "", "2"]),
           _op("aten::to", [s, (), (), (), ()], ["float", "Scalar", "Scalar", "Scalar", ""], ["", "15", "False", "False", ""])]
    pattern = build_pattern(ops)
    source = pattern_source(pattern)
    assert "gelu_tanh(" in source
    assert "torch.ops.aten.add_(v0, in1, alpha=0.3)" in source        # in place on an intermediate stays in place
    assert "torch.ops.aten.sub_(v3, in2, alpha=2)" in source
    out = pattern.fused(*pattern.make_inputs(pattern.example_params, device, False).args)
    assert out.dtype == torch.bfloat16
    check_chain(pattern, device)


def test_in_place_op_on_an_input_runs_out_of_place_in_the_reference(device):
    ops = [_op("aten::mul_", [(4, 8), ()], ["float", "double"], ["", ""]), _op("aten::relu_", [(4, 8)], ["float"], [""])]
    pattern = build_pattern(ops)
    assert "torch.ops.aten.mul(in0, s0)" in pattern_source(pattern)
    assert "torch.ops.aten.relu_(v0)" in pattern_source(pattern)
    x = torch.randn(4, 8, device=device)
    before = x.clone()
    torch.testing.assert_close(pattern.fused(x, s0=-2.0), pattern.reference(x, s0=-2.0))
    assert torch.equal(x, before)
    check_chain(pattern, device)


def test_gelu_without_recorded_approximate_is_assumed_erf_and_said():
    ops = [_op("aten::gelu", [(4, 8), ()], ["float", ""], ["", ""])]
    pattern = build_pattern(ops)
    assert "gelu_erf(" in pattern_source(pattern)
    assert "does not record `approximate`" in pattern_source(pattern)


def test_masked_softmax_tail_with_bool_mask(device):
    """The attention-score chain of examples/gpt_train.py: scale, causal mask, softmax."""
    s = (2, 3, 16, 16)
    ops = [_op("aten::mul", [s, ()], ["float", "double"], ["", ""]),
           _op("aten::masked_fill", [s, (16, 16), ()], ["float", "bool", "Scalar"], ["", "", "-inf"]),
           _op("aten::softmax", [s, (), ()], ["float", "Scalar", ""], ["", "-1", ""])]
    pattern = build_pattern(ops)
    check_against_reference(pattern, pattern.example_params, device)
    graph = generated(pattern).graph
    assert [x.dtype for x in graph.inputs] == [torch.float32, torch.bool] and graph.reduction.reduction == "softmax"


@pytest.mark.parametrize("keepdim", ["True", "False"])
def test_max_returns_values_and_indices(keepdim, device):
    s = (5, 37)
    ops = [_op("aten::add", [s, (37,), ()], ["float", "float", "Scalar"], ["", "", "1"]),
           _op("aten::max", [s, (), ()], ["float", "Scalar", "Scalar"], ["", "-1", keepdim])]
    pattern = build_pattern(ops)
    inputs = pattern.make_inputs(pattern.example_params, device, False)
    values, indices = pattern.fused(*inputs.args)
    ref = pattern.reference(*inputs.args)
    torch.testing.assert_close(values, ref[0])
    assert torch.equal(indices, ref[1])
    check_chain(pattern, device)


def test_shapes_may_change_but_not_the_broadcast_structure(device):
    pattern = build_pattern(conv_tail())
    fused = generated(pattern).module.fused
    y, b, z = torch.randn(2, 8, 3, 3, device=device), torch.randn(8, 1, 1, device=device), torch.randn(2, 8, 3, 3, device=device)
    torch.testing.assert_close(fused(y, b, z, s0=1.0, s1=2.0), pattern.reference(y, b, z, s0=1.0, s1=2.0))
    with pytest.raises(ValueError, match="unlike in the traced chain"):
        fused(y, torch.randn(1, 1, 3, device=device), z, s0=1.0, s1=2.0)
    with pytest.raises(TypeError, match="traced chain had torch.float32"):
        fused(y.half(), b, z, s0=1.0, s1=2.0)


def test_runs_under_torch_compile(device):
    pattern = build_pattern(conv_tail())
    inputs = pattern.make_inputs(pattern.example_params, device, True)
    compiled = torch.compile(pattern.fused, fullgraph=True, backend="aot_eager")
    out = compiled(*inputs.args, **inputs.kwargs)
    torch.testing.assert_close(out, pattern.reference(*inputs.args, **inputs.kwargs))
    out.sum().backward()
    assert all(a.grad is not None for a in inputs.args)


def test_fused_bytes_reads_inputs_once_and_writes_output_once():
    pattern = build_pattern(conv_tail("c10::BFloat16", (8, 64, 32, 32)))
    n = 8 * 64 * 32 * 32
    b = pattern.fused_bytes(pattern.example_params)
    assert b["forward"] == 2 * n + 2 * 64 + 2 * n + 2 * n          # two full inputs, the bias, the output
    # backward: dout, the inputs again, the full grads, the bias grad and its (col tiles x rows) fp32 partials
    rows, col_tiles = 8 * 64, 1
    assert b["backward"] == 2 * n + (4 * n + 2 * 64) + (4 * n + 2 * 64) + 2 * 4 * col_tiles * rows


def test_pattern_is_cached_and_not_registered():
    from fusion_advisor.kernels import all_patterns
    a, b = build_pattern(conv_tail()), build_pattern(conv_tail())
    assert a is b and a.name.startswith("generic:")
    assert a.name not in {p.name for p in all_patterns()}
    assert a.match(conv_tail(shape=(2, 8, 3, 3)))["inputs"][0]["shape"] == [2, 8, 3, 3]
    assert a.match(conv_tail()[:-1]) is None


# -- splitting ------------------------------------------------------------------------------------
def test_split_at_unsupported_op_says_why():
    s = (4, 16)
    ops = [_op("aten::add", [s, (16,), ()], ["float", "float", "Scalar"], ["", "", "1"]),
           _op("aten::relu", [s], ["float"], [""]),
           _op("aten::cumsum", [s, (), ()], ["float", "Scalar", ""], ["", "1", ""]),
           _op("aten::exp", [s], ["float"], [""]),
           _op("aten::mul", [s, ()], ["float", "double"], ["", ""])]
    segments = split_supported(ops)
    assert [[o.short for o in seg] for seg, _ in segments] == [["add", "relu"], ["exp", "mul"]]
    assert "cumsum is not a supported" in segments[0][1] and segments[1][1] is None


def test_split_where_an_op_does_not_consume_the_previous_output():
    ops = [_op("aten::relu", [(4, 16)], ["float"], [""]),
           _op("aten::sigmoid", [(8, 3)], ["float"], [""]),       # another tensor: a new chain
           _op("aten::sum", [(8, 3), (), (), ()], ["float", "ScalarList", "Scalar", ""], ["", "[-1]", "False", ""]),
           _op("aten::neg", [(8,)], ["float"], [""])]
    segments = split_supported(ops)
    assert [[o.short for o in seg] for seg, _ in segments] == [["relu"], ["sigmoid", "sum"], ["neg"]]
    assert "does not consume op 0" in segments[0][1]
    assert "reduction" in segments[1][1]


@pytest.mark.parametrize("op,why", [
    (_op("aten::div", [(4, 8), (4, 8), ()], ["float", "float", ""], ["", "", ""]), "rounding_mode"),
    (_op("aten::pow", [(4, 8), (4, 8)], ["float", "float"], ["", ""]), "tensor exponent"),
    (_op("aten::sum", [(4, 8), (), (), ()], ["float", "ScalarList", "Scalar", ""], ["", "[0, 1]", "False", ""]),
     "short of all of them"),
    (_op("aten::add", [(4, 8), (4, 8), ()], ["float", "long int", "Scalar"], ["", "", "1"]), "dtype int64"),
    (_op("aten::to", [(4, 8), (), (), (), ()], ["float", "Scalar", "Scalar", "Scalar", ""], ["", "7", "False", "False", ""]), "float64"),
    (_op("aten::clamp", [(4, 8), (4, 8), ()], ["float", "float", ""], ["", "", ""]), "tensor bounds"),
    (_op("aten::mul", [(4, 8), (4, 8)], ["float", "bool"], ["", ""]), "bool tensor"),
])
def test_unsupported_ops_say_why(op, why):
    segments = split_supported([op])
    assert segments == []
    with pytest.raises(Unsupported, match=why) as info:
        build_graph([op])
    assert isinstance(info.value, AdvisorError)


def test_bind_is_checked():
    with pytest.raises(Unsupported, match="bind: in1 is float32"):
        build_graph(conv_tail(), bind={(5, 0): "in1"})
    ops = conv_tail()[:3] + [_op("aten::mul_", [X, X], ["float", "float"], ["", ""])]
    with pytest.raises(Unsupported, match="modified in place after"):
        build_graph(ops + [_op("aten::add", [X, X, ()], ["float", "float", "Scalar"], ["", "", "1"])],
                    bind={(4, 1): "v2"})


def _log_bucket_chain(divisor: str):
    """T5's relative-position bucket: log(position.float() / max_exact) / log(16) * 8."""
    p = (32, 32)
    return [_op("aten::div", [p, ()], ["float", "Scalar"], ["", divisor]),
            _op("aten::log", [p], ["float"], [""]),
            _op("aten::div", [p, ()], ["float", "Scalar"], ["", "2.772588722239781"]),
            _op("aten::mul", [p, ()], ["float", "Scalar"], ["", "8"])]


def test_an_input_reaching_log_through_a_positive_scale_is_drawn_positive():
    assert build_graph(_log_bucket_chain("8")).inputs[0].positive
    assert not build_graph(_log_bucket_chain("-8")).inputs[0].positive   # x / -8 > 0 needs x < 0: N(0, 1)
    pattern = build_pattern(_log_bucket_chain("8"))
    x = pattern.make_inputs(pattern.example_params, torch.device("cpu"), False).args[0]
    assert x.min() >= 0.5
    assert torch.isfinite(pattern.reference(x)).all()
    check_against_reference(pattern, pattern.example_params, torch.device("cpu"))   # NaN == NaN refused it
