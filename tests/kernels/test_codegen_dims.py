"""Generated kernels reduce over any one dim, and a softmax keeps its rows in registers through the
pointwise ops after it: softmax over the channels of a conv output (NCHW, dim=1) + bias, * scale,
sigmoid is one kernel each way, reading and writing NCHW in place (no permuted copies of the
full-size tensors), forward and backward vs eager; and apply rewrites the user's statements."""
import textwrap

import pytest
import torch

from fusion_advisor import apply as apply_mod
from fusion_advisor.kernels.codegen import Unsupported, build_graph, build_pattern, generated, split_supported
from fusion_advisor.kernels.codegen.candidate import candidate_for
from fusion_advisor.core.records import OpRecord
from fusion_advisor.kernels.tolerances import tolerance
from codegen_chains import random_chain
from generated_apply import estimate_plan, kernels_importable, load
from test_codegen import check_chain

pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning",
                                        "ignore:divide by zero encountered:RuntimeWarning",
                                        "ignore:overflow encountered:RuntimeWarning")

NCHW = (2, 6, 5, 7)      # odd sizes: masked lanes in every tile
TYPE = {torch.float32: "float", torch.float16: "c10::Half", torch.bfloat16: "c10::BFloat16"}


def op(name, dims, types, concrete):
    return OpRecord(f"aten::{name}", tuple(tuple(d) for d in dims), tuple(types), tuple(concrete))


def softmax_tail(dtype=torch.float32, shape=NCHW, dim=1, kind="softmax"):
    """What the profiler records for the conv2d-transpose script's tail (checked against a CPU
    profile): softmax over the channels, + a (C,1,1) bias parameter, * a Python float, sigmoid."""
    t, c = TYPE[dtype], (shape[1], 1, 1)
    return [op(kind, [shape, (), ()], [t, "Scalar", ""], ["", str(dim), ""]),
            op("add", [shape, c, ()], [t, t, "Scalar"], ["", "", "1"]),
            op("mul", [shape, ()], [t, "double"], ["", ""]),
            op("sigmoid", [shape], [t], [""])]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
def test_softmax_over_channels_with_its_epilogue_is_one_kernel(dtype, device):
    ops = softmax_tail(dtype)
    assert [len(seg) for seg, _ in split_supported(ops)] == [4]          # not cut after the softmax
    pattern = build_pattern(ops)
    chain = generated(pattern)
    assert chain.graph.reduce_dims == (1, 1) and chain.module.SPEC["reduce_dims"] == (1, 1)
    assert "RED_INNER" in chain.source and ".movedim" not in chain.source.split("def _forward(")[1].split("\n\n")[0]
    check_chain(pattern, device)


@pytest.mark.parametrize("kind,dim", [("softmax", 2), ("log_softmax", 1), ("softmax", 3), ("softmax", -1)])
def test_other_dims_and_log_softmax(kind, dim, device):
    check_chain(build_pattern(softmax_tail(kind=kind, dim=dim)), device)


@pytest.mark.parametrize("reduction,args", [
    ("sum", (["ScalarList", "Scalar", ""], ["[1]", "False", ""])),
    ("sum", (["ScalarList", "Scalar", ""], ["[1]", "True", ""])),
    ("mean", (["ScalarList", "Scalar", ""], ["[2]", "False", ""])),
    ("amax", (["ScalarList", "Scalar"], ["[1]", "True"])),
], ids=["sum1", "sum1-keepdim", "mean2", "amax1-keepdim"])
def test_reductions_over_a_middle_dim(reduction, args, device):
    """x * w (a per-channel weight) + 1, then a reduction over a dim that is not the last."""
    types, concrete = args
    c = (NCHW[1], 1, 1)
    ops = [op("mul", [NCHW, c], ["float", "float"], ["", ""]),
           op("add", [NCHW, ()], ["float", "double"], ["", ""]),
           op(reduction, [NCHW] + [()] * len(types), ["float", *types], ["", *concrete])]
    pattern = build_pattern(ops)
    assert generated(pattern).graph.reduce_dims in ((1, 1), (2, 2))
    check_chain(pattern, device)


@pytest.mark.parametrize("dims,keepdim", [("[2, 3]", "False"), ("[2, 3]", "True"), ("[1, 2]", "False"),
                                         ("[-3, -2]", "True")], ids=["hw", "hw-keepdim", "ch", "ch-neg-keepdim"])
