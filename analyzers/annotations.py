"""Clusters as annotation tracks of the saved trace: open trace.json.gz in Perfetto (or
chrome://tracing) and each cluster occurrence shows as one span on a "fusion-advisor clusters
(GPU d)" track, one thread per stream, named as the report names it, beside the kernels it would fuse.

A span is a run of consecutive kernels (by start time, on one stream) of one cluster. The events
carry their own category, which `Trace` does not read back: analysing an annotated trace gives
the same result.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from fusion_advisor.analyzers.trace import Trace

CATEGORY = "fusion_advisor_cluster"
TRACK_NAME = "fusion-advisor clusters"
TRACK_PID_BASE = 1 << 30   # numeric pids (the Chrome trace format's), above any OS pid (Linux: <= 2**22)


@dataclass
class ClusterSpan:
    cluster_id: str
    device: int
    stream: int
    ts: float          # µs, the trace's clock
    end: float
    kernels: int


def cluster_spans(trace: Trace, kernel_cluster: pd.Series) -> list[ClusterSpan]:
    """One span per occurrence of a cluster: consecutive kernels of it on one stream."""
    k = trace.kernels
    if k.empty or kernel_cluster is None or kernel_cluster.isna().all():
        return []
    frame = pd.DataFrame({"cluster": kernel_cluster.reindex(k.index), "device": k["device"], "stream": k["stream"],
                          "ts": k["ts"].astype(float), "end": k["end"].astype(float)})
    spans: list[ClusterSpan] = []
    for (device, stream), rows in frame.sort_values("ts", kind="stable").groupby(["device", "stream"], sort=False):
        ids = rows["cluster"].to_numpy(dtype=object)
        ts, end = rows["ts"].to_numpy(), rows["end"].to_numpy()
        start = 0
        for i in range(1, len(ids) + 1):
            if i < len(ids) and ids[i] == ids[start]:
                continue
            cid = ids[start]
            if isinstance(cid, str):
                spans.append(ClusterSpan(cid, int(device), int(stream), float(ts[start]),
                                         float(np.max(end[start:i])), i - start))
            start = i
    return spans


def span_events(spans: list[ClusterSpan], names: dict[str, str]) -> list[dict]:
    """Chrome-trace events for the spans: complete events ("X") on one thread per stream of a
    "fusion-advisor clusters (GPU d)" process, named by `names` (cluster id -> label)."""
    events: list[dict] = []
    for device, stream in sorted({(s.device, s.stream) for s in spans}):
        pid = TRACK_PID_BASE + device
        events.append({"ph": "M", "name": "process_name", "pid": pid, "tid": 0,
                       "args": {"name": f"{TRACK_NAME} (GPU {device})"}})
        events.append({"ph": "M", "name": "thread_name", "pid": pid, "tid": stream,
                       "args": {"name": f"stream {stream}"}})
    for s in spans:
        events.append({"ph": "X", "cat": CATEGORY, "name": names.get(s.cluster_id, s.cluster_id),
                       "pid": TRACK_PID_BASE + s.device, "tid": s.stream, "ts": s.ts, "dur": max(s.end - s.ts, 0.0),
                       "args": {"cluster": s.cluster_id, "kernels": s.kernels}})
    return events
