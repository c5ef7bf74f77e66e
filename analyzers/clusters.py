"""Clusters: chains of memory-bound kernels, producer to consumer, that one fused kernel could
replace, merged across steps and repeated layers, matched to a registered pattern and priced.

The trace has no tensor identities, so a chain is read off launch order, module scopes and
shapes. What a chain is, rule by rule:

1. Units (analyzers/chain_units.py): the kernels one op launched back to back, or on a
   CPU-only trace an op that would launch a kernel; per step, CPU thread, stream and direction,
   in launch order. A chain never spans forward, backward and the optimizer's record_function
   range ("Optimizer.step#AdamW.step"): a change of any ends it.
2. Breakers end a chain and never belong to one: GEMM, attention, convolution, communication
   and already-compiled (Triton) kernels; every kernel of an op that launches one of those
   (a matmul's input copies, cuBLAS workspace memsets; in backward, the autograd node's op);
   host copies (a DtoH/HtoD memcpy
   synchronises); a kernel the roofline puts above the ridge point (not memory-bound); a kernel
   of unknown class without a cost rule; a kernel without a launching op.
   One exception: a GEMM that reads none of the chain's outputs (SwiGLU's up_proj runs between
   silu and mul) is stepped over when the next kernel reads the chain's output; it stays out of
   the cluster.
3. Links. Within one module call, the next unit joins when one of its inputs is related to a
   tensor the chain already holds: same shape, same element count (a view), broadcastable
   (keepdim reductions, [1,1,S,D] rotary tables), or the same leading dims (a slice of the last
   dim: rotate_half). Inside one module that is loose on purpose: RoPE and RMSNorm are small
   DAGs, not single chains, and one fused kernel replaces the whole DAG.
4. Module boundaries. A module call's chain stands on its own: RMSNorm's 8 kernels are one
   cluster, the residual add before it is not folded in. Two pieces on either side of a
   boundary join when the next piece strictly consumes the previous one's output (same shape
   or element count) and
     (a) a registered pattern matches the joined ops and neither piece alone (residual add +
         RMSNorm once `add_rms_norm` is registered), or
     (b) both pieces are single kernels (or a run of single kernels): a module that already is
         one kernel (nn.LayerNorm) is only worth fusing together with its neighbour (the
         residual add before it: add + LayerNorm).
5. Autograd's gradient accumulation (an add/add_ the engine runs between backward nodes when a
   tensor had several consumers) belongs to a chain only inside one module call (x feeds both
   pow and mul inside RMSNorm); between modules it is the graph summing gradients, which no
   module's fused backward replaces: it stays out.
6. A cluster makes at least 2 passes over the data: 2 kernels, not counting memsets, nor the
   launches one op splits its work into (a foreach op over many tensors), but counting the
   passes an op's cost rule says it makes (LayerNorm backward: 2).

Occurrences of the same chain (leaf op names, input shapes and dtypes, leaf module classes,
direction) merge into one Cluster, whatever the step or the layer: the 9 LlamaRMSNorm calls of a
4-layer Llama (2 per layer and the final norm) are one forward cluster with 9 occurrences per
step. Scalar arguments are not part of the signature (they do not change bytes); pattern params
are read from the first occurrence.

Two kinds of cluster are derived rather than found: a cross_entropy forward cluster fed by an LM
head's `aten::linear` also yields a `linear_cross_entropy` cluster holding both
(analyzers/lm_head_loss.py): a memory trade, since the GEMM it includes is what rule 2 keeps out of
every chain; and a forward `aten::linear` of misaligned width (an odd vocabulary) yields a
`padded_linear` cluster (analyzers/misaligned_gemm.py).
"""
from __future__ import annotations

import dataclasses
import hashlib
import logging
import re
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd

from fusion_advisor.analyzers.chain_units import (ACCUMULATION_SCOPE, NO_SCOPE, Classifier, OpColumns, Unit,
                                                  cpu_units, feeds, flat_shapes, gpu_units, related)
