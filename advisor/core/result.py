"""AdvisorResult: the versioned JSON contract between the stages.

profile/analyze write it, bench and recommend add to it, report and apply read it. Every time
figure says in its name whether it is an estimate (`estimate_*`, `*_estimate_us`) or a measurement
(`measured_*`); the two never share a field.

Bump SCHEMA_VERSION when a field changes meaning or is removed, with an entry in CHANGELOG.md;
adding a field with a default is compatible (readers ignore unknown keys and default missing ones).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import time
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from fusion_advisor.core.errors import AdvisorError
from fusion_advisor.core.files import write_text_atomic

SCHEMA_VERSION = 1

FORWARD, FORWARD_BACKWARD = "forward", "forward+backward"    # Benchmark.passes

# The string enums. Read back as any string (a newer fusion-advisor may add a value without a
# schema bump); the names say what each field holds.
Direction = Literal["forward", "backward"]
Passes = Literal["forward", "forward+backward"]
Verdict = Literal["recommended", "rejected", "not run"]
TimingKind = Literal["gpu", "cpu-interpreter", "none"]     # "cpu-interpreter" is never used to recommend
Confidence = Literal["measured", "estimate"]
RecommendationKind = Literal["fused_kernel", "torch_compile", "liger", "cuda_graphs", "memory", "channels_last"]
GENERATED_PREFIX = "generic:"   # a generated kernel's pattern name: "generic:<hash>"


def is_generated(pattern: str | None) -> bool:
    """A generated kernel's pattern name ("generic:<hash>"), not a registered pattern's."""
    return bool(pattern) and pattern.startswith(GENERATED_PREFIX)


@dataclass
class Estimate:
    """What the cost model predicts for one occurrence of a cluster (µs), on `profile`."""

    profile: str = ""                 # DeviceProfile name, e.g. "NVIDIA H100 80GB HBM3 (calibrated)"
    bytes_now: int | None = None      # bytes the unfused kernels move
    bytes_fused: int | None = None    # bytes one fused kernel moves (external inputs/outputs once)
    flops: int | None = None
    now_us: float | None = None       # roofline time of the kernels as they run now
    now_traced_us: float | None = None  # their time in the trace (measured); the saving starts from it
    fused_us: float | None = None     # roofline time of one fused kernel, plus one launch
    saving_us: float | None = None    # now (traced where the trace timed GPU kernels, else roofline) - fused
    saving_lo_us: float | None = None
    saving_hi_us: float | None = None
    unknown_ops: list[str] = field(default_factory=list)  # ops without a bytes rule: not guessed


@dataclass
class Cluster:
    """A producer→consumer chain of memory-bound kernels that one fused kernel could replace,
    merged across steps and repeated layers."""

    id: str                                   # stable: same chain, same id, across runs
    direction: Direction
    pattern: str | None = None                # FusionPattern name: registered, or "generic:<hash>" for a
                                              # generated kernel (pattern_params["chain"] rebuilds it);
                                              # None: no kernel for it
    pattern_params: dict = field(default_factory=dict)
    module_class: str | None = None           # "LlamaModel/LlamaDecoderLayer/LlamaRMSNorm"
    source: str | None = None                 # "modeling_llama.py:62"
    ops: list[dict] = field(default_factory=list)      # OpRecord dicts of one occurrence
    kernels: list[str] = field(default_factory=list)   # short kernel names of one occurrence
    dtypes: list[str] = field(default_factory=list)
    occurrences_per_step: float = 0.0         # e.g. 24 identical layers -> 24
    launches_per_step: float = 0.0
    measured_us_per_step: float = 0.0         # sum of the cluster's kernel durations in the trace
    measured_us_per_occurrence: float = 0.0
    estimate: Estimate = field(default_factory=Estimate)
    split_reason: str | None = None           # why the chain ended where it did
    memory_bound: bool = True
    notes: list[str] = field(default_factory=list)  # e.g. what a generated kernel leaves eager, and why


@dataclass
class ProviderTiming:
    """A benchmark measurement, µs per call, with the profiler off.

    p20/p50/p80 are GPU times with the host kept ahead of the GPU (what a call costs when the step
    is GPU-bound); `host_us` is the median host time to issue one call (what it costs when the
    step is launch-bound). Memory figures are bytes above what was allocated before the call:
    `peak_mem_bytes` the peak during it, `activation_bytes` what the forward leaves allocated
    (outputs and tensors saved for backward)."""

    p20_us: float
    p50_us: float
    p80_us: float
    peak_mem_bytes: int | None = None
    host_us: float | None = None
    activation_bytes: int | None = None

    def call_cost_us(self, host_counts: bool = False) -> float:
        """What one call costs in the step: its GPU time (p50); where the host time counts
        (AdvisorResult.host_counts: the GPU waits for the host), the larger of that and the host
        time to issue the call."""
        if host_counts and self.host_us is not None:
            return max(self.p50_us, self.host_us)
        return self.p50_us


# Under this GPU-busy share of the unprofiled step, host time counts though the step reads
# "gpu-bound": on the H100 zoo (torch 2.11) BERT, busy 85 %, got 9 % slower from LayerNorm kernels
# that bench timed 1.5x faster on the GPU but that take 400-650 µs of host time per fwd+bwd call
# against eager's 170-190; HF Llama, busy 74 %, got 1.16x from kernels that win on both counts.
HOST_COUNTS_BELOW_BUSY = 0.9


@dataclass
class Benchmark:
    cluster_id: str
    pattern: str
    params: dict
    passes: Passes
    measured: dict[str, ProviderTiming] = field(default_factory=dict)  # eager, triton, compile, liger
    numerics_ok: bool | None = None
    numerics_detail: str = ""
    verdict: Verdict = "not run"
    reason: str = ""
    timing: TimingKind = "none"
    device: str = ""                           # where it was timed, e.g. "NVIDIA H200"
    numerics_by_provider: dict[str, str] = field(default_factory=dict)  # provider -> "ok" | failure
    best_provider: str | None = None           # fastest provider that passed numerics and beat eager


@dataclass
class Recommendation:
    rank: int
    cluster_id: str
    pattern: str | None
    title: str
    measured_saving_us_per_step: float | None     # None when bench could not run (no GPU)
    estimate_saving_us_per_step: float | None
    confidence: Confidence
    memory_saved_bytes: int | None = None
    patch: dict = field(default_factory=dict)    # {"kind": "module_swap", "modules": [...], "diff": "..."}
    roi: dict = field(default_factory=dict)      # gpu_hours_per_day, usd_per_day, usd_per_month, assumptions
    kind: RecommendationKind = "fused_kernel"
    detail: str = ""                             # one line: the figures behind it


@dataclass
class AdvisorResult:
    schema_version: int = SCHEMA_VERSION
    tool_version: str = ""
    created_unix: float = field(default_factory=lambda: round(time.time(), 3))
    trace_path: str | None = None
    run: dict = field(default_factory=dict)              # script, argv, gpu, driver, torch, triton, steps
    device_profile: dict | None = None                   # the DeviceProfile every estimate used
    summary: dict = field(default_factory=dict)          # analyzers.summary.StepSummary
    kernel_classes: list[dict] = field(default_factory=list)   # class, calls_per_step, measured_us_per_step, pct
    # Roofline points, one per kernel name, every figure per step (bytes and FLOPs summed over the
    # step's calls, like the time): name (the trace's full name), short_name,
    # kernel_class, calls_per_step, measured_us_per_step, bytes_estimate, flops_estimate,
    # estimate_us_per_step, intensity, achieved_gbps, pct_of_peak_bw, memory_bound (below the
    # ridge point), cluster_id (None outside clusters). A CPU-only trace: one point per op name
    # that would launch a kernel, measured_us_per_step None.
    kernels: list[dict] = field(default_factory=list)
    # One representative step on the GPU, for the timeline chart: name, stream, start_us (from
    # the step's first kernel), dur_us, kernel_class, cluster_id
    timeline: list[dict] = field(default_factory=list)
    clusters: list[Cluster] = field(default_factory=list)      # ranked by estimated saving per step
    launch_bound: dict | None = None     # analyzers.launch_bound.LaunchBound (None: no GPU kernels)
    layout: dict | None = None           # analyzers.layout.layout_transposes (None: no NCHW<->NHWC transposes)
    benchmarks: list[Benchmark] = field(default_factory=list)
    recommendations: list[Recommendation] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    # A torchrun job (advisor/distributed.py): world_size, ranks [{rank, trace, step_time_s,
    # communication {comm_us_per_step, exposed_us_per_step, ...}}], slowest_rank, skew_pct
    distributed: dict | None = None

    # -- queries -------------------------------------------------------------------------------
    def host_counts(self) -> bool:
        """Whether a call's host time counts in what it costs the step (ProviderTiming.call_cost_us):
        in a launch-bound step, and wherever the GPU sat idle for more than 1 - HOST_COUNTS_BELOW_BUSY
        of the unprofiled step (the host is then on the critical path part of the time)."""
        if self.is_launch_bound():
            return True
        share = self.gpu_busy_share()
        return share is not None and share < HOST_COUNTS_BELOW_BUSY

    def gpu_busy_share(self) -> float | None:
        """The share of the unprofiled step the GPU was busy, as the launch-bound analyzer measured
        it; None where it was not measured."""
        lb = self.launch_bound
        share = lb.get("gpu_busy_share_unprofiled") if isinstance(lb, dict) else None
        return float(share) if isinstance(share, (int, float)) and not isinstance(share, bool) else None

    def is_launch_bound(self) -> bool:
        """What the launch-bound analyzer concluded, read defensively: a bool, or a dict with a
        `launch_bound` / `is_launch_bound` flag or a `verdict` of "launch-bound"."""
        lb = self.launch_bound
        if isinstance(lb, bool):
            return lb
        if not isinstance(lb, dict):
            return False
        for key in ("launch_bound", "is_launch_bound"):
            if isinstance(lb.get(key), bool):
                return lb[key]
        verdict = lb.get("verdict")
        return isinstance(verdict, str) and verdict.strip().lower().replace("_", "-") == "launch-bound"

    def backward_partners(self, cluster: Cluster) -> list[Cluster]:
        """The backward clusters of this forward cluster's pattern and shapes (a generated kernel's
        one backward can replace several)."""
        return [other for other in self.clusters
                if other.direction == "backward" and other.pattern == cluster.pattern
                and params_key(other.pattern_params) == params_key(cluster.pattern_params)]

    def backward_partner(self, cluster: Cluster) -> Cluster | None:
        partners = self.backward_partners(cluster)
        return partners[0] if partners else None

    def forward_partner(self, cluster: Cluster) -> Cluster | None:
        for other in self.clusters:
            if (other.direction == "forward" and other.pattern == cluster.pattern
                    and params_key(other.pattern_params) == params_key(cluster.pattern_params)):
                return other
        return None

    def same_call_partner(self, cluster: Cluster) -> Cluster | None:
        """The one call seen from the other direction where the two clusters read different shapes
        or dtypes, so neither is the other's exact partner. Hugging Face's loss: the forward cluster
        starts after `logits.float()` (fp32 logits), the backward one holds the cast's backward (bf16,
        upcast); each was timed forward+backward and both were recommended, so the H100 zoo's GPT-NeoX
        report claimed 16.9 ms a step where verify measured 8.4. The cluster of the other direction
        with the same pattern, module and calls a step (the same source line where the module is not
        known; a CPU trace names the backward's by the line that called backward), that has no exact
        partner either; None unless each is the other's only such cluster."""
        found = self._same_site(cluster)
        return found[0] if len(found) == 1 and self._same_site(found[0]) == [cluster] else None

    def _same_site(self, cluster: Cluster) -> list[Cluster]:
        """The clusters of the other direction at cluster's call site, neither with an exact partner."""
        if not cluster.pattern or not (cluster.module_class or cluster.source) or self._exact_partners(cluster):
            return []
        other = "forward" if cluster.direction == "backward" else "backward"
        return [c for c in self.clusters
                if c.direction == other and c.pattern == cluster.pattern and c.module_class == cluster.module_class
                and (cluster.module_class or c.source == cluster.source)
                and c.occurrences_per_step == cluster.occurrences_per_step and not self._exact_partners(c)]

    def _exact_partners(self, cluster: Cluster) -> list[Cluster]:
        if cluster.direction == "forward":
            return self.backward_partners(cluster)
        partner = self.forward_partner(cluster)
        return [partner] if partner is not None else []

    def has_backward(self, cluster: Cluster) -> bool:
        """Does this forward cluster run backward in the step? Its pattern_params may say so
        (`requires_grad`); else a backward cluster of the same pattern and shapes, or a training
        run (the step was an optimizer step), says yes."""
        explicit = cluster.pattern_params.get("requires_grad")
        if isinstance(explicit, bool):
            return explicit
        if self.backward_partner(cluster) is not None:
            return True
        return self.run.get("step_source") == "optimizer"

    def primary_benchmark(self, cluster: Cluster) -> Benchmark | None:
        """The cluster's benchmark that counts: forward+backward when it was timed so, else forward."""
        mine = [b for b in self.benchmarks if b.cluster_id == cluster.id]
        for passes in (FORWARD_BACKWARD, FORWARD):
            for b in mine:
                if b.passes == passes:
                    return b
        return None

    # -- JSON ----------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self, indent: int | None = 2) -> str:
        return dumps_strict(self.to_dict(), indent=indent)

    @classmethod
    def from_dict(cls, data: dict) -> "AdvisorResult":
        if not isinstance(data, dict) or "schema_version" not in data:
            raise AdvisorError("not an AdvisorResult (no schema_version)")
        if type(data["schema_version"]) is not int:  # bool is an int to isinstance
            raise AdvisorError(f"not an AdvisorResult (schema_version {data['schema_version']!r} is not a number)")
        if data["schema_version"] < 1:
            raise AdvisorError(f"not an AdvisorResult (schema_version {data['schema_version']!r}: versions start at 1)")
        if data["schema_version"] > SCHEMA_VERSION:
            raise AdvisorError(f"result schema {data['schema_version']} is newer than this fusion-advisor "
                               f"understands ({SCHEMA_VERSION}); upgrade fusion-advisor")
        return _build(cls, data)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "AdvisorResult":
        try:
            with open(path, encoding="utf-8") as fh:
                data = json.load(fh)
        except FileNotFoundError:
            raise AdvisorError(f"result not found: {path}") from None
        except json.JSONDecodeError as exc:
            raise AdvisorError(f"{path} is not valid JSON ({exc.msg} at byte {exc.pos})") from None
        except UnicodeDecodeError:
            raise AdvisorError(f"{path} is not a JSON text file (not UTF-8)") from None
        except OSError as exc:
            raise AdvisorError(f"cannot read {path}: {exc.strerror or exc}") from None
        return cls.from_dict(data)

    def save(self, path: str | os.PathLike) -> str:
        write_text_atomic(Path(path), self.to_json())
        return str(path)


def params_key(params: dict) -> str:
    """Pattern params as a key that ignores `requires_grad`: the same shapes forward and backward."""
    shape_only = {k: v for k, v in params.items() if k != "requires_grad"}
    return json.dumps(shape_only, sort_keys=True, default=str)



def dumps_strict(obj: Any, indent: int | None = 2) -> str:
    """JSON that every parser reads: NaN and infinities become null (json.dumps would write bare
    NaN / Infinity, which is not JSON); numpy values become Python ones."""
    return json.dumps(_finite(obj), indent=indent, allow_nan=False)


def _finite(obj: Any):
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if obj is None or isinstance(obj, (str, int)):
        return obj
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set)):
        return [_finite(v) for v in obj]
    return _finite(_json_default(obj))


