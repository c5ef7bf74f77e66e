"""What the report says, worked out once from an AdvisorResult and shared by the renderers, so the
terminal and the HTML report never disagree on a figure.

Estimates and measurements stay apart here as everywhere: a saving is `measured_*` or
`estimate_*`, and a figure that mixes them (the waterfall) carries a `basis` per item.

Fields of the result's free-form dicts that the report reads:
  device_profile: cost_model.device.DeviceProfile.to_dict(): label, source ("calibrated" or
                  "datasheet"), hbm_bytes_per_s, peak_flops ({"bf16_tc": FLOP/s, ...}), launch_us.
  launch_bound:   analyzers/launch_bound.py: verdict, launch_wait_share, remedies (title, reason,
                  applies), primary_remedy; other scalar keys are shown as the evidence.
  recommendation.roi: advisor/recommend.py: usd_per_month, usd_per_day, gpu_hours_per_day, assumptions.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from fusion_advisor.report.base import is_number
from fusion_advisor.core.result import (AdvisorResult, Benchmark, Cluster, ProviderTiming, Recommendation,
                                        is_generated)


@dataclass
class Roof:
    label: str           # "bf16"
    tflops: float


@dataclass
class DeviceFacts:
    name: str
    calibrated: bool
    bw_gbps: float | None
    roofs: list[Roof]
    launch_us: float | None
    extra: dict          # the profile's other keys, shown as they are

    @property
    def basis(self) -> str:
        return "calibrated on this GPU" if self.calibrated else "datasheet figures, not calibrated"


@dataclass
class RankedRow:
    rec: Recommendation
    cluster: Cluster | None
    bench: Benchmark | None
    gpu_run: bool = True        # False: the step time and $ figures came from a CPU run: not shown

    @property
    def saving_us(self) -> float | None:
        """The saving the waterfall uses: measured where bench timed it, else the estimate."""
        m = self.rec.measured_saving_us_per_step
        return m if is_number(m) else (self.rec.estimate_saving_us_per_step
                                       if is_number(self.rec.estimate_saving_us_per_step) else None)

    @property
    def basis(self) -> str:
        return "measured" if is_number(self.rec.measured_saving_us_per_step) else "estimate"

    @property
    def usd_per_month(self) -> float | None:
        v = (self.rec.roi or {}).get("usd_per_month")
        return v if is_number(v) else None


@dataclass
class BenchRow:
    bench: Benchmark
    cluster: Cluster | None

    def p50(self, provider: str) -> float | None:
        t = self.bench.measured.get(provider)
        return t.p50_us if isinstance(t, ProviderTiming) and is_number(t.p50_us) else None

    @property
    def speedup(self) -> float | None:
        """eager p50 / triton p50, both measured."""
        eager, triton = self.p50("eager"), self.p50("triton")
        return eager / triton if eager and triton else None


@dataclass
class ReportFacts:
    script: str
    gpu: str
    versions: str
    step_us: float | None
    step_basis: str                         # "unprofiled" | "profiled" | ""
    gpu_busy_pct: float | None
    device: DeviceFacts | None
    ranked: list[RankedRow]
    rejected: list[BenchRow]
    not_run: list[BenchRow]
    bench_ran: bool
    bench_not_run_why: list[str]
    measured_saving_us: float | None         # over the recommendations bench timed
    estimate_saving_us: float | None         # over every recommendation's estimate
    usd_per_month_measured: float | None
    usd_per_month_estimate: float | None     # recommendations without a measurement only
    clusters: list[Cluster] = field(default_factory=list)
    gpu_run: bool = True                     # the run had a GPU: step time, % of the step and $ mean something
    target_gpu: str = ""                     # the device profile the estimates are for


_ROOF_NAMES = {"fp32": "fp32", "tf32_tc": "tf32 tensor-core", "bf16_tc": "bf16 tensor-core",
               "fp16_tc": "fp16 tensor-core", "fp64": "fp64"}


def device_facts(profile: dict | None) -> DeviceFacts | None:
    """The DeviceProfile the estimates used, as the charts and headers need it."""
    if not profile:
        return None
    flops = profile.get("peak_flops") if isinstance(profile.get("peak_flops"), dict) else {}
    roofs = [Roof(_ROOF_NAMES.get(k, str(k)), float(v) / 1e12) for k, v in flops.items()
             if k in ("fp32", "bf16_tc") and is_number(v) and v > 0]
    bw = profile.get("hbm_bytes_per_s")
    launch = profile.get("launch_us")
    known = {"name", "label", "source", "hbm_bytes_per_s", "peak_flops", "launch_us", "bandwidth_curve",
             "calibration", "element_rates"}
    return DeviceFacts(name=str(profile.get("label") or profile.get("name") or "unnamed profile"),
                       calibrated=profile.get("source") == "calibrated",
                       bw_gbps=float(bw) / 1e9 if is_number(bw) and bw > 0 else None,
                       roofs=sorted(roofs, key=lambda r: -r.tflops),
                       launch_us=float(launch) if is_number(launch) else None,
                       extra={k: v for k, v in profile.items() if k not in known and not isinstance(v, (list, dict))})


def launch_bound_headline(lb: dict | None) -> tuple[str, str | None, bool] | None:
    """(verdict, advice, bound) from analyzers/launch_bound.py's dict."""
    if not lb or not lb.get("verdict"):
        return None
    primary = next((r for r in lb.get("remedies", []) if r.get("remedy") == lb.get("primary_remedy")), None)
    advice = f"{primary['title']}: {primary['reason']}" if primary else None
    return str(lb["verdict"]), advice, "launch-bound" in str(lb["verdict"])


