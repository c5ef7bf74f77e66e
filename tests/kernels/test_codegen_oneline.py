"""A whole chain on one line with Python-level constants (minGPT's NewGELU) binds to its source like
a multi-line chain: `math.sqrt(2.0 / math.pi)` is a number Python computes before any op runs (the
trace holds only its value), and the ops form a DAG over x (`torch.pow(x, 3.0)` reads x alone).
apply rewrites the statement into one call of the generated kernel, which computes what the line
did, forward and backward."""
import math
import textwrap

import pytest
import torch

from fusion_advisor import apply as apply_mod
from fusion_advisor.kernels.codegen import build_pattern, generated
from fusion_advisor.kernels.codegen.candidate import candidate_for, pattern_from_params
from fusion_advisor.kernels.numerics import compare
from fusion_advisor.kernels.registry import Inputs, OpRecord
from fusion_advisor.kernels.tolerances import tolerance
from generated_apply import estimate_plan, kernels_importable, load
from test_codegen import check_chain

USER_CODE = textwrap.dedent("""\
    import math

    import torch
    import torch.nn as nn


    class NewGELU(nn.Module):
        def forward(self, x):
            return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))
    """)
DEF_LINE = 8
SHAPE = (2, 5, 24)
F32 = "float"


def op(name, dims, types, concrete):
    return OpRecord(f"aten::{name}", tuple(tuple(d) for d in dims), tuple(types), tuple(concrete))


def new_gelu_records(constant_recorded: bool) -> list[OpRecord]:
    """The top-level ops a CPU profile of NewGELU records (Python numbers are 0-dim `double`s without
    a value); `constant_recorded`: the folded sqrt(2/pi) arrives as a recorded Scalar instead, as
    some traces hold it (then the source's expression, not the trace's rounded digits, is passed)."""
    s = SHAPE
    sqrt_2_pi = (op("mul", [s, ()], [F32, "Scalar"], ["", "0.7978845608"]) if constant_recorded
                 else op("mul", [s, ()], [F32, "double"], ["", ""]))
    return [op("mul", [s, ()], [F32, "double"], ["", ""]),
            op("pow", [s, ()], [F32, "Scalar"], ["", "3."]),
            op("mul", [s, ()], [F32, "double"], ["", ""]),
            op("add", [s, s, ()], [F32, F32, "Scalar"], ["", "", "1"]),
            sqrt_2_pi,
            op("tanh", [s], [F32], [""]),
            op("add", [s, (), ()], [F32, "double", "Scalar"], ["", "", "1"]),
            op("mul", [s, s], [F32, F32], ["", ""])]


SPELLINGS = {"math": "math.sqrt(2.0 / math.pi)", "numpy": "np.sqrt(2.0 / np.pi)", "torch.pi": "math.sqrt(2.0 / torch.pi)"}


@pytest.mark.parametrize("spelling", list(SPELLINGS))
@pytest.mark.parametrize("constant_recorded", [False, True], ids=["double", "recorded-scalar"])
def test_one_line_new_gelu_binds_to_its_source(tmp_path, constant_recorded, spelling):
    path = tmp_path / "model.py"
    constant = SPELLINGS[spelling]
    path.write_text(USER_CODE.replace("import math\n", "import math\n\nimport numpy as np\n" if spelling == "numpy"
                                      else "import math\n").replace("math.sqrt(2.0 / math.pi)", constant))
    found = candidate_for(new_gelu_records(constant_recorded), str(path), DEF_LINE + (2 if spelling == "numpy" else 0),
                          "model.py:8")
    assert found is not None and found.call is not None, found and found.notes
    assert found.call.args == ["x"]                       # x read once, by every op that uses it
    assert constant in found.call.scalars.values()
    line = 9 + (2 if spelling == "numpy" else 0)
    assert (found.call.first_line, found.call.last_line, found.call.target) == (line, line, None)
    sqrt_scalar = next(k for k, v in found.call.scalars.items() if v == constant)
    assert found.params["scalars"][sqrt_scalar] == pytest.approx(0.7978845608028654)   # bench uses the value
    assert pattern_from_params(found.params) is found.pattern


