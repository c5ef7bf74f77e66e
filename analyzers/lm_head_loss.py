"""The LM head and its loss as one candidate (`linear_cross_entropy`), derived from a matched
cross_entropy cluster and the `aten::linear` whose output it read.

The LM head's GEMM is a breaker (rule 2 in clusters.py): no memory-bound chain holds it, so no
signature can match "linear, then cross-entropy". What fusing them buys is memory, not time: the
(tokens, vocab) logits, their fp32 copy and their gradients never exist (1.5 GiB at 4,096 tokens x
32,000 vocab in bf16), for three GEMMs that stay. So the derived cluster is priced by bench like
any other (numerics forward and backward, time, memory) and recommended as a trade (the pattern's
`goal` is "memory"), never as a speed-up.

Found: for each forward cluster matched as cross_entropy, the nearest earlier `aten::linear` on the
same thread (within LOOKBACK op rows of its first op, not crossing into backward) whose output has
exactly the loss's (tokens, vocab) shape and whose inputs share one float dtype; the loss must read
the logits upcast to fp32 (HF's ForCausalLMLoss) or fp32 already, as linear_cross_entropy's
reference does.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

from fusion_advisor.core.result import Cluster, Estimate

LM_HEAD_SUFFIX = "-lm-head"   # the derived cluster's id: its loss cluster's id and this (recommend reads it back)
LOOKBACK = 400   # op rows from the head to its loss (label shift, views, casts): 34 in the HF Llama fixture


def lm_head_loss_clusters(clusters: Sequence[Cluster], first_rows: dict[str, list[int]], col, units: Sequence,
                          n_steps: int, params_from_lm_head: Callable) -> list[Cluster]:
    """One `linear_cross_entropy` cluster per cross_entropy forward cluster fed by an LM head.
    first_rows: cluster id -> the first op row of each of its occurrences; units: the trace's
    launching ops (chain_units.Unit), whose durations give the head's GEMM time;
    params_from_lm_head: linear_cross_entropy's (head op, loss params) -> its params, or None."""
    out = []
    for c in clusters:
        if c.pattern != "cross_entropy" or c.direction != "forward":
            continue
        heads = [h for h in (_head_row(col, r) for r in first_rows.get(c.id, [])) if h is not None]
        if not heads:
            continue
        head = col.record(heads[0])
        params = params_from_lm_head(head, c.pattern_params)
        if params is None:
            continue
        head_rows = set(heads)
        gemm_us = sum(u.dur for u in units if u.top_row in head_rows)
        per_step = c.measured_us_per_step + gemm_us / max(n_steps, 1)
        out.append(Cluster(
            id=f"{c.id}{LM_HEAD_SUFFIX}", direction="forward", pattern="linear_cross_entropy", pattern_params=params,
            module_class=c.module_class, source=c.source,
            ops=[dataclasses.asdict(head)] + list(c.ops), kernels=list(c.kernels), dtypes=[params["dtype"]],
            occurrences_per_step=c.occurrences_per_step, launches_per_step=c.launches_per_step,
            measured_us_per_step=round(per_step, 3),
            measured_us_per_occurrence=round(per_step * max(n_steps, 1) / max(len(heads), 1), 3),
            estimate=Estimate(), split_reason=None, memory_bound=False,
            notes=[f"the LM head's GEMM ({params['tokens']} x {params['hidden']} by {params['vocab']} x "
                   f"{params['hidden']}) and cluster {c.id}'s loss: fused, the (tokens, vocab) logits never "
                   "exist; the GEMMs stay, so this trades time for memory (not priced by the cost model)"]))
    return out


def _head_row(col, first_row: int) -> int | None:
    """The op row of the nearest earlier aten::linear on the loss's thread, in the forward; whether
    it produced the loss's logits is params_from_lm_head's call."""
    tid = col.tid[first_row]
    for r in range(first_row - 1, max(first_row - LOOKBACK, 0) - 1, -1):
        if not col.backward[r] and col.tid[r] == tid and col.name[r] == "aten::linear":
            return r
    return None
