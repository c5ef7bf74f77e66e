"""Clusters on the real H200 fixtures: chains found, merged across layers and steps, matched to a
pattern and priced (tests/data/README.md says how each fixture was recorded)."""
import gzip
import json

import pytest

from fusion_advisor.analyzers.clusters import feeds, related, find_clusters
from fusion_advisor.kernels.lookup import pattern_lookup
from fusion_advisor.analyzers.trace import Trace
from fusion_advisor.cost_model.device import load_profile
from fusion_advisor.kernels import get as get_pattern

RMSNORM_FWD_LEAF_OPS = ["aten::copy_", "aten::pow", "aten::mean", "aten::add", "aten::rsqrt", "aten::mul",
                        "aten::copy_", "aten::mul"]
BREAKERS = {"gemm", "attention", "conv", "communication"}


def _findings(name):
    from conftest import DATA
    trace = Trace.load(DATA / name)
    return trace, find_clusters(trace, load_profile(gpu_name=trace.device_name), pattern_lookup())


@pytest.fixture(scope="module")
def llama():
    return _findings("llama-bf16-h200.json.gz")


@pytest.fixture(scope="module")
def gpt():
    return _findings("gpt-bf16-h200.json.gz")


def _one(clusters, **want):
    found = [c for c in clusters if all(getattr(c, k) == v for k, v in want.items())]
    assert len(found) == 1, [(c.id, c.pattern, c.direction, c.module_class) for c in clusters]
    return found[0]


def test_decomposed_rmsnorm_is_one_forward_cluster(llama):
    trace, f = llama
    c = _one(f.clusters, pattern="rms_norm", direction="forward")
    with_add = _one(f.clusters, pattern="add_rms_norm", direction="forward")
    # 4 layers x 2 norms + the final norm: all but the first layer's input norm follow a residual
    # add, and add_rms_norm (registered) covers both sides, so those 8 take the add along.
    assert c.occurrences_per_step == 1 and with_add.occurrences_per_step == 8
    assert len(c.kernels) == 8 and c.launches_per_step == 8
    assert len(with_add.kernels) == 9 and with_add.launches_per_step == 72
    assert [op["name"] for op in c.ops] == RMSNORM_FWD_LEAF_OPS
    assert [op["name"] for op in with_add.ops] == ["aten::add"] + RMSNORM_FWD_LEAF_OPS
    assert c.module_class == "LlamaModel/LlamaDecoderLayer/LlamaRMSNorm"
    assert c.source == "llama_train.py:22"
    assert c.dtypes == ["bfloat16", "float32"]
    assert c.pattern_params["shape"] == [4, 1024, 1024] and c.pattern_params["dtype"] == "bfloat16"
    assert "GEMM" in c.split_reason
    # measured time: every forward RMSNorm kernel of the two steps, plus the 8 residual adds
    k = trace.kernel_ops()
    fwd = k[k["module_class"].fillna("").str.endswith("LlamaRMSNorm") & ~k["backward"].astype(bool)]
    both = c.measured_us_per_step + with_add.measured_us_per_step
    assert both > fwd["dur"].sum() / 2
    assert c.measured_us_per_occurrence == pytest.approx(c.measured_us_per_step, abs=0.01)
    # priced with the pattern's exact fused bytes, on the trace's own GPU
    pattern = get_pattern("rms_norm")
    assert c.estimate.bytes_fused == pattern.fused_bytes(c.pattern_params)["forward"]
    assert c.estimate.profile == "NVIDIA H200 (calibrated 2026-11-22)"  # cost_model/profiles
    assert c.estimate.bytes_now > 4 * c.estimate.bytes_fused
    assert 0 < c.estimate.fused_us < c.estimate.now_us
    assert c.estimate.saving_lo_us <= c.estimate.saving_us <= c.estimate.saving_hi_us
    assert c.estimate.unknown_ops == []
    # the saving starts from what the trace measured, not from the roofline's "now"
    assert c.estimate.now_traced_us == pytest.approx(c.measured_us_per_occurrence, abs=1e-3)
    assert c.estimate.saving_us == pytest.approx(c.measured_us_per_occurrence - c.estimate.fused_us, abs=1e-3)