from fusion_advisor.analyzers.lm_head_loss import lm_head_loss_clusters
from fusion_advisor.analyzers.misaligned_gemm import misaligned_linear_clusters
from fusion_advisor.analyzers.trace import Trace, resolve_source_file
from fusion_advisor.cost_model.device import DeviceProfile
from fusion_advisor.core.dtypes import TRACE_DTYPES
from fusion_advisor.cost_model.roofline import cluster_estimate
from fusion_advisor.core.records import OpRecord
from fusion_advisor.core.result import Cluster, is_generated

MIN_KERNELS = 2


@dataclass(frozen=True)
class PatternLookup:
    """What finding clusters asks of the kernels layer (rule 4a, the pattern of each cluster), handed
    in by the caller so the analyzers import no kernel: fusion_advisor.kernels.lookup.pattern_lookup()."""

    match: Callable[[Sequence[OpRecord]], tuple[Any, dict] | None]   # registered (pattern, params), or None
    resolve: Callable[[str, dict], Any]                              # a pattern by name, "generic:" ones rebuilt
    # forward ops, source file, def line, label -> a generated-kernel candidate (.pattern, .params,
    # .notes), None where codegen supports too little of the chain
    generated: Callable[[Sequence[OpRecord], str | None, int | None, str | None], Any]
    lm_head_params: Callable[[OpRecord, dict], dict | None]          # linear_cross_entropy's params_from_lm_head
    # padded_linear's params_from_linear: a misaligned aten::linear's params, or None
    linear_params: Callable[[OpRecord], dict | None] = lambda record: None


# -- chains (rules 2-5) --------------------------------------------------------------------------
@dataclass
class _Piece:
    """Consecutive linked units of one module call."""

    units: list[Unit]

    @property
    def passes(self) -> int:
        return sum(u.passes for u in self.units)

    @property
    def scope(self) -> int:
        return self.units[0].scope

    def writes(self) -> list[tuple[int, ...]]:
        return [s for u in self.units for s in u.writes]

    def tensors(self) -> list[tuple[int, ...]]:
        return [s for u in self.units for s in u.reads + u.writes]


@dataclass
class _Run:
    """Linked pieces between two chain ends; `end_reason` says why it ended."""

    pieces: list[_Piece]
    end_reason: str = "the end of the step"


def _resolve_accumulation(units: list[Unit]) -> None:
    """Rule 5: an accumulation joins the module call it sits inside, else nothing."""
    for i, u in enumerate(units):
        if not u.accumulation:
            continue
        prev = next((units[j].scope for j in range(i - 1, -1, -1) if not units[j].accumulation), None)
        nxt = next((units[j].scope for j in range(i + 1, len(units)) if not units[j].accumulation), None)
        u.scope = prev if prev is not None and prev == nxt and prev >= 0 else ACCUMULATION_SCOPE


