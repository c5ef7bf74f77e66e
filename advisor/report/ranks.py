"""What a torchrun job's report shows per rank (AdvisorResult.distributed): computed once here,
drawn by the terminal and HTML renderers."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class RankRow:
    rank: int
    step_ms: float | None
    comm_ms: float | None        # the collectives' own time per step
    exposed_ms: float | None     # the part no compute overlaps
    collectives: str             # "c10d::allreduce_ x1"
    slowest: bool


@dataclass
class JobFacts:
    world_size: int
    rows: list[RankRow]
    skew_pct: float | None
    basis: str                   # "gpu kernels" | "cpu ops" | ""

    @property
    def headline(self) -> str:
        slowest = next((r for r in self.rows if r.slowest), None)
        skew = f", rank skew {self.skew_pct:.1f} %" if self.skew_pct is not None else ""
        where = f"rank {slowest.rank} is the slowest and sets the step" if slowest else "no rank was timed"
        return f"{self.world_size}-rank job: {where}{skew}; savings are priced on its step, dollars for every rank"


def job_facts(distributed: dict | None) -> JobFacts | None:
    if not isinstance(distributed, dict) or not distributed.get("ranks"):
        return None
    rows, basis = [], ""
    for r in distributed["ranks"]:
        comm = r.get("communication") or {}
        basis = basis or comm.get("basis", "")
        names = comm.get("collectives") or {}
        rows.append(RankRow(
            rank=int(r.get("rank", len(rows))),
            step_ms=_ms(r.get("step_time_s"), 1e3),
            comm_ms=_ms(comm.get("comm_us_per_step"), 1e-3),
            exposed_ms=_ms(comm.get("exposed_us_per_step"), 1e-3),
            collectives=", ".join(f"{n} x{c:g}" for n, c in names.items()) or "none",
            slowest=r.get("rank") == distributed.get("slowest_rank")))
    skew = distributed.get("skew_pct")
    return JobFacts(int(distributed.get("world_size", len(rows))), rows,
                    float(skew) if isinstance(skew, (int, float)) else None, basis)


def _ms(value, scale: float) -> float | None:
    return float(value) * scale if isinstance(value, (int, float)) else None
