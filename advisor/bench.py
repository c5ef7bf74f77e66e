"""bench: rebuild each matched cluster on its captured shapes and dtypes, check the replacement's
numerics forward and backward, and time it against eager, torch.compile and Liger.

Reads `result.clusters` (those with a registered `pattern`) and `result.launch_bound`; writes
`result.benchmarks`, one Benchmark per cluster and pass. A cluster that runs backward in the step
is timed forward and forward+backward; the forward+backward figures are the ones that count.

Verdicts (on the cluster's own figures, never on estimates):
  rejected     the Triton replacement fails numerics, or is not faster than eager by MIN_SPEEDUP
  recommended  it passes numerics and beats eager; `best_provider` says when torch.compile or
               Liger is faster still (then the honest advice is to use that)
  not run      no CUDA GPU, an unregistered pattern, inputs that cannot be built; and every
               CPU/interpreter run (its timings exercise the plumbing, they are not GPU figures)
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Callable

import torch

from fusion_advisor import measure
from fusion_advisor.kernels import autocast
from fusion_advisor.cost_model.timing import Timing, time_calls
from fusion_advisor.core.errors import AdvisorError, EnvironmentProblem
from fusion_advisor.core.result import (FORWARD, FORWARD_BACKWARD, AdvisorResult, Benchmark, ProviderTiming,
                                        params_key)

MIN_SPEEDUP = 1.02          # below this the difference is within run-to-run noise: not "faster"
CPU_MAX_ELEMENTS = 1 << 16  # the interpreter runs one program at a time: CPU mode is for tiny shapes
NOT_TIMED_ON_GPU = "not timed on GPU: CPU/interpreter timings exercise the plumbing only"


@dataclass
class BenchOptions:
    providers: tuple[str, ...] = measure.PROVIDERS
    mode: str = "auto"               # "auto": the CUDA GPU, or nothing timed; "cpu": interpreter mode
    cuda_graphs: bool | None = None  # None: time the CUDA-graph alternative when the step is launch-bound
    warmup_ms: float = 25.0
    rep_ms: float = 100.0


def parse_providers(text: str) -> tuple[str, ...]:
    names = tuple(p.strip() for p in text.split(",") if p.strip())
    known = (*measure.PROVIDERS, measure.CUDA_GRAPH)
    unknown = [p for p in names if p not in known]
    if unknown:
        raise AdvisorError(f"unknown provider {unknown[0]!r} (known: {', '.join(known)})")
    if "eager" not in names:
        raise AdvisorError("--providers must include eager: every speedup is measured against it")
    return names


def bench(result: AdvisorResult, options: BenchOptions | None = None,
          progress: Callable[[int, int, str], None] | None = None) -> AdvisorResult:
    """Fill `result.benchmarks` (replacing any earlier ones). `progress(done, total, label)` is
    called before each cluster and once at the end."""
    options = options or BenchOptions()
    matched = [c for c in result.clusters if c.pattern]
    result.benchmarks = []
    if not matched:
        return result
    from fusion_advisor import kernels as registry  # imports every pattern (and Triton) only when benching

    # The environment as it is now, not kernels.common.interpreting() (read once at import, for the
    # launchers' hot path): a bench run asked without the interpreter is refused as such.
    device = _device(options.mode, os.environ.get("TRITON_INTERPRET", "0") == "1")
    graphs = options.cuda_graphs if options.cuda_graphs is not None else result.is_launch_bound()
    if measure.CUDA_GRAPH in options.providers:
        graphs = True
    cache: dict[tuple, list[Benchmark]] = {}
    lost: str | None = None
    for done, cluster in enumerate(matched):
        label = f"{cluster.pattern} {_shape_label(cluster.pattern_params)}"
        if progress:
            progress(done, len(matched), label)
        if lost is not None:
            result.benchmarks.append(Benchmark(cluster.id, cluster.pattern, dict(cluster.pattern_params), FORWARD,
                                               timing="none", reason=lost))
            continue
        result.benchmarks.extend(_bench_cluster(cluster, result, registry, device, options, graphs, cache))
        why = context_lost(device)
        if why is not None:
            # A device-side assert (RoBERTa's token-type table indexed as positions, on an H100) leaves
            # the CUDA context unusable: every later call in this process fails, and those failures
            # would read as the later patterns' own.
            lost = (f"not timed: the CUDA context was lost during the bench of {label} ({why}); every GPU "
                    f"call after it fails in this process")
    note = _untuned_tiles_note(result, device)
    if note and note not in result.notes:
        result.notes.append(note)
    if progress:
        progress(len(matched), len(matched), "done")
    return result


def _untuned_tiles_note(result: AdvisorResult, device: torch.device | None) -> str | None:
    """Where our norm kernels were timed on a GPU model without searched tiles, say how to search them:
    bench's verdicts on those patterns were made with the heuristic's tiles."""
    if device is None or device.type != "cuda":
        return None
    from fusion_advisor.kernels import norm_tiles
    timed = {b.pattern for b in result.benchmarks if b.timing == "gpu"}
    return norm_tiles.untuned_note(timed, norm_tiles.gpu_name(device))


def context_lost(device: torch.device | None) -> str | None:
    """None while `device` still runs work; else the first line of what the CUDA runtime says."""
    if device is None or device.type != "cuda":
        return None
    try:
        torch.cuda.synchronize(device)
        torch.ones(1, device=device).add_(1).item()
    except Exception as exc:   # AcceleratorError / RuntimeError: "CUDA error: device-side assert triggered"
        return f"{type(exc).__name__}: {str(exc).strip().splitlines()[0]}"
    return None


def _device(mode: str, interpreting: bool) -> torch.device | None:
    if mode == "cpu":
        if not interpreting:
            raise EnvironmentProblem("CPU mode needs TRITON_INTERPRET=1 in the environment before fusion-advisor "
                                     "starts (Triton kernels run in its interpreter)")
        return torch.device("cpu")
    if mode != "auto":
        raise AdvisorError(f"unknown bench mode {mode!r} (use auto or cpu)")
    if torch.cuda.is_available() and not interpreting:
        return torch.device("cuda", torch.cuda.current_device())
    return None


def _bench_cluster(cluster, result, registry, device, options, graphs, cache) -> list[Benchmark]:
    def not_run(reason: str, passes: str = FORWARD) -> list[Benchmark]:
        return [Benchmark(cluster.id, cluster.pattern, dict(cluster.pattern_params), passes, reason=reason)]

    if cluster.direction == "backward":
        partner = result.forward_partner(cluster)
        if partner is not None:
            return not_run(f"timed with its forward cluster {partner.id} (forward+backward)", FORWARD_BACKWARD)
    try:
        pattern = registry.resolve(cluster.pattern, cluster.pattern_params)
    except KeyError as exc:
        return not_run(f"pattern {cluster.pattern!r} is not registered in this fusion-advisor ({exc.args[0]})")
    backward = cluster.direction == "backward" or result.has_backward(cluster)
    primary = FORWARD_BACKWARD if backward else FORWARD
    if device is None:
        return not_run("no CUDA GPU", primary)
    params = {k: v for k, v in cluster.pattern_params.items() if k != "requires_grad"}
    launch_bound = result.host_counts()
    key = (pattern.name, params_key(params), backward, graphs)
    if key not in cache:
        region = autocast.traced_region(pattern.autocast_op, params, device.type)
        with region:
            cache[key] = _bench_pattern(pattern, params, device, backward, options, graphs, launch_bound)
        if isinstance(region, torch.autocast):
            for b in cache[key]:
                b.reason = "; ".join(filter(None, [b.reason, f"timed inside torch.autocast({device.type!r}, "
                                                             f"{params['dtype']}), as the trace ran it"]))
    return [dataclasses.replace(b, cluster_id=cluster.id, params=dict(cluster.pattern_params),
                                measured=dict(b.measured), numerics_by_provider=dict(b.numerics_by_provider))
            for b in cache[key]]


def _bench_pattern(pattern, params: dict, device: torch.device, backward: bool, options: BenchOptions,
                   graphs: bool, launch_bound: bool) -> list[Benchmark]:
    """Numerics, then timings, for one pattern on one shape: a Benchmark per pass."""
    from fusion_advisor.kernels.numerics import compare_pattern

    passes = [FORWARD, FORWARD_BACKWARD] if backward else [FORWARD]
    on_gpu = device.type == "cuda"
    where = torch.cuda.get_device_name(device) if on_gpu else "cpu (TRITON_INTERPRET=1)"
    blank = [Benchmark("", pattern.name, dict(params), p, timing="gpu" if on_gpu else "cpu-interpreter",
                       device=where) for p in passes]

    def all_not_run(reason: str) -> list[Benchmark]:
        for b in blank:
            b.timing, b.reason = "none", reason
        return blank

    if not on_gpu and _input_elements(pattern, params) > CPU_MAX_ELEMENTS:
        return all_not_run(f"shape too large for CPU interpreter mode (over {CPU_MAX_ELEMENTS} elements)")
    try:
        workloads = {p: measure.build_workload(pattern, params, device, backward=(p == FORWARD_BACKWARD),
                                               requires_grad=backward) for p in passes}
    except Exception as exc:
        return all_not_run(f"cannot build inputs for {params}: {type(exc).__name__}: {exc}")

    fns, numerics, notes = {}, {}, []
    for provider in options.providers:
        if provider == measure.CUDA_GRAPH:
            continue
        try:
            fns[provider] = measure.provider_callable(pattern, provider)
        except measure.ProviderUnavailable as exc:
            notes.append(f"{provider}: not run ({exc})")
            continue
        if provider != "eager":
            try:
                check = compare_pattern(pattern, params, device, candidate=fns[provider], backward=backward)
                numerics[provider] = "ok" if check.ok else check.detail
            except Exception as exc:   # the reference itself failed: nothing can be judged
                return all_not_run(f"the reference raised on these inputs: {type(exc).__name__}: {exc}")
    if graphs and on_gpu:
        fns[measure.CUDA_GRAPH] = pattern.reference

    for bench_ in blank:
        bench_.numerics_by_provider = dict(numerics)
        if "triton" in numerics:
            bench_.numerics_ok = numerics["triton"] == "ok"
            bench_.numerics_detail = numerics["triton"]
        work = workloads[bench_.passes]
        for provider, fn in fns.items():
            if numerics.get(provider, "ok") != "ok":
                continue   # a provider that computes something else is not timed
            try:
                bench_.measured[provider] = _time_provider(work, provider, fn, device, options)
            except Exception as exc:
                notes.append(f"{provider} {bench_.passes}: failed ({type(exc).__name__}: {exc})")
        verdict, reason, best = judge(bench_.measured, numerics, bench_.timing, launch_bound)
        bench_.verdict, bench_.best_provider = verdict, best
        bench_.reason = "; ".join([reason, *dict.fromkeys(notes)])
    return blank


def _input_elements(pattern, params: dict) -> int:
    """Elements of one input set, counted on the meta device (nothing allocated); 0 if the
    pattern cannot build meta tensors (then building them for real reports the problem)."""
    try:
        inputs = pattern.make_inputs(params, torch.device("meta"), False)
    except Exception:
        return 0
    return sum(a.numel() for a in inputs.args if isinstance(a, torch.Tensor))


def _time_provider(work: measure.Workload, provider: str, fn, device, options: BenchOptions) -> ProviderTiming:
    if provider == measure.CUDA_GRAPH:
        replays, graphs = measure.graph_replays(work, fn)
        timing = time_calls(replays, device, warmup_ms=options.warmup_ms, rep_ms=options.rep_ms)
        del graphs
        return ProviderTiming(*_rounded(timing), host_us=round(timing.host_us, 3))
    timing = time_calls(work.calls(fn), device, before=work.clear_grads,
                                warmup_ms=options.warmup_ms, rep_ms=options.rep_ms)
    memory = measure.measure_memory(work, fn, device)
    return ProviderTiming(*_rounded(timing), peak_mem_bytes=memory.peak_bytes,
                          host_us=round(timing.host_us, 3), activation_bytes=memory.activation_bytes)


def _rounded(timing: Timing) -> tuple[float, float, float]:
    return round(timing.p20_us, 3), round(timing.p50_us, 3), round(timing.p80_us, 3)


def judge(measured: dict[str, ProviderTiming], numerics: dict[str, str], timing: str,
          launch_bound: bool = False) -> tuple[str, str, str | None]:
    """(verdict, reason, best_provider) for the Triton replacement, from the figures alone."""
    triton_numerics = numerics.get("triton")
    if triton_numerics is not None and triton_numerics != "ok":
        return "rejected", f"numerics: {triton_numerics}", None
    if timing != "gpu":
        return "not run", NOT_TIMED_ON_GPU, None
    eager = measured.get("eager")
    if eager is None:
        return "not run", "eager was not timed: no baseline", None
    cost = {p: t.call_cost_us(launch_bound) for p, t in measured.items()}
    basis = "max of GPU and host time (the GPU waits for the host)" if launch_bound else "GPU time"
    faster = [p for p in measured if p not in ("eager", measure.CUDA_GRAPH) and cost["eager"] / cost[p] >= MIN_SPEEDUP]
    best = min(faster, key=cost.__getitem__) if faster else None
    if best not in (None, "triton") and "triton" in faster and cost["triton"] / cost[best] < MIN_SPEEDUP:
        best = "triton"   # the others are within noise of ours: no reason to send the user elsewhere
    others = ""
    if best not in (None, "triton"):
        advice = {"compile": "use torch.compile", "liger": "use Liger-Kernel"}.get(best, f"use {best}")
        others = (f"; {measure.LABELS[best]} is faster ({cost[best]:.1f} µs, "
                  f"{cost['eager'] / cost[best]:.2f}x eager): {advice}")
    if "triton" not in measured:
        return "not run", "the Triton replacement was not timed" + others, best
    speedup = cost["eager"] / cost["triton"]
    figures = f"triton {cost['triton']:.1f} µs vs eager {cost['eager']:.1f} µs ({speedup:.2f}x, p50 {basis})"
    if speedup < MIN_SPEEDUP:
        return "rejected", f"not faster than eager: {figures}" + others, best
    return "recommended", figures + others, best


def _shape_label(params: dict) -> str:
    shape = params.get("shape")
    dims = "x".join(map(str, shape)) if isinstance(shape, (list, tuple)) else ""
    return f"{dims} {params.get('dtype', '')}".strip()
