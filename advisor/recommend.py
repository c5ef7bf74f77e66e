"""recommend: rank what to change by the time it saves per step, and price it.

Reads `result.clusters`, `result.benchmarks`, `result.launch_bound`, `result.summary` and
`result.run`; writes `result.recommendations`. It only ranks: what applying each one changes
(`Recommendation.patch`) is apply's to say (apply.describe_patches).

Order:
  1. when the step is launch-bound, the CUDA-graphs / torch.compile verdict comes first: fewer
     launches then matter more than faster kernels;
  2. measured savings (bench timed them on this GPU), largest first: per-call saving of the best
     provider that passed numerics and beat eager, times the cluster's occurrences per step;
  3. estimates (the cost model's), largest first, only for clusters that bench could not time
     (no GPU, or a CPU/interpreter run), labelled `confidence: "estimate"`.
A rejected replacement (numerics, or not faster than eager) is never recommended; if
torch.compile or Liger beat eager there, that is recommended instead. The exception is a pattern
whose goal is memory (linear_cross_entropy): measured to lower the peak, it is offered as a trade
(kind "memory", its time cost in the title), ranked by its time like the rest (a cost ranks last),
and applied only on request.

ROI: GPU-seconds saved per step x steps per day x GPUs. Steps per day come from `--steps-per-day`,
else the run's measured unprofiled step time (a job that trains around the clock). The hourly
price defaults to DEFAULT_GPU_HOURLY_COST (below, with its source); pass your own.
"""
from __future__ import annotations

from dataclasses import dataclass

from fusion_advisor.analyzers.lm_head_loss import LM_HEAD_SUFFIX
from fusion_advisor.cluster_names import where_label
from fusion_advisor.core.errors import AdvisorError
from fusion_advisor.core.result import FORWARD_BACKWARD, AdvisorResult, Benchmark, Cluster, Recommendation, is_generated
from fusion_advisor.bench import judge

# A round figure for renting one H100/H200 SXM GPU on demand from the specialty GPU clouds in
# 2026: published comparisons put H100 SXM at about $2.50-3.50 per GPU-hour there (hyperscalers
# charge more, spot and reserved capacity less). Pass --gpu-hourly-cost with your own rate.
DEFAULT_GPU_HOURLY_COST = 2.50
GPU_HOURLY_COST_SOURCE = ("default: a round 2026 on-demand rate for one H100/H200 SXM GPU on specialty GPU "
                          "clouds (about $2.50-3.50); pass --gpu-hourly-cost for yours")
DAYS_PER_MONTH = 30
SECONDS_PER_DAY = 86_400


@dataclass
class RoiOptions:
    gpu_hourly_cost: float = DEFAULT_GPU_HOURLY_COST
    steps_per_day: float | None = None     # None: from the run's measured step time
    gpus: int = 1
    cost_is_default: bool = True

    def __post_init__(self):
        if not self.gpu_hourly_cost >= 0:
            raise AdvisorError(f"--gpu-hourly-cost must be >= 0, got {self.gpu_hourly_cost}")
        if self.steps_per_day is not None and not self.steps_per_day > 0:
            raise AdvisorError(f"--steps-per-day must be > 0, got {self.steps_per_day}")
        if self.gpus < 1:
            raise AdvisorError(f"--gpus must be at least 1, got {self.gpus}")


def steps_per_day(result: AdvisorResult, options: RoiOptions) -> tuple[float | None, str]:
    """(steps per day, where that figure comes from)."""
    if options.steps_per_day is not None:
        return float(options.steps_per_day), "--steps-per-day"
    step_s = result.run.get("step_time_s_unprofiled")
    if isinstance(step_s, (int, float)) and step_s > 0:
        return SECONDS_PER_DAY / step_s, (f"measured unprofiled step time {step_s * 1e3:.2f} ms, "
                                          "training around the clock")
    return None, "no step rate: the run has no unprofiled step time; pass --steps-per-day"