def test_apply_rewrites_the_line_and_the_kernel_matches_it(tmp_path, device):
    path = tmp_path / "model.py"
    path.write_text(USER_CODE)
    found = candidate_for(new_gelu_records(False), str(path), DEF_LINE, "model.py:8")
    plan, diff, stem = estimate_plan(path, found, "model.py:8", "fwd-gelu", "GPT/Block/MLP/NewGELU", 12,
                                     "NewGELU as one kernel")
    assert "-        return 0.5 * x * (1.0 + torch.tanh(" in diff
    assert f"+        return fused_{stem}(x, " in diff and "math.sqrt(2.0 / math.pi)" in diff
    backup = apply_mod.write(plan, tmp_path)

    original = _load_from_text(tmp_path / "original.py", USER_CODE, "original_gelu")
    with kernels_importable(tmp_path):
        patched = load(path, "patched_gelu")
        torch.manual_seed(0)
        x = (2 * torch.randn(3, 7, 40, device=device)).requires_grad_()    # other sizes, same rank
        got, want = patched.NewGELU()(x), original.NewGELU()(x)
        torch.testing.assert_close(got, want, **tolerance(torch.float32))
        g = torch.randn_like(want)
        (gx,), (wx,) = torch.autograd.grad(got, (x,), g), torch.autograd.grad(want, (x,), g)
        torch.testing.assert_close(gx, wx, **tolerance(torch.float32))
    apply_mod.revert(tmp_path, backup)
    assert path.read_text() == USER_CODE


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_generated_new_gelu_in_half_precisions(tmp_path, device, dtype):
    """The kernel rounds where eager rounds (every op's output in x's dtype)."""
    path = tmp_path / "model.py"
    path.write_text(USER_CODE)
    name = {torch.float16: "c10::Half", torch.bfloat16: "c10::BFloat16"}[dtype]
    records = [OpRecord(r.name, r.dims, tuple(name if t == F32 else t for t in r.types), r.concrete)
               for r in new_gelu_records(False)]
    found = candidate_for(records, str(path), DEF_LINE)
    assert found.call is not None
    module = _load_from_text(tmp_path / "original.py", USER_CODE, "original_gelu_half")
    torch.manual_seed(0)
    x = (2 * torch.randn(SHAPE, device=device)).to(dtype).requires_grad_()
    kwargs = {k: eval(v, {"math": math}) for k, v in found.call.scalars.items()}
    # The project's numerics rule: tolerance table, and eager's own rounding error against float64
    # allowed for (eager's fp16 backward rounds every intermediate; the kernel keeps fp32).
    check = compare(lambda x: module.NewGELU()(x), lambda x: found.pattern.fused(x, **kwargs),
                    Inputs((x,), {}, (0,)))
    assert check.ok, check.detail


def _load_from_text(path, text, name):
    path.write_text(text)
    return load(path, name)


def autocast_records(low: str = "c10::BFloat16") -> list[OpRecord]:
    """NewGELU on bf16 x traced under CUDA autocast: autocast runs `torch.pow` in fp32 (its fp32
    policy), so every op after it reads float32; `0.5 * x` stays bf16 until the last mul."""
    s = SHAPE
    return [op("mul", [s, ()], [low, "double"], ["", ""]),
            op("pow", [s, ()], [low, "Scalar"], ["", "3."]),
            op("mul", [s, ()], [F32, "double"], ["", ""]),
            op("add", [s, s, ()], [low, F32, "Scalar"], ["", "", "1"]),
            op("mul", [s, ()], [F32, "double"], ["", ""]),
            op("tanh", [s], [F32], [""]),
            op("add", [s, (), ()], [F32, "double", "Scalar"], ["", "", "1"]),
            op("mul", [s, s], [low, F32], ["", ""])]


