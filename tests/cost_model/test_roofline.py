"""The roofline: monotone in bytes and FLOPs, memory- vs compute-bound on the right side of the
ridge, the bandwidth curve read correctly, and cluster estimates that add up."""
import pytest

from fusion_advisor.cost_model.device import DeviceProfile, datasheet_profiles
from fusion_advisor.cost_model.ops import OpCost, op_cost
from fusion_advisor.cost_model.roofline import (achieved_bandwidth, cluster_estimate, external_bytes,
                                                is_memory_bound, kernel_time_us, memory_time_us, roofline_point)
from fusion_advisor.kernels import get
from fusion_advisor.core.records import OpRecord

BF16, F32 = "c10::BFloat16", "float"
H200 = datasheet_profiles()["h200"]


def calibrated(curve):
    return DeviceProfile(name="GPU", source="calibrated", hbm_bytes_per_s=4e12, peak_flops={"fp32": 60e12, "bf16_tc": 800e12},
                         launch_us=4.0, min_kernel_us=2.0, l2_bytes=50 << 20, bandwidth_curve=curve,
                         bandwidth_spread=(0.9, 1.05), calibration={"date": "2026-11-22"})


def add(shape, dtype=BF16):
    return OpRecord("aten::add", (shape, shape, ()), (dtype, dtype, "Scalar"), ("", "", "1"))


def test_time_grows_with_bytes_and_flops():
    for profile in (H200, calibrated([(4096, 2e9), (1 << 20, 0.4e12), (64 << 20, 3.5e12), (1 << 32, 4e12)])):
        times = [memory_time_us(b, profile) for b in (1 << 10, 1 << 14, 1 << 20, 1 << 24, 1 << 28, 1 << 33)]
        assert times == sorted(times) and times[0] > 0
        small = kernel_time_us(OpCost(1 << 20, 1 << 20, 1 << 40, tensor_core=True, dtype="bfloat16"), profile)
        big = kernel_time_us(OpCost(1 << 20, 1 << 20, 1 << 42, tensor_core=True, dtype="bfloat16"), profile)
        assert big > small


def test_curve_is_read_between_and_beyond_its_points():
    profile = calibrated([(1000, 1e9), (10_000_000, 2e12)])
    assert memory_time_us(1000, profile) == pytest.approx(1.0)          # 1000 B at 1 GB/s
    assert memory_time_us(10, profile) == pytest.approx(1.0)            # never faster than the smallest kernel
    assert memory_time_us(10_000_000, profile) == pytest.approx(5.0)
    mid = memory_time_us(5_000_500, profile)                             # linear in bytes between points
    assert mid == pytest.approx((1.0 + 5.0) / 2)
    # past the largest point: the asymptotic copy bandwidth
    assert memory_time_us(10_000_000 + 4_000_000, profile) == pytest.approx(5.0 + 1.0)


def test_shortest_kernel_is_the_floor():
    tiny = op_cost(add((4,)))
    assert kernel_time_us(tiny, H200) == pytest.approx(H200.min_kernel_us)
    view = op_cost(OpRecord("aten::view", ((4, 4), ()), (F32, "ScalarList"), ("", "[16]")))
    assert kernel_time_us(view, H200) == 0.0


def test_large_gemm_is_compute_bound_and_an_add_memory_bound():
    gemm = op_cost(OpRecord("aten::mm", ((8192, 8192), (8192, 8192)), (BF16, BF16)))
    elementwise = op_cost(add((4096, 1024)))
    for profile in datasheet_profiles().values():
        assert not is_memory_bound(gemm, profile), profile.name
        assert is_memory_bound(elementwise, profile), profile.name
    # a compute-bound GEMM takes its FLOPs at the dtype's peak
    assert kernel_time_us(gemm, H200) == pytest.approx(2 * 8192 ** 3 / H200.peak_flops["bf16_tc"] * 1e6)
    # a skinny GEMM is memory-bound
    skinny = op_cost(OpRecord("aten::mm", ((16, 8192), (8192, 8192)), (BF16, BF16)))
    assert is_memory_bound(skinny, H200)
    # fp32 without TF32 uses the fp32 CUDA-core rate: slower than bf16
    gemm32 = op_cost(OpRecord("aten::mm", ((8192, 8192), (8192, 8192)), (F32, F32)))
    assert kernel_time_us(gemm32, H200) > 10 * kernel_time_us(gemm, H200)


