"""Device profiles: datasheet lookups, torch device-name matching, the calibration cache and the
order in which load_profile picks a profile."""
import json
import os
import subprocess
import sys

import pytest

from fusion_advisor.cost_model import device
from fusion_advisor.cost_model.device import (DeviceProfile, cache_path, datasheet_profiles, load_profile,
                                              match_target)
from fusion_advisor.core.errors import AdvisorError


@pytest.mark.parametrize("torch_name, key", [
    ("NVIDIA H100 80GB HBM3", "h100"),
    ("NVIDIA H100 PCIe", "h100-pcie"),
    ("NVIDIA H100 NVL", "h100-nvl"),
    ("NVIDIA H200", "h200"),
    ("NVIDIA H200 NVL", "h200-nvl"),
    ("NVIDIA A100-SXM4-80GB", "a100-80gb"),
    ("NVIDIA A100-SXM4-40GB", "a100-40gb"),
    ("NVIDIA A100-PCIE-40GB", "a100-pcie-40gb"),
    ("NVIDIA A100 80GB PCIe", "a100-pcie-80gb"),
    ("Tesla V100-SXM2-32GB", "v100"),
    ("Tesla V100-PCIE-16GB", "v100-pcie"),
    ("NVIDIA L4", "l4"),
    ("NVIDIA L40S", "l40s"),
    ("NVIDIA L40", "l40"),
    ("NVIDIA A10G", "a10g"),
    ("NVIDIA A10", "a10"),
    ("NVIDIA GH200 480GB", None),
    ("NVIDIA GeForce RTX 4090", None),
])
def test_torch_device_names_match_their_datasheet(torch_name, key):
    assert match_target(torch_name) == key


def test_datasheet_figures():
    sheets = datasheet_profiles()
    h100 = sheets["h100"]
    assert h100.name == "NVIDIA H100 SXM" and h100.source == "datasheet"
    assert h100.calibration["datasheet_hbm_bytes_per_s"] == pytest.approx(3.35e12)
    assert h100.hbm_bytes_per_s == pytest.approx(3.35e12 * device.DATASHEET_COPY_EFFICIENCY)
    assert h100.peak_flops["bf16_tc"] == pytest.approx(989.4e12)       # dense, not "with sparsity"
    assert sheets["h100-pcie"].hbm_bytes_per_s < h100.hbm_bytes_per_s < sheets["h200"].hbm_bytes_per_s
    assert sheets["a100-80gb"].peak_flops["tf32_tc"] == pytest.approx(156e12)
    # V100 has no bf16 tensor cores: the fp32 rate stands in
    assert sheets["v100"].peak("bf16_tc") == sheets["v100"].peak_flops["fp32"]
    for key, p in sheets.items():
        assert p.label() == f"{p.name} (datasheet)"
        assert set(p.peak_flops) <= set(device.PEAK_KEYS) and "fp32" in p.peak_flops, key
        assert p.l2_bytes > 0 and p.hbm_bytes_per_s > 0


def test_targets_and_aliases():
    assert load_profile(target="h100").name == "NVIDIA H100 SXM"
    assert load_profile(target="H100-PCIe").name == "NVIDIA H100 PCIe"
    assert load_profile(target="a100").name == "NVIDIA A100 SXM4 80GB"
    with pytest.raises(AdvisorError, match="unknown target GPU 'b9000'.*h100"):
        load_profile(target="b9000")


def _calibrated(name="NVIDIA H200", date="2026-11-22", torch_version=None, driver="580.159.04", bw=4.3e12):
    import torch
    return DeviceProfile(
        name=name, source="calibrated", hbm_bytes_per_s=bw, peak_flops={"fp32": 50e12, "bf16_tc": 780e12},
        launch_us=4.0, min_kernel_us=1.8, l2_bytes=60 << 20, num_sms=132,
        bandwidth_curve=[(4096, 2e9), (1 << 30, bw)], element_rates={"strided": 3e11},
        calibration={"gpu_name": name, "driver": driver, "torch": torch_version or torch.__version__, "date": date})


