"""Cost rules: bytes and FLOPs of representative ops, checked against hand-computed numbers, and
every op that launches a kernel in the real traces priced or named as unknown."""
import dataclasses

import pytest

from fusion_advisor.analyzers.trace import Trace
from fusion_advisor.cost_model.ops import TensorSpec, op_cost, unknown_reason
from fusion_advisor.core.records import OpRecord

BF16, F32, I64 = "c10::BFloat16", "float", "long int"


def rec(name, dims, types, concrete=None):
    return OpRecord(name, tuple(dims), tuple(types), tuple(concrete or [""] * len(types)))


def test_bf16_add_with_a_broadcast_bias():
    cost = op_cost(rec("aten::add", [(4096, 1024), (1024,), ()], [BF16, BF16, "Scalar"], ["", "", "1"]))
    # read x (4096*1024*2) and the bias once (1024*2); write the output once.
    assert cost.bytes_read == 4096 * 1024 * 2 + 1024 * 2
    assert cost.bytes_written == 4096 * 1024 * 2
    assert cost.flops == 4096 * 1024
    assert cost.kernels == 1 and not cost.tensor_core
    # a broadcast operand sends PyTorch through its generic strided loop
    assert cost.loop == "strided" and cost.loop_elements == 4096 * 1024


def test_same_shape_add_and_scalar_mul_are_plain_vectorized_kernels():
    add = op_cost(rec("aten::add", [(8, 512, 768), (8, 512, 768), ()], [BF16, BF16, "Scalar"], ["", "", "1"]))
    assert add.bytes == 3 * 8 * 512 * 768 * 2 and add.loop is None
    # mul by a Python float: a 0-dim wrapped double, a kernel argument; the result stays bf16
    mul = op_cost(rec("aten::mul", [(8, 12, 512, 512), ()], [BF16, "double"]))
    n = 8 * 12 * 512 * 512
    assert (mul.bytes_read, mul.bytes_written) == (n * 2, n * 2) and mul.writes[0].dtype == "bfloat16"
    assert mul.loop is None


def test_in_place_add_reads_both_and_writes_self():
    cost = op_cost(rec("aten::add_", [(4, 1024, 1024), (4, 1024, 1024), ()], [F32, F32, "Scalar"], ["", "", "1"]))
    n = 4 * 1024 * 1024
    assert (cost.bytes_read, cost.bytes_written) == (2 * n * 4, n * 4)


def test_fill_writes_only():
    cost = op_cost(rec("aten::fill_", [(4096, 1024), ()], [F32, "Scalar"], ["", "0"]))
    assert (cost.bytes_read, cost.bytes_written) == (0, 4096 * 1024 * 4)


def test_masked_fill_in_place_reads_self_and_mask():
    cost = op_cost(rec("aten::masked_fill_", [(8, 12, 512, 512), (512, 512), ()], [BF16, "bool", "Scalar"],
                       ["", "", "-inf"]))
    n = 8 * 12 * 512 * 512
    assert cost.bytes_read == n * 2 + 512 * 512
    assert cost.bytes_written == n * 2


def test_casts_and_no_op_to():
    up = op_cost(rec("aten::to", [(4, 1024, 1024), (), (), (), ()], [BF16, "Scalar", "Scalar", "Scalar", ""],
                     ["", "6", "False", "False", ""]))
    n = 4 * 1024 * 1024
    assert (up.bytes_read, up.bytes_written) == (n * 2, n * 4) and up.writes[0].dtype == "float32"
    same = op_cost(rec("aten::to", [(4, 1024, 1024), (), (), (), ()], [F32, "Scalar", "Scalar", "Scalar", ""],
                       ["", "6", "False", "False", ""]))
    assert (same.bytes, same.kernels) == (0, 0)       # returns self: no kernel
    copy = op_cost(rec("aten::copy_", [(8, 512, 768), (8, 512, 768), ()], [BF16, F32, "Scalar"], ["", "", "False"]))
    m = 8 * 512 * 768
    assert (copy.bytes_read, copy.bytes_written) == (m * 4, m * 2)


def test_reductions():
    mean = op_cost(rec("aten::mean", [(4, 1024, 1024), (), (), ()], [F32, "ScalarList", "Scalar", ""],
                       ["", "[-1]", "True", ""]))
    assert (mean.bytes_read, mean.bytes_written) == (4 * 1024 * 1024 * 4, 4 * 1024 * 4)
    bias_grad = op_cost(rec("aten::sum", [(4096, 768), (), (), ()], [BF16, "ScalarList", "Scalar", ""],
                            ["", "[0]", "True", ""]))
    assert (bias_grad.bytes_read, bias_grad.bytes_written) == (4096 * 768 * 2, 768 * 2)
    total = op_cost(rec("aten::sum", [(4096, 768)], [BF16]))
    assert total.bytes_written == 2
    to_fp32 = op_cost(rec("aten::sum", [(64, 32), (), (), ()], [BF16, "ScalarList", "Scalar", "Scalar"],
                          ["", "[1]", "False", "6"]))
    assert to_fp32.writes[0] == TensorSpec((64,), "float32")