def _runs(units: list[Unit]) -> list[_Run]:
    """Rules 2-3 and the strict link of rule 4: cut a unit stream into runs of pieces."""
    runs: list[_Run] = []
    cur: _Run | None = None
    skipped: list[Unit] = []    # independent GEMMs stepped over (rule 2's exception)

    def close(reason: str) -> None:
        nonlocal cur
        if cur is not None:
            cur.end_reason = reason
            runs.append(cur)
        cur = None

    for u in units:
        if u.breaker is not None:
            if cur is None:
                continue
            if u.gemm_reads and not any(feeds(w, r) for w in _chain_writes(cur) for r in u.gemm_reads):
                skipped.append(u)
                continue
            close(f"next: {(skipped[0] if skipped else u).breaker}")
            skipped = []
            continue
        if cur is None:
            cur = _Run([_Piece([u])])
            continue
        last = cur.pieces[-1]
        if u.context != last.units[-1].context:
            # Forward, backward and the optimizer (its record_function range) never share a chain.
            close(f"the next kernel runs in {u.context[1] or ('backward' if u.context[0] else 'forward')}")
            skipped = []
            cur = _Run([_Piece([u])])
            continue
        if skipped:
            # Across a skipped GEMM only a strict consumer of the chain's output continues it; in
            # another module it is the next piece (HF's LlamaMLP: act_fn is a module of its own,
            # the mul with up_proj's output sits in LlamaMLP), which rule 4 joins or not.
            if any(feeds(w, r) for w in _chain_writes(cur) for r in u.reads):
                skipped = []
                if u.scope == last.scope:
                    last.units.append(u)
                else:
                    cur.pieces.append(_Piece([u]))
                continue
            close(f"next: {skipped[0].breaker}")
            skipped = []
            cur = _Run([_Piece([u])])
            continue
        if u.scope == last.scope and u.scope != ACCUMULATION_SCOPE:
            held = last.tensors()
            # Kernels of one top-level op (cross_entropy: log_softmax, nll_loss) always link.
            # Ops whose shapes the profiler did not record (a foreach op over many tensors) link
            # on order and module alone.
            shapeless = not u.reads and not last.units[-1].reads
            if u.top_row == last.units[-1].top_row or shapeless or any(related(r, t) for r in u.reads for t in held):
                last.units.append(u)
                continue
            close("the next kernel reads none of this chain's tensors")
            cur = _Run([_Piece([u])])
            continue
        if any(feeds(w, r) for w in last.writes() for r in u.reads):
            cur.pieces.append(_Piece([u]))
            continue
        close("the next kernel reads none of this chain's tensors")
        cur = _Run([_Piece([u])])
    close("the end of the step" if not skipped else f"next: {skipped[0].breaker}")
    return runs


def _chain_writes(run: _Run) -> list[tuple[int, ...]]:
    return [s for p in run.pieces for s in p.writes()]


def _unit_label(col: OpColumns, u: Unit) -> str:
    """Module class path of a unit; outside modules, the record_function range it ran in."""
    if u.scope == NO_SCOPE and u.top_row >= 0 and isinstance(col.annotation[u.top_row], str):
        return col.annotation[u.top_row]
    return _scope_label(col, u.scope)


def _scope_label(col: OpColumns, scope: int) -> str:
    if scope >= 0:
        return str(col.class_path[scope])
    return "autograd gradient accumulation" if scope == ACCUMULATION_SCOPE else "(no module)"


# -- pattern matching ----------------------------------------------------------------------------
class _Matcher:
    """Forward ops of a chain (the top-level ops the user's code called) and their pattern."""

    def __init__(self, trace: Trace, cl: Classifier, launching_tops: np.ndarray, patterns: PatternLookup):
        self.trace, self.cl, self.launching_tops, self.patterns = trace, cl, launching_tops, patterns

    def forward_rows(self, units: Sequence[Unit]) -> list[int]:
        if not units[0].backward:
            return list(dict.fromkeys(u.top_row for u in units if u.top_row >= 0))
        # Backward: the forward ops its nodes differentiate, widened to every kernel-launching
        # top-level op between the first and the last of them on the forward thread (an add of a
        # scalar has no backward kernel but is part of the forward chain).
        fwd, tops = self.cl.col.fwd_row, self.cl.col.top_row
        rows = sorted({int(tops[fwd[u.op_row]]) for u in units if u.op_row >= 0 and fwd[u.op_row] >= 0})
        if not rows:
            return []
        col = self.cl.col
        lo, hi = np.searchsorted(self.launching_tops, [rows[0], rows[-1]], side="left")
        return [int(r) for r in self.launching_tops[lo:hi + 1]
                if r <= rows[-1] and col.tid[r] == col.tid[rows[0]] and not col.backward[r]]

    def match(self, units: Sequence[Unit]) -> tuple[object, dict] | None:
        rows = sorted(self.forward_rows(units))
        if not rows:
            return None
        return self.patterns.match([self.cl.record(r) for r in rows])

    def spans(self, left: Sequence[Unit], right: Sequence[Unit]) -> bool:
        """Rule 4a: a pattern matches left+right, and not left or right alone, and its signature
        covers ops of both sides."""
        joined = self.match(list(left) + list(right))
        if joined is None:
            return False
        pattern = joined[0]
        alone = {m[0].name for m in (self.match(left), self.match(right)) if m is not None}
        if pattern.name in alone:
            return False
        left_rows = set(self.forward_rows(left))
        rows = sorted(self.forward_rows(list(left) + list(right)))
        names = [self.cl.record(r).short for r in rows]
        m = re.search(pattern.forward_signature, " ".join(names))
        if m is None:
            return False
        # Which ops the regex covered: count names before its start and end.
        first = len(" ".join(names)[:m.start()].split())
        last = len(" ".join(names)[:m.end()].split()) - 1
        covered = rows[first:last + 1]
        return any(r in left_rows for r in covered) and any(r not in left_rows for r in covered)


