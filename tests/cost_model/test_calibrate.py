"""Calibration pieces that run without a GPU: the sizes it sweeps and how it turns repeated
timings into the bandwidth's spread. (Without a GPU the command exits 3: test_device_profiles.)"""
import pytest

from fusion_advisor.cost_model.calibrate import _calls_for, _sizes, _spread
from fusion_advisor.cost_model.timing import percentile


def test_sizes_span_kilobytes_to_gigabytes():
    full = _sizes(4 << 30, quick=False)
    assert full[0] == 4096 and full[-1] == 4 << 30
    assert all(b == 2 * a for a, b in zip(full, full[1:]))
    quick = _sizes(1 << 30, quick=True)
    assert quick[0] == 4096 and len(quick) < len(full) / 3
    assert _calls_for(4096) == 200 and _calls_for(4 << 30) == 2


def row(nbytes, median, p10=None, p90=None):
    return {"bytes": nbytes, "median_us": median, "p10_us": p10 or median, "p90_us": p90 or median}


def test_spread_from_samples_and_other_streams():
    copy = [row(4096, 2.0, 1.0, 9.0), row(1 << 24, 10.0, 9.0, 12.5)]      # the tiny row is ignored
    triad = [row((1 << 24) + 8, 9.0)]                                    # 11 % faster than copy
    memcpy = [row(1 << 24, 12.0)]                                        # 17 % slower
    lo, hi = _spread(copy, [triad, memcpy])
    assert lo == min(10.0 / 12.5, 10.0 / 12.0)
    assert hi == pytest.approx(10.0 / 9.0, rel=1e-5)                     # p10 sample and triad agree
    assert lo < 1.0 < hi
    # bounded: a wild sample cannot make the range absurd
    assert _spread([row(1 << 24, 10.0, 1.0, 100.0)], []) == (0.5, 1.5)


def testpercentile():
    assert percentile([3.0, 1.0, 2.0], 0.5) == 2.0
    assert percentile([1.0, 2.0], 0.9) == 1.9