def test_large_elementwise_runs_at_copy_bandwidth():
    cost = op_cost(add((16384, 8192)))
    t = kernel_time_us(cost, H200)
    assert cost.bytes / (t * 1e-6) == pytest.approx(H200.hbm_bytes_per_s, rel=0.01)


def test_broadcast_pointwise_is_bound_by_its_element_rate():
    same = op_cost(add((8192, 8192)))
    bias = op_cost(OpRecord("aten::add", ((8192, 8192), (8192,), ()), (BF16, BF16, "Scalar"), ("", "", "1")))
    assert bias.bytes < same.bytes
    assert kernel_time_us(bias, H200) > kernel_time_us(same, H200)
    no_rates = DeviceProfile(**{**H200.__dict__, "element_rates": {}})
    assert kernel_time_us(bias, no_rates) < kernel_time_us(same, no_rates)


def test_achieved_bandwidth_and_roofline_point():
    cost = op_cost(add((4096, 1024)))
    bps, pct = achieved_bandwidth(cost, 10.0, H200)
    assert bps == pytest.approx(cost.bytes / 10e-6)
    assert pct == pytest.approx(100 * bps / H200.hbm_bytes_per_s)
    assert achieved_bandwidth(cost, 0.0, H200) == (0.0, 0.0)
    point = roofline_point(cost, 10.0, H200)
    assert point["memory_bound"] and point["bytes_estimate"] == cost.bytes
    assert point["achieved_gbps"] == pytest.approx(bps / 1e9)


RMS_NORM_FWD = [
    OpRecord("aten::to", ((4, 1024, 1024), (), (), (), ()), (BF16, "Scalar", "Scalar", "Scalar", ""),
             ("", "6", "False", "False", "")),
    OpRecord("aten::pow", ((4, 1024, 1024), ()), (F32, "Scalar"), ("", "2")),
    OpRecord("aten::mean", ((4, 1024, 1024), (), (), ()), (F32, "ScalarList", "Scalar", ""), ("", "[-1]", "True", "")),
    OpRecord("aten::add", ((4, 1024, 1), (), ()), (F32, "double", "Scalar"), ("", "", "1")),
    OpRecord("aten::rsqrt", ((4, 1024, 1),), (F32,)),
    OpRecord("aten::mul", ((4, 1024, 1024), (4, 1024, 1)), (F32, F32)),
    OpRecord("aten::to", ((4, 1024, 1024), (), (), (), ()), (F32, "Scalar", "Scalar", "Scalar", ""),
             ("", "15", "False", "False", "")),
    OpRecord("aten::mul", ((1024,), (4, 1024, 1024)), (BF16, BF16)),
]


def test_rms_norm_chain_estimate():
    n, rows = 4 * 1024 * 1024, 4 * 1024
    pattern_bytes = get("rms_norm").fused_bytes({"shape": [4, 1024, 1024], "dtype": "bfloat16"})["forward"]
    est = cluster_estimate(RMS_NORM_FWD, pattern_bytes, H200)
    assert est.profile == "NVIDIA H200 (datasheet)"
    assert est.unknown_ops == []
    assert est.bytes_fused == pattern_bytes
    assert est.bytes_now > 5 * pattern_bytes
    assert est.now_us > est.fused_us > 0
    assert est.saving_us == pytest.approx(est.now_us - est.fused_us)
    assert est.saving_lo_us <= est.saving_us <= est.saving_hi_us
    # without a pattern: the chain's external tensors, x in, weight in, y out (the rstd the
    # pattern also writes is internal to the chain)
    generic = cluster_estimate(RMS_NORM_FWD, None, H200)
    assert generic.bytes_fused == n * 2 + 1024 * 2 + n * 2
    assert pattern_bytes - generic.bytes_fused == 4 * rows


