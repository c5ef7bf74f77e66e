"""Real traced ops as patterns see them: OpRecords read off the GPU traces in tests/data."""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from fusion_advisor.analyzers.trace import Trace
from fusion_advisor.core.records import OpRecord

DATA = Path(__file__).parent / "data"


@lru_cache(maxsize=None)
def forward_ops(trace_name: str) -> tuple[OpRecord, ...]:
    """The top-level forward ops of the trace's first profiled step, in launch order."""
    ops = _load(str(DATA / trace_name)).ops
    step = min(s for s in ops["step"] if s >= 0)
    rows = ops[(ops["step"] == step) & (ops["depth"] == 0) & (~ops["backward"])]
    return tuple(OpRecord.from_trace(name, dims, types, concrete)
                 for name, dims, types, concrete in zip(rows["name"], rows["input_dims"], rows["input_types"],
                                                        rows["concrete"]))


def windows(ops: tuple[OpRecord, ...], anchor: str, before: int, after: int) -> list[list[OpRecord]]:
    """ops[i - before : i + after + 1] around every op named `anchor` (e.g. "aten::silu")."""
    return [list(ops[max(0, i - before): i + after + 1]) for i, o in enumerate(ops) if o.name == anchor]


def traced_ops(path, first: str, last: str, max_depth: int | None = 0) -> list[OpRecord]:
    """Forward ops of a real trace's first profiled step, as the OpRecords a pattern is handed: the
    first op named `last` and the ops before it back to the nearest one named `first` (full names,
    "aten::embedding"), nested ops down to `max_depth` (0: top-level ops only; None: all)."""
    trace = _load(str(path))
    ops = trace.ops
    sel = ops[(ops["step"] == trace.step_ids[0]) & ~ops["backward"].astype(bool)]
    if max_depth is not None:
        sel = sel[sel["depth"] <= max_depth]
    names = sel["name"].tolist()
    end = names.index(last)
    start = max(i for i in range(end + 1) if names[i] == first)
    rows = sel.iloc[start:end + 1]
    return [OpRecord.from_trace(name, dims, types, concrete)
            for name, dims, types, concrete in zip(rows["name"], rows["input_dims"], rows["input_types"],
                                                   rows["concrete"])]


@lru_cache(maxsize=None)
def _load(path: str) -> Trace:
    return Trace.load(path)


def op_records(trace, rows) -> list[OpRecord]:
    """OpRecords for rows of a loaded Trace's ops frame, as a cluster hands them to a pattern."""
    ops, modules = trace.ops, trace.modules
    return [OpRecord.from_trace(op["name"], op["input_dims"], op["input_types"], op["concrete"],
                                modules["class_path"].iloc[op["module_row"]] if op["module_row"] >= 0 else None)
            for op in (ops.loc[r] for r in rows)]
