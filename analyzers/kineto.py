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

from fusion_advisor.core.errors import TraceError

# Categories we keep, mapped to the frame they feed.
OP_CATS = {"cpu_op"}
KERNEL_CATS = {"kernel": "kernel", "gpu_memcpy": "memcpy", "gpu_memset": "memset"}
LAUNCH_CATS = {"cuda_runtime", "cuda_driver"}
PYTHON_CATS = {"python_function"}
ANNOTATION_CATS = {"user_annotation": False, "gpu_user_annotation": True}
_KEPT_CATS = OP_CATS | set(KERNEL_CATS) | LAUNCH_CATS | PYTHON_CATS | set(ANNOTATION_CATS)


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
    bad_spans: dict = field(default_factory=dict)  # category -> events dropped for a missing or corrupt ts/dur


# Bounds of a believable span, in µs: Kineto's ts is since the epoch (~1.8e15 in 2027), a dur over
# ~4 months is corruption. NaN fails every comparison, so it is out of bounds too.
_MAX_TS_US = 1e17
_MAX_DUR_US = 1e13
# More bad spans than this share of the timed events: the trace is damaged, not a few odd events.
MAX_BAD_SPAN_SHARE = 0.1


def _span(ev: dict) -> tuple[float, float] | None:
    """(ts, dur) of an event, or None when either is missing, not a number, NaN, negative or huge."""
    ts, dur = ev.get("ts"), ev.get("dur")
    try:
        ts = float(ts) if isinstance(ts, (int, float, str)) and not isinstance(ts, bool) else None
        dur = float(dur) if isinstance(dur, (int, float, str)) and not isinstance(dur, bool) else None
    except ValueError:
        return None
    if ts is None or dur is None or not (-_MAX_TS_US <= ts <= _MAX_TS_US) or not (0.0 <= dur <= _MAX_DUR_US):
        return None
    return ts, dur


def _text(value) -> str:
    return value if isinstance(value, str) else ""


def _tid(value):
    """A thread, stream or device id: Kineto writes ints; anything else is 0 (frames sort by it)."""
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def _id(value, default: int = -1):
    """An id field (External id, correlation, Python id): an int, else `default` (ids key dicts)."""
    return value if isinstance(value, int) and not isinstance(value, bool) else default


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
    timed = 0
    for i in range(len(events)):
        ev = events[i]
        events[i] = None  # drop each dict once read: keeps the peak near the JSON's own size
        if not isinstance(ev, dict) or ev.get("ph") != "X":
            continue
        cat = ev.get("cat")
        if not isinstance(cat, str) or cat not in _KEPT_CATS:
            continue
        timed += 1
        span = _span(ev)
        if span is None:
            raw.bad_spans[cat] = raw.bad_spans.get(cat, 0) + 1
            continue
        ev["ts"], ev["dur"] = span
        args = ev.get("args")
        args = args if isinstance(args, dict) else {}
        if cat in OP_CATS:
            o["ext_id"].append(_id(args.get("External id")))
            o["name"].append(_text(ev.get("name")))
            o["ts"].append(ev.get("ts", 0.0))
            o["dur"].append(ev.get("dur", 0.0))
            o["tid"].append(_tid(ev.get("tid")))
            o["seq"].append(_id(args.get("Sequence number")))
            o["input_dims"].append(args.get("Input Dims"))
            o["input_types"].append(args.get("Input type"))
            o["input_strides"].append(args.get("Input Strides"))
            o["concrete"].append(args.get("Concrete Inputs"))
        elif cat in KERNEL_CATS:
            k["name"].append(_text(ev.get("name")))
            k["kind"].append(KERNEL_CATS[cat])
            k["ts"].append(ev.get("ts", 0.0))
            k["dur"].append(ev.get("dur", 0.0))
            k["device"].append(_tid(args.get("device", ev.get("pid"))))
            k["stream"].append(_tid(args.get("stream", ev.get("tid"))))
            k["correlation"].append(_id(args.get("correlation")))
            k["ext_id"].append(_id(args.get("External id")))
            k["grid"].append(tuple(args.get("grid", ())) or None)
            k["block"].append(tuple(args.get("block", ())) or None)
            k["registers"].append(args.get("registers per thread"))
            k["shared_mem"].append(args.get("shared memory"))
            k["occupancy"].append(args.get("est. achieved occupancy %"))
            k["bytes"].append(args.get("bytes"))
        elif cat in LAUNCH_CATS:
            la["name"].append(_text(ev.get("name")))
            la["ts"].append(ev.get("ts", 0.0))
            la["dur"].append(ev.get("dur", 0.0))
            la["tid"].append(_tid(ev.get("tid")))
            la["correlation"].append(_id(args.get("correlation")))
            la["ext_id"].append(_id(args.get("External id")))
        elif cat in PYTHON_CATS:
            py["py_id"].append(_id(args.get("Python id")))
            py["parent_id"].append(_id(args.get("Python parent id")))
            py["name"].append(_text(ev.get("name")))
            py["ts"].append(ev.get("ts", 0.0))
            py["dur"].append(ev.get("dur", 0.0))
            py["tid"].append(_tid(ev.get("tid")))
            py["module_id"].append(_id(args.get("Python module id")))
        elif cat in ANNOTATION_CATS:
            an["name"].append(_text(ev.get("name")))
            an["ts"].append(ev.get("ts", 0.0))
            an["dur"].append(ev.get("dur", 0.0))
            an["tid"].append(_tid(ev.get("tid")))
            an["gpu"].append(ANNOTATION_CATS[cat])
            an["ext_id"].append(_id(args.get("External id")))
    bad = sum(raw.bad_spans.values())
    if bad and bad > MAX_BAD_SPAN_SHARE * timed:
        raise TraceError(f"{path}: {bad:,} of {timed:,} timed events have a missing, NaN, negative or huge ts/dur: "
                         f"the trace is damaged")
    return raw