def roi(saving_us_per_step: float | None, basis: str, result: AdvisorResult, options: RoiOptions) -> dict:
    """GPU-hours and dollars saved per day and per month, with every assumption stated."""
    rate, rate_source = steps_per_day(result, options)
    assumptions = {
        "gpu_hourly_cost_usd": options.gpu_hourly_cost,
        "gpu_hourly_cost_source": GPU_HOURLY_COST_SOURCE if options.cost_is_default else "--gpu-hourly-cost",
        "steps_per_day": rate,
        "steps_per_day_source": rate_source,
        "gpus": options.gpus,
        "days_per_month": DAYS_PER_MONTH,
    }
    out = {"basis": basis, "assumptions": assumptions}
    if saving_us_per_step is None or rate is None:
        out["missing"] = rate_source if rate is None else "no saving figure"
        return out
    gpu_hours_per_day = saving_us_per_step * 1e-6 * rate * options.gpus / 3600
    out.update({
        "gpu_hours_per_day": round(gpu_hours_per_day, 4),
        "usd_per_day": round(gpu_hours_per_day * options.gpu_hourly_cost, 2),
        "usd_per_month": round(gpu_hours_per_day * options.gpu_hourly_cost * DAYS_PER_MONTH, 2),
    })
    step_s = result.run.get("step_time_s_unprofiled")
    if isinstance(step_s, (int, float)) and step_s > 0:
        out["pct_of_step"] = round(100 * saving_us_per_step * 1e-6 / step_s, 3)
    return out


def recommend(result: AdvisorResult, options: RoiOptions | None = None) -> AdvisorResult:
    """Fill `result.recommendations`, ranked (replacing any earlier ones)."""
    options = options or RoiOptions()
    host_counts = result.host_counts()
    measured, estimated = [], []
    for cluster in result.clusters:
        if not cluster.pattern:
            continue   # no registered replacement: nothing we could time or apply
        if cluster.direction == "backward" and result.forward_partner(cluster) is not None:
            continue   # its saving is in the forward cluster's forward+backward figures
        if _speaker(cluster, result) is not cluster:
            continue   # one call, timed from both sides: counted once, by the other
        same_call = result.same_call_partner(cluster)
        rec = _cluster_recommendation(cluster, result, host_counts, options)
        if rec is not None and same_call is not None:
            rec.detail = "; ".join(filter(None, [rec.detail, (
                f"the same call's {same_call.direction} cluster {same_call.id} (read as "
                f"{_params_text(same_call.pattern_params)}) is not counted again")]))
        if rec is not None:
            (measured if rec.confidence == "measured" else estimated).append(rec)
    layout = _channels_last_recommendation(result, options)
    if layout is not None:
        estimated.append(layout)
    ranked = sorted(measured, key=lambda r: -r.measured_saving_us_per_step)
    ranked += sorted(estimated, key=lambda r: -(r.estimate_saving_us_per_step or 0.0))
    if result.is_launch_bound():
        ranked.insert(0, _launch_bound_recommendation(result, options))
    seen: set[str] = set()
    for rank, rec in enumerate(ranked, 1):
        rec.rank = rank
        if rec.title in seen:   # two clusters alike in every named respect: the id tells them apart
            rec.title += f" [{rec.cluster_id}]"
        seen.add(rec.title)
    result.recommendations = ranked
    return result


def _speaker(cluster: Cluster, result: AdvisorResult) -> Cluster:
    """The cluster that speaks for cluster's call: itself, or its same-call partner where that one
    represents the call (`_represents`)."""
    same_call = result.same_call_partner(cluster)
    return same_call if same_call is not None and _represents(same_call, cluster, result) else cluster


def _represents(cluster: Cluster, other: Cluster, result: AdvisorResult) -> bool:
    """Of one call's forward and backward clusters (AdvisorResult.same_call_partner), which one
    speaks for it: the one whose eager forward+backward took longer, since it saw more of the
    call's chain (GPT-NeoX's loss on the H100: 8,758 us as the backward cluster read it, bf16 logits
    and their upcast, against 6,157 us for the forward cluster's fp32 logits); the forward one
    where either was not timed."""
    def eager_us(c: Cluster) -> float | None:
        bench = result.primary_benchmark(c)
        timing = bench.measured.get("eager") if bench is not None and bench.timing == "gpu" else None
        return timing.p50_us if timing is not None else None

    mine, theirs = eager_us(cluster), eager_us(other)
    if mine is None or theirs is None or mine == theirs:
        return cluster.direction == "forward"
    return mine > theirs


def _params_text(params: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in params.items() if k != "requires_grad")


def _occurrences(cluster: Cluster) -> tuple[float, str]:
    if cluster.occurrences_per_step > 0:
        return cluster.occurrences_per_step, ""
    return 1.0, "occurrences per step unknown: counted once"