def _join(run: _Run, matcher: _Matcher) -> list[tuple[list[Unit], str]]:
    """Rule 4: group a run's pieces into chains; each with the reason it ended."""
    chains: list[tuple[list[Unit], str]] = []
    cur = list(run.pieces[0].units)
    cur_lone = run.pieces[0].passes == 1
    for piece in run.pieces[1:]:
        joinable = piece.scope != ACCUMULATION_SCOPE and cur[-1].scope != ACCUMULATION_SCOPE
        lone = piece.passes == 1
        if joinable and ((cur_lone and lone) or matcher.spans(cur, piece.units)):
            cur += piece.units
            cur_lone = cur_lone and lone
            continue
        chains.append((cur, f"module boundary: the next kernel runs in {_scope_label(matcher.cl.col, piece.scope)}"))
        cur, cur_lone = list(piece.units), lone
    chains.append((cur, run.end_reason))
    return chains


# -- merging and pricing -------------------------------------------------------------------------
def _signature(units: Sequence[Unit]) -> tuple:
    return (units[0].backward,) + tuple(
        (u.record.name, repr(flat_shapes(u.record.dims, u.record.types)),
         tuple(t for t in u.record.types if t in TRACE_DTYPES or t == "TensorList"), u.scope_cls, u.passes)
        for u in units)


def _cluster_id(sig: tuple) -> str:
    digest = hashlib.sha1(repr(sig).encode()).hexdigest()[:10]
    return ("bwd-" if sig[0] else "fwd-") + digest


@dataclass
class ClusterFindings:
    clusters: list[Cluster]                 # ranked by estimated saving per step
    kernel_cluster: pd.Series               # cluster id per row of trace.kernels (None outside)
    kernel_memory_bound: pd.Series          # bool per row of trace.kernels
    kernel_classes: pd.Series               # class per row of trace.kernels
    op_columns: OpColumns                   # the trace's ops as arrays, with their OpRecords
    unit_ops: list[int]                     # every op of the steps that launched (or would) a kernel
    unit_classes: list[str | None]          # its class (CPU-only traces: from the op's name)
    op_cluster: dict[int, str]              # op row -> cluster id, for the ops inside clusters