def test_a_traced_time_is_the_savings_starting_point():
    """Eager far slower than its bytes say (a slow path): the trace's time, not the roofline's,
    is what fusing saves from; a CPU trace's zero falls back to the roofline."""
    pattern_bytes = get("rms_norm").fused_bytes({"shape": [4, 1024, 1024], "dtype": "bfloat16"})["forward"]
    roofline = cluster_estimate(RMS_NORM_FWD, pattern_bytes, H200)
    slow = cluster_estimate(RMS_NORM_FWD, pattern_bytes, H200, traced_us=10 * roofline.now_us)
    assert slow.now_us == roofline.now_us and slow.now_traced_us == 10 * roofline.now_us
    assert slow.saving_us == pytest.approx(10 * roofline.now_us - slow.fused_us)
    assert slow.saving_lo_us <= slow.saving_us <= slow.saving_hi_us
    cpu = cluster_estimate(RMS_NORM_FWD, pattern_bytes, H200, traced_us=0.0)
    assert cpu.now_traced_us is None and cpu.saving_us == pytest.approx(roofline.saving_us)


def test_external_bytes_of_swiglu_counts_both_inputs():
    g = (4096, 2816)
    silu = op_cost(OpRecord("aten::silu", (g,), (BF16,)))
    mul = op_cost(OpRecord("aten::mul", (g, g), (BF16, BF16)))
    one = 4096 * 2816 * 2
    assert external_bytes([silu, mul]) == 3 * one              # g and u read, the product written


def test_unknown_ops_are_listed_not_guessed():
    ops = [OpRecord("aten::_foreach_mul_", ((), ()), ("TensorList", "Scalar"), ("", "0.9")), add((1024, 1024))]
    est = cluster_estimate(ops, None, H200)
    assert est.unknown_ops == ["aten::_foreach_mul_"]
    assert est.now_us > 0 and est.fused_us is None and est.saving_us is None
    with_pattern = cluster_estimate(ops, 1 << 20, H200)
    assert with_pattern.fused_us is not None       # a lower bound on the saving: the unknown op is not counted


def test_saving_range_follows_the_bandwidth_spread():
    profile = calibrated([(4096, 2e9), (1 << 20, 0.5e12), (1 << 30, 4e12)])
    est = cluster_estimate(RMS_NORM_FWD, None, profile)
    wide = cluster_estimate(RMS_NORM_FWD, None, DeviceProfile(**{**profile.__dict__, "bandwidth_spread": (0.5, 1.5)}))
    assert wide.saving_us == pytest.approx(est.saving_us)
    assert wide.saving_lo_us < est.saving_lo_us <= est.saving_us <= est.saving_hi_us < wide.saving_hi_us


POINTWISE_AND_ROWS = {"aten::add", "aten::add_", "aten::mul", "aten::silu", "aten::silu_backward", "aten::gelu",
                      "aten::gelu_backward", "aten::pow", "aten::fill_", "aten::div", "aten::masked_fill_",
                      "aten::mean", "aten::gather", "aten::_softmax", "aten::_log_softmax",
                      "aten::_softmax_backward_data", "aten::_log_softmax_backward_data", "aten::native_layer_norm",
                      "aten::native_layer_norm_backward"}


@pytest.mark.parametrize("fixture", ["llama-bf16-h200", "gpt-fp32-h200"])
def test_datasheet_h200_predicts_the_recorded_kernels(data_dir, fixture):
    """Against real H200 kernel durations: the memory-bound kernels of 5 µs and more (pointwise,
    softmax, LayerNorm; column reductions and latency-bound losses excepted: a roofline misses
    them). Predictions are back-to-back times, so they run ~1 µs above a recorded duration."""
    from fusion_advisor.analyzers.trace import Trace

    def tup(x):
        return tuple(tup(v) for v in x) if isinstance(x, (list, tuple)) else x
    trace = Trace.load(data_dir / f"{fixture}.json.gz")
    ops, k = trace.ops, trace.kernels[trace.kernels["kind"] == "kernel"]
    errors = []
    for row, measured in k.groupby("op_row")["dur"].sum().items():
        if row < 0 or ops.at[row, "name"] not in POINTWISE_AND_ROWS or measured < 5:
            continue
        record = OpRecord(ops.at[row, "name"], tup(ops.at[row, "input_dims"] or ()),
                          tuple(ops.at[row, "input_types"] or ()), tuple(ops.at[row, "concrete"] or ()))
        errors.append(abs(kernel_time_us(op_cost(record), H200) - measured) / measured)
    errors.sort()
    assert len(errors) > 100
    assert errors[len(errors) // 2] < 0.20                 # median
    assert errors[int(0.9 * len(errors))] < 0.40           # p90