def _estimate_per_step(cluster: Cluster, result: AdvisorResult) -> float | None:
    """The cost model's saving per step, the backward cluster's included."""
    parts = [cluster] + (result.backward_partners(cluster) if cluster.direction == "forward" else [])
    same_call = result.same_call_partner(cluster)
    parts += [same_call] if same_call is not None else []
    total, known = 0.0, False
    for c in parts:
        if c.estimate.saving_us is not None:
            total += c.estimate.saving_us * _occurrences(c)[0]
            known = True
    return total if known else None


def _cluster_recommendation(cluster: Cluster, result: AdvisorResult, launch_bound: bool,
                            options: RoiOptions) -> Recommendation | None:
    from fusion_advisor import kernels as registry

    bench = result.primary_benchmark(cluster)
    estimate = _estimate_per_step(cluster, result)
    occurrences, occ_note = _occurrences(cluster)
    where = where_label(cluster)
    try:
        pattern = registry.resolve(cluster.pattern, cluster.pattern_params)
    except KeyError:
        pattern = None
    if pattern is not None and pattern.goal == "memory":
        return _memory_recommendation(cluster, bench, pattern, where, occurrences, launch_bound, result, options)
    verdict, best = (bench.verdict, bench.best_provider) if bench is not None else ("not run", None)
    if bench is not None and bench.timing == "gpu":
        # judged again in this step's terms: a stored result priced before host_counts did not count
        # host time where the GPU waits for it
        verdict, _, best = judge(bench.measured, bench.numerics_by_provider, bench.timing, launch_bound)
    if verdict == "rejected" and best is None:
        return None
    if bench is None or bench.timing != "gpu":
        if estimate is None or estimate <= 0:
            return None
        why = bench.reason if bench is not None and bench.reason else "not benchmarked"
        return Recommendation(
            rank=0, cluster_id=cluster.id, pattern=cluster.pattern,
            title=f"Fuse {where} with {_whose(cluster)} (estimate: not timed)",
            measured_saving_us_per_step=None, estimate_saving_us_per_step=estimate, confidence="estimate",
            roi=roi(estimate, "estimate", result, options), kind="fused_kernel",
            detail="; ".join(x for x in (f"cost-model estimate, {why}", occ_note) if x))
    if best is None or "eager" not in bench.measured or best not in bench.measured:
        return None
    eager, chosen = bench.measured["eager"], bench.measured[best]
    per_call = eager.call_cost_us(launch_bound) - chosen.call_cost_us(launch_bound)
    saving = per_call * occurrences
    kind = {"triton": "fused_kernel", "compile": "torch_compile", "liger": "liger"}.get(best, best)
    ours_applied = verdict != "rejected"   # `apply` uses our kernel wherever it beat eager
    other = {"compile": "torch.compile", "liger": "Liger-Kernel"}.get(best)
    if best == "triton":
        title = f"Fuse {where} with {_whose(cluster)}"
    elif ours_applied:
        title = f"Fuse {where} with {_whose(cluster)} ({other} measured faster still)"
    else:
        title = (f"Wrap {where} in torch.compile by hand" if best == "compile" else
                 f"Use Liger-Kernel's {cluster.pattern} for {where} by hand") + \
                f": our {cluster.pattern} kernel lost to eager, `apply` leaves it"
    detail = (f"{best} {chosen.call_cost_us(launch_bound):.1f} µs vs eager {eager.call_cost_us(launch_bound):.1f} µs "
              f"per call ({bench.passes}, on {bench.device}) x {occurrences:g} per step")
    ours = bench.measured.get("triton")
    if other and ours_applied and ours is not None:
        ours_saving = (eager.call_cost_us(launch_bound) - ours.call_cost_us(launch_bound)) * occurrences
        detail += f"; what `apply` puts in, our kernel, saves {ours_saving:.1f} µs per step"
    return Recommendation(
        rank=0, cluster_id=cluster.id, pattern=cluster.pattern, title=title,
        measured_saving_us_per_step=saving, estimate_saving_us_per_step=estimate, confidence="measured",
        memory_saved_bytes=_memory_saved(eager, chosen, bench.passes, occurrences),
        roi=roi(saving, "measured", result, options), kind=kind,
        detail="; ".join(x for x in (detail, occ_note) if x))