def test_rmsnorm_backward_is_matched_through_its_forward_ops(llama):
    trace, f = llama
    c = _one(f.clusters, pattern="rms_norm", direction="backward")
    assert c.occurrences_per_step == 9   # the final norm's backward has the same kernels as the layers'
    assert c.pattern_params == _one(f.clusters, pattern="rms_norm", direction="forward").pattern_params
    assert c.estimate.bytes_fused == get_pattern("rms_norm").fused_bytes(c.pattern_params)["backward"]
    names = [op["name"] for op in c.ops]
    # the weight gradient's reduction and x's internal gradient accumulation (pow and mul both read
    # x) are in; the residual stream's accumulation after the norm is not
    assert names[:3] == ["aten::mul", "aten::mul", "aten::sum"] and names.count("aten::add_") == 1
    assert names[-1] == "aten::copy_"
    rows = f.kernel_cluster[f.kernel_cluster == c.id].index
    assert trace.kernel_ops().loc[rows, "module_class"].str.endswith("LlamaRMSNorm").all()


def test_gemms_are_never_inside_a_cluster(llama, gpt):
    for trace, f in (llama, gpt):
        inside = f.kernel_cluster.notna()
        assert inside.sum() > 100
        assert not f.kernel_classes[inside].isin(BREAKERS).any()
        # every clustered kernel is memory-bound
        assert f.kernel_memory_bound[inside].all()


def test_repeated_layers_merge_with_their_count(llama):
    _, f = llama
    ids = [c.id for c in f.clusters]
    assert len(ids) == len(set(ids))
    rope = _one(f.clusters, direction="forward", module_class="LlamaModel/LlamaDecoderLayer/LlamaAttention")
    assert rope.occurrences_per_step == 4 and len(rope.kernels) == 10
    assert [op["name"] for op in rope.ops].count("aten::neg") == 2    # q and k rotated in one cluster
    # SwiGLU: up_proj's GEMM runs between silu and mul, reads neither, and is stepped over
    swiglu = _one(f.clusters, direction="forward", module_class="LlamaModel/LlamaDecoderLayer/LlamaMLP")
    assert [op["name"] for op in swiglu.ops] == ["aten::silu", "aten::mul"]
    assert swiglu.occurrences_per_step == 4


def test_clusters_are_ranked_by_estimated_saving_per_step(llama):
    _, f = llama
    savings = [c.estimate.saving_us * c.occurrences_per_step for c in f.clusters if c.estimate.saving_us is not None]
    assert savings == sorted(savings, reverse=True)
    assert f.clusters[0].pattern == "rms_norm"


def test_gpt_layernorm_and_softmax_chains(gpt):
    trace, f = gpt
    # nn.LayerNorm is one kernel: it is worth fusing only with the residual add before it
    add_ln = [c for c in f.clusters if [op["name"] for op in c.ops] == ["aten::add", "aten::native_layer_norm"]]
    assert len(add_ln) == 1
    ln = add_ln[0]
    assert ln.direction == "forward" and ln.module_class == "GPT/Block/LayerNorm"
    assert ln.occurrences_per_step == 8   # 2 per block (the first block's ln_1 follows the embeddings) + ln_f
    assert ln.pattern in (None, "add_layer_norm")
    # the hand-written attention's scale -> mask -> softmax chain, forward and backward
    sm = [c for c in f.clusters if any(op["name"] == "aten::_softmax" for op in c.ops)]
    assert len(sm) == 1 and sm[0].occurrences_per_step == 4
    assert [op["name"] for op in sm[0].ops] == ["aten::mul", "aten::bitwise_not", "aten::copy_",
                                                "aten::masked_fill_", "aten::_softmax"]
    assert sm[0].pattern in (None, "softmax")
    assert any(op["name"] == "aten::_softmax_backward_data" for c in f.clusters for op in c.ops)
    ln_bwd = _one(f.clusters, direction="backward", module_class="GPT/Block/LayerNorm")
    assert len(ln_bwd.kernels) == 2 and ln_bwd.occurrences_per_step == 9


def test_gpt_gelu_stands_alone_between_two_gemms(gpt):
    """The bias is fused into cuBLAS's epilogue (addmm), so GELU is one kernel between two GEMMs:
    no chain to fuse in either direction."""
    trace, f = gpt
    k = trace.kernel_ops()
    gelu = k["name"].str.contains("Gelu")
    assert gelu.sum() == 16   # 4 blocks x (forward + backward) x 2 steps
    assert f.kernel_cluster[gelu].isna().all()


