"""Device profiles: what a GPU can do, for the roofline.

A DeviceProfile is either measured on the GPU by `fusion-advisor calibrate` ("calibrated") or
read off NVIDIA's datasheets ("datasheet"). `load_profile` picks, in this order:
  1. a calibration cached on this machine for this GPU (and this driver and torch),
  2. a calibrated profile committed with fusion-advisor (cost_model/profiles/*.json),
  3. the datasheet profile.

Datasheet figures are dense peaks (NVIDIA prints tensor-core figures "with sparsity": those are
halved here). Two figures are not on any datasheet: the CPU cost of an eager launch and the
shortest back-to-back kernel; datasheet profiles carry typical values for them, said so below.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from fusion_advisor.core.errors import AdvisorError

MiB = 1 << 20

# Achievable copy bandwidth as a share of the datasheet HBM figure. Read on this project's
# machines (device notes, 2026-11): an H200 copies at ~4.3 of 4.8 TB/s, an H100 SXM at ~3.0 of
# 3.35 TB/s: both 0.90. STREAM-like copies on A100s land in the same range.
DATASHEET_COPY_EFFICIENCY = 0.90

# Not datasheet figures: typical values on Hopper with PyTorch 2.x eager, used until the GPU is
# calibrated. launch: CPU time of one eager op that launches one kernel (dispatcher + launch).
# min_kernel: GPU time per kernel when tiny kernels run back to back; in the H200 fixtures
# (tests/data) a tiny kernel runs ~1.0 µs and queued kernels start ~1.0 µs after the previous
# one ends.
TYPICAL_LAUNCH_US = 5.0
TYPICAL_MIN_KERNEL_US = 2.0
# Elements per second of kernels bound by work per element rather than bytes (a bf16 and an fp32
# kernel of the same shape take the same time), per SM; datasheet profiles scale them by SM count.
# Read off the large such kernels in the H200 fixtures (tests/data):
#   strided: PyTorch's generic (non-vectorized) pointwise loop, taken when an operand broadcasts
#            or is not contiguous (add, mul, neg, masked_fill_, copy_: 250-370 G/s);
#   softmax: softmax_warp_forward over rows of 512 (450 G/s);
#   norm:    vectorized_layer_norm_kernel and its backward over rows of 768 (240-300 G/s).
TYPICAL_ELEMENT_RATES_PER_SM = {"strided": 330e9 / 132, "softmax": 450e9 / 132, "norm": 270e9 / 132}

PEAK_KEYS = ("fp32", "tf32_tc", "bf16_tc", "fp16_tc", "fp64")


@dataclass
class DeviceProfile:
    name: str                                   # "NVIDIA H200"
    source: str                                 # "calibrated" | "datasheet"
    hbm_bytes_per_s: float                      # copy bandwidth, bytes read + written per second
    peak_flops: dict[str, float]                # keys from PEAK_KEYS
    launch_us: float                            # CPU cost to launch one kernel (eager)
    min_kernel_us: float                        # GPU time of the shortest kernel, back to back
    l2_bytes: int
    num_sms: int | None = None
    bandwidth_curve: list[tuple[int, float]] = field(default_factory=list)  # (bytes moved, bytes/s)
    element_rates: dict[str, float] = field(default_factory=dict)  # OpCost.loop family -> elements/s
    calibration: dict = field(default_factory=dict)   # gpu_name, driver, torch, triton, date, raw
    # Relative spread of achieved bandwidth (lo, hi multipliers of the curve): from the
    # calibration's repeated timings and copy-vs-triad difference; wider for datasheet figures.
    bandwidth_spread: tuple[float, float] = (0.8, 1.1)

    def label(self) -> str:
        if self.source == "calibrated":
            date = self.calibration.get("date", "")
            return f"{self.name} (calibrated {date})" if date else f"{self.name} (calibrated)"
        return f"{self.name} ({self.source})"

    def peak(self, key: str) -> float:
        """Peak FLOP/s for a PEAK_KEYS key; a tensor-core rate the GPU lacks falls back to fp32
        (a V100 has no bf16 tensor cores: PyTorch runs bf16 matmuls on CUDA cores there)."""
        if key in self.peak_flops:
            return self.peak_flops[key]
        return self.peak_flops["fp32"]

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["bandwidth_curve"] = [[int(b), float(bw)] for b, bw in self.bandwidth_curve]
        d["bandwidth_spread"] = list(self.bandwidth_spread)
        return d

    @classmethod
    def from_dict(cls, data: dict) -> "DeviceProfile":
        known = {f.name for f in dataclasses.fields(cls)}
        missing = [k for k in ("name", "source", "hbm_bytes_per_s", "peak_flops", "launch_us",
                               "min_kernel_us", "l2_bytes") if k not in data]
        if missing:
            raise AdvisorError(f"not a device profile: missing {', '.join(missing)}")
        kwargs = {k: v for k, v in data.items() if k in known}
        kwargs["bandwidth_curve"] = [(int(b), float(bw)) for b, bw in data.get("bandwidth_curve") or []]
        if "bandwidth_spread" in data:
            kwargs["bandwidth_spread"] = tuple(data["bandwidth_spread"])
        return cls(**kwargs)

    def save(self, path: str | os.PathLike) -> str:
        from fusion_advisor.core.files import write_text_atomic
        write_text_atomic(Path(path), json.dumps(self.to_dict(), indent=2) + "\n")
        return str(path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "DeviceProfile":
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise AdvisorError(f"device profile not found: {path}") from None
        except (OSError, json.JSONDecodeError) as exc:
            raise AdvisorError(f"cannot read device profile {path}: {exc}") from None
        if not isinstance(data, dict):
            raise AdvisorError(f"{path} is not a device profile")
        return cls.from_dict(data)


# -- datasheets ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Sheet:
    key: str                       # target name for --target-gpu
    name: str                      # display name
    hbm: float                     # datasheet memory bandwidth, bytes/s
    peaks: dict                    # dense FLOP/s
    l2_bytes: int
    num_sms: int | None
    pattern: str                   # regex over the lower-cased torch device name
    source: str                    # where the figures come from


T = 1e12
_SHEETS: tuple[_Sheet, ...] = (
    # NVIDIA H200 Tensor Core GPU datasheet (2024): SXM 4.8 TB/s, FP64 34, FP32 67, TF32 989,
    # BF16/FP16 1,979 TFLOPS with sparsity. L2: cudaDeviceProp.l2CacheSize on an H200 (60 MiB).
    _Sheet("h200-nvl", "NVIDIA H200 NVL", 4.8 * T,
           {"fp64": 30 * T, "fp32": 60 * T, "tf32_tc": 417.5 * T, "bf16_tc": 835.5 * T, "fp16_tc": 835.5 * T},
           60 * MiB, 132, r"\bh200\b.*\bnvl\b", "NVIDIA H200 datasheet (NVL column)"),
    _Sheet("h200", "NVIDIA H200", 4.8 * T,
           {"fp64": 34 * T, "fp32": 67 * T, "tf32_tc": 494.7 * T, "bf16_tc": 989.4 * T, "fp16_tc": 989.4 * T},
           60 * MiB, 132, r"\bh200\b", "NVIDIA H200 datasheet (SXM column)"),
    # NVIDIA H100 Tensor Core GPU datasheet (2023): SXM 3.35 TB/s, FP64 34, FP32 67, TF32 989,
    # BF16 1,979 (sparse); PCIe 2 TB/s, FP64 26, FP32 51, TF32 756, BF16 1,513 (sparse);
    # NVL 3.9 TB/s, FP64 30, FP32 60, TF32 835, BF16 1,671 (sparse). 50 MiB L2. SMs: 132 SXM/NVL,
    # 114 PCIe (NVIDIA Hopper architecture whitepaper).
    _Sheet("h100-nvl", "NVIDIA H100 NVL", 3.9 * T,
           {"fp64": 30 * T, "fp32": 60 * T, "tf32_tc": 417.5 * T, "bf16_tc": 835.5 * T, "fp16_tc": 835.5 * T},
           50 * MiB, 132, r"\bh100\b.*\bnvl\b", "NVIDIA H100 datasheet (NVL column)"),
    _Sheet("h100-pcie", "NVIDIA H100 PCIe", 2.0 * T,
           {"fp64": 26 * T, "fp32": 51 * T, "tf32_tc": 378 * T, "bf16_tc": 756.5 * T, "fp16_tc": 756.5 * T},
           50 * MiB, 114, r"\bh100\b.*\bpcie\b", "NVIDIA H100 datasheet (PCIe column)"),
    _Sheet("h100", "NVIDIA H100 SXM", 3.35 * T,
           {"fp64": 34 * T, "fp32": 67 * T, "tf32_tc": 494.7 * T, "bf16_tc": 989.4 * T, "fp16_tc": 989.4 * T},
           50 * MiB, 132, r"\bh100\b", "NVIDIA H100 datasheet (SXM column)"),
    # NVIDIA A100 Tensor Core GPU datasheet (2021): FP64 9.7, FP32 19.5, TF32 156, BF16/FP16 312
    # TFLOPS dense; 1,555 GB/s (40GB), 2,039 GB/s (80GB SXM), 1,935 GB/s (80GB PCIe). 40 MiB L2,
    # 108 SMs (NVIDIA Ampere architecture whitepaper).
    _Sheet("a100-pcie-80gb", "NVIDIA A100 80GB PCIe", 1.935 * T,
           {"fp64": 9.7 * T, "fp32": 19.5 * T, "tf32_tc": 156 * T, "bf16_tc": 312 * T, "fp16_tc": 312 * T},
           40 * MiB, 108, r"\ba100\b.*(80gb.*pcie|pcie.*80gb)", "NVIDIA A100 datasheet (80GB PCIe column)"),
    _Sheet("a100-pcie-40gb", "NVIDIA A100 40GB PCIe", 1.555 * T,
           {"fp64": 9.7 * T, "fp32": 19.5 * T, "tf32_tc": 156 * T, "bf16_tc": 312 * T, "fp16_tc": 312 * T},
           40 * MiB, 108, r"\ba100\b.*\bpcie\b", "NVIDIA A100 datasheet (40GB PCIe column)"),
    _Sheet("a100-80gb", "NVIDIA A100 SXM4 80GB", 2.039 * T,
           {"fp64": 9.7 * T, "fp32": 19.5 * T, "tf32_tc": 156 * T, "bf16_tc": 312 * T, "fp16_tc": 312 * T},
           40 * MiB, 108, r"\ba100\b.*80gb", "NVIDIA A100 datasheet (80GB SXM column)"),
    _Sheet("a100-40gb", "NVIDIA A100 SXM4 40GB", 1.555 * T,
           {"fp64": 9.7 * T, "fp32": 19.5 * T, "tf32_tc": 156 * T, "bf16_tc": 312 * T, "fp16_tc": 312 * T},
           40 * MiB, 108, r"\ba100\b", "NVIDIA A100 datasheet (40GB SXM column)"),
    # NVIDIA V100 datasheet (2020): SXM2 FP64 7.8, FP32 15.7, tensor (FP16) 125 TFLOPS; PCIe 7, 14,
    # 112; 900 GB/s both. 6 MiB L2, 80 SMs (Volta whitepaper). No TF32 or BF16 tensor cores.
    _Sheet("v100-pcie", "NVIDIA V100 PCIe", 0.9 * T,
           {"fp64": 7 * T, "fp32": 14 * T, "fp16_tc": 112 * T},
           6 * MiB, 80, r"\bv100\b.*\bpcie\b", "NVIDIA V100 datasheet (PCIe column)"),
    _Sheet("v100", "NVIDIA V100 SXM2", 0.9 * T,
           {"fp64": 7.8 * T, "fp32": 15.7 * T, "fp16_tc": 125 * T},
           6 * MiB, 80, r"\bv100\b", "NVIDIA V100 datasheet (SXM2 column)"),
    # NVIDIA L40S datasheet (2023): 864 GB/s, FP32 91.6, TF32 366, BF16/FP16 733 TFLOPS sparse;
    # 96 MiB L2, 142 SMs (Ada architecture whitepaper).
    _Sheet("l40s", "NVIDIA L40S", 0.864 * T,
           {"fp32": 91.6 * T, "tf32_tc": 183 * T, "bf16_tc": 366.5 * T, "fp16_tc": 366.5 * T},
           96 * MiB, 142, r"\bl40s\b", "NVIDIA L40S datasheet"),
    # NVIDIA L40 datasheet (2022): 864 GB/s, FP32 90.5, TF32 181, BF16/FP16 362 TFLOPS sparse.
    _Sheet("l40", "NVIDIA L40", 0.864 * T,
           {"fp32": 90.5 * T, "tf32_tc": 90.5 * T, "bf16_tc": 181 * T, "fp16_tc": 181 * T},
           96 * MiB, 142, r"\bl40\b", "NVIDIA L40 datasheet"),
    # NVIDIA L4 datasheet (2023): 300 GB/s, FP32 30.3, TF32 120, BF16/FP16 242 TFLOPS sparse;
    # 48 MiB L2, 58 SMs (Ada whitepaper).
    _Sheet("l4", "NVIDIA L4", 0.3 * T,
           {"fp32": 30.3 * T, "tf32_tc": 60 * T, "bf16_tc": 121 * T, "fp16_tc": 121 * T},
           48 * MiB, 58, r"\bl4\b", "NVIDIA L4 datasheet"),
    # AWS lists the A10G's 24 GB at 600 GB/s but publishes no compute peaks; these are the A10
    # datasheet's (FP32 31.2, TF32 62.5, BF16/FP16 125 TFLOPS dense). SM count not published.
    _Sheet("a10g", "NVIDIA A10G", 0.6 * T,
           {"fp32": 31.2 * T, "tf32_tc": 62.5 * T, "bf16_tc": 125 * T, "fp16_tc": 125 * T},
           6 * MiB, None, r"\ba10g\b", "AWS (bandwidth), NVIDIA A10 datasheet (compute)"),
    # NVIDIA A10 datasheet (2021): 600 GB/s, FP32 31.2, TF32 62.5, BF16/FP16 125 TFLOPS dense;
    # 6 MiB L2, 72 SMs.
    _Sheet("a10", "NVIDIA A10", 0.6 * T,
           {"fp32": 31.2 * T, "tf32_tc": 62.5 * T, "bf16_tc": 125 * T, "fp16_tc": 125 * T},
           6 * MiB, 72, r"\ba10\b", "NVIDIA A10 datasheet"),
)

# --target-gpu names besides each sheet's own key.
_ALIASES = {"h100-sxm": "h100", "h200-sxm": "h200", "a100": "a100-80gb", "a100-sxm": "a100-80gb",
            "a100-pcie": "a100-pcie-80gb", "v100-sxm2": "v100"}


def _profile_from_sheet(sheet: _Sheet) -> DeviceProfile:
    return DeviceProfile(
        name=sheet.name, source="datasheet",
        hbm_bytes_per_s=sheet.hbm * DATASHEET_COPY_EFFICIENCY,
        peak_flops=dict(sheet.peaks), launch_us=TYPICAL_LAUNCH_US, min_kernel_us=TYPICAL_MIN_KERNEL_US,
        l2_bytes=sheet.l2_bytes, num_sms=sheet.num_sms,
        element_rates={k: v * sheet.num_sms for k, v in TYPICAL_ELEMENT_RATES_PER_SM.items()} if sheet.num_sms else {},
        calibration={"datasheet": sheet.source, "target": sheet.key,
                     "datasheet_hbm_bytes_per_s": sheet.hbm,
                     "copy_efficiency_assumed": DATASHEET_COPY_EFFICIENCY},
        # Datasheet bandwidth is a typical fraction, not a reading: a wider range.
        bandwidth_spread=(0.75, 1.1),
    )


def datasheet_profiles() -> dict[str, DeviceProfile]:
    """Every datasheet profile, by target key ("h100", "h100-pcie", "h200", "a100-80gb", ...)."""
    return {s.key: _profile_from_sheet(s) for s in _SHEETS}


def target_names() -> list[str]:
    return sorted({s.key for s in _SHEETS} | set(_ALIASES))


def match_target(gpu_name: str) -> str | None:
    """The datasheet key for a torch device name ('NVIDIA H100 80GB HBM3' -> 'h100'), or None."""
    low = gpu_name.lower().replace("-", " ").replace("_", " ")
    for sheet in _SHEETS:
        if re.search(sheet.pattern, low):
            return sheet.key
    return None


def _target_key(target: str) -> str:
    key = target.strip().lower().replace("_", "-").replace(" ", "-")
    key = _ALIASES.get(key, key)
    if key not in {s.key for s in _SHEETS}:
        raise AdvisorError(f"unknown target GPU {target!r} (known: {', '.join(target_names())})")
    return key


# -- where profiles live -------------------------------------------------------------------------
PROFILES_DIR = Path(__file__).resolve().parent / "profiles"


def cache_dir() -> Path:
    """($XDG_CACHE_HOME or ~/.cache)/fusion-advisor"""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "fusion-advisor"


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "-", text).strip("-") or "unknown"


def cache_path(gpu_name: str, driver: str | None, torch_version: str | None) -> Path:
    """One cached calibration per (GPU name, driver, torch version)."""
    return cache_dir() / f"{_slug(gpu_name)}__driver-{_slug(driver or 'unknown')}__torch-{_slug(torch_version or 'unknown')}.json"


def _read_profiles(folder: Path) -> list[DeviceProfile]:
    out = []
    if not folder.is_dir():
        return out
    for path in sorted(folder.glob("*.json")):
        try:
            out.append(DeviceProfile.load(path))
        except AdvisorError:
            continue  # a stray or half-written file is not a profile; the next source answers
    return out


def _newest(profiles: list[DeviceProfile]) -> DeviceProfile | None:
    return max(profiles, key=lambda p: str(p.calibration.get("date", ""))) if profiles else None


def current_gpu_name() -> str | None:
    try:
        import torch
        if torch.cuda.is_available():
            return torch.cuda.get_device_name()
    except Exception:  # noqa: BLE001 - a broken CUDA setup means "no GPU here"
        return None
    return None


def load_profile(gpu_name: str | None = None, target: str | None = None, *,
                 driver: str | None = None, torch_version: str | None = None) -> DeviceProfile:
    """The best profile for a GPU, named by its torch device name (`gpu_name`, e.g. from a
    trace) or by a target key (`target`, e.g. "h100" for a CPU-only trace); with neither, the
    GPU of this machine. `driver` and `torch_version` select the cached calibration (default:
    this machine's torch; any driver)."""
    if target is not None:
        key = _target_key(target)
        committed = [p for p in _read_profiles(PROFILES_DIR) if match_target(p.name) == key]
        return _newest(committed) or datasheet_profiles()[key]
    if gpu_name is None:
        gpu_name = current_gpu_name()
        if gpu_name is None:
            raise AdvisorError("no CUDA GPU here and no target GPU given: name one to price for "
                               f"(--target-gpu, one of: {', '.join(target_names())})")
    if torch_version is None:
        try:
            import torch
            torch_version = torch.__version__
        except ImportError:
            torch_version = None
    cached = [p for p in _read_profiles(cache_dir())
              if p.source == "calibrated" and p.calibration.get("gpu_name", p.name) == gpu_name
              and (torch_version is None or p.calibration.get("torch") == torch_version)
              and (driver is None or p.calibration.get("driver") == driver)]
    if cached:
        return _newest(cached)
    key = match_target(gpu_name)
    committed = [p for p in _read_profiles(PROFILES_DIR)
                 if p.calibration.get("gpu_name", p.name) == gpu_name
                 or (key is not None and match_target(p.name) == key)]
    if committed:
        return _newest(committed)
    if key is None:
        raise AdvisorError(f"no device profile for {gpu_name!r}: run `fusion-advisor calibrate` on it, or "
                           f"price for a known GPU (--target-gpu, one of: {', '.join(target_names())})")
    return datasheet_profiles()[key]