def test_softmax_forward_and_backward():
    n = 8 * 12 * 512 * 512
    fwd = op_cost(rec("aten::_softmax", [(8, 12, 512, 512), (), ()], [BF16, "Scalar", "Scalar"], ["", "-1", "False"]))
    assert (fwd.bytes_read, fwd.bytes_written) == (n * 2, n * 2)
    half_to_float = op_cost(rec("aten::_softmax", [(8, 12, 512, 512), (), ()], [BF16, "Scalar", "Scalar"],
                                ["", "-1", "True"]))
    assert half_to_float.bytes_written == n * 4
    bwd = op_cost(rec("aten::_softmax_backward_data", [(8, 12, 512, 512), (8, 12, 512, 512), (), ()],
                      [BF16, BF16, "Scalar", "Scalar"], ["", "", "-1", "15"]))
    assert (bwd.bytes_read, bwd.bytes_written) == (2 * n * 2, n * 2)


def test_layer_norm_forward_and_its_two_backward_passes():
    x = (8, 512, 768)
    n, rows = 8 * 512 * 768, 8 * 512
    fwd = op_cost(rec("aten::native_layer_norm", [x, (), (768,), (768,), ()],
                      [BF16, "ScalarList", BF16, BF16, "Scalar"], ["", "[768]", "", "", "1e-05"]))
    assert fwd.bytes_read == n * 2 + 2 * 768 * 2
    assert fwd.bytes_written == n * 2 + 2 * rows * 4        # y, then mean and rstd in fp32
    bwd = op_cost(rec("aten::native_layer_norm_backward", [x, x, (), (8, 512, 1), (8, 512, 1), (768,), (768,), ()],
                      [BF16, BF16, "ScalarList", F32, F32, BF16, BF16, "ScalarList"],
                      ["", "", "[768]", "", "", "", "", "[True, True, True]"]))
    stats = 2 * rows * 4
    # grad_input pass: dy, x, mean, rstd, weight; gamma/beta pass: dy, x, mean, rstd
    assert bwd.bytes_read == (2 * n * 2 + stats + 768 * 2) + (2 * n * 2 + stats)
    assert bwd.bytes_written == n * 2 + 2 * 768 * 2
    assert bwd.kernels == 2


def test_matmuls():
    mm = op_cost(rec("aten::mm", [(4096, 768), (768, 3072)], [BF16, BF16]))
    assert mm.flops == 2 * 4096 * 768 * 3072
    assert mm.bytes_read == (4096 * 768 + 768 * 3072) * 2 and mm.bytes_written == 4096 * 3072 * 2
    assert mm.tensor_core and mm.dtype == "bfloat16"
    addmm = op_cost(rec("aten::addmm", [(768,), (4096, 768), (768, 768), (), ()], [F32, F32, F32, "Scalar", "Scalar"],
                        ["", "", "", "1", "1"]))
    assert addmm.flops == 2 * 4096 * 768 * 768 + 2 * 4096 * 768
    assert addmm.bytes_read == (768 + 4096 * 768 + 768 * 768) * 4
    assert not addmm.tensor_core                     # fp32 GEMMs: CUDA cores unless TF32 is allowed
    bmm = op_cost(rec("aten::bmm", [(96, 512, 64), (96, 64, 512)], [BF16, BF16]))
    assert bmm.flops == 2 * 96 * 512 * 512 * 64 and bmm.bytes_written == 96 * 512 * 512 * 2
    linear = op_cost(rec("aten::linear", [(8, 512, 768), (2304, 768), (2304,)], [BF16, BF16, BF16]))
    assert linear.flops == 2 * 4096 * 768 * 2304 + 4096 * 2304
    assert linear.writes[0].shape == (8, 512, 2304)


def test_conv2d_output_shape_and_flops():
    conv = op_cost(rec("aten::convolution", [(8, 64, 56, 56), (128, 64, 3, 3), (128,), (), (), (), (), (), ()],
                       [BF16, BF16, BF16, "ScalarList", "ScalarList", "ScalarList", "Scalar", "ScalarList", "Scalar"],
                       ["", "", "", "[2, 2]", "[1, 1]", "[1, 1]", "False", "[0, 0]", "1"]))
    assert conv.writes[0].shape == (8, 128, 28, 28)
    assert conv.flops == 2 * (8 * 128 * 28 * 28) * 64 * 9


def test_causal_attention_counts_the_visible_pairs():
    q = (4, 8, 1024, 128)
    cost = op_cost(rec("aten::_cudnn_attention_forward", [q, q, q] + [()] * 10,
                       [BF16] * 3 + ["", "", "", "Scalar", "Scalar", "Scalar", "Scalar", "Scalar", "Scalar", ""],
                       ["", "", "", "", "", "", "1024", "1024", "True", "0.", "True", "False", ""]))
    pairs = 1024 * 1025 // 2
    assert cost.flops == 2 * 4 * 8 * pairs * (128 + 128)
    assert cost.bytes_read == 3 * 4 * 8 * 1024 * 128 * 2