def test_profile_round_trip(tmp_path):
    p = _calibrated()
    path = p.save(tmp_path / "p.json")
    back = DeviceProfile.load(path)
    assert back == p
    assert back.label() == "NVIDIA H200 (calibrated 2026-11-22)"
    assert json.loads((tmp_path / "p.json").read_text())["bandwidth_curve"][0] == [4096, 2e9]
    (tmp_path / "bad.json").write_text('{"name": "x"}')
    with pytest.raises(AdvisorError, match="missing"):
        DeviceProfile.load(tmp_path / "bad.json")


@pytest.fixture
def isolated(tmp_path, monkeypatch):
    """A temporary cache folder and a temporary folder of committed profiles."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    committed = tmp_path / "committed"
    committed.mkdir()
    monkeypatch.setattr(device, "PROFILES_DIR", committed)
    return tmp_path / "cache" / "fusion-advisor", committed


def test_precedence_cache_then_committed_then_datasheet(isolated):
    cache, committed = isolated
    assert device.cache_dir() == cache
    # nothing calibrated: the datasheet
    assert load_profile("NVIDIA H200").source == "datasheet"
    # a committed calibration for this GPU wins over the datasheet
    _calibrated(date="2026-11-01", bw=4.1e12).save(committed / "h200.json")
    assert load_profile("NVIDIA H200").hbm_bytes_per_s == 4.1e12
    # ... and over the datasheet for a --target too
    assert load_profile(target="h200").hbm_bytes_per_s == 4.1e12
    # a cached calibration of this GPU with this torch wins over both
    mine = _calibrated(date="2026-11-22", bw=4.25e12)
    mine.save(cache_path(mine.name, "580.159.04", mine.calibration["torch"]))
    assert load_profile("NVIDIA H200").hbm_bytes_per_s == 4.25e12
    # ... but not one made with another torch or another driver than asked for
    assert load_profile("NVIDIA H200", torch_version="1.0").hbm_bytes_per_s == 4.1e12
    assert load_profile("NVIDIA H200", driver="999.1").hbm_bytes_per_s == 4.1e12
    assert load_profile("NVIDIA H200", driver="580.159.04").hbm_bytes_per_s == 4.25e12
    # other GPUs are not affected
    assert load_profile("NVIDIA H100 80GB HBM3").source == "datasheet"


def test_cache_file_is_per_gpu_driver_and_torch(isolated):
    a = cache_path("NVIDIA H200", "580.159.04", "2.11.0+cu130")
    b = cache_path("NVIDIA H200", "580.159.04", "2.12.0+cu130")
    c = cache_path("NVIDIA H100 80GB HBM3", "580.159.04", "2.11.0+cu130")
    assert len({a, b, c}) == 3 and all(p.parent == isolated[0] for p in (a, b, c))
    assert " " not in a.name and "/" not in a.name


def test_unknown_gpu_needs_a_calibration(isolated):
    with pytest.raises(AdvisorError, match="run `fusion-advisor calibrate`"):
        load_profile("NVIDIA B9000")
    mine = _calibrated(name="NVIDIA B9000")
    mine.save(cache_path(mine.name, "580.159.04", mine.calibration["torch"]))
    assert load_profile("NVIDIA B9000").name == "NVIDIA B9000"


def test_a_broken_cache_file_is_skipped(isolated):
    cache, _ = isolated
    cache.mkdir(parents=True)
    (cache / "junk.json").write_text("{not json")
    assert load_profile("NVIDIA H200").source == "datasheet"


def test_no_gpu_and_no_target_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(device, "current_gpu_name", lambda: None)
    with pytest.raises(AdvisorError, match="--target-gpu"):
        load_profile()


def test_calibrate_without_a_gpu_exits_3(tmp_path):
    pytest.importorskip("torch")
    import torch
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    env = dict(os.environ, XDG_CACHE_HOME=str(tmp_path))
    r = subprocess.run([sys.executable, "-m", "fusion_advisor.cli", "calibrate", "--quick"], capture_output=True,
                       text=True, timeout=120, env=env)
    assert r.returncode == 3
    assert len(r.stderr.strip().splitlines()) == 1 and "no CUDA GPU" in r.stderr
    assert not (tmp_path / "fusion-advisor").exists()