def test_mean_over_a_block_of_adjacent_dims(dims, keepdim, device):
    """A pointwise tail, then `mean(dim=(2, 3))` (a conv net's global average pool) or over (C, H);
    the bias broadcasts over the reduced dims ((C, 1, 1) over H, W; (W,) over C, H)."""
    bias = (NCHW[1], 1, 1) if dims == "[2, 3]" else (NCHW[3],)
    ops = [op("add", [NCHW, bias, ()], ["float", "float", "Scalar"], ["", "", "1"]),
           op("sigmoid", [NCHW], ["float"], [""]),
           op("mean", [NCHW, (), (), ()], ["float", "ScalarList", "Scalar", ""], ["", dims, keepdim, ""])]
    pattern = build_pattern(ops)
    assert generated(pattern).graph.reduce_dims == (None if dims == "[2, 3]" else (1, 2))
    check_chain(pattern, device)


def test_softmax_over_the_last_dim_takes_an_epilogue_too(device):
    s = (3, 4, 33)
    ops = [op("mul", [s, ()], ["float", "double"], ["", ""]),
           op("softmax", [s, (), ()], ["float", "Scalar", ""], ["", "-1", ""]),
           op("mul", [s, s], ["float", "float"], ["", ""])]           # probabilities * a full-size mask
    pattern = build_pattern(ops)
    assert generated(pattern).graph.reduce_dims is None and len(generated(pattern).graph.epilogue) == 1
    check_chain(pattern, device)


def test_an_input_broadcast_over_the_channels_and_w(device):
    """(N, 1, H, 1): kept in rows of the logical (N, H, W | C) loop, broadcast over the reduced dim."""
    ops = [op("softmax", [NCHW, (), ()], ["float", "Scalar", ""], ["", "1", ""]),
           op("mul", [NCHW, (NCHW[0], 1, NCHW[2], 1)], ["float", "float"], ["", ""])]
    check_chain(build_pattern(ops), device)


def test_what_a_strided_reduction_cannot_take_is_refused():
    # (1, C, H, 1) is kept along the reduced dim and some of the others: its gradient would need a
    # per-element buffer in the logical order, which the kernels write in NCHW's.
    odd = (1, NCHW[1], NCHW[2], 1)
    ops = [op("softmax", [NCHW, (), ()], ["float", "Scalar", ""], ["", "1", ""]),
           op("mul", [NCHW, odd], ["float", "float"], ["", ""])]
    with pytest.raises(Unsupported, match=r"reduction over dims \[1\] \(not the last\)"):
        build_pattern(ops)
    apart = op("sum", [NCHW, (), (), ()], ["float", "ScalarList", "Scalar", ""], ["", "[1, 3]", "False", ""])
    with pytest.raises(Unsupported, match="one block of adjacent dims"):
        build_graph([apart])
    # (1, C, 1, 1) kept along C, broadcast along H, all reduced together: not one column vector.
    mixed = [op("mul", [NCHW, (1, NCHW[1], 1, 1)], ["float", "float"], ["", ""]),
             op("sum", [NCHW, (), (), ()], ["float", "ScalarList", "Scalar", ""], ["", "[1, 2]", "False", ""])]
    with pytest.raises(Unsupported, match="kept along some of the reduced dims"):
        build_pattern(mixed)


# -- the user's script: source binding and apply ------------------------------------------------
USER_CODE = textwrap.dedent("""\
    import torch
    import torch.nn as nn


    class Model(nn.Module):
        def __init__(self, channels=6, scaling_factor=2.0):
            super().__init__()
            self.conv_transpose = nn.ConvTranspose2d(3, channels, 3, stride=2, padding=1, output_padding=1)
            self.bias = nn.Parameter(torch.randn(channels, 1, 1))
            self.scaling_factor = scaling_factor

        def forward(self, x):
            x = self.conv_transpose(x)
            x = torch.softmax(x, dim=1)
            x = x + self.bias
            x = x * self.scaling_factor
            x = torch.sigmoid(x)
            return x
    """)
DEF_LINE = 12


