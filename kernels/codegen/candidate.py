"""A cluster no registered pattern matches -> a generated kernel for it, as the rest of the loop
sees a pattern: a FusionPattern plus `pattern_params` that rebuild it in any process.

    found = candidate_for(records, "examples/conv_pointwise.py", 17)
    found.pattern.name            # "generic:1a2b3c4d5e"
    found.params                  # {"inputs": [...], "scalars": {...}, "chain": {...}}
    pattern_from_params(found.params) is found.pattern      # in bench / apply, another process

The chain is the longest run of supported ops (split_supported; the other ops stay eager and
`notes` says why). Its dataflow comes from the source when the function that ran it can be read
(source_bind.py: exact, and `call` says how apply calls the kernel); else from the trace's shapes
(graph.py's linking rule, a guess the notes name; apply will not rewrite such a chain).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Sequence

from fusion_advisor.kernels.codegen.graph import _value_slots, split_supported
from fusion_advisor.kernels.codegen.ops import Unsupported
from fusion_advisor.kernels.codegen.pattern import build_pattern, generated
from fusion_advisor.kernels.codegen.source_bind import SourceCall, chain_from_source
from fusion_advisor.kernels.registry import FusionPattern, OpRecord

MIN_OPS = 2   # one op is already one kernel


@dataclass
class Candidate:
    pattern: FusionPattern
    params: dict                       # the cluster's pattern_params
    call: SourceCall | None            # how apply calls it; None: the dataflow was guessed
    notes: list[str] = field(default_factory=list)


def candidate_for(records: Sequence[OpRecord], source_file: str | None = None, def_line: int | None = None,
                  label: str | None = None) -> Candidate | None:
    """The generated-kernel candidate for a chain's forward ops, or None when no run of at least
    MIN_OPS supported ops exists. `source_file`/`def_line`: the function that ran them (a file on
    this disk); `label`: how the trace names that place ("model.py:17"), for the module header."""
    segments = split_supported(list(records))
    best = max(segments, key=lambda s: len(s[0]), default=None)
    if best is None or len(best[0]) < MIN_OPS:
        return None
    ops = best[0]
    notes = []
    if len(ops) < len(records):
        notes.append(f"the generated kernel covers {len(ops)} of the chain's {len(records)} ops; the chain splits where "
                     + "; ".join(why for _, why in segments if why))
    source = label or (f"{source_file}:{def_line}" if source_file and def_line else None)
    if source_file and def_line:
        try:
            bound = chain_from_source(ops, source_file, def_line)
            pattern = build_pattern(bound.ops, bind=bound.bind, source=source, exact=True)
            call = _call(pattern, bound)
            params = _params(pattern, bound.ops, bound.bind, True, source, call, bound.scalar_values)
            return Candidate(pattern, params, call, notes)
        except Unsupported as exc:
            notes.append(f"dataflow read off the trace's shapes, not the source ({exc}): apply will not rewrite it")
    else:
        notes.append("dataflow read off the trace's shapes (the source was not found): apply will not rewrite it")
    pattern = build_pattern(ops, source=source)
    notes += generated(pattern).graph.notes
    return Candidate(pattern, _params(pattern, ops, {}, False, source, None, {}), None, notes)


def _call(pattern: FusionPattern, bound) -> SourceCall:
    """The source expressions of the generated function's arguments, in its order."""
    graph = generated(pattern).graph
    args = []
    for x in graph.inputs:
        pos = _value_slots(graph.nodes[x.op_index].spec).index(x.slot)
        args.append(bound.externals[(x.op_index, pos)])
    scalars = {}
    for s in graph.scalars:
        pos = _value_slots(graph.nodes[s.op_index].spec).index(s.slot)
        scalars[s.name] = bound.scalar_exprs[(s.op_index, pos)]
    return dataclasses.replace(bound.call, args=args, scalars=scalars)


def _params(pattern: FusionPattern, ops, bind, exact: bool, source, call, scalar_values) -> dict:
    params = dict(pattern.example_params)
    graph = generated(pattern).graph
    if scalar_values:   # literal numbers in the source: benchmark with the user's values
        scalars = dict(params.get("scalars", {}))
        for s in graph.scalars:
            pos = _value_slots(graph.nodes[s.op_index].spec).index(s.slot)
            if (s.op_index, pos) in scalar_values:
                scalars[s.name] = scalar_values[(s.op_index, pos)]
        params["scalars"] = scalars
    params["chain"] = {"ops": [_op_dict(o) for o in ops], "bind": sorted([k[0], k[1], v] for k, v in bind.items()),
                       "exact": exact, "source": source, "call": call.to_dict() if call else None}
    return params


def _op_dict(o: OpRecord) -> dict:
    return {"name": o.name, "dims": o.dims, "types": o.types, "concrete": o.concrete, "module": o.module}


def pattern_from_params(params: dict) -> FusionPattern:
    """Rebuild a generated pattern from a cluster's pattern_params (any process)."""
    chain = params.get("chain")
    if not isinstance(chain, dict) or not chain.get("ops"):
        raise KeyError("these params hold no generated chain")
    ops = [OpRecord.from_trace(o["name"], o.get("dims"), o.get("types"), o.get("concrete"), o.get("module"))
           for o in chain["ops"]]
    bind = {(int(i), int(s)): str(v) for i, s, v in chain.get("bind", [])}
    return build_pattern(ops, bind=bind, source=chain.get("source"), exact=bool(chain.get("exact")))


def source_call(params: dict) -> SourceCall | None:
    call = (params.get("chain") or {}).get("call")
    return SourceCall.from_dict(call) if call else None