def _json_default(obj: Any):
    if hasattr(obj, "item"):
        return obj.item()
    if isinstance(obj, (set, tuple)):
        return list(obj)
    return str(obj)


def _build(cls, data: dict, where: str = ""):
    """Dataclass from dict, by its type hints: nested dataclasses rebuilt, containers checked
    (a hand-edited or foreign JSON fails here, in one line, not in a renderer), unknown keys
    ignored, scalars kept as they are (the renderers check numbers where they use them)."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    missing = [n for n, f in fields.items() if n not in data and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if missing:
        raise AdvisorError(f"not an AdvisorResult: a {cls.__name__} lacks {', '.join(missing)}")
    hints = _hints(cls)
    return cls(**{name: _from_json(hints[name], data[name], f"{where}.{name}" if where else name)
                  for name in fields if name in data})


@functools.cache
def _hints(cls) -> dict:
    return typing.get_type_hints(cls)


# What a field is called in a message, where its name alone does not say.
_LABELS = {"id": "cluster id", "cluster_id": "cluster id"}


def _from_json(tp, value, where: str):
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            article = "an" if tp.__name__[0] in "AEIOU" else "a"
            raise AdvisorError(f"not an AdvisorResult: '{where}' is not {article} {tp.__name__}")
        return _build(tp, value, where)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _from_json(inner[0], value, where) if len(inner) == 1 else value
    if tp is list or origin is list:
        if not isinstance(value, list):
            raise AdvisorError(f"not an AdvisorResult: '{where}' should be a list, not {type(value).__name__}")
        return [_from_json(args[0], v, f"{where}[{i}]") for i, v in enumerate(value)] if args else value
    if tp is dict or origin is dict:
        if not isinstance(value, dict):
            raise AdvisorError(f"not an AdvisorResult: '{where}' should be an object, not {type(value).__name__}")
        return {k: _from_json(args[1], v, f"{where}.{k}") for k, v in value.items()} if args else value
    if tp is str or origin is Literal:
        if not isinstance(value, str):
            name = where.rsplit(".", 1)[-1]
            what = (f"a {_LABELS[name]} in '{where.split('[', 1)[0]}'" if name in _LABELS else f"'{where}'")
            raise AdvisorError(f"not an AdvisorResult: {what} is not a string")
        return value
    return value