def test_chain_traced_under_cuda_autocast_runs_its_pow_in_fp32(tmp_path, device):
    path = tmp_path / "model.py"
    path.write_text(USER_CODE)
    found = candidate_for(autocast_records(), str(path), DEF_LINE)
    assert found is not None and found.call is not None, found and found.notes
    chain = generated(found.pattern)
    assert [n.autocast for n in chain.graph.nodes] == [False, True] + [False] * 6
    assert chain.graph.nodes[-1].dtype == torch.float32           # autocast's output dtype, as eager's
    assert ".float()" in chain.source.split("def reference(")[1]   # the cast spelled out in the reference

    def autocast_new_gelu(x):   # what CUDA autocast runs for the user's line (the cast made explicit)
        return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x.float(), 3.0))))

    torch.manual_seed(0)
    x = (2 * torch.randn(SHAPE, device=device)).to(torch.bfloat16).requires_grad_()
    kwargs = {k: eval(v, {"math": math}) for k, v in found.call.scalars.items()}
    for reference in (autocast_new_gelu, lambda x: found.pattern.reference(x, **kwargs)):
        check = compare(reference, lambda x: found.pattern.fused(x, **kwargs), Inputs((x,), {}, (0,)))
        assert check.ok, check.detail


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: the real torch.autocast('cuda') policy")
def test_generated_kernel_matches_the_line_under_cuda_autocast(tmp_path):
    path = tmp_path / "model.py"
    path.write_text(USER_CODE)
    found = candidate_for(autocast_records(), str(path), DEF_LINE)
    module = _load_from_text(tmp_path / "original.py", USER_CODE, "original_gelu_autocast")
    x = (2 * torch.randn(SHAPE, device="cuda")).to(torch.bfloat16).requires_grad_()
    kwargs = {k: eval(v, {"math": math}) for k, v in found.call.scalars.items()}
    with torch.autocast("cuda", dtype=torch.bfloat16):
        check = compare(lambda x: module.NewGELU()(x), lambda x: found.pattern.fused(x, **kwargs),
                        Inputs((x,), {}, (0,)))
    assert check.ok, check.detail


def test_a_value_nothing_reads_gets_no_gradient(device):
    """In a DAG over x a value may feed nothing after it (`y = x.sigmoid()` beside the output): the
    backward kernel skips it rather than reading a gradient that was never made."""
    s = (4, 9)
    ops = [op("mul", [s, ()], [F32, "double"], ["", ""]),
           op("sigmoid", [s], [F32], [""]),
           op("add", [s, s, ()], [F32, F32, "Scalar"], ["", "", "1"])]
    pattern = build_pattern(ops, bind={(1, 0): "in0", (2, 0): "v0", (2, 1): "in0"}, exact=True)
    check_chain(pattern, device)


ERF_GELU_CODE = textwrap.dedent("""\
    import math

    import torch


    def gelu(x):
        return x * 0.5 * (1.0 + torch.erf(x / math.sqrt(2.0)))
    """)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_hand_written_erf_gelu_binds_and_matches(tmp_path, device, dtype):
    """The exact GELU users write by hand (BERT-era code): erf is fused too, `math.sqrt(2.0)` folds."""
    path = tmp_path / "model.py"
    path.write_text(ERF_GELU_CODE)
    t, s = {torch.float32: F32, torch.bfloat16: "c10::BFloat16"}[dtype], SHAPE
    records = [op("mul", [s, ()], [t, "double"], ["", ""]),
               op("div", [s, ()], [t, "double"], ["", ""]),
               op("erf", [s], [t], [""]),
               op("add", [s, (), ()], [t, "double", "Scalar"], ["", "", "1"]),
               op("mul", [s, s], [t, t], ["", ""])]
    found = candidate_for(records, str(path), 6)
    assert found is not None and found.call is not None, found and found.notes
    assert found.call.args == ["x"] and "math.sqrt(2.0)" in found.call.scalars.values()
    module = _load_from_text(tmp_path / "original.py", ERF_GELU_CODE, f"original_erf_gelu_{dtype}")
    kwargs = {k: eval(v, {"math": math}) for k, v in found.call.scalars.items()}
    torch.manual_seed(0)
    x = (2 * torch.randn(SHAPE, device=device)).to(dtype).requires_grad_()
    check = compare(module.gelu, lambda x: found.pattern.fused(x, **kwargs), Inputs((x,), {}, (0,)))
    assert check.ok, check.detail