def find_clusters(trace: Trace, profile: DeviceProfile, patterns: PatternLookup) -> ClusterFindings:
    """Every memory-bound cluster of the trace's steps, merged, matched to `patterns` and priced on
    `profile`."""
    cl = Classifier(trace, profile)
    groups = gpu_units(trace, cl) if trace.has_gpu else cpu_units(trace, cl)
    mods = trace.modules
    cls_of = mods["cls"].to_numpy(dtype=object) if len(mods) else np.array([], dtype=object)
    units_all = [u for g in groups for u in g]
    for g in groups:
        _resolve_accumulation(g)
    for u in units_all:
        u.scope_cls = cls_of[u.scope] if u.scope >= 0 else None
    launching_tops = np.array(sorted({u.top_row for u in units_all if u.top_row >= 0}), dtype=np.int64)
    matcher = _Matcher(trace, cl, launching_tops, patterns)

    found: dict[tuple, list[tuple[list[Unit], str]]] = {}
    for g in groups:
        for run in _runs(g):
            for chain, reason in _join(run, matcher):
                if sum(u.passes for u in chain) >= MIN_KERNELS:
                    found.setdefault(_signature(chain), []).append((chain, reason))

    n_steps = max(len(trace.step_ids), 1)
    cluster_of = np.full(len(trace.kernels), None, dtype=object)   # Trace rows are labelled 0..n-1
    op_cluster: dict[int, str] = {}
    clusters = []
    for sig, occurrences in found.items():
        cid = _cluster_id(sig)
        for chain, _ in occurrences:
            for u in chain:
                cluster_of[u.kernel_rows] = cid
                op_cluster[u.op_row] = cid
        clusters.append(_build_cluster(trace, cl, matcher, cid, occurrences, n_steps, profile))
    _share_generated_backward(clusters, profile, patterns)
    first_rows = {_cluster_id(sig): [chain[0].op_row for chain, _ in occ] for sig, occ in found.items()}
    clusters += lm_head_loss_clusters(clusters, first_rows, cl.col, units_all, n_steps, patterns.lm_head_params)
    clusters += misaligned_linear_clusters(cl.col, units_all, n_steps, patterns.linear_params)
    clusters.sort(key=_rank_key, reverse=True)
    kernel_cluster = pd.Series(cluster_of, index=trace.kernels.index, dtype=object)
    return ClusterFindings(clusters, kernel_cluster, cl.kernel_memory_bound(), cl.kernel_classes, cl.col,
                           unit_ops=[u.op_row for u in units_all], unit_classes=[u.kernel_class for u in units_all],
                           op_cluster=op_cluster)


def _rank_key(c: Cluster) -> tuple:
    saving = c.estimate.saving_us
    return (saving is not None, (saving or 0.0) * c.occurrences_per_step, c.measured_us_per_step)


def _dtype_names(records: Sequence[OpRecord]) -> list[str]:
    """Dtypes of the tensors the chain reads (0-dim arguments, wrapped Python scalars, left out)."""
    return sorted({TRACE_DTYPES[t][0] for r in records for d, t in zip(r.dims, r.types)
                   if t in TRACE_DTYPES and isinstance(d, (list, tuple)) and len(d) > 0})


def _chain_module(col: OpColumns, occurrences: list[tuple[list[Unit], str]], pattern_modules: Sequence[str]) -> str:
    """The module path a cluster is named by: of each occurrence, the module holding most of the chain's
    kernels, on a tie the later one (where it ends); but a module the matched pattern names (its
    `modules`: "LayerNorm") where the chain passes through one. DistilBERT's embedding chain (lookup,
    add, LayerNorm, dropout: a kernel each) was named by its Dropout, which patch then tried as a norm."""
    paths = Counter()
    for chain, _ in occurrences:
        weights = Counter()
        for u in chain:
            weights[_unit_label(col, u)] += u.passes
        order = {label: i for i, label in enumerate(weights)}
        named = [label for label in weights if label.rsplit("/", 1)[-1] in pattern_modules]
        paths[max(named or weights, key=lambda s: (weights[s], order[s]))] += 1
    return paths.most_common(1)[0][0]


