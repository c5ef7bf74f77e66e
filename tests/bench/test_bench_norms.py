"""benchmarks/bench_norms.py's plan and summary, on CPU (the sweep itself needs a GPU)."""
import importlib.util
import pathlib

import pytest

SCRIPT = pathlib.Path(__file__).resolve().parents[2] / "benchmarks" / "bench_norms.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_norms", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_plan_runs_bf16_64k_first_and_caps_the_largest_tensors(bench):
    args = bench.parse_args([])
    plan = bench.shape_plan(args)
    assert plan[0] == ("rms_norm", 1024, 65536, "bfloat16") and plan[4] == ("group_norm", 1024, 65536, "bfloat16")
    assert [p[1] for p in plan[:15:5]] == [1024, 64, 8192]   # a budget's prefix spans short and long rows
    assert {p[3] for p in plan[: len(plan) // 2]} == {"bfloat16"}
    for pattern, n, rows, dtype in plan:
        assert rows * n * (2 if dtype == "bfloat16" else 4) <= 1 << 28
    big = {(n, dtype): rows for _, n, rows, dtype in plan if rows > 65536}
    assert big[(64, "bfloat16")] == 1 << 20 and big[(1024, "bfloat16")] == (1 << 27) // 1024
    assert (16384, "float32") not in big   # capped below 64k rows: already swept at 4k and 64k


def test_quick_is_bf16_at_64k_rows(bench):
    args = bench.parse_args(["--quick"])
    assert args.dtypes == ["bfloat16"] and args.rows == [65536] and args.time_budget == 90.0
    assert len(bench.shape_plan(args)) == len(bench.QUICK_N) * len(bench.PATTERNS)


def test_summary_names_the_worst_shape(bench):
    def row(n, vs, pct):
        return {"pattern": "layer_norm", "pass": "forward+backward", "provider": "triton", "n": n, "rows": 4096,
                "dtype": "bfloat16", "vs_compile": vs, "vs_eager": 2.0, "pct_copy": pct}
    lines = bench.summary([row(64, 0.8, 40.0), row(1024, 1.25, 85.0)])
    assert len(lines) == 1 and "0.80x at 4096x64" in lines[0] and "40.0% copy at 4096x64" in lines[0]
    assert "geomean 1.00x" in lines[0]


def test_refuses_a_sweep_without_our_kernel(bench):
    with pytest.raises(SystemExit):
        bench.parse_args(["--providers", "eager,compile"])


def test_tile_overrides_reach_the_kernels_table_and_the_csv_label(bench, monkeypatch):
    from fusion_advisor.kernels import norm_tiles
    for const in bench.TILE_KNOBS.values():
        monkeypatch.setattr(norm_tiles, const, getattr(norm_tiles, const))  # restored after the test
    try:
        label = bench.set_tiles(bench.parse_args(["--bwd-tile", "4096", "--bwd-per-thread", "16",
                                                  "--bwd-prefetch-tile", "2048", "--db-in-memory-cols", "16384",
                                                  "--acc-in-memory-cols", "16384", "--reload-cols", "32768"]))
        assert label == (f"fwd{norm_tiles.FWD_TILE}/bwd4096x16/{norm_tiles.WARPS_PER_SM}w"
                         f"/mem16384/dbmem16384/pf2048/reload32768")
        assert norm_tiles.sums_in_memory(16384) == (True, True) and not norm_tiles.reloads(16384)
        # 4 rows of 1024 a tile: past the 2048-element prefetch limit, so no prefetch
        assert norm_tiles.bwd_config(1024, 65536) == norm_tiles.TileConfig(4, 1024, 8, 2, False)
    finally:
        norm_tiles.fwd_config.cache_clear()
        norm_tiles.bwd_config.cache_clear()


def test_markdown_table_shows_the_largest_row_count_and_the_worst_shape(bench):
    def row(n, rows, pct, vs):
        return {"pattern": "rms_norm", "pass": "forward+backward", "provider": "triton", "n": str(n),
                "rows": str(rows), "dtype": "bfloat16", "pct_copy": str(pct), "vs_compile": str(vs)}
    lines = bench.markdown_table([row(64, 65536, 58.0, 1.25), row(64, 1048576, 96.0, 1.05),
                                  row(16384, 8192, 54.0, 0.8),
                                  {**row(64, 65536, 10.0, 9.0), "provider": "compile"}])
    assert lines[0].startswith("| pattern | N = 64 | N = 16384 |")
    assert lines[2].startswith("| rms_norm | 96 % / 1.05× | 54 % / 0.80× |")   # 1M rows, not 64k, at N = 64
    assert "0.80× at 8,192 × 16384" in lines[2]
    assert f"{(1.25 * 1.05 * 0.8) ** (1 / 3):.2f}×" in lines[2]


def test_table_of_a_missing_or_foreign_csv_is_a_one_line_error(bench, tmp_path, capsys):
    foreign = tmp_path / "other.csv"
    foreign.write_text("a,b\n1,2\n")
    for path in (tmp_path / "missing.csv", foreign):
        assert bench.main(["--table", str(path)]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "\n" not in err
