"""A generated kernel's dataflow read off the user's source (kernels/codegen/source_bind.py) and the
candidate built from it (candidate.py): exact bindings, or a reason, never a guess."""
import importlib.util
import pathlib
import textwrap

import pytest
import torch

from fusion_advisor.kernels.codegen.candidate import candidate_for, pattern_from_params
from fusion_advisor.kernels.codegen.ops import Unsupported
from fusion_advisor.kernels.codegen.source_bind import chain_from_source
from fusion_advisor.core.records import OpRecord
from fusion_advisor.kernels.tolerances import tolerance

EXAMPLE = pathlib.Path(__file__).parents[2] / "examples" / "conv_pointwise.py"
F32 = "float"


def op(name, dims, types, concrete):
    return OpRecord(f"aten::{name}", tuple(tuple(d) for d in dims), tuple(types), tuple(concrete))


def conv_tail_records(shape=(2, 16, 5, 7)):
    """What the profiler records for examples/conv_pointwise.py's pointwise_tail (see the CPU
    fixture conv-pointwise-cpu.json.gz): Python numbers come as `double` without a value."""
    c = (shape[1], 1, 1)
    return [op("add", [shape, c, ()], [F32, F32, "Scalar"], ["", "", "1"]),
            op("mul", [shape, ()], [F32, "double"], ["", ""]),
            op("clamp", [shape, (), ()], [F32, "Scalar", "Scalar"], ["", "-6.", "6."]),
            op("mul", [shape, ()], [F32, "double"], ["", ""]),
            op("sigmoid", [shape], [F32], [""]),
            op("mul", [shape, shape], [F32, F32], ["", ""]),
            op("clamp_max", [shape, ()], [F32, "Scalar"], ["", "4."])]


def _def_line(path, name):
    return next(i for i, line in enumerate(path.read_text().splitlines(), 1) if line.startswith(f"def {name}("))


def _load(path, name="user_module"):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_conv_tail_dataflow_is_read_exactly():
    line = _def_line(EXAMPLE, "pointwise_tail")
    bound = chain_from_source(conv_tail_records(), str(EXAMPLE), line)
    # y * torch.sigmoid(1.702 * y): the last mul reads the clamp's output (v2), not a new input.
    assert bound.bind[(5, 0)] == "v2" and bound.bind[(5, 1)] == "v4"
    assert bound.externals == {(0, 0): "y", (0, 1): "bias"}
    assert bound.scalar_exprs == {(1, 1): "scale", (3, 1): "1.702"}
    assert bound.scalar_values == {(3, 1): 1.702}
    assert bound.call.target is None and bound.call.function == "pointwise_tail"
    assert (bound.call.first_line, bound.call.last_line) == (line + 2, line + 6)


def test_candidate_computes_the_users_function(device):
    """The kernel built from the source binding equals the user's own code, forward and backward,
    called the way apply calls it; and the params rebuild the same pattern (another process)."""
    found = candidate_for(conv_tail_records(), str(EXAMPLE), _def_line(EXAMPLE, "pointwise_tail"), "conv_pointwise.py:17")
    assert found.call is not None and found.call.args == ["y", "bias"]
    assert found.call.scalars == {"s0": "scale", "s1": "1.702"}
    assert found.params["scalars"]["s1"] == 1.702          # the literal, not a placeholder
    assert pattern_from_params(found.params) is found.pattern
    example = _load(EXAMPLE)
    torch.manual_seed(0)
    y = (3 * torch.randn(2, 16, 5, 7, device=device)).requires_grad_()
    bias = torch.randn(16, 1, 1, device=device, requires_grad=True)
    got = found.pattern.fused(y, bias, s0=1.5, s1=1.702)
    want = example.pointwise_tail(y, bias, 1.5)
    torch.testing.assert_close(got, want, **tolerance(torch.float32))
    g = torch.randn_like(want)
    for a, b, rows in zip(torch.autograd.grad(got, (y, bias), g), torch.autograd.grad(want, (y, bias), g), (1, 70)):
        torch.testing.assert_close(a, b, **tolerance(torch.float32, rows))


def test_without_source_the_dataflow_is_a_named_guess():
    found = candidate_for(conv_tail_records())
    assert found.call is None
    assert any("not found" in n for n in found.notes) and any("op 5 mul" in n for n in found.notes)
    # The guess reads the last mul's second operand as a new input: three tensors, not two.
    assert len(found.params["inputs"]) == 3


def _write(tmp_path, body: str) -> pathlib.Path:
    path = tmp_path / "model.py"
    path.write_text("import torch\nimport torch.nn.functional as F\n\n\n" + textwrap.dedent(body))
    return path


SHAPE = (4, 8)


def test_reflected_operands_strings_and_computed_bounds(tmp_path, device):
    path = _write(tmp_path, """
        def act(x, lim):
            h = 2.0 * x                                  # traced as mul(x, 2.0)
            h = F.gelu(h, approximate="tanh")            # the profiler drops the string
            return h.clamp(-lim, lim)                    # bounds computed: runtime scalars
        """)
    records = [op("mul", [SHAPE, ()], [F32, "double"], ["", ""]),
               op("gelu", [SHAPE, ()], [F32, ""], ["", ""]),
               op("clamp", [SHAPE, (), ()], [F32, "Scalar", "Scalar"], ["", "-3.", "3."])]
    found = candidate_for(records, str(path), _def_line(path, "act"))
    assert found.call is not None, found.notes
    assert found.call.args == ["x"] and found.call.scalars == {"s0": "2.0", "s1": "-lim", "s2": "lim"}
    user = _load(path, "reflected_model")
    x = torch.randn(*SHAPE, device=device)
    for lim in (3.0, 0.5):   # the kernel follows the user's bound, not the traced 3.0
        got = found.pattern.fused(x, s0=2.0, s1=-lim, s2=lim)
        torch.testing.assert_close(got, user.act(x, lim), **tolerance(torch.float32))


@pytest.mark.parametrize("body, why", [
    ("""
     def f(x, b):
         h = x + b
         g = h * 2.0
         y = g.sigmoid()
         return y + h
     """, "read after it"),
    ("""
     def f(x, b):
         h = x + b
         g = torch.relu(h) * 2.0
         return g.sigmoid()
     """, "not a run of the ops"),
    ("""
     def f(x, b):
         h = x + b
         if h.sum() > 0:
             h = h * 2.0
         return h.sigmoid()
     """, "not a run of the ops"),
])
def test_unreadable_dataflow_says_why(tmp_path, body, why):
    path = _write(tmp_path, body)
    records = [op("add", [SHAPE, SHAPE, ()], [F32, F32, "Scalar"], ["", "", "1"]),
               op("mul", [SHAPE, ()], [F32, "double"], ["", ""]),
               op("sigmoid", [SHAPE], [F32], [""])]
    with pytest.raises(Unsupported, match=why):
        chain_from_source(records, str(path), _def_line(path, "f"))