def test_embedding_backward_and_gather():
    bwd = op_cost(rec("aten::embedding_dense_backward", [(4, 1024, 1024), (4, 1024), (), (), ()],
                      [BF16, I64, "Scalar", "Scalar", "Scalar"], ["", "", "1024", "-1", "False"]))
    assert bwd.bytes_read == 4 * 1024 * 1024 * 2 + 4 * 1024 * 8
    assert bwd.bytes_written == 1024 * 1024 * 2
    # index_select lowered to gather: the index is expanded over the row, read once per row
    gather = op_cost(rec("aten::gather", [(1024, 768), (), (4096, 768), (), (4096, 768)],
                         [BF16, "Scalar", I64, "Scalar", BF16], ["", "0", "", "False", ""]))
    assert gather.bytes_read == 4096 * 8 + 4096 * 768 * 2
    assert gather.bytes_written == 4096 * 768 * 2


def test_cat_needs_a_dtype_the_trace_does_not_record():
    cat = rec("aten::cat", [[(4, 8, 1024, 64), (4, 8, 1024, 64)], ()], ["TensorList", "Scalar"], ["", "-1"])
    assert op_cost(cat) is None
    assert "TensorList" in unknown_reason(cat)
    priced = op_cost(cat, dtype_hint="bfloat16")
    n = 4 * 8 * 1024 * 64
    assert (priced.bytes_read, priced.bytes_written) == (2 * n * 2, 2 * n * 2)


@pytest.mark.parametrize("op", [
    rec("aten::_foreach_add_", [(), ()], ["TensorList", "Scalar"], ["", "1e-08"]),
    rec("aten::_local_scalar_dense", [()], [F32]),
    rec("aten::some_new_op", [(4, 4)], [F32]),
    rec("aten::mm", [(4, 4)], [F32]),                       # a record that does not fit the rule
])
def test_ops_without_a_rule_are_unknown_with_a_reason(op):
    assert op_cost(op) is None
    assert unknown_reason(op)


def test_views_cost_nothing():
    cost = op_cost(rec("aten::transpose", [(4, 8, 16), (), ()], [F32, "Scalar", "Scalar"], ["", "1", "2"]))
    assert (cost.bytes, cost.flops, cost.kernels) == (0, 0, 0)
    assert unknown_reason(rec("aten::view", [(4,)], [F32])) == ""


def _kernel_ops(trace):
    ops = trace.ops

    def tup(x):
        return tuple(tup(v) for v in x) if isinstance(x, (list, tuple)) else x
    for row in sorted({int(r) for r in trace.kernels["op_row"] if r >= 0}):
        yield OpRecord(ops.at[row, "name"], tup(ops.at[row, "input_dims"] or ()),
                       tuple(ops.at[row, "input_types"] or ()), tuple(ops.at[row, "concrete"] or ()))


@pytest.mark.parametrize("fixture", ["llama-bf16-h200", "gpt-fp32-h200"])
def test_every_kernel_launching_op_in_real_traces_is_priced_or_explained(data_dir, fixture):
    trace = Trace.load(data_dir / f"{fixture}.json.gz")
    unpriced = {}
    for op in _kernel_ops(trace):
        cost = op_cost(op, dtype_hint="bfloat16")
        if cost is None:
            unpriced[op.name] = unknown_reason(op, "bfloat16")
        else:
            assert cost.kernels >= 1 and cost.bytes > 0, op
    # Only what the profiler cannot describe: foreach TensorLists and device-to-host syncs.
    assert set(unpriced) <= {"aten::_local_scalar_dense"} | {n for n in unpriced if n.startswith("aten::_foreach_")}
    assert all(unpriced.values())


@dataclasses.dataclass(frozen=True)
class StridedRecord(OpRecord):
    """An OpRecord with the trace's Input Strides (a field OpRecord may grow)."""

    strides: tuple = ()


def test_strides_tell_a_transposing_copy_from_a_plain_one():
    shape = (4, 8, 1024, 128)
    contiguous = (1048576, 131072, 128, 1)
    permuted = (1048576, 128, 1024, 1)        # (B, S, H, D) memory viewed as (B, H, S, D)
    plain = op_cost(StridedRecord("aten::copy_", (shape, shape, ()), (BF16, BF16, "Scalar"), ("", "", "False"),
                                  strides=(contiguous, contiguous, ())))
    transposing = op_cost(StridedRecord("aten::copy_", (shape, shape, ()), (BF16, BF16, "Scalar"),
                                        ("", "", "False"), strides=(contiguous, permuted, ())))
    assert plain.bytes == transposing.bytes
    assert plain.loop is None and transposing.loop == "strided"
    # both operands permuted the same way: still one flat loop
    same = op_cost(StridedRecord("aten::mul", (shape, shape), (BF16, BF16), strides=(permuted, permuted)))
    assert same.loop is None
    # a slice of the last dim (rotate_half's x[..., 64:]) is not dense
    half = (4, 8, 1024, 64)
    sliced = op_cost(StridedRecord("aten::neg", (half,), (BF16,), strides=(permuted,)))
    assert sliced.loop == "strided"