def _sum(values) -> float | None:
    nums = [v for v in values if is_number(v)]
    return float(sum(nums)) if nums else None


def report_facts(result: AdvisorResult) -> ReportFacts:
    run, summary = result.run, result.summary
    clusters = {c.id: c for c in result.clusters}
    benches = {}
    for b in result.benchmarks:  # one per cluster; a "recommended" verdict wins over others
        if b.cluster_id not in benches or b.verdict == "recommended":
            benches[b.cluster_id] = b
    gpu_run = bool(summary.get("has_gpu") or run.get("gpu_name"))
    ranked = [RankedRow(r, clusters.get(r.cluster_id), benches.get(r.cluster_id), gpu_run)
              for r in sorted(result.recommendations, key=lambda r: (r.rank if is_number(r.rank) else 1e9))]
    # A memory trade is recommended although bench rejected it for speed: it is not listed twice.
    trades = {r.cluster_id for r in result.recommendations if r.kind == "memory"}
    rejected = [BenchRow(b, clusters.get(b.cluster_id)) for b in result.benchmarks
                if b.verdict == "rejected" and b.cluster_id not in trades]
    speed = [r for r in ranked if r.rec.kind != "memory"]   # the totals add time savings, not trades
    not_run = [BenchRow(b, clusters.get(b.cluster_id)) for b in result.benchmarks
               if b.verdict == "not run" and not b.reason.startswith(_PARTNER_TIMED)]
    timed = [b for b in result.benchmarks if b.measured]
    why = sorted({sentence(b.reason, end="") for b in result.benchmarks
                  if b.verdict == "not run" and b.reason and not b.reason.startswith(_PARTNER_TIMED)})

    unprofiled = run.get("step_time_s_unprofiled")
    if is_number(unprofiled) and unprofiled > 0:
        step_us, step_basis = unprofiled * 1e6, "unprofiled"
    elif is_number(summary.get("wall_us_per_step")):
        step_us, step_basis = float(summary["wall_us_per_step"]), "profiled"
    else:
        step_us, step_basis = None, ""
    versions = ", ".join(f"{k} {run[k]}" for k in ("torch", "triton") if run.get(k))
    busy = summary.get("gpu_busy_pct") if summary.get("has_gpu") else None
    return ReportFacts(
        script=str(run.get("script") or result.trace_path or "trace"),
        gpu=str(run.get("gpu_name") or "no GPU (CPU only)"), versions=versions,
        step_us=step_us, step_basis=step_basis, gpu_busy_pct=busy if is_number(busy) else None,
        device=device_facts(result.device_profile),
        ranked=ranked, rejected=rejected, not_run=not_run,
        bench_ran=bool(timed), bench_not_run_why=why,
        measured_saving_us=_sum(r.rec.measured_saving_us_per_step for r in speed),
        estimate_saving_us=_sum(r.rec.estimate_saving_us_per_step for r in speed),
        usd_per_month_measured=_sum(r.usd_per_month for r in speed if r.basis == "measured"),
        usd_per_month_estimate=_sum(r.usd_per_month for r in speed if r.basis == "estimate"),
        gpu_run=gpu_run, target_gpu=str((result.device_profile or {}).get("label") or ""),
        clusters=sorted(result.clusters, key=lambda c: -(c.measured_us_per_step if is_number(c.measured_us_per_step) else 0)),
    )


_PARTNER_TIMED = "timed with its forward cluster"   # bench's note on a backward cluster: not a reason
_REASONS = {"no CUDA GPU": "this machine has no CUDA GPU"}


def sentence(reason: str, end: str = ".") -> str:
    """A bench reason as a reader's clause: "no CUDA GPU" -> "this machine has no CUDA GPU."."""
    text = _REASONS.get(reason.strip(), reason.strip())
    return text + end if end and not text.endswith((".", "!", "?")) else text


def waterfall(facts: ReportFacts) -> list[dict]:
    """Step time, then the step after each ranked recommendation in turn (savings assumed to add
    up): [{label, before_us, after_us, saving_us, basis}]. None from a CPU run: its step time is no
    yardstick for a GPU saving."""
    if facts.step_us is None or not facts.gpu_run:
        return []
    steps, now = [], facts.step_us
    for row in facts.ranked:
        saving = row.saving_us
        if saving is None or saving <= 0:
            continue
        after = max(now - saving, 0.0)
        pattern = row.rec.pattern or "step"
        steps.append({"label": f"#{row.rec.rank} {'generated' if is_generated(pattern) else pattern}",
                      "title": row.rec.title,
                      "before_us": now, "after_us": after, "saving_us": now - after, "basis": row.basis})
        now = after
    return steps



def assumptions_text(assumptions) -> str:
    """advisor/recommend.py's ROI assumptions as one readable line."""
    if not isinstance(assumptions, dict):
        return str(assumptions or "")
    parts = []
    cost = assumptions.get("gpu_hourly_cost_usd")
    if is_number(cost):
        src = "default" if "default" in str(assumptions.get("gpu_hourly_cost_source", "")) else "given"
        parts.append(f"${cost:.2f} per GPU-hour ({src})")
    rate = assumptions.get("steps_per_day")
    if is_number(rate):
        parts.append(f"{rate:,.0f} steps a day ({assumptions.get('steps_per_day_source', '')})")
    if is_number(assumptions.get("gpus")):
        parts.append(f"{assumptions['gpus']:g} GPU(s)")
    if is_number(assumptions.get("days_per_month")):
        parts.append(f"{assumptions['days_per_month']:g}-day month")
    return "; ".join(parts)