def test_cluster_ids_are_stable_and_cpu_traces_find_the_same_chains(llama, tmp_path, data_dir):
    """An id is a hash of the chain's signature (ops, shapes, dtypes, module classes), nothing
    of the run: the same run without its GPU events gives the same chains the same ids."""
    _, f = llama
    doc = json.loads(gzip.open(data_dir / "llama-bf16-h200.json.gz").read())
    doc["traceEvents"] = [e for e in doc["traceEvents"] if e.get("cat") not in ("kernel", "gpu_memcpy", "gpu_memset")]
    path = tmp_path / "cpu.json"
    path.write_text(json.dumps(doc))
    cpu = find_clusters(Trace.load(path), load_profile(target="h100"), pattern_lookup())
    by_id = {c.id: c for c in cpu.clusters}
    for pattern, direction in (("rms_norm", "forward"), ("rms_norm", "backward")):
        gpu_c = _one(f.clusters, pattern=pattern, direction=direction)
        cpu_c = by_id[gpu_c.id]
        assert cpu_c.occurrences_per_step == gpu_c.occurrences_per_step
        assert cpu_c.measured_us_per_step == 0 and cpu_c.launches_per_step == 0
        assert cpu_c.estimate.profile == "NVIDIA H100 SXM (datasheet)"
        assert cpu_c.estimate.saving_us > 0


def test_shape_links():
    assert related((2, 128, 256), (2, 128, 1))        # keepdim reduction
    assert related((2, 4, 128, 32), (2, 4, 128, 64))  # a slice of the last dim
    assert related((512, 512), (8, 12, 512, 512))     # a broadcast mask
    assert related((4096, 768), (8, 512, 768))        # a view
    assert not related((1, 128, 64), (2, 128, 256))
    assert not related((), (2, 128, 256))             # scalars link nothing
    assert feeds((8, 512, 768), (4096, 768)) and not feeds((2, 128, 1), (2, 128, 256))


def test_a_pattern_that_spans_a_module_boundary_joins_the_pieces(llama, monkeypatch):
    """Rule 4a: once a pattern covers residual add + RMSNorm, the add before a norm joins it; the
    first layer's input norm (no add before it) stays rms_norm. A stand-in pattern: the real
    add_rms_norm is written elsewhere, with the same interface."""
    from dataclasses import replace

    from fusion_advisor.kernels import registry

    rms = get_pattern("rms_norm")

    def params(ops):
        base = rms.params_from_ops(ops)
        return None if base is None else dict(base, residual=True)

    add_rms = replace(rms, name="add_rms_norm", forward_signature=r"add to pow mean add rsqrt mul",
                      params_from_ops=params, fused_bytes=lambda p: {"forward": 123, "backward": 456})
    monkeypatch.setitem(registry._REGISTRY, "add_rms_norm", add_rms)
    trace, _ = llama
    f = find_clusters(trace, load_profile(gpu_name=trace.device_name), pattern_lookup())
    joined = _one(f.clusters, pattern="add_rms_norm", direction="forward")
    assert [op["name"] for op in joined.ops] == ["aten::add"] + RMSNORM_FWD_LEAF_OPS
    assert joined.occurrences_per_step == 8 and joined.pattern_params["residual"] is True
    assert joined.estimate.bytes_fused == 123
    alone = _one(f.clusters, pattern="rms_norm", direction="forward")
    assert alone.occurrences_per_step == 1
    # backward: the residual's gradient accumulation stays outside, the norm's backward unchanged
    assert _one(f.clusters, pattern="rms_norm", direction="backward").occurrences_per_step == 9


def test_optimizer_range_is_its_own_chain(llama):
    """AdamW(foreach=True): 8 multi-tensor kernels run back to back inside the optimizer's
    record_function range; the profiler records no shapes for long TensorLists, so they are
    linked on order and range, and stay unpriced (the cost model does not guess)."""
    trace, f = llama
    opt = _one(f.clusters, module_class="Optimizer.step#AdamW.step")
    assert [op["name"] for op in opt.ops][:2] == ["aten::_foreach_mul_", "aten::_foreach_lerp_"]
    assert len(opt.ops) == 8 and opt.estimate.saving_us is None and len(opt.estimate.unknown_ops) == 8
    assert f.clusters[-1].estimate.saving_us is None   # unpriced clusters rank last


