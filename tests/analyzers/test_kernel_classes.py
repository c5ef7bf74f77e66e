"""Kernel classes on the real H200 traces: every kernel gets a class, and the known families land
where they belong."""
import pytest

from fusion_advisor.analyzers.kernel_classes import CLASSES, class_summary, classify, kernel_class
from fusion_advisor.analyzers.trace import Trace

FIXTURES = ["llama-bf16-h200", "llama-fp32-h200", "gpt-bf16-h200", "gpt-fp32-h200", "llama-tiny-bf16-h200"]


@pytest.fixture(scope="module")
def traces(request):
    data = request.config.rootpath / "tests" / "data"
    return {name: Trace.load(data / f"{name}.json.gz") for name in FIXTURES}


def by_name(trace):
    cls = classify(trace)
    ops = trace.ops["name"].tolist()
    return [(name, ops[row] if row >= 0 else None, c)
            for name, row, c in zip(trace.kernels["name"], trace.kernels["op_row"], cls)]


def test_every_kernel_is_classified(traces):
    for name, trace in traces.items():
        cls = classify(trace)
        assert len(cls) == len(trace.kernels) > 0, name
        assert set(cls) <= set(CLASSES), name
        # "other" is the exception: only embedding backward's sort helpers land there
        others = {op for _, op, c in by_name(trace) if c == "other"}
        assert others <= {"aten::embedding_dense_backward"}, (name, others)


def test_known_families(traces):
    rows = [r for t in traces.values() for r in by_name(t)]
    for kname, op, c in rows:
        if kname.startswith("nvjet_") or "cutlass_80_simt_sgemm" in kname or "xmma_gemm" in kname:
            assert c == "gemm", kname
        if "sdpa" in kname or kname.startswith("fmha_cutlass") or op in ("aten::_cudnn_attention_backward",
                                                                          "aten::_cudnn_attention_forward"):
            assert c in ("attention", "memset"), kname
        if "multi_tensor_apply_kernel" in kname or "vectorized_elementwise_kernel" in kname:
            assert c == "elementwise", kname
        if "layer_norm" in kname or "GammaBeta" in kname:
            assert c == "normalization", kname
        if "softmax_warp" in kname:
            assert c == "softmax", kname
        if kname.startswith("Memcpy"):
            assert c == "memcpy"
        if kname.startswith("Memset"):
            assert c == "memset"
    # splitKreduce belongs to the GEMM that launched it, cudnn's helpers to attention
    assert kernel_class("void cublasLt::splitKreduce_kernel<32, 16>", "aten::mm") == "gemm"
    assert kernel_class("void cudnn::fusion::convert_dq_to_16bits<true>(void const*)",
                        "aten::_cudnn_attention_backward") == "attention"
    assert kernel_class("void at::native::reduce_kernel<512, 1>", "aten::sum") == "reduction"
    assert kernel_class("ncclDevKernel_AllReduce_Sum_bf16_RING_LL(ncclDevKernelArgs)", None) == "communication"
    assert kernel_class("triton_poi_fused_add_mul_0", None) == "triton"
    assert kernel_class("sm90_xmma_fprop_implicit_gemm_bf16", "aten::cudnn_convolution") == "conv"
    assert kernel_class("some_custom_kernel", None) == "other"


def test_class_summary_per_step(traces):
    trace = traces["llama-bf16-h200"]
    rows = class_summary(trace)
    assert [r["class"] for r in rows][:2] == ["elementwise", "gemm"]
    assert sum(r["pct"] for r in rows) == pytest.approx(100.0)
    steps = trace.step_ids
    k = trace.kernels[trace.kernels["step"].isin(steps)]
    assert sum(r["calls_per_step"] for r in rows) == pytest.approx(len(k) / len(steps))
    assert sum(r["measured_us_per_step"] for r in rows) == pytest.approx(k["dur"].sum() / len(steps))
