"""Which provider `apply` gives each cluster, and why: the fastest one bench measured that `apply`
can put in (our Triton kernel, or regional torch.compile of the cluster's module), that passed
numerics and beat eager by bench.MIN_SPEEDUP.

Liger-Kernel is timed by bench but not applied here; where it measured fastest the choice says so
and falls back to the next best of ours and compile. Where bench did not time the cluster on a GPU
(a CPU run, no GPU) nothing is measured: the choice is our kernel on the cost model's estimate, as
`apply` always did, and says so.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

from fusion_advisor.bench import MIN_SPEEDUP
from fusion_advisor.regional_compile import pattern_name
from fusion_advisor.core.result import Benchmark, Cluster, Recommendation

APPLIED = ("triton", "compile")   # providers apply can put in the user's run
# A compiled region's cost in the whole step beyond its isolated bench time, per call: the zoo's
# HF Llama (H100, torch 2.11) lost 2.2 ms a step to 18 region calls (9 RMSNorms, forward and
# backward), about 120 µs each. Regional compile is applied only where it saves more than that.
MIN_REGION_SAVING_US = 120.0
# Module classes that hold most of a model's GEMMs: "compile:<Class>" would compile all of them, not
# the one a cluster came from (padded_linear's clusters are single nn.Linear modules).
EVERY_GEMM = ("Linear",)


def measured_win(bench) -> bool:
    """Bench timed it on a GPU, its numerics passed, and it beat eager: the only kind of
    recommendation `apply` and `patch` take by default."""
    return bench is not None and bench.timing == "gpu" and bench.numerics_ok is not False and \
        bench.verdict == "recommended"


def timed_for_apply(rec: Recommendation, bench) -> bool:
    """What `apply` and `patch` take without --include-estimates: a measured win, or for a memory
    trade (slower by design) a GPU measurement whose numerics passed."""
    if rec.kind == "memory":
        return bench is not None and bench.timing == "gpu" and bench.numerics_ok is not False
    return measured_win(bench)


def numerics_failed(bench) -> bool:
    """Bench checked it and it failed: never applied, estimates or not."""
    return bench is not None and bench.numerics_ok is False


@dataclass
class ProviderChoice:
    rank: int
    cluster_id: str
    module: str | None                   # the cluster's module class, "A/B/C"
    pattern: str | None
    provider: str | None                 # "triton" | "compile" | None: nothing applied
    why: str
    passes: str = ""                     # what was timed: "forward" | "forward+backward"
    measured_us: dict[str, float] = field(default_factory=dict)   # per call, per provider (bench p50)
    runtime_pattern: str | None = None   # "compile:<ModuleClass>" when provider is compile

    def as_dict(self) -> dict:
        return asdict(self)

    def note(self) -> str:
        """One line for the plan's notes: provider, why, the measured times."""
        return f"#{self.rank} cluster {self.cluster_id} ({_leaf(self.module) or '?'}): {self.provider or 'nothing'} - {self.why}"


def _leaf(module_class: str | None) -> str | None:
    return module_class.rsplit("/", 1)[-1] if module_class else None


def times_text(measured_us: dict[str, float]) -> str:
    names = {"eager": "eager", "triton": "ours", "compile": "compile", "liger": "Liger"}
    return ", ".join(f"{names.get(p, p)} {t:.1f} µs" for p, t in measured_us.items() if p in names)


def choose(rec: Recommendation, cluster: Cluster | None, bench: Benchmark | None, launch_bound: bool = False,
           memory: bool = False) -> ProviderChoice:
    """The provider for one recommendation's cluster (see the module docstring)."""
    module = cluster.module_class if cluster is not None else None
    choice = ProviderChoice(rec.rank, rec.cluster_id, module, rec.pattern, None, "")
    if rec.kind == "memory":
        choice.provider = "triton" if memory else None
        choice.why = "a memory trade (less peak memory, measured time cost)" + ("" if memory else ": only with --memory")
        _fill_times(choice, bench, launch_bound)
        return choice
    if bench is None or bench.timing != "gpu" or "eager" not in bench.measured:
        choice.provider = "triton"
        choice.why = "not timed on a GPU: our kernel on the cost model's estimate"
        return choice
    cost = _fill_times(choice, bench, launch_bound)
    ok = [p for p in APPLIED if p in cost and _numerics_ok(bench, p)]
    faster = [p for p in ok if cost["eager"] / cost[p] >= MIN_SPEEDUP]
    if not faster:
        failed = [f"{p}: {bench.numerics_by_provider.get(p) or bench.numerics_detail or 'failed'}"
                  for p in APPLIED if not _numerics_ok(bench, p)]
        choice.why = "nothing measured faster than eager" + (f" (numerics failed: {'; '.join(failed)})" if failed else "")
        return choice
    best = min(faster, key=cost.__getitem__)
    if best == "compile" and "triton" in faster:
        # Our kernel beat eager: it stays. A compiled region costs more in the whole step than its
        # isolated bench shows (guards, graph boundaries, the region's own launches): in the zoo's
        # HF Llama (H100), regional compile of the 9 RMSNorms that bench timed 1.1-1.3x faster than
        # ours made the step 15.2 -> 17.4 ms, where our kernel had given 1.38x on the same family.
        best = "triton"
    if best == "compile" and "/" not in (module or ""):
        choice.why = ("torch.compile measured fastest, but the cluster's module is the model itself: that is "
                      "whole-model torch.compile, not a region (see the report's torch.compile advice)")
        return choice
    if best == "compile" and _leaf(module) in EVERY_GEMM:
        choice.why = (f"torch.compile measured fastest, but compiling every {_leaf(module)} of the model would compile "
                      "each of its GEMMs, each a region with its own cost in the step: wrap that one module in "
                      "torch.compile by hand, or use whole-model torch.compile")
        return choice
    if best == "compile" and cost["eager"] - cost["compile"] < MIN_REGION_SAVING_US:
        choice.why = (f"torch.compile measured fastest, but it saves {cost['eager'] - cost['compile']:.0f} µs a call, "
                      f"less than a compiled region costs in the step (~{MIN_REGION_SAVING_US:.0f} µs, measured)")
        return choice
    choice.provider = best
    why = f"{'our kernel' if best == 'triton' else 'torch.compile'} measured fastest " \
          f"({cost['eager'] / cost[best]:.2f}x eager, {bench.passes})"
    liger = cost.get("liger")
    if liger is not None and liger < cost[best] and _numerics_ok(bench, "liger"):
        why += f"; Liger-Kernel measured faster still ({liger:.1f} µs) but apply does not put it in"
    if best == "compile":
        choice.runtime_pattern = pattern_name(module)
        why += (f"; regional torch.compile of every {_leaf(module)} (one shared compile per class, "
                "dynamic=False): adds one compile at its first call, timed by apply --verify")
    choice.why = why + f"; measured {times_text(choice.measured_us)}"
    return choice


def _numerics_ok(bench: Benchmark, provider: str) -> bool:
    if provider == "triton" and bench.numerics_ok is False:
        return False
    return bench.numerics_by_provider.get(provider, "ok") == "ok"


def _fill_times(choice: ProviderChoice, bench: Benchmark | None, launch_bound: bool) -> dict[str, float]:
    if bench is None or bench.timing != "gpu":
        return {}
    cost = {p: t.call_cost_us(launch_bound) for p, t in bench.measured.items()}
    choice.passes = bench.passes
    choice.measured_us = {p: round(c, 3) for p, c in cost.items()}
    return cost
