"""The stages, wired in order. Each stage reads the previous stage's data and nothing else."""
from __future__ import annotations

from fusion_advisor import __version__
from fusion_advisor.analyzers.summary import summarize
from fusion_advisor.analyzers.trace import Trace
from fusion_advisor.result import AdvisorResult


def run_info_from_trace(trace: Trace) -> dict:
    """What the run was: our stored metadata when the trace came from `profile`, else what the
    trace itself says (any torch.profiler trace has the device properties)."""
    info = dict(trace.run_info)
    info.setdefault("gpu_name", trace.device_name)
    props = (trace.meta.get("deviceProperties") or [{}])[0]
    if props:
        info.setdefault("num_sms", props.get("numSms"))
        info.setdefault("gpu_memory_bytes", props.get("totalGlobalMem"))
        info.setdefault("compute_capability", f"{props.get('computeMajor')}.{props.get('computeMinor')}")
    info.setdefault("cuda_driver_api", trace.meta.get("cuda_driver_version"))
    info["trace_events"] = trace.n_events
    return info


def analyze(trace: Trace) -> AdvisorResult:
    """Trace -> AdvisorResult with the step summary (later stages add to it)."""
    result = AdvisorResult(tool_version=__version__, trace_path=trace.path)
    result.run = run_info_from_trace(trace)
    result.summary = summarize(trace).to_dict()
    if not trace.step_ids:
        result.notes.append("no ProfilerStep markers in the trace: figures are for the whole trace, not per step")
    if not trace.has_gpu:
        result.notes.append("no GPU kernels in the trace (CPU-only run): GPU figures are estimates for a target GPU")
    return result