def _memory_recommendation(cluster: Cluster, bench: Benchmark | None, pattern, where: str, occurrences: float,
                           launch_bound: bool, result: AdvisorResult, options: RoiOptions) -> Recommendation | None:
    """A pattern whose goal is memory (linear_cross_entropy): recommended when bench timed it on
    the GPU, its numerics passed and its forward+backward peak is lower than eager's, whatever it
    costs in time; the title states both figures. Never from an estimate: the cost model does not
    price memory, and a trade must be measured to be offered."""
    if bench is None or bench.timing != "gpu" or bench.numerics_ok is False:
        return None
    eager, ours = bench.measured.get("eager"), bench.measured.get("triton")
    if eager is None or ours is None or eager.peak_mem_bytes is None or ours.peak_mem_bytes is None:
        return None
    saved = int(eager.peak_mem_bytes - ours.peak_mem_bytes)
    if saved <= 0:
        return None
    saving = (eager.call_cost_us(launch_bound) - ours.call_cost_us(launch_bound)) * occurrences
    time_text = (f"{-saving / 1e3:.2f} ms per step slower" if saving < 0 else f"{saving / 1e3:.2f} ms per step faster")
    mib = lambda b: f"{b / 2**20:,.0f} MiB"  # noqa: E731
    figures = [f"peak of one {bench.passes}: eager {mib(eager.peak_mem_bytes)}, ours {mib(ours.peak_mem_bytes)}",
               f"ours {ours.call_cost_us(launch_bound):.1f} µs vs eager {eager.call_cost_us(launch_bound):.1f} µs "
               f"per call (on {bench.device}) x {occurrences:g} per step"]
    loss = _fused_loss_saving_per_call(cluster, result, launch_bound)
    if loss is not None:
        # The trade replaces the loss that the plan already fuses: priced against eager alone, GPT-NeoX's
        # (H100 zoo) read "5.54 ms per step faster" where it is 2.1 ms slower than the head + our loss.
        pattern_name, loss_us = loss
        eager_us = eager.call_cost_us(launch_bound) - loss_us
        figures.insert(1, f"against eager's head with our {pattern_name} ({eager_us:.1f} µs: eager's "
                          f"{eager.call_cost_us(launch_bound):.1f} less the {loss_us:.1f} µs our {pattern_name} "
                          f"saves a call, from its own benchmark)")
        vs_eager = f"{abs(saving) / 1e3:.2f} ms {'slower' if saving < 0 else 'faster'} than eager"
        saving = (eager_us - ours.call_cost_us(launch_bound)) * occurrences
        time_text = (f"{abs(saving) / 1e3:.2f} ms per step {'slower' if saving < 0 else 'faster'} than with our "
                     f"{pattern_name}, {vs_eager}")
    liger = bench.measured.get("liger")
    if liger is not None and liger.peak_mem_bytes is not None:
        figures.append(f"Liger-Kernel {liger.call_cost_us(launch_bound):.1f} µs, {mib(liger.peak_mem_bytes)}")
    figures.append("a memory trade: `fusion-advisor apply --memory` applies it")
    return Recommendation(
        rank=0, cluster_id=cluster.id, pattern=cluster.pattern,
        title=f"Save {mib(saved)} of peak memory in {where} with our {pattern.name} ({time_text})",
        measured_saving_us_per_step=saving, estimate_saving_us_per_step=None, confidence="measured",
        memory_saved_bytes=saved,
        roi=roi(saving, "measured", result, options), kind="memory", detail="; ".join(figures))


def _fused_loss_saving_per_call(cluster: Cluster, result: AdvisorResult, launch_bound: bool) -> tuple[str, float] | None:
    """(pattern, µs a call) our fused loss saves on the call a memory trade derives from
    (analyzers/lm_head_loss.py: "<loss cluster id>" + LM_HEAD_SUFFIX), as its benchmark measured it where our
    kernel beat eager (what `apply` puts in without --memory); None where there is none."""
    loss_id = cluster.id.removesuffix(LM_HEAD_SUFFIX)
    loss = next((c for c in result.clusters if c.id == loss_id and c.id != cluster.id), None)
    if loss is None:
        return None
    loss = _speaker(loss, result)
    bench = result.primary_benchmark(loss)
    if bench is None or bench.timing != "gpu" or bench.numerics_ok is False:
        return None
    eager, ours = bench.measured.get("eager"), bench.measured.get("triton")
    if eager is None or ours is None:
        return None
    saved = eager.call_cost_us(launch_bound) - ours.call_cost_us(launch_bound)
    return (loss.pattern, saved) if saved > 0 and bench.verdict != "rejected" else None