def test_the_conv_transpose_script_gets_a_kernel_and_a_source_rewrite(tmp_path, device):
    path = tmp_path / "model.py"
    path.write_text(USER_CODE)
    shape = (2, 6, 8, 10)                                # what the script's conv_transpose2d outputs
    found = candidate_for(softmax_tail(shape=shape), str(path), DEF_LINE, "model.py:12")
    assert found is not None and found.call is not None, found and found.notes
    assert found.call.args == ["x", "self.bias"] and list(found.call.scalars.values()) == ["self.scaling_factor"]
    assert (found.call.first_line, found.call.last_line, found.call.target) == (14, 17, "x")

    plan, diff, stem = estimate_plan(path, found, "model.py:12", "fwd-softmax", "Model", 1, "softmax tail as one kernel")
    assert "-        x = torch.softmax(x, dim=1)" in diff and "-        x = torch.sigmoid(x)" in diff
    assert f"+        x = fused_{stem}(x, self.bias, s0=self.scaling_factor)" in diff
    backup = apply_mod.write(plan, tmp_path)

    original = load(_write(tmp_path / "original.py", USER_CODE), "original_softmax_model")
    with kernels_importable(tmp_path):
        patched = load(path, "patched_softmax_model")
        torch.manual_seed(0)
        want_model = original.Model().to(device)
        got_model = patched.Model().to(device)
        got_model.load_state_dict(want_model.state_dict())
        x = torch.randn(2, 3, 5, 4, device=device)        # other sizes than traced: (2, 6, 10, 8) out
        got, want = got_model(x), want_model(x)
        torch.testing.assert_close(got, want, **tolerance(torch.float32))
        g = torch.randn_like(want)
        got_grads = torch.autograd.grad(got, [*got_model.parameters()], g)
        want_grads = torch.autograd.grad(want, [*want_model.parameters()], g)
        for a, b in zip(got_grads, want_grads):
            torch.testing.assert_close(a, b, **tolerance(torch.float32, 40))
    apply_mod.revert(tmp_path, backup)
    assert path.read_text() == USER_CODE


def _write(path, text):
    path.write_text(text)
    return path


@pytest.mark.parametrize("seed", range(200, 216))
def test_random_chain_with_a_reduction_over_any_dim(seed, device):
    """Random chains ending in a reduction over a random dim (or block of two), softmaxes with
    pointwise ops after them. A broadcast operand the strided layout cannot take is refused by name."""
    ops = random_chain(seed, torch.float32, with_reduction=True, any_dim=True)
    try:
        pattern = build_pattern(ops)
    except Unsupported as exc:
        assert "cannot take" in str(exc) or "kept along some of the reduced dims" in str(exc), exc
        pytest.skip(f"refused: {exc}")
    assert generated(pattern).graph.reduction is not None
    check_chain(pattern, device, seed)


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the tests above compile the kernels for real")
def test_new_kernel_shapes_compile_for_hopper(device):
    """The interpreter runs a kernel as Python; Triton's compiler front end is stricter. The new
    layouts (a strided reduced dim, a block of dims, a softmax epilogue, erf, an autocast fp32 op)
    generate Triton IR for sm_90."""
    from kernel_checks import hopper_compile_errors, recorded_launches
    from test_codegen_oneline import autocast_records

    c = (NCHW[1], 1, 1)
    chains = [
        (softmax_tail(torch.bfloat16), None, False),
        (softmax_tail(kind="log_softmax", dim=2), None, False),
        ([op("add", [NCHW, c, ()], ["float", "float", "Scalar"], ["", "", "1"]),
          op("erf", [NCHW], ["float"], [""]),
          op("mean", [NCHW, (), (), ()], ["float", "ScalarList", "Scalar", ""], ["", "[2, 3]", "True", ""])], None, False),
        ([op("mul", [NCHW, (NCHW[3],)], ["float", "float"], ["", ""]),
          op("sum", [NCHW, (), (), ()], ["float", "ScalarList", "Scalar", ""], ["", "[1, 2]", "False", ""])], None, False),
        (autocast_records(), {(1, 0): "in0", (2, 0): "v1", (3, 0): "in0", (3, 1): "v2", (4, 0): "v3", (5, 0): "v4",
                              (6, 0): "v5", (7, 0): "v0", (7, 1): "v6"}, True),
    ]
    with recorded_launches() as launches:
        for ops, bind, exact in chains:
            pattern = build_pattern(ops, bind=bind, exact=exact)
            inputs = pattern.make_inputs(pattern.example_params, device, True)
            out = pattern.fused(*inputs.args, **inputs.kwargs)
            out.backward(torch.ones_like(out))
    assert len(launches) >= 2 * len(chains)
    errors = hopper_compile_errors(launches)
    assert not errors, "\n\n".join(errors)
