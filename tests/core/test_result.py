"""The AdvisorResult converter: typed fields rebuilt from JSON, malformed containers refused in one line."""
import json
from pathlib import Path

import pytest

from fusion_advisor.core.errors import AdvisorError
from fusion_advisor.core.result import AdvisorResult, Benchmark, Cluster, ProviderTiming

SAMPLE = Path(__file__).parents[1] / "data" / "result-sample.json"


def test_the_sample_round_trips_with_its_nested_types():
    result = AdvisorResult.load(SAMPLE)
    assert result.clusters and all(isinstance(c, Cluster) for c in result.clusters)
    assert all(isinstance(t, ProviderTiming) for b in result.benchmarks for t in b.measured.values())
    assert AdvisorResult.from_dict(json.loads(result.to_json())).to_dict() == result.to_dict()


def test_an_enum_value_this_version_does_not_know_is_read_as_it_is():
    """A newer fusion-advisor may add a value without a schema bump: read, not refused."""
    data = {"schema_version": 1, "benchmarks": [dict(cluster_id="c1", pattern="rms_norm", params={},
                                                     passes="forward", verdict="deferred")]}
    assert AdvisorResult.from_dict(data).benchmarks[0].verdict == "deferred"
    assert isinstance(AdvisorResult.from_dict(data).benchmarks[0], Benchmark)


@pytest.mark.parametrize("data, message", [
    ({"benchmarks": [dict(cluster_id="c1", pattern="p", params={}, passes="forward", measured={"eager": 3})]},
     "'benchmarks[0].measured.eager' is not a ProviderTiming"),
    ({"clusters": [dict(id="c1", direction="forward", estimate=[])]}, "'clusters[0].estimate' is not an Estimate"),
    ({"clusters": [dict(id="c1", direction="forward", kernels="k")]}, "'clusters[0].kernels' should be a list"),
    ({"recommendations": [dict(rank=1, cluster_id="c1", pattern=None, title="t", measured_saving_us_per_step=None,
                               estimate_saving_us_per_step=None, confidence="estimate", roi=[])]},
     "'recommendations[0].roi' should be an object"),
    ({"run": None}, "'run' should be an object"),
    ({"benchmarks": [dict(cluster_id=7, pattern="p", params={}, passes="forward")]}, "a cluster id in 'benchmarks'"),
])
def test_malformed_fields_are_one_line_errors(data, message):
    with pytest.raises(AdvisorError, match="not an AdvisorResult") as err:
        AdvisorResult.from_dict({"schema_version": 1, **data})
    assert message in str(err.value) and "\n" not in str(err.value)