def _memory_saved(eager, chosen, passes: str, occurrences: float) -> int | None:
    """Training: activation bytes held from forward to backward, in every occurrence at once.
    Inference: the peak of one call (occurrences run one after another)."""
    if passes == FORWARD_BACKWARD:
        if eager.activation_bytes is None or chosen.activation_bytes is None:
            return None
        return int((eager.activation_bytes - chosen.activation_bytes) * occurrences)
    if eager.peak_mem_bytes is None or chosen.peak_mem_bytes is None:
        return None
    return int(eager.peak_mem_bytes - chosen.peak_mem_bytes)


def _whose(cluster: Cluster) -> str:
    if is_generated(cluster.pattern):
        return f"a generated Triton kernel ({cluster.pattern})"
    from fusion_advisor import kernels as registry
    try:
        kind = registry.get(cluster.pattern).replacement_kind
    except KeyError:
        kind = "Triton kernel"
    return f"our {cluster.pattern} {kind}"


# Below this share of the GPU's busy time a step, the layout transposes are not worth a change of
# memory format (the conv example's bf16 trace on an H200: about 9 %).
MIN_TRANSPOSE_SHARE = 0.02


def _channels_last_recommendation(result: AdvisorResult, options: RoiOptions) -> Recommendation | None:
    """cuDNN's NCHW <-> NHWC transposes around the convolutions (analyzers/layout.py), where they
    take MIN_TRANSPOSE_SHARE of the GPU's time or more: convert to channels_last, by hand."""
    layout = result.layout if isinstance(result.layout, dict) else None
    if not layout or not isinstance(layout.get("transpose_us_per_step"), (int, float)):
        return None
    share = layout.get("share_of_gpu_busy")
    if not isinstance(share, (int, float)) or share < MIN_TRANSPOSE_SHARE:
        return None
    us = float(layout["transpose_us_per_step"])
    return Recommendation(
        rank=0, cluster_id="", pattern=None,
        title=f"Convert the model and its inputs to channels_last: cuDNN transposed NCHW <-> NHWC around the "
              f"convolutions, {us:,.1f} µs a step ({100 * share:.1f} % of the GPU's time)",
        measured_saving_us_per_step=None, estimate_saving_us_per_step=us, confidence="estimate",
        roi=roi(us, "estimate", result, options), kind="channels_last",
        detail=(f"{layout.get('transposes_per_step', 0):g} transposes a step ({', '.join(layout.get('kernels') or [])}), "
                "their time measured in the trace; the saving is at most that (the convolution kernels change "
                "too): measure it with your script in channels_last; whole-model torch.compile does the same "
                "conversion inside its graph"))


def _launch_bound_recommendation(result: AdvisorResult, options: RoiOptions) -> Recommendation:
    """The verdict for a launch-bound step, with what CUDA graphs measured on the matched clusters."""
    lb = result.launch_bound if isinstance(result.launch_bound, dict) else {}
    measured, timed = 0.0, 0
    for cluster in result.clusters:
        bench = result.primary_benchmark(cluster)
        if bench is None or bench.timing != "gpu" or "cuda_graph" not in bench.measured or "eager" not in bench.measured:
            continue
        per_call = bench.measured["eager"].call_cost_us(True) - bench.measured["cuda_graph"].call_cost_us(True)
        measured += per_call * _occurrences(cluster)[0]
        timed += 1
    estimate = lb.get("estimate_saving_us_per_step")
    estimate_basis = "launch-bound analysis"
    if not isinstance(estimate, (int, float)):
        estimate = result.summary.get("gpu_idle_us_per_step")
        estimate_basis = "upper bound: GPU idle time per step"
    busy = result.summary.get("gpu_busy_pct")
    busy_text = f" (GPU busy {busy:.0f} % of the step)" if isinstance(busy, (int, float)) else ""
    detail = (f"CUDA-graph replay vs eager, max of GPU and host time, on {timed} matched cluster"
              f"{'s' if timed != 1 else ''}: {measured:.1f} µs per step measured" if timed else
              "no cluster was timed as a CUDA graph")
    detail += f"; estimate is the {estimate_basis}"
    saving = measured if timed else None
    return Recommendation(
        rank=0, cluster_id="", pattern=None,
        title=f"The step is launch-bound{busy_text}: capture it with CUDA graphs or "
              "torch.compile(mode=\"reduce-overhead\") before fusing kernels",
        measured_saving_us_per_step=saving,
        estimate_saving_us_per_step=float(estimate) if isinstance(estimate, (int, float)) else None,
        confidence="measured" if timed else "estimate",
        roi=roi(saving if timed else estimate, "measured" if timed else "estimate", result, options),
        kind="cuda_graphs", detail=detail)
