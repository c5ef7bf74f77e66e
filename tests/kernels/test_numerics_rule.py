"""kernels/numerics.py's one rule for every comparison with eager: the tolerance table, and where that
fails, eager's own error against the reference run in float64."""
import torch

from fusion_advisor.kernels.numerics import judge

TOL = {"atol": 1e-5, "rtol": 1e-4}


def t(*values):
    return torch.tensor(values, dtype=torch.float64)


def test_within_the_tolerance_of_eager_passes_without_the_float64_run():
    assert judge(t(1.0, 2.0), t(1.0, 2.0 + 1e-5), TOL, "x", lambda: 1 / 0) is None


def test_eagers_own_error_widens_the_band_around_eager():
    # eager is 3e-5 off the truth; ours 3.5e-5 from eager, on the truth's side
    assert judge(t(0.006615), t(0.0066500), TOL, "dx", lambda: t(0.006620)) is None


def test_a_result_nearer_the_truth_on_the_other_side_passes():
    # the H100-era zoo check on ConvNeXt's fp32 channels_first LayerNorm dx (row scale 1e-4):
    # candidate 0.00659862, eager 0.00663757, float64 0.00661541
    assert judge(t(0.00659862), t(0.00663757), TOL, "dx", lambda: t(0.00661541)) is None


def test_farther_from_the_truth_than_tolerance_plus_eagers_error_fails():
    reason = judge(t(0.00650), t(0.00663757), TOL, "dx", lambda: t(0.00661541))
    assert reason is not None and reason.startswith("dx") and "float64" in reason
    # without a float64 run the plain tolerance decides
    assert judge(t(0.00659862), t(0.00663757), TOL, "dx", lambda: None) is not None
