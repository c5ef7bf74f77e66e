"""Verify: the same script run unpatched and patched, losses compared (CPU, interpreter)."""
from pathlib import Path

from fusion_advisor.verify import RunMeasurement, compare, verify

ROOT = Path(__file__).resolve().parents[2]
TINY = ["--hidden", "32", "--layers", "1", "--heads", "2", "--seq", "8", "--vocab", "64", "--dtype", "float32",
        "--steps", "50"]


def test_patched_run_matches_unpatched_losses():
    v = verify(str(ROOT / "examples" / "llama_train.py"), TINY, ["rms_norm"], steps=4, warmup=1)
    assert v.before.swapped == [] and len(v.after.swapped) == 3  # 1 layer x 2 norms + final norm
    assert all("LlamaRMSNorm -> RMSNorm" in s for s in v.after.swapped)
    assert len(v.before.losses) == len(v.after.losses) >= 5
    assert v.losses_match and v.max_loss_rel_diff < 1e-4
    assert v.before.steps_run == 5 and len(v.before.step_times_s) == 4


def test_compare_flags_diverging_losses():
    a = RunMeasurement(False, 3, [2.0, 1.9, 1.8], [0.1, 0.1], 0.1, 1000)
    b = RunMeasurement(True, 3, [2.0, 1.9, 2.5], [0.05, 0.05], 0.05, 600)
    v = compare(a, b)
    assert not v.losses_match and abs(v.max_loss_rel_diff - 0.7 / 1.8) < 1e-9
    assert v.speedup == 2.0 and v.mem_saved_bytes == 400


def test_patch_checks_are_not_counted_as_the_scripts_losses():
    """linear_cross_entropy's check runs the whole HF model forward and backward inside the first
    step: those losses must not be recorded as the script's (they made a matching run read as
    "losses DIFFER", first loss 10.51 vs 10.79, on an H100)."""
    import pytest
    pytest.importorskip("transformers.models.llama.modeling_llama")
    args = ["--model", "llama", "--hidden", "32", "--layers", "1", "--heads", "2", "--seq", "8", "--batch", "2",
            "--vocab", "64", "--steps", "50"]
    v = verify(str(ROOT / "examples" / "hf_train.py"), args, ["linear_cross_entropy"], steps=3, warmup=1)
    assert any("linear_cross_entropy" in s for s in v.after.swapped), v.after.skipped
    assert len(v.before.losses) == len(v.after.losses) == 4
    assert v.losses_match, (v.before.losses, v.after.losses)