def _build_cluster(trace: Trace, cl: Classifier, matcher: _Matcher, cid: str,
                   occurrences: list[tuple[list[Unit], str]], n_steps: int, profile: DeviceProfile) -> Cluster:
    first, reason = occurrences[0]
    records = [u.record for u in first]
    direction = "backward" if first[0].backward else "forward"
    source = next((cl.col.source[u.op_row] for u in first
                   if u.op_row >= 0 and isinstance(cl.col.source[u.op_row], str)), None)
    matched = matcher.match(first)
    module_class = _chain_module(cl.col, occurrences, matched[0].modules if matched is not None else ())
    pattern_name, params, fused, notes = None, {}, None, []
    if matched is None and not str(first[0].context[1] or "").startswith("Optimizer."):
        generic = _generated_candidate(trace, cl, matcher, first)
        if generic is not None:
            matched, notes = (generic.pattern, generic.params), generic.notes
    if matched is not None:
        pattern, params = matched
        pattern_name = pattern.name
        fused = pattern.fused_bytes(params).get(direction)
    measured = sum(u.dur for chain, _ in occurrences for u in chain)
    estimate = cluster_estimate(records, fused, profile, traced_us=measured / len(occurrences))
    launches = sum(len(u.kernel_rows) for chain, _ in occurrences for u in chain)
    return Cluster(
        id=cid, direction=direction, pattern=pattern_name, pattern_params=dict(params),
        module_class=module_class, source=source,
        ops=[dataclasses.asdict(r) for r in records],
        kernels=[n for u in first for n in u.kernel_names],
        dtypes=_dtype_names(records),
        occurrences_per_step=round(len(occurrences) / n_steps, 3),
        launches_per_step=round(launches / n_steps, 3),
        measured_us_per_step=round(measured / n_steps, 3),
        measured_us_per_occurrence=round(measured / len(occurrences), 3),
        estimate=estimate, split_reason=reason, memory_bound=True, notes=notes,
    )


def _generated_candidate(trace: Trace, cl: Classifier, matcher: _Matcher, units: Sequence[Unit]):
    """A chain no registered pattern matches: a generated kernel for its forward ops (the
    backward cluster gets the same one: the generated backward replaces it), with the dataflow
    read off the source when the traced file is on this disk. Not for the optimizer's chains
    (the fix there is a fused or foreach optimizer, not a kernel of ours)."""
    rows = sorted(matcher.forward_rows(units))
    records = [cl.record(r) for r in rows]
    source = next((cl.col.source[r] for r in rows if isinstance(cl.col.source[r], str)), None)
    file_name, _, line = (source or "").rpartition(":")
    path = resolve_source_file(file_name, trace.run_info) if file_name and line.isdigit() else None
    try:
        return matcher.patterns.generated(records, str(path) if path else None, int(line) if path else None, source)
    except (ValueError, RuntimeError) as exc:   # e.g. an op's meta run fails: no kernel, not an error
        logging.getLogger(__name__).debug("no generated kernel for %s: %s", source, exc)
        return None


def _same_op(a: dict, b: dict) -> bool:
    return (a["name"], a["dims"], a["types"]) == (b["name"], b["dims"], b["types"])


def _share_generated_backward(clusters: list[Cluster], profile: DeviceProfile, patterns: PatternLookup) -> None:
    """Autograd splits a chain's backward where its gradient graph branches (a clamp's mask, a
    broadcast input's sum), so one forward chain can have several backward clusters, each over
    part of its ops. The forward chain's generated kernel replaces all of them with one backward
    kernel: each such backward cluster takes the forward cluster's pattern (bench then times them
    together, forward+backward) and its share of that kernel's bytes."""
    forwards = [c for c in clusters if c.direction == "forward" and is_generated(c.pattern)]
    shared: dict[str, list[Cluster]] = {}
    for c in clusters:
        if c.direction != "backward" or not is_generated(c.pattern):
            continue
        mine = c.pattern_params["chain"]["ops"]
        for f in forwards:
            theirs = f.pattern_params["chain"]["ops"]
            if any(all(_same_op(a, b) for a, b in zip(mine, theirs[i:i + len(mine)]))
                   for i in range(len(theirs) - len(mine) + 1)):
                shared.setdefault(f.id, []).append(c)
                break
    for fid, backs in shared.items():
        f = next(c for c in clusters if c.id == fid)
        pattern = patterns.resolve(f.pattern, f.pattern_params)
        share = pattern.fused_bytes(f.pattern_params)["backward"] / len(backs)
        for c in backs:
            c.pattern, c.pattern_params = f.pattern, f.pattern_params
            c.estimate = cluster_estimate([OpRecord.from_trace(**o) for o in c.ops], share, profile,
                                          traced_us=c.measured_us_per_occurrence)
            others = [b.id for b in backs if b is not c]
            c.notes = [f"backward of {f.id}'s generated kernel" + (f", with {', '.join(others)}" if others else "")]
