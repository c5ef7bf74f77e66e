"""The accuracy benchmark's plumbing on CPU (tiny sizes, no timing asserted): chains are built,
profiled, read back through Trace, priced and written to the CSV."""
import csv
import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def load_benchmark():
    spec = importlib.util.spec_from_file_location("cost_model_accuracy", ROOT / "benchmarks" / "cost_model_accuracy.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module          # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_dry_run_writes_a_priced_csv(tmp_path, capsys):
    bench = load_benchmark()
    out = tmp_path / "acc.csv"
    assert bench.main(["--dry-run", "--out", str(out), "--chains", "rms_norm,swiglu,softmax_attention"]) == 0
    rows = list(csv.DictReader(out.open()))
    assert {"gpu", "driver", "torch", "triton", "predicted_us", "measured_us", "error_pct"} <= set(rows[0])
    chains = {r["chain"] for r in rows}
    assert {"rms_norm", "swiglu", "softmax_attention", "fused:rms_norm"} <= chains
    steps = [r for r in rows if r["chain"] == "rms_norm" and r["step"] != "(whole chain)"]
    assert [r["step"] for r in steps] == ["to", "pow", "mean", "add", "rsqrt", "mul", "to", "mul"]
    assert all(float(r["predicted_us"]) > 0 for r in steps if r["step"] != "to")
    assert all(float(r["measured_us"]) > 0 for r in rows)
    assert all(r["profile"] == "NVIDIA H200 (calibrated 2026-11-22)" for r in rows)  # cost_model/profiles
    printed = capsys.readouterr().out
    assert "absolute % error" in printed and f"wrote {out}" in printed
