"""A benchmark row as bench writes one for a replacement it timed on a GPU and found faster than
eager with its numerics checked: what `apply` and `patch` need before they take a recommendation.
The figures are synthetic; tests that use it check what apply does with a measured win, not the win."""
from fusion_advisor.core.result import Benchmark, ProviderTiming


def measured_win(cluster_id: str, pattern: str) -> Benchmark:
    return Benchmark(cluster_id=cluster_id, pattern=pattern, params={}, passes="forward+backward",
                     measured={"eager": ProviderTiming(100.0, 100.0, 100.0), "triton": ProviderTiming(50.0, 50.0, 50.0)},
                     numerics_ok=True, verdict="recommended", timing="gpu", device="synthetic")