def test_hf_swiglu_spans_the_act_fn_module():
    """HF's LlamaMLP runs act_fn (a module of its own) on gate_proj's output, then up_proj's GEMM
    (stepped over), then the mul in LlamaMLP: one SwiGLU cluster across the two modules."""
    _, f = _findings("hf-llama-tiny-bf16-h200.json.gz")
    swiglu = _one(f.clusters, pattern="swiglu", direction="forward")
    assert [op["name"] for op in swiglu.ops] == ["aten::silu", "aten::mul"]
    assert swiglu.module_class.endswith("LlamaDecoderLayer/LlamaMLP") and swiglu.occurrences_per_step == 2


@pytest.mark.parametrize("name, hidden, vocab, tokens", [("hf-llama-tiny-bf16-h200.json.gz", 256, 1024, 256),
                                                         ("llama-bf16-h200.json.gz", 1024, 1024, 4096)])
def test_lm_head_and_loss_make_a_linear_cross_entropy_candidate(name, hidden, vocab, tokens):
    """The LM head's aten::linear whose (tokens, vocab) output the cross-entropy read (HF's
    ForCausalLMLoss, our example's F.cross_entropy(logits.float())) becomes one memory-trade
    cluster with the loss's cluster, its GEMM's time included."""
    _, f = _findings(name)
    loss = _one(f.clusters, pattern="cross_entropy", direction="forward")
    lce = _one(f.clusters, pattern="linear_cross_entropy")
    assert lce.pattern_params == {"tokens": tokens, "hidden": hidden, "vocab": vocab, "dtype": "bfloat16",
                                  "bias": False, "reduction": "mean", "ignore_index": -100, "ignored": 0.1,
                                  "grad_weight_fp32": False}
    assert lce.ops[0]["name"] == "aten::linear" and lce.ops[1:] == loss.ops
    assert not lce.memory_bound and lce.measured_us_per_step > loss.measured_us_per_step


def test_a_linear_that_did_not_make_the_logits_is_not_an_lm_head():
    """The nearest linear before the loss is the head only when its output is the loss's
    (tokens, vocab) logits."""
    from fusion_advisor.analyzers.lm_head_loss import _head_row
    from fusion_advisor.kernels.linear_cross_entropy import params_from_lm_head
    _, f = _findings("hf-llama-tiny-bf16-h200.json.gz")
    loss = _one(f.clusters, pattern="cross_entropy", direction="forward")
    head = f.op_columns.record(_head_row(f.op_columns, min(r for r, c in f.op_cluster.items() if c == loss.id)))
    assert params_from_lm_head(head, loss.pattern_params) is not None
    assert params_from_lm_head(head, dict(loss.pattern_params, vocab=999)) is None
    assert params_from_lm_head(head, dict(loss.pattern_params, upcast=False, dtype="bfloat16")) is None


def test_a_chain_is_named_by_the_module_its_pattern_names_where_it_passes_through_one():
    """DistilBERT's embeddings: lookup, add, LayerNorm, dropout, a kernel each. The later module
    (Dropout) named the cluster, and patch then tried its Dropouts as LayerNorms."""
    from types import SimpleNamespace

    from fusion_advisor.analyzers.clusters import _chain_module
    paths = ["M/Embeddings/Embedding", "M/Embeddings", "M/Embeddings/LayerNorm", "M/Embeddings/Dropout"]
    col = SimpleNamespace(class_path=paths, annotation=[None] * 4)
    chain = [SimpleNamespace(scope=i, top_row=-1, passes=1) for i in range(4)]
    assert _chain_module(col, [(chain, "")], ("LayerNorm",)) == "M/Embeddings/LayerNorm"
    assert _chain_module(col, [(chain, "")], ()) == "M/Embeddings/Dropout"    # no pattern: where it ends
    heavier = [*chain, SimpleNamespace(scope=1, top_row=-1, passes=2)]        # most kernels still decide
    assert _chain_module(col, [(heavier, "")], ("RMSNorm",)) == "M/Embeddings"
