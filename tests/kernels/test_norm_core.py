"""The shared norm kernels (kernels/norm_core.py) in the regimes the pattern tests do not reach:
short rows with many rows a program, odd and long rows, a persistent backward whose programs get
unequal numbers of row tiles, no residual / no weight / no bias; and the tile table's GPU configs
compile for Hopper."""
import pytest
import torch

import json
import pathlib

from fusion_advisor.kernels import (add_layer_norm, add_rms_norm, group_norm, layer_norm, norm_core, norm_tiles,
                                    norm_tune, rms_norm)
from fusion_advisor.kernels.tolerances import tolerance
import kernel_checks
from fusion_advisor.kernels import common
from kernel_checks import check_against_reference, hopper_compile_errors, recorded_launches, sm90_resources

DTYPES = ["float32", "float16", "bfloat16"]
# (rows, N): short rows stacked 32-64 a program with a last partial tile, odd N, a long row.
SHAPES = [[300, 64], [77, 128], [19, 431], [3, 5120]]
SWEEP_N = (64, 128, 256, 512, 768, 1024, 2048, 4096, 5120, 8192, 16384)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_rms_norms_in_every_row_regime(shape, dtype, device):
    params = {"shape": shape, "dtype": dtype, "eps": 1e-6}
    check_against_reference(rms_norm.PATTERN, params, device, reduced_grads=(1,))
    check_against_reference(add_rms_norm.PATTERN, params, device, reduced_grads=(2,))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_layer_norms_in_every_row_regime(shape, dtype, device):
    params = {"shape": shape, "dtype": dtype, "eps": 1e-5}
    check_against_reference(layer_norm.PATTERN, params, device, reduced_grads=(2, 3))
    check_against_reference(add_layer_norm.PATTERN, params, device, reduced_grads=(3, 4))


@pytest.mark.parametrize("options", [{"weight": False, "bias": False}, {"bias": False}, {"weight": False}], ids=str)
@pytest.mark.parametrize("dtype", DTYPES)
def test_short_rows_without_weight_or_bias(options, dtype, device):
    params = {"shape": [200, 64], "dtype": dtype, "eps": 1e-5, **options}
    check_against_reference(layer_norm.PATTERN, params, device, reduced_grads=(2, 3))
    check_against_reference(add_layer_norm.PATTERN, params, device, reduced_grads=(3, 4))


# GroupNorm over (tokens, hidden) in the shared row kernels: groups of 64 (a head), of 4. (Groups of
# 1 or 2 channels are ill-conditioned in fp32 backward: x - mean is rounding noise times rstd ~ 316;
# on an H100 a group of one channel missed by 7e-5, and the old kernel misses groups of 2 as well.)
GROUP_CASES = [{"shape": [300, 64], "num_groups": 1}, {"shape": [37, 1024], "num_groups": 16},
               {"shape": [9, 128], "num_groups": 32}, {"shape": [6, 256, 1, 1], "num_groups": 8},
               # group counts that are not powers of two: 12 heads of 64 (padded to 16), 3 groups of 32
               {"shape": [37, 768], "num_groups": 12}, {"shape": [11, 96], "num_groups": 3}]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", GROUP_CASES, ids=lambda c: "x".join(map(str, c["shape"])) + f"g{c['num_groups']}")
def test_group_norm_over_channels_uses_the_row_kernels(case, dtype, device):
    shape = case["shape"]
    assert group_norm.uses_row_kernels(shape[1], 1, case["num_groups"])
    check_against_reference(group_norm.PATTERN, {**case, "dtype": dtype, "eps": 1e-5}, device, reduced_grads=(2, 3))


@pytest.mark.parametrize("options", [{"weight": False, "bias": False}, {"bias": False}, {"weight_dtype": "float32"}],
                         ids=str)
def test_group_norm_rows_without_weight_or_bias(options, device):
    if device.type == "cuda" and options.get("weight_dtype") == "float32":
        pytest.skip("the reference itself refuses a float32 weight with bfloat16 input on CUDA")
    check_against_reference(group_norm.PATTERN, {"shape": [70, 256], "num_groups": 4, "dtype": "bfloat16",
                                                 "eps": 1e-5, **options}, device, reduced_grads=(2, 3))


def test_group_norm_keeps_its_own_kernels_where_rows_do_not_fit():
    assert not group_norm.uses_row_kernels(96, 1, 4)      # groups of 24: not a power of two
    assert not group_norm.uses_row_kernels(256, 1, 12)    # 256 channels do not split into 12 groups
    assert not group_norm.uses_row_kernels(256, 49, 8)    # positions: an image
    with pytest.raises(ValueError, match="segments"):
        norm_core.norm_fwd(torch.randn(4, 96), None, None, None, 1e-5, rms=False, out_dtype=torch.float32,
                           segments=4)


