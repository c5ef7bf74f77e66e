"""The Trace on real GPU traces (tests/data, recorded on an H200: see tests/data/README.md)."""
import gzip
import json

import pytest

from fusion_advisor.analyzers.summary import short_kernel_name, summarize
from fusion_advisor.analyzers.trace import Trace
from fusion_advisor.core.errors import TraceError

LLAMA = "llama-bf16-h200.json.gz"
RMSNORM_FWD_OPS = ["aten::to", "aten::pow", "aten::mean", "aten::add", "aten::rsqrt", "aten::mul", "aten::to", "aten::mul"]


@pytest.fixture(scope="module")
def llama(request):
    from conftest import DATA
    return Trace.load(DATA / LLAMA)


def test_run_metadata_travels_in_the_trace(llama):
    assert llama.device_name == "NVIDIA H200"
    info = llama.run_info
    assert info["torch"].startswith("2.11.0") and info["triton"] == "3.6.0" and info["driver"] == "580.159.04"
    assert info["step_source"] == "optimizer"
    assert llama.step_ids == [3, 4] == info["steps_recorded"]


def test_every_kernel_is_linked_to_the_op_that_launched_it(llama):
    k = llama.kernel_ops()
    assert len(k) == 1184
    assert (k["op_row"] >= 0).all()
    assert set(k["step"]) == {3, 4}
    # the launch row is found through the correlation id
    assert (k["launch_row"] >= 0).mean() > 0.99


def test_decomposed_rmsnorm_kernels_have_module_and_source(llama):
    k = llama.kernel_ops()
    fwd = k[k["module_class"].fillna("").str.endswith("RMSNorm") & ~k["backward"].astype(bool)]
    # 4 layers x 2 norms + the final norm, 8 kernels each, 2 steps
    assert len(fwd) == 9 * 8 * 2
    assert set(fwd["source"]) == {"llama_train.py:22"}
    one = fwd[fwd["step"] == 3].sort_values("ts").head(8)
    assert one["op_name"].tolist() == RMSNORM_FWD_OPS
    assert set(fwd["module_class"]) == {"LlamaModel/LlamaDecoderLayer/LlamaRMSNorm", "LlamaModel/LlamaRMSNorm"}


def test_backward_ops_inherit_their_forward_module(llama):
    ops = llama.ops
    bwd = ops[ops["backward"] & (ops["depth"] == 0) & ops["name"].str.contains("PowBackward0")]
    assert len(bwd) == 18
    mods = llama.modules["cls"].to_numpy()[bwd["module_row"].to_numpy()]
    assert set(mods) == {"LlamaRMSNorm"}
    fwd_names = ops["name"].to_numpy()[bwd["fwd_row"].to_numpy()]
    assert set(fwd_names) == {"aten::pow"}


def test_module_hierarchy(llama):
    m = llama.modules
    layer = m[m["cls"] == "LlamaDecoderLayer"]
    assert len(layer) == 4 * 2  # 4 layers, 2 steps
    assert (m["path"].str.count("/") == m["depth"]).all()


def test_summary_figures(llama):
    s = summarize(llama)
    assert s.steps == [3, 4]
    assert s.kernels_per_step == 592
    assert 0 < s.gpu_busy_pct < 100
    assert s.gpu_busy_us_per_step + s.gpu_idle_us_per_step <= s.wall_us_per_step
    assert abs(sum(r["pct"] for r in s.top_modules) - 100) < 1  # every kernel lands in some module row
    assert s.top_modules[0]["module"] == "LlamaModel/LlamaDecoderLayer/LlamaAttention"


def test_short_kernel_name():
    name = ("void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add<float>, "
            "std::array<char*, 3ul> >(int, at::native::CUDAFunctor_add<float>, std::array<char*, 3ul>)")
    assert short_kernel_name(name) == "vectorized_elementwise_kernel<4, CUDAFunctor_add<float>, array<char*, 3ul> >"


@pytest.mark.parametrize("fixture", ["llama-fp32-h200.json.gz", "gpt-bf16-h200.json.gz", "gpt-fp32-h200.json.gz",
                                     "llama-tiny-bf16-h200.json.gz"])
def test_all_fixtures_load_and_link(fixture, data_dir):
    t = Trace.load(data_dir / fixture)
    k = t.kernel_ops()
    assert len(k) > 100 and (k["op_row"] >= 0).all()
    assert t.step_ids == [3, 4]


# -- bad traces: one clear error each ------------------------------------------------------------
def _write(path, data: bytes):
    path.write_bytes(data)
    return path


def test_truncated_trace(tmp_path, data_dir):
    text = gzip.open(data_dir / LLAMA).read()
    p = _write(tmp_path / "t.json", text[: len(text) // 2])
    with pytest.raises(TraceError, match="truncated"):
        Trace.load(p)


def test_truncated_gzip(tmp_path, data_dir):
    raw = (data_dir / LLAMA).read_bytes()
    p = _write(tmp_path / "t.json.gz", raw[: len(raw) // 2])
    with pytest.raises(TraceError, match="gzip stream is truncated"):
        Trace.load(p)


@pytest.mark.parametrize("content,message", [
    (b"", "is empty"),
    (b"hello, not json", "not valid JSON"),
    (b'{"foo": 1}', "not a torch.profiler trace"),
    (json.dumps({"traceEvents": [{"ph": "M", "name": "process_name"}]}).encode(), "nothing to analyse"),
    (b"\xff\xfe\x00binary", "not a JSON trace"),
])
def test_bad_trace_contents(tmp_path, content, message):
    with pytest.raises(TraceError, match=message):
        Trace.load(_write(tmp_path / "t.json", content))


def test_missing_and_folder(tmp_path):
    with pytest.raises(TraceError, match="not found"):
        Trace.load(tmp_path / "nope.json")
    with pytest.raises(TraceError, match="is a folder"):
        Trace.load(tmp_path)


def test_cpu_only_trace_requires_kernels_when_asked(tmp_path, data_dir):
    doc = json.loads(gzip.open(data_dir / LLAMA).read())
    doc["traceEvents"] = [e for e in doc["traceEvents"] if e.get("cat") not in ("kernel", "gpu_memcpy", "gpu_memset")]
    p = tmp_path / "cpu.json"
    p.write_text(json.dumps(doc))
    assert not Trace.load(p).has_gpu
    with pytest.raises(TraceError, match="no GPU kernels"):
        Trace.load(p, require_kernels=True)


def test_trace_without_stacks_loads(tmp_path, data_dir):
    """Recorded without with_stack: no op has a source; loading must still work (pandas 3 hands
    out read-only arrays where pandas 2 did not)."""
    doc = json.loads(gzip.open(data_dir / LLAMA).read())
    doc["traceEvents"] = [e for e in doc["traceEvents"] if e.get("cat") != "python_function"]
    p = tmp_path / "nostack.json"
    p.write_text(json.dumps(doc))
    t = Trace.load(p)
    assert t.modules.empty and t.ops["source"].isna().all()
    assert len(t.kernel_ops()) == 1184
