"""Profiling a torchrun job: every rank profiles the same steps, each writes its own trace, and one
result is merged from them.

    fusion-advisor profile --nproc-per-node 2 train.py -- ARGS
        = torchrun --standalone --nproc-per-node 2 -m fusion_advisor.cli profile-rank -o OUT train.py -- ARGS
          (torch.distributed.run, torchrun's own launcher), then `merge` over OUT/trace.rank<k>.json.gz

`profile-rank` also runs under a launcher of your own (torchrun, Slurm's srun with the torchrun
environment): the rank and world size come from RANK / WORLD_SIZE.

The merged result is the slowest rank's analysis (the slowest rank sets the step, so savings are
priced on it), with `distributed` holding, per rank, the step time, the communication time and the
part of it no compute overlaps, and the skew between ranks. Dollars count every GPU of the job.
"""
from __future__ import annotations

import os
import statistics
import subprocess
import sys
from pathlib import Path

from fusion_advisor.core.errors import AdvisorError, ScriptError


def rank_from_env() -> tuple[int, int]:
    """(rank, world size) from the launcher's environment."""
    try:
        return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    except (KeyError, ValueError):
        raise AdvisorError("profile-rank runs under torchrun (RANK and WORLD_SIZE unset); use "
                           "`fusion-advisor profile --nproc-per-node N` to launch one") from None


def launch(script: str, script_args: list[str], nproc: int, out: Path, rank_args: list[str],
           timeout_s: float | None = None) -> int:
    """Run `profile-rank` on `nproc` local ranks through torch.distributed.run; its exit status."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "fusion_advisor.cli", "profile-rank", "-o", str(out), *rank_args, script, "--", *script_args]
    return subprocess.run(cmd, timeout=timeout_s).returncode


def rank_traces(out: Path) -> list[Path]:
    """OUT/trace.rank<k>.json.gz, by rank."""
    found = sorted(out.glob("trace.rank*.json.gz"), key=lambda p: int(p.name.split(".")[1][4:]))
    if not found:
        raise ScriptError(f"no rank wrote a trace under {out} (the job failed before any step was recorded)")
    return found


def _rank_summary(path: Path) -> dict:
    """One rank's figures without its full analysis: step time and communication."""
    from fusion_advisor.analyzers.communication import summarize_communication
    from fusion_advisor.analyzers.trace import Trace

    trace = Trace.load(path)
    comm = summarize_communication(trace)
    step_s = trace.run_info.get("step_time_s_unprofiled")
    return {"rank": trace.run_info.get("rank"), "trace": str(path),
            "step_time_s": step_s if isinstance(step_s, (int, float)) else None,
            "communication": comm.to_dict() if comm is not None else None}


def merge(traces: list[Path], target_gpu: str | None = None, workers: int | None = None):
    """One AdvisorResult for the job: the slowest rank's full analysis plus `distributed` (every
    rank's step and communication figures, read in `workers` processes, one per core by default)."""
    from concurrent.futures import ProcessPoolExecutor

    from fusion_advisor.analyzers.trace import Trace
    from fusion_advisor.pipeline import analyze

    workers = workers or min(len(traces), os.cpu_count() or 1)
    if workers > 1 and len(traces) > 1:
        with ProcessPoolExecutor(workers) as pool:
            ranks = list(pool.map(_rank_summary, traces))
    else:
        ranks = [_rank_summary(p) for p in traces]
    for k, r in enumerate(ranks):
        r["rank"] = r["rank"] if r["rank"] is not None else k
    timed = [r["step_time_s"] for r in ranks if r["step_time_s"] is not None]
    slowest = max(range(len(ranks)), key=lambda i: ranks[i]["step_time_s"] or 0.0)
    merged = analyze(Trace.load(traces[slowest]), target_gpu=target_gpu)
    merged.distributed = {
        "world_size": int(merged.run.get("world_size", len(traces))),
        "ranks": ranks,
        "slowest_rank": ranks[slowest]["rank"],
        "skew_pct": round(100.0 * (max(timed) - min(timed)) / statistics.median(timed), 2) if timed else None,
        "basis": "savings are priced on the slowest rank's step; dollars count every rank's GPU",
    }
    merged.notes.append(f"a {len(traces)}-rank job: the analysis is rank {ranks[slowest]['rank']}'s, the slowest "
                        f"(each rank's step and communication time under `distributed`)")
    return merged
