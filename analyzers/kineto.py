"""Read a Kineto (torch.profiler) trace file into plain column lists, with clear errors.

Reading is the one place that touches the raw JSON; everything downstream works on the frames
that `Trace` builds from the columns returned here. A 1M-event trace (274 MB of JSON) parses in
~13 s and 1.4 GB peak on a 2-core CPU machine with the standard library's `json`, so we keep it;
columns are filled in one pass and the event dicts are dropped as we go.
"""
from __future__ import annotations

import gzip
import json
import os
import zlib
from dataclasses import dataclass, field

from fusion_advisor.errors import TraceError

# Categories we keep, mapped to the frame they feed.
OP_CATS = {"cpu_op"}
KERNEL_CATS = {"kernel": "kernel", "gpu_memcpy": "memcpy", "gpu_memset": "memset"}
LAUNCH_CATS = {"cuda_runtime", "cuda_driver"}
PYTHON_CATS = {"python_function"}
ANNOTATION_CATS = {"user_annotation": False, "gpu_user_annotation": True}


@dataclass
class RawColumns:
    """Column lists, one dict of lists per frame, plus the trace's top-level fields."""

    ops: dict = field(default_factory=dict)
    kernels: dict = field(default_factory=dict)
    launches: dict = field(default_factory=dict)
    python: dict = field(default_factory=dict)
    annotations: dict = field(default_factory=dict)
    top: dict = field(default_factory=dict)
    n_events: int = 0


def _cols(*names: str) -> dict:
    return {n: [] for n in names}


def read_text(path: str) -> str:
    """The trace's JSON text; `.gz` is decompressed. Raises TraceError on unreadable input."""
    if not os.path.exists(path):
        raise TraceError(f"trace not found: {path}")
    if os.path.isdir(path):
        raise TraceError(f"{path} is a folder; give the trace file (.json or .json.gz) inside it")
    try:
        with open(path, "rb") as fh:
            head = fh.read(2)
        if head == b"\x1f\x8b":
            with gzip.open(path, "rb") as fh:
                data = fh.read()
        else:
            with open(path, "rb") as fh:
                data = fh.read()
    except (EOFError, zlib.error, gzip.BadGzipFile) as exc:
        raise TraceError(f"{path}: the gzip stream is truncated or corrupt ({exc})") from None
    except OSError as exc:
        raise TraceError(f"cannot read {path}: {exc.strerror or exc}") from None
    if not data.strip():
        raise TraceError(f"{path} is empty")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise TraceError(f"{path} is not a JSON trace (not UTF-8 text)") from None


def parse(path: str) -> RawColumns:
    """Parse a Kineto trace into RawColumns."""
    text = read_text(path)
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        where = f"byte {exc.pos:,} of {len(text):,}"
        if exc.pos >= len(text.rstrip()) - 1:
            raise TraceError(f"{path} is truncated: the JSON ends early ({where})") from None
        raise TraceError(f"{path} is not valid JSON: {exc.msg} at {where}") from None
    del text
    if not isinstance(doc, dict) or not isinstance(doc.get("traceEvents"), list):
        raise TraceError(f"{path} is JSON but not a torch.profiler trace (no 'traceEvents' list)")
    events = doc.pop("traceEvents")
    raw = RawColumns(top=doc, n_events=len(events))
    raw.ops = _cols("ext_id", "name", "ts", "dur", "tid", "seq", "input_dims", "input_types",
                    "input_strides", "concrete")
    raw.kernels = _cols("name", "kind", "ts", "dur", "device", "stream", "correlation", "ext_id",
                        "grid", "block", "registers", "shared_mem", "occupancy", "bytes")
    raw.launches = _cols("name", "ts", "dur", "tid", "correlation", "ext_id")
    raw.python = _cols("py_id", "parent_id", "name", "ts", "dur", "tid", "module_id")
    raw.annotations = _cols("name", "ts", "dur", "tid", "gpu", "ext_id")
    o, k, la, py, an = raw.ops, raw.kernels, raw.launches, raw.python, raw.annotations
    for i in range(len(events)):
        ev = events[i]
        events[i] = None  # drop each dict once read: keeps the peak near the JSON's own size
        if not isinstance(ev, dict) or ev.get("ph") != "X":
            continue
        cat = ev.get("cat")
        args = ev.get("args") or {}
        if cat in OP_CATS:
            o["ext_id"].append(args.get("External id", -1))
            o["name"].append(ev.get("name", ""))
            o["ts"].append(ev.get("ts", 0.0))
            o["dur"].append(ev.get("dur", 0.0))
            o["tid"].append(ev.get("tid", 0))
            o["seq"].append(args.get("Sequence number", -1))
            o["input_dims"].append(args.get("Input Dims"))
            o["input_types"].append(args.get("Input type"))
            o["input_strides"].append(args.get("Input Strides"))
            o["concrete"].append(args.get("Concrete Inputs"))
        elif cat in KERNEL_CATS:
            k["name"].append(ev.get("name", ""))
            k["kind"].append(KERNEL_CATS[cat])
            k["ts"].append(ev.get("ts", 0.0))
            k["dur"].append(ev.get("dur", 0.0))
            k["device"].append(args.get("device", ev.get("pid", 0)))
            k["stream"].append(args.get("stream", ev.get("tid", 0)))
            k["correlation"].append(args.get("correlation", -1))
            k["ext_id"].append(args.get("External id", -1))
            k["grid"].append(tuple(args.get("grid", ())) or None)
            k["block"].append(tuple(args.get("block", ())) or None)
            k["registers"].append(args.get("registers per thread"))
            k["shared_mem"].append(args.get("shared memory"))
            k["occupancy"].append(args.get("est. achieved occupancy %"))
            k["bytes"].append(args.get("bytes"))
        elif cat in LAUNCH_CATS:
            la["name"].append(ev.get("name", ""))
            la["ts"].append(ev.get("ts", 0.0))
            la["dur"].append(ev.get("dur", 0.0))
            la["tid"].append(ev.get("tid", 0))
            la["correlation"].append(args.get("correlation", -1))
            la["ext_id"].append(args.get("External id", -1))
        elif cat in PYTHON_CATS:
            py["py_id"].append(args.get("Python id", -1))
            parent = args.get("Python parent id")
            py["parent_id"].append(-1 if parent is None else parent)
            py["name"].append(ev.get("name", ""))
            py["ts"].append(ev.get("ts", 0.0))
            py["dur"].append(ev.get("dur", 0.0))
            py["tid"].append(ev.get("tid", 0))
            py["module_id"].append(args.get("Python module id", -1))
        elif cat in ANNOTATION_CATS:
            an["name"].append(ev.get("name", ""))
            an["ts"].append(ev.get("ts", 0.0))
            an["dur"].append(ev.get("dur", 0.0))
            an["tid"].append(ev.get("tid", 0))
            an["gpu"].append(ANNOTATION_CATS[cat])
            an["ext_id"].append(args.get("External id", -1))
    return raw
