"""Clusters written into the saved trace as annotation tracks (Perfetto), on a real H200 trace:
one span per cluster occurrence, named as the report names it, and an annotated trace analyses to
the same result."""
import gzip
import json
import shutil
from pathlib import Path

from fusion_advisor.analyzers.annotations import CATEGORY, TRACK_PID_BASE, span_events
from fusion_advisor.analyzers.trace import Trace
from fusion_advisor.capture import add_trace_events
from fusion_advisor.cluster_names import where_label
from fusion_advisor.pipeline import analyze

FIXTURE = Path(__file__).resolve().parents[1] / "data" / "llama-tiny-bf16-h200.json.gz"


def test_each_cluster_occurrence_is_one_named_span_and_the_analysis_is_unchanged(tmp_path):
    trace = Trace.load(FIXTURE)
    spans: list = []
    result = analyze(trace, spans=spans)
    assert result.clusters and spans
    by_cluster: dict = {}
    for s in spans:
        by_cluster.setdefault(s.cluster_id, []).append(s)
    k = trace.kernels
    assert set(by_cluster) <= {c.id for c in result.clusters}
    for c in result.clusters:   # every traced cluster has its spans (the LM head + loss is derived, no kernels of its own)
        if c.pattern == "linear_cross_entropy":
            continue
        mine = by_cluster.get(c.id, [])
        assert mine, c.id
        assert all(s.end > s.ts and s.kernels >= 1 for s in mine)
        assert sum(s.kernels for s in mine) <= len(k)
    copy = tmp_path / "trace.json.gz"
    shutil.copy(FIXTURE, copy)
    names = {c.id: where_label(c) for c in result.clusters}
    add_trace_events(copy, span_events(spans, names))
    events = json.loads(gzip.open(copy, "rt").read())["traceEvents"]
    ours = [e for e in events if e.get("cat") == CATEGORY]
    assert len(ours) == len(spans) and all(e["pid"] == TRACK_PID_BASE + s.device and e["tid"] == s.stream
                                           and e["ph"] == "X" for e, s in zip(ours, spans))
    tracks = [e for e in events if e.get("ph") == "M" and isinstance(e.get("pid"), int) and e["pid"] >= TRACK_PID_BASE]
    assert any(e["args"]["name"].startswith("fusion-advisor clusters (GPU") for e in tracks)
    assert {e["name"] for e in ours} == {names[s.cluster_id] for s in spans}
    again = analyze(Trace.load(copy))
    assert [(c.id, c.pattern, c.occurrences_per_step) for c in again.clusters] == \
        [(c.id, c.pattern, c.occurrences_per_step) for c in result.clusters]
    assert again.summary == result.summary


def test_a_function_wrapper_module_is_not_the_place_named():
    """transformers 5.2x calls apply_rotary_pos_emb through the `kernels` package's `Func` module:
    the attention that calls it is the place, as the report names it."""
    from fusion_advisor.core.result import Cluster
    rope = Cluster(id="fwd-r", direction="forward", pattern="rope", source="transformers/models/mixtral/modeling_mixtral.py:207",
                   module_class="MixtralForCausalLM/MixtralModel/MixtralDecoderLayer/MixtralAttention/Func/Func")
    assert where_label(rope) == "MixtralAttention @ modeling_mixtral.py:207"