@pytest.mark.parametrize("in_memory", ["dweight", "dbias", "both"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_parameter_sums_added_to_memory_every_tile(in_memory, dtype, device, monkeypatch):
    # The long-row backward (sums in memory) on short rows: several rows a tile, several tiles a
    # program; each parameter's sums in memory or in registers on its own.
    monkeypatch.setattr(norm_tiles, "ACC_IN_MEMORY_COLS", 64 if in_memory != "dbias" else 1 << 20)
    monkeypatch.setattr(norm_tiles, "DB_IN_MEMORY_COLS", 64 if in_memory != "dweight" else 1 << 20)
    assert norm_tiles.sums_in_memory(64) == (in_memory != "dbias", in_memory != "dweight")
    params = {"shape": [300, 64], "dtype": dtype, "eps": 1e-5}   # 10 tiles of 32 rows over 4 programs
    check_against_reference(rms_norm.PATTERN, params, device, reduced_grads=(1,))
    check_against_reference(add_rms_norm.PATTERN, params, device, reduced_grads=(2,))
    check_against_reference(layer_norm.PATTERN, params, device, reduced_grads=(2, 3))
    check_against_reference(add_layer_norm.PATTERN, {**params, "bias": False}, device, reduced_grads=(3, 4))
    check_against_reference(group_norm.PATTERN, {**params, "num_groups": 4}, device, reduced_grads=(2, 3))


@pytest.mark.parametrize("n", [64, 80])   # a power of two (no column masks: EVEN) and a padded row
@pytest.mark.parametrize("dtype", DTYPES)
def test_backward_that_reads_each_tile_twice(n, dtype, device, monkeypatch):
    # The long-row backward (RELOAD: the row sums from a first read, dx and the parameter sums from a
    # second) on short rows, several rows a tile and several tiles a program, with the sums in
    # registers and (dweight) in memory.
    monkeypatch.setattr(norm_tiles, "RELOAD_COLS", 64)
    with recorded_launches() as launches:
        for dw_in_memory in (False, True):
            monkeypatch.setattr(norm_tiles, "ACC_IN_MEMORY_COLS", 64 if dw_in_memory else 1 << 20)
            params = {"shape": [300, n], "dtype": dtype, "eps": 1e-5}
            check_against_reference(rms_norm.PATTERN, params, device, reduced_grads=(1,))
            check_against_reference(add_rms_norm.PATTERN, params, device, reduced_grads=(2,))
            check_against_reference(layer_norm.PATTERN, params, device, reduced_grads=(2, 3))
            check_against_reference(add_layer_norm.PATTERN, params, device, reduced_grads=(3, 4))
            check_against_reference(group_norm.PATTERN, {**params, "shape": [300, 64], "num_groups": 4}, device,
                                    reduced_grads=(2, 3))
    bwd = [launch for launch in launches if launch["name"].endswith("_bwd_kernel")]
    assert all(launch["args"]["RELOAD"][1] for launch in bwd)
    assert {launch["args"]["EVEN"][1] for launch in bwd if launch["name"] != "_group_norm_rows_bwd_kernel"} == {n == 64}
    assert bwd or device.type == "cuda"


@pytest.mark.parametrize("stages", [2, 3])
@pytest.mark.parametrize("dtype", DTYPES)
def test_pipelined_persistent_tiles_in_both_passes(stages, dtype, device, monkeypatch):
    # stages > 1: the forward turns persistent too. 4 rows a tile over 301 rows of 96 (padded to 128)
    # make 76 tiles, the last one short; 2 programs an SM (8 in the interpreter, 264 on an H100 with
    # fewer tiles than that on a GPU, so the GPU run uses 9001 rows).
    rows = 9001 if device.type == "cuda" else 301
    fwd = norm_tiles.TileConfig(4, 128, 4, 2, True, stages)
    bwd = norm_tiles.TileConfig(4, 128, 4, 2, False, stages)
    monkeypatch.setattr(norm_core, "fwd_config", lambda *a: fwd)
    monkeypatch.setattr(norm_core, "bwd_config", lambda *a: bwd)
    params = {"shape": [rows, 96], "dtype": dtype, "eps": 1e-5}
    check_against_reference(rms_norm.PATTERN, params, device, reduced_grads=(1,))
    check_against_reference(add_layer_norm.PATTERN, params, device, reduced_grads=(3, 4))
    check_against_reference(group_norm.PATTERN, {"shape": [rows, 128], "num_groups": 4, "dtype": dtype},
                            device, reduced_grads=(2, 3))


def test_pipelined_backward_never_reads_partial_rows_ahead(device, monkeypatch):
    # Rows long enough to add their sums to memory every tile read the row back the tile after:
    # the launcher runs that loop unpipelined whatever the config says.
    monkeypatch.setattr(norm_tiles, "ACC_IN_MEMORY_COLS", 64)
    monkeypatch.setattr(norm_core, "bwd_config", lambda *a: norm_tiles.TileConfig(8, 64, 4, 2, False, 3))
    with recorded_launches() as launches:   # records the interpreter's launches (none on a GPU)
        check_against_reference(layer_norm.PATTERN, {"shape": [300, 64], "dtype": "float32"}, device,
                                reduced_grads=(2, 3))
    bwd = [launch for launch in launches if launch["name"] == "_layer_norm_bwd_kernel"]
    assert all(launch["args"]["STAGES"][1] == 1 for launch in bwd)
    assert bwd or device.type == "cuda"


def test_backward_programs_get_unequal_numbers_of_tiles(device):
    # 4 programs in the interpreter; 37 rows in tiles of 4 make 10 tiles: 3, 3, 2 and 2 each. On a
    # GPU (2 x SMs programs of 8 warps) 2403 rows make 601 tiles, the last one short.
    rows, n = (2403 if device.type == "cuda" else 37), 512
    cfg = norm_tiles.bwd_config(n, rows)
    tiles = -(-rows // cfg.block_m)
    assert cfg.block_m > 1 and tiles > norm_tiles.bwd_programs(cfg, rows, device)
    assert tiles % norm_tiles.bwd_programs(cfg, rows, device) and rows % cfg.block_m
    check_against_reference(layer_norm.PATTERN, {"shape": [rows, n], "dtype": "float32"}, device,
                            reduced_grads=(2, 3))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_without_weight_matches_its_formula(dtype, device):
    # No pattern normalises without an RMSNorm weight; the flag is the kernels' and checked here.
    torch.manual_seed(0)
    x = torch.randn(150, 64, device=device, dtype=dtype, requires_grad=True)
    y, _, _, rstd = norm_core.norm_fwd(x.detach(), None, None, None, 1e-6, rms=True, out_dtype=dtype)
    xf = x.float()
    ref = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)).to(dtype)
    torch.testing.assert_close(y, ref, **tolerance(dtype))
    dy = torch.randn_like(y)
    dx, dw, db = norm_core.norm_bwd(dy, None, x.detach(), None, None, None, rstd, rms=True)
    ref.backward(dy)
    assert dw is None and db is None
    torch.testing.assert_close(dx, x.grad, **tolerance(dtype))


def test_zero_rows_give_zero_parameter_grads(device):
    x = torch.empty(0, 64, device=device)
    w, b = torch.ones(64, device=device), torch.zeros(64, device=device)
    y, _, mean, rstd = norm_core.norm_fwd(x, None, w, b, 1e-5, rms=False, out_dtype=x.dtype)
    dx, dw, db = norm_core.norm_bwd(x, None, x, w, b, mean, rstd, rms=False)
    assert y.shape == dx.shape == (0, 64) and not dw.any() and not db.any()


@pytest.mark.parametrize("n", SWEEP_N)
def test_tile_table_gives_power_of_two_tiles_of_bounded_size(n):
    for rows in (4096, 65536, 1 << 20):
        fwd, bwd = norm_tiles.fwd_config(n, rows, 264), norm_tiles.bwd_config(n, rows)
        for cfg, cap in ((fwd, norm_tiles.FWD_TILE), (bwd, norm_tiles.BWD_TILE)):
            assert cfg.block_n >= n and cfg.block_n & (cfg.block_n - 1) == 0 and cfg.block_m & (cfg.block_m - 1) == 0
            assert cfg.block_m * cfg.block_n <= max(cap, cfg.block_n)
            assert cfg.num_warps in (4, 8, 16, 32)
    assert norm_tiles.fwd_config(64, 1 << 20, 264).block_m >= 32   # short rows: many a program
    assert norm_tiles.bwd_config(64, 1 << 20).block_m >= 32
    with pytest.raises(ValueError, match="wider than"):
        norm_tiles.fwd_config(norm_tiles.MAX_BLOCK_N + 1, 4, 8)


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the tests above compile the kernels for real")
def test_gpu_tile_configs_compile_for_hopper(device, monkeypatch):
    """The interpreter runs any block shape; the GPU compiler does not. Every config the table
    gives on an H100 for the sweep's row lengths is run here on 3 rows and compiled for sm_90."""
    configs = [(n, norm_tiles.fwd_config(n, rows, 264), norm_tiles.bwd_config(n, rows), None)
               for n in SWEEP_N for rows in (4096, 1 << 20)]
    # norm_tune.py's candidates too, on the pattern it tunes with (a search must not die compiling).
    for n in (64, 1024, 5120):
        block_n = 1 << (n - 1).bit_length()
        fwds, bwds = norm_tune.fwd_candidates(block_n), norm_tune.bwd_candidates(block_n)
        configs += [(n, fwds[i % len(fwds)], bwds[i % len(bwds)], add_layer_norm.PATTERN)
                    for i in range(max(len(fwds), len(bwds)))]
    patterns = ((rms_norm.PATTERN, {}), (add_rms_norm.PATTERN, {}), (layer_norm.PATTERN, {}),
                (add_layer_norm.PATTERN, {"bias": False}), (group_norm.PATTERN, {"num_groups": "heads"}))
    with recorded_launches() as launches:
        for n, fwd, bwd, only in configs:
            monkeypatch.setattr(norm_core, "fwd_config", lambda *a, cfg=fwd: cfg)
            monkeypatch.setattr(norm_core, "bwd_config", lambda *a, cfg=bwd: cfg)
            for pattern, params in patterns if only is None else ((only, {}),):
                if params.get("num_groups") == "heads":   # GroupNorm over heads of 64 (of 1 below 64)
                    params = {"num_groups": max(1, n // 64)}
                    if not group_norm.uses_row_kernels(n, 1, params["num_groups"]):
                        continue
                inputs = pattern.make_inputs({"shape": [3, n], "dtype": "bfloat16", **params}, device, True)
                out = pattern.fused(*inputs.args, **inputs.kwargs)
                outs = [out] if isinstance(out, torch.Tensor) else list(out)
                torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])
    names = {launch["name"] for launch in launches}
    assert {"_rms_norm_fwd_kernel", "_add_layer_norm_bwd_kernel", "_norm_param_grads_kernel",
            "_group_norm_rows_bwd_kernel"} <= names
    errors = hopper_compile_errors(launches)
    assert not errors, "\n\n".join(errors)


def test_tuned_table_is_read_for_its_gpu_and_ignored_when_broken():
    # conftest points XDG_CACHE_HOME at a fresh folder: the file written here is this test's alone.
    gpu = "NVIDIA Fake GPU 80GB"
    path = norm_tiles.tuned_path(gpu)
    path.parent.mkdir(parents=True, exist_ok=True)
    caches = (norm_tiles.tuned_table, norm_tiles.fwd_config, norm_tiles.bwd_config)
    try:
        path.write_text(json.dumps({"configs": {"fwd/1024/2": [8, 16, 1], "bwd/1024/2": [2, 4, 3],
                                                "bwd/64/2": [3, 4, 1],   # 3 rows: not a power of two
                                                "bwd/4096/2": [1, 16, 1, 0, 2, 0],   # an older entry, chunk 0
                                                "bwd/8192/2": [2, 8, 2, 0, 2, 2048]}}))   # an older chunked tile
        assert norm_tiles.fwd_config(1024, 65536, 264, 2, gpu) == norm_tiles.TileConfig(8, 1024, 16, 1)
        assert norm_tiles.bwd_config(1000, 65536, 2, gpu) == norm_tiles.TileConfig(2, 1024, 4, 3)
        assert norm_tiles.bwd_config(1024, 65536, 4, gpu) == norm_tiles.bwd_config(1024, 65536)  # fp32: not tuned
        assert norm_tiles.bwd_config(64, 65536, 2, gpu) == norm_tiles.bwd_config(64, 65536)      # invalid entry
        # a sixth field of 0 is read (and ignored); any other (the chunked backward's, removed) leaves it out
        assert norm_tiles.bwd_config(4096, 65536, 2, gpu) == norm_tiles.TileConfig(1, 4096, 16, 1, False, 2)
        assert norm_tiles.bwd_config(8192, 65536, 2, gpu) == norm_tiles.bwd_config(8192, 65536)
        assert norm_tiles._tuned_entry("bwd/8192/2", [2, 8, 2, 0, 2]) == (2, 8, 2, False, 2)   # valid but for it
        assert norm_tiles.fwd_config(1024, 2, 1, 2, gpu).block_m == 2    # never more rows than there are
        path.write_text("{not json")
        for cached in caches:
            cached.cache_clear()
        assert norm_tiles.fwd_config(1024, 65536, 264, 2, gpu) == norm_tiles.fwd_config(1024, 65536, 264)
    finally:
        path.unlink(missing_ok=True)
        for cached in caches:
            cached.cache_clear()


def test_tuned_entries_with_stages_and_the_shipped_table(tmp_path, monkeypatch):
    gpu = "NVIDIA Other Fake GPU"
    caches = (norm_tiles.tuned_table, norm_tiles.fwd_config, norm_tiles.bwd_config)
    shipped = tmp_path / "shipped.json"
    monkeypatch.setattr(norm_tiles, "shipped_path", lambda name: shipped)
    try:
        # no file in the user cache: the shipped one answers
        shipped.write_text(json.dumps({"configs": {
            "bwd/2048/2": [1, 8, 2, 0, 3],     # pipelined, 3 stages
            "bwd/4096/2": [1, 16, 1, 1, 2],    # prefetch and stages together: not a tile
            "bwd/16384/2": [1, 16, 1, 0, 2],   # pipelined where the sums go to memory: the heuristic
            "fwd/256/2": [16, 8, 4, 1, 2],     # a persistent forward
            "fwd-plain/256/2": [4, 4, 1, 1, 1]}}))   # the norm without a residual: its own tile
        assert norm_tiles.bwd_config(2048, 65536, 2, gpu) == norm_tiles.TileConfig(1, 2048, 8, 2, False, 3)
        assert norm_tiles.bwd_config(4096, 65536, 2, gpu) == norm_tiles.bwd_config(4096, 65536)
        assert norm_tiles.bwd_config(16384, 65536, 2, gpu) == norm_tiles.bwd_config(16384, 65536)
        with monkeypatch.context() as knobs:   # read twice, both sums in registers (opt-in): it pipelines
            knobs.setattr(norm_tiles, "ACC_IN_MEMORY_COLS", 32768)
            knobs.setattr(norm_tiles, "RELOAD_COLS", 16384)
            for cached in caches:
                cached.cache_clear()
            assert norm_tiles.bwd_config(16384, 65536, 2, gpu) == norm_tiles.TileConfig(1, 16384, 16, 1, False, 2)
        for cached in caches:
            cached.cache_clear()
        assert norm_tiles.fwd_config(256, 65536, 264, 2, gpu) == norm_tiles.TileConfig(16, 256, 8, 4, stages=2)
        assert norm_tiles.fwd_config(256, 65536, 264, 2, gpu, False) == norm_tiles.TileConfig(4, 256, 4, 1)
        # no plain tile searched at 2048: the residual family's answers
        assert norm_tiles.bwd_config(2048, 65536, 2, gpu, False) == norm_tiles.bwd_config(2048, 65536, 2, gpu)
        # the user's own search wins over the shipped table
        user = norm_tiles.tuned_path(gpu)
        user.parent.mkdir(parents=True, exist_ok=True)
        user.write_text(json.dumps({"configs": {"bwd/2048/2": [1, 8, 1, 1]}}))
        for cached in caches:
            cached.cache_clear()
        assert norm_tiles.bwd_config(2048, 65536, 2, gpu) == norm_tiles.TileConfig(1, 2048, 8, 1, True, 1)
        user.unlink()
    finally:
        for cached in caches:
            cached.cache_clear()


def test_small_launches_read_their_own_tiles(tmp_path, monkeypatch):
    """A launch over at most 16 MiB of rows takes the "/small" tile (the plain family's, else the
    residual family's), a larger one the regular tile; without small tiles, the regular one."""
    gpu = "NVIDIA Small Fake GPU"
    caches = (norm_tiles.tuned_table, norm_tiles.fwd_config, norm_tiles.bwd_config)
    shipped = tmp_path / "shipped.json"
    monkeypatch.setattr(norm_tiles, "shipped_path", lambda name: shipped)
    shipped.write_text(json.dumps({"configs": {
        "bwd/64/2": [64, 8, 2, 1, 1], "bwd/64/2/small": [16, 4, 4, 0, 2], "bwd-plain/64/2/small": [8, 4, 4, 0, 2],
        "fwd/1024/2": [4, 8, 1], "fwd/1024/2/small": [1, 4, 1]}}))
    try:
        assert norm_tiles.small_launch(65536, 64, 2) and not norm_tiles.small_launch(65536, 256, 2)
        assert norm_tiles.bwd_config(64, 65536, 2, gpu) == norm_tiles.TileConfig(16, 64, 4, 4, False, 2)
        assert norm_tiles.bwd_config(64, 65536, 2, gpu, False) == norm_tiles.TileConfig(8, 64, 4, 4, False, 2)
        assert norm_tiles.bwd_config(64, 1 << 20, 2, gpu) == norm_tiles.TileConfig(64, 64, 8, 2, True, 1)
        assert norm_tiles.bwd_config(64, 1 << 20, 2, gpu, False) == norm_tiles.TileConfig(64, 64, 8, 2, True, 1)
        assert norm_tiles.fwd_config(1024, 4096, 264, 2, gpu) == norm_tiles.TileConfig(1, 1024, 4, 1)
        assert norm_tiles.fwd_config(1024, 1 << 17, 264, 2, gpu) == norm_tiles.TileConfig(4, 1024, 8, 1)
    finally:
        for cached in caches:
            cached.cache_clear()


def test_shipped_tile_tables_are_valid_tiles():
    shipped = sorted((pathlib.Path(norm_tiles.__file__).parent / "tiles").glob("*.json"))
    for path in shipped:
        data = json.loads(path.read_text())
        assert data["gpu"] and data["torch"] and data["triton"], path.name
        assert norm_tiles.shipped_path(data["gpu"]) == path
        for key, entry in data["configs"].items():
            assert norm_tiles._tuned_entry(key, entry) is not None, (path.name, key, entry)


def test_report_says_where_norms_ran_untuned_tiles():
    note = norm_tiles.untuned_note({"layer_norm", "swiglu", "rms_norm"}, "NVIDIA H200")
    assert "layer_norm, rms_norm kernels" in note and "NVIDIA H200" in note and "calibrate --kernel-tiles" in note
    assert norm_tiles.untuned_note({"layer_norm"}, "NVIDIA H100 80GB HBM3") is None   # its table ships
    assert norm_tiles.untuned_note({"swiglu"}, "NVIDIA H200") is None                 # not a norm
    assert norm_tiles.untuned_note({"layer_norm"}, "") is None                        # no GPU


@pytest.mark.parametrize("n", (64, 1024, 16384))
def test_tune_candidates_surround_the_heuristic(n):
    fwds, bwds = norm_tune.fwd_candidates(n), norm_tune.bwd_candidates(n)
    heuristic_fwd, heuristic_bwd = norm_tiles.fwd_config(n, 1 << 20, 264), norm_tiles.bwd_config(n, 1 << 20)
    assert heuristic_fwd in fwds and heuristic_bwd in bwds
    for cfg in fwds + bwds:
        assert cfg.block_m >= 1 and cfg.block_m & (cfg.block_m - 1) == 0 and cfg.block_n == n
        assert cfg.block_m * cfg.block_n <= max(16384, n) and cfg.num_warps in (4, 8, 16, 32)


def test_tuning_needs_a_gpu(device):
    if device.type == "cuda":
        pytest.skip("on a GPU it would tune")
    with pytest.raises(RuntimeError, match="needs a CUDA GPU"):
        norm_tune.tune([64], [torch.bfloat16], device)


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the sweep measures what this estimates")
def test_backward_registers_leave_room_for_its_programs_per_sm():
    """The backward's registers and spills as ptxas builds it for sm_90 (kernel_checks.sm90_resources):
    the occupancy the tile table counts on."""
    cases, configs = [], []
    for n in (64, 1024, 2048, 4096, 8192):
        cfg = norm_tiles.bwd_config(n, 1 << 20)
        types = {name: "*bf16" for name in ("DY", "DS_OUT", "X", "W", "DX")}
        types.update({name: "*fp32" for name in ("MEAN", "RSTD", "DW_PARTIAL", "DB_PARTIAL")})
        consts = {"HAS_DS_OUT": True, "HAS_WEIGHT": True, "HAS_BIAS": True, "BLOCK_M": cfg.block_m,
                  "BLOCK_N": cfg.block_n, "DW_IN_MEMORY": norm_tiles.sums_in_memory(cfg.block_n)[0],
                  "DB_IN_MEMORY": norm_tiles.sums_in_memory(cfg.block_n)[1],
                  "PREFETCH": cfg.prefetch, "STAGES": cfg.stages, "LAUNCH_DEPENDENTS": True,
                  "RELOAD": norm_tiles.reloads(cfg.block_n), "EVEN": norm_tiles.reloads(cfg.block_n)}
        cases.append({"module": "fusion_advisor.kernels.norm_core", "kernel": "_add_layer_norm_bwd_kernel",
                      "types": types, "constexprs": consts, "num_warps": cfg.num_warps,
                      "unaligned": ["n_rows"]})   # what the JIT sees for N % 16 == 0
        configs.append((n, cfg))
    for (n, cfg), (regs, stack) in zip(configs, sm90_resources(cases)):
        # 64K registers an SM: every program the grid puts on an SM is resident at once.
        assert regs * 32 * cfg.num_warps * cfg.programs_per_sm <= 65536, (n, cfg, regs)
        assert stack == 0, (n, stack)


def test_long_fp32_rows_take_twice_the_threads_of_bf16():
    # a row of 16384 in fp32 holds twice the registers of bf16: 32 warps, where bf16 takes 16
    assert norm_tiles.bwd_config(16384, 65536, 2).num_warps == 16
    assert norm_tiles.bwd_config(16384, 65536, 4).num_warps == 32


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the long-row run times both")
def test_reading_the_tile_twice_frees_registers_for_both_sums_at_16384():
    """RELOAD (opt-in): (add +) LayerNorm's backward at 16384 bf16 and 16 warps, both sums in registers,
    spills at most 16 bytes a thread where the shipped path (the tile read once, dweight sums in memory)
    spills far more (136-200 under Triton 3.6's ptxas)."""
    types = {name: "*bf16" for name in ("DY", "DS_OUT", "X", "W", "DX")}
    types.update({name: "*fp32" for name in ("MEAN", "RSTD", "DW_PARTIAL", "DB_PARTIAL")})
    cases = []
    for kernel, residual in (("_layer_norm_bwd_kernel", False), ("_add_layer_norm_bwd_kernel", True)):
        for reload in (True, False):
            consts = {"HAS_DS_OUT": residual, "HAS_WEIGHT": True, "HAS_BIAS": True, "BLOCK_M": 1, "BLOCK_N": 16384,
                      "DW_IN_MEMORY": not reload, "DB_IN_MEMORY": False, "PREFETCH": False, "STAGES": 1,
                      "LAUNCH_DEPENDENTS": True, "RELOAD": reload, "EVEN": reload}
            cases.append({"module": "fusion_advisor.kernels.norm_core", "kernel": kernel, "types": types,
                          "constexprs": consts, "num_warps": 16, "unaligned": ["n_rows"]})
    spills = [stack for _, stack in sm90_resources(cases)]
    for reloaded, once in (spills[0:2], spills[2:4]):
        assert reloaded <= 16 and reloaded < once, spills


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU run launches them")
def test_parameter_grads_kernel_starts_while_the_backward_runs():
    """Programmatic dependent launch, as ptxas builds it for sm_90: the backward lets the
    parameter-grad kernel launch (griddepcontrol.launch_dependents), which waits for the
    backward's end (griddepcontrol.wait) before it reads the partial rows; neither without it."""
    bwd_types = {name: "*bf16" for name in ("DY", "DS_OUT", "X", "W", "DX")}
    bwd_types.update({name: "*fp32" for name in ("MEAN", "RSTD", "DW_PARTIAL", "DB_PARTIAL")})
    cases = []
    for early in (True, False):
        cases.append({"module": "fusion_advisor.kernels.norm_core", "kernel": "_layer_norm_bwd_kernel",
                      "types": bwd_types, "num_warps": 8,
                      "constexprs": {"HAS_DS_OUT": False, "HAS_WEIGHT": True, "HAS_BIAS": True, "BLOCK_M": 4,
                                     "BLOCK_N": 512, "DW_IN_MEMORY": False, "DB_IN_MEMORY": False,
                                     "PREFETCH": True, "STAGES": 1, "LAUNCH_DEPENDENTS": early, "RELOAD": False,
                                     "EVEN": False}})
        cases.append({"module": "fusion_advisor.kernels.norm_core", "kernel": "_norm_param_grads_kernel",
                      "types": {"DW_PARTIAL": "*fp32", "DB_PARTIAL": "*fp32", "DW": "*bf16", "DB": "*bf16"},
                      "num_warps": 4,
                      "constexprs": {"HAS_WEIGHT": True, "HAS_BIAS": True, "BLOCK_P": 32, "BLOCK_C": 128,
                                     "WAIT_PRIMARY": early}})
    (bwd, grads, bwd_plain, grads_plain) = kernel_checks.sm90_global_accesses(cases)
    assert bwd.get("griddepcontrol.launch_dependents") == 1 and "griddepcontrol.wait" not in bwd
    assert grads.get("griddepcontrol.wait") == 1 and "griddepcontrol.launch_dependents" not in grads
    assert not any(op.startswith("griddepcontrol") for op in (*bwd_plain, *grads_plain))


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU run launches them")
def test_other_backwards_let_their_parameter_sums_start_early():
    """channel_norm's and bias_act's backwards, whose partial rows the same kernel sums."""
    cases = [{"module": "fusion_advisor.kernels.channel_norm", "kernel": "_channel_norm_bwd_kernel", "num_warps": 4,
              "types": {"DY": "*bf16", "X": "*bf16", "W": "*bf16", "DX": "*bf16", "MEAN": "*fp32", "RSTD": "*fp32",
                        "DW_PARTIAL": "*fp32", "DB_PARTIAL": "*fp32"},
              "constexprs": {"HAS_WEIGHT": True, "HAS_BIAS": True, "BLOCK_C": 128, "BLOCK_S": 32, "DY_CL": False,
                             "X_CL": False, "LAUNCH_DEPENDENTS": True}},
             {"module": "fusion_advisor.kernels.bias_act", "kernel": "_bias_act_bwd_kernel", "num_warps": 4,
              "types": {"DY": "*bf16", "X": "*bf16", "B": "*bf16", "DX": "*bf16", "DB_PARTIAL": "*fp32",
                        "negative_slope": "fp32"},
              "constexprs": {"ACT": 0, "BLOCK_M": 8, "BLOCK_N": 512, "LAUNCH_DEPENDENTS": True},
              "unaligned": ["negative_slope"]}]
    for accesses in kernel_checks.sm90_global_accesses(cases):
        assert accesses.get("griddepcontrol.launch_dependents") == 1


def test_no_dependent_launch_off_a_gpu():
    assert not common.pdl(torch.device("cpu"))


def test_small_search_times_8_mib_launches_under_small_keys():
    from fusion_advisor.kernels.common import next_power_of_2
    from fusion_advisor.kernels import norm_tune
    for n, rows in ((64, 65536), (1024, 4096), (5120, 816), (16384, 256)):
        got = norm_tune.tune_rows(n, torch.bfloat16, norm_tune.TUNE_ROWS, norm_tune.SMALL_TUNE_BYTES)
        assert got == rows and norm_tiles.small_launch(got, next_power_of_2(n), 2)
    large = norm_tune.tune_rows(64, torch.bfloat16, norm_tune.TUNE_ROWS, 1 << 27)
    assert large == 1 << 20 and not norm_tiles.small_launch(large, 64, 2)


def _shipped_tiles():
    """(key, TileConfig) of every valid entry of every shipped table, one per distinct tile a pass."""
    seen, out = set(), []
    for path in sorted((pathlib.Path(norm_tiles.__file__).parent / "tiles").glob("*.json")):
        for key, entry in json.loads(path.read_text())["configs"].items():
            cfg = norm_tiles._tuned_entry(key, entry)
            kind, block_n = key.split("/")[0], int(key.split("/")[1])
            if cfg is None or (kind, block_n, cfg) in seen:
                continue
            seen.add((kind, block_n, cfg))
            block_m, warps, per_sm, prefetch, stages = cfg
            out.append((key, norm_tiles.TileConfig(block_m, block_n, warps, per_sm, prefetch, stages)))
    return out


@pytest.mark.parametrize("key,cfg", _shipped_tiles(), ids=lambda v: v if isinstance(v, str) else "")
def test_every_shipped_tile_computes_the_reference(key, cfg, monkeypatch):
    """Each tile a shipped table makes the GPU run, forced in the interpreter on rows a little
    shorter than its padded length (masked columns) and on enough rows for several tiles a
    program: the forward and backward of the family it was searched on match eager."""
    if torch.cuda.is_available():
        pytest.skip("on a GPU the table's tiles run in every test above")
    kind, block_n = key.split("/")[0], cfg.block_n
    n = block_n - 3 if block_n <= 64 else block_n * 3 // 4 + 1
    if kind.startswith("fwd"):
        monkeypatch.setattr(norm_core, "fwd_config", lambda *a: cfg)
    else:
        monkeypatch.setattr(norm_core, "bwd_config", lambda *a: cfg)
    params = {"shape": [3 * cfg.block_m + 1, n], "dtype": "bfloat16", "eps": 1e-5}
    pattern, grads = (layer_norm, (2, 3)) if kind.endswith("-plain") else (add_layer_norm, (3, 4))
    with recorded_launches() as launches:
        check_against_reference(pattern.PATTERN, params, torch.device("cpu"), reduced_grads=grads)
    name = f"_{pattern.__name__.rsplit('.', 1)[1]}_{kind[:3]}_kernel"
    ran = [launch["args"] for launch in launches if launch["name"] == name]
    assert ran and all((a["BLOCK_M"][1], a["BLOCK_N"][1], a["STAGES"][1]) == (cfg.block_m, block_n, cfg.stages)
                       for a in ran), (name, [launch["name"] for launch in launches])
