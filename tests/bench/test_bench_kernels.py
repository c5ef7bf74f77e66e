"""benchmarks/bench_kernels.py --dry-run end to end, and the README summary from its CSV."""
import csv
import importlib.util
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


def load_script(relpath: str):
    spec = importlib.util.spec_from_file_location(Path(relpath).stem, ROOT / relpath)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(torch.cuda.is_available(), reason="--dry-run needs the interpreter set before kernels load")
def test_dry_run_writes_the_long_csv_and_the_summary_reads_it(tmp_path, capsys):
    bench_kernels = load_script("benchmarks/bench_kernels.py")
    out = tmp_path / "sweep.csv"
    assert bench_kernels.main(["--dry-run", "--patterns", "rms_norm", "--out", str(out)]) == 0
    with open(out, newline="") as fh:
        reader = csv.DictReader(fh)
        rows = list(reader)
    assert reader.fieldnames == ["gpu", "driver", "torch", "triton", "pattern", "shape", "dtype", "pass", "provider",
                                 "p20_ms", "p50_ms", "p80_ms", "gbps", "pct_peak_bw", "peak_mem_bytes", "numerics",
                                 "variant"]
    assert [(r["pass"], r["provider"]) for r in rows] == [
        ("forward", "eager"), ("forward", "triton"), ("forward+backward", "eager"), ("forward+backward", "triton")]
    for r in rows:
        assert r["pattern"] == "rms_norm" and r["shape"] == "6x42x431" and r["dtype"] == "float32"
        assert "dry run" in r["gpu"] and r["numerics"] == "ok"
        assert 0 < float(r["p20_ms"]) <= float(r["p50_ms"]) <= float(r["p80_ms"])
        assert float(r["gbps"]) > 0
    assert "wrote" in capsys.readouterr().out

    summarize = load_script("scripts/summarize_bench.py")
    assert summarize.main([str(out)]) == 0
    table = capsys.readouterr().out
    assert "| rms_norm | forward |" in table and "| rms_norm | forward+backward |" in table


def test_shape_budget():
    bench_kernels = load_script("benchmarks/bench_kernels.py")
    shapes = tuple({"shape": [i]} for i in range(9))
    assert bench_kernels.pick_shapes(shapes, quick=True, all_shapes=False) == [{"shape": [4]}]
    assert bench_kernels.pick_shapes(shapes, quick=False, all_shapes=False) == [
        {"shape": [0]}, {"shape": [3]}, {"shape": [5]}, {"shape": [8]}]
    assert len(bench_kernels.pick_shapes(shapes, quick=False, all_shapes=True)) == 9


def test_only_picks_the_matching_shapes():
    bench_kernels = load_script("benchmarks/bench_kernels.py")
    shapes = tuple({"tokens": t, "vocab": v} for t in (4096, 8192) for v in (32768, 50257))
    args = bench_kernels.parse_args(["--only", "vocab=50257"])
    assert bench_kernels.pick_shapes(shapes, False, False, args.only) == [
        {"tokens": 4096, "vocab": 50257}, {"tokens": 8192, "vocab": 50257}]
    assert bench_kernels.pick_shapes(shapes, True, False, {"tokens": "8192", "vocab": "50257"}) == [
        {"tokens": 8192, "vocab": 50257}]
    with pytest.raises(SystemExit):
        bench_kernels.parse_args(["--only", "vocab"])


def test_shape_column_names_patterns_sized_by_other_params():
    # padded_linear's bench params have no "shape": its CSV rows on the H100 (2026-12-07) came out blank
    bench_kernels = load_script("benchmarks/bench_kernels.py")
    assert bench_kernels.shape_of({"shape": [65536, 768], "dtype": "bfloat16"}) == "65536x768"
    params = {"tokens": 8192, "in_features": 768, "out_features": 50265, "bias": True, "dtype": "bfloat16",
              "num_sms": 132}
    assert bench_kernels.shape_of(params) == "tokens=8192 in_features=768 out_features=50265"
    assert bench_kernels.shape_text(params).endswith(" bfloat16 bias=True")


def test_variant_column_tells_shapes_of_one_size_apart():
    # bias_act's bench shapes hold 16384x4096 twice, with relu and with hardswish (H100, 2026-12-07)
    bench_kernels = load_script("benchmarks/bench_kernels.py")
    relu = {"shape": [16384, 4096], "dtype": "bfloat16", "activation": "relu"}
    hardswish = {**relu, "activation": "hardswish"}
    assert bench_kernels.variant_of(relu) == "activation=relu"
    assert bench_kernels.shape_text(hardswish) == "16384x4096 bfloat16 activation=hardswish"
    rows = [{"pattern": "bias_act", "shape": "16384x4096", "dtype": "bfloat16", "pass": "forward",
             "provider": "triton", "p50_ms": t, "gbps": 1.0, "pct_peak_bw": 1.0, "variant": bench_kernels.variant_of(p)}
            for p, t in ((relu, 0.1), (hardswish, 0.2))]
    import io
    import contextlib
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        bench_kernels.print_table(rows)
    assert "activation=relu" in printed.getvalue() and "activation=hardswish" in printed.getvalue()
