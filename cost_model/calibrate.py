"""`fusion-advisor calibrate`: measure the GPU at hand into a DeviceProfile.

Microbenchmarks, each warmed up first and timed with CUDA events (median of several samples):
  - a copy kernel (b = -a: read 1, write 1), triad a = b + s*c (read 2, write 1) and the
    device-to-device memcpy, from a few KB to a few GB moved: the copy kernel's curve prices every
    kernel by its size (small kernels never reach peak bandwidth); triad and memcpy against it,
    and the samples' spread, give the bandwidth's uncertainty.
    Small sizes run as CUDA graphs of many back-to-back launches, so the CPU's launch cost does
    not hide the GPU's time per kernel; the buffers stay warm in L2 between launches, as a chain's
    intermediates do.
  - matmul per dtype (fp32 on CUDA cores, tf32, bf16, fp16, fp64) on random data (zeros run
    faster: less switching), large enough to saturate the GPU.
  - element rates of the kernels bound by work per element rather than bytes: a broadcast add
    (PyTorch's generic strided loop), softmax and LayerNorm rows.
  - a one-element kernel: its back-to-back GPU time (min_kernel_us) and the CPU time of one eager
    launch (launch_us).
  - the L2 size and SM count from the device properties.
"""
from __future__ import annotations

import datetime
import statistics
import subprocess
import time
from typing import Callable

from fusion_advisor.cost_model.device import DeviceProfile
from fusion_advisor.cost_model.timing import back_to_back_us, percentile
from fusion_advisor.core.errors import EnvironmentProblem

Progress = Callable[[str, int, int], None]   # (what, done, total)

KiB = 1 << 10
GiB = 1 << 30


def driver_version() -> str | None:
    """The NVIDIA driver's version ("580.159.04"): NVML, else nvidia-smi, else None."""
    try:
        import pynvml  # nvidia-ml-py
        pynvml.nvmlInit()
        try:
            v = pynvml.nvmlSystemGetDriverVersion()
            return v.decode() if isinstance(v, bytes) else str(v)
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # noqa: BLE001 - NVML missing or broken: try the next source
        pass
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip().splitlines()[0].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return None


def _require_gpu():
    try:
        import torch
    except ImportError:
        raise EnvironmentProblem("calibrate needs PyTorch with CUDA: torch is not installed") from None
    if not torch.cuda.is_available():
        raise EnvironmentProblem("no CUDA GPU here: calibrate measures the GPU it runs on")
    return torch


def _sizes(max_bytes: int, quick: bool) -> list[int]:
    """Bytes moved per kernel: 4 KiB up to `max_bytes`, every power of 2 (every 4th when quick)."""
    step = 4 if quick else 1
    sizes, p = [], 12
    while (1 << p) <= max_bytes:
        sizes.append(1 << p)
        p += step
    return sizes


def _calls_for(bytes_moved: int) -> int:
    """Back-to-back calls per sample: ~1 ms of work, at least 2, at most 200."""
    est_us = 2.0 + bytes_moved / 3e12 * 1e6
    return int(max(2, min(200, 1000 / est_us)))


# tensors each streaming call moves per element: memcpy (same-dtype copy_: cudaMemcpyAsync D2D),
# copy (a kernel, b = -a: read 1, write 1), triad (a kernel, a = b + c/2: read 2, write 1)
_STREAMS = {"memcpy": 2, "copy": 2, "triad": 3}


def _stream_curve(torch, kind: str, sizes: list[int], samples: int, step: Progress) -> list[dict]:
    """[{bytes, median_us, p10_us, p90_us}] of one streaming call per size, fp32 (`_STREAMS`)."""
    streams = _STREAMS[kind]
    rows = []
    for i, size in enumerate(sizes):
        n = max(1, size // (4 * streams))
        a, b = torch.empty(n, device="cuda"), torch.randn(n, device="cuda")
        c = torch.randn(n, device="cuda")
        fn = {"memcpy": lambda: a.copy_(b), "copy": lambda: torch.neg(b, out=a),
              "triad": lambda: torch.add(b, c, alpha=0.5, out=a)}[kind]
        calls = _calls_for(size)
        t = back_to_back_us(fn, calls, samples, graph=calls > 2)
        moved = n * 4 * streams
        rows.append({"bytes": moved, "median_us": statistics.median(t), "p10_us": percentile(t, 0.1),
                     "p90_us": percentile(t, 0.9)})
        step(f"{kind} {moved / 1e6:,.3f} MB", i + 1, len(sizes))
    return rows


def _matmul_peaks(torch, quick: bool, step: Progress) -> dict:
    # (key, dtype, allow_tf32, n): fp32 and fp64 at 4096 (already seconds-long on GPUs with slow
    # fp64); tensor-core dtypes at 8192, which saturates an H100/H200.
    big = 4096 if quick else 8192
    plan = [("fp32", torch.float32, False, 4096), ("tf32_tc", torch.float32, True, big),
            ("bf16_tc", torch.bfloat16, False, big), ("fp16_tc", torch.float16, False, big),
            ("fp64", torch.float64, False, 2048 if quick else 4096)]
    old = torch.backends.cuda.matmul.allow_tf32
    out = {}
    try:
        for i, (key, dtype, tf32, n) in enumerate(plan):
            torch.backends.cuda.matmul.allow_tf32 = tf32
            x = torch.randn(n, n, device="cuda", dtype=dtype)
            y = torch.randn(n, n, device="cuda", dtype=dtype)
            z = torch.empty(n, n, device="cuda", dtype=dtype)
            t = back_to_back_us(lambda: torch.mm(x, y, out=z), 1 if key in ("fp32", "fp64") else 3,
                                  3 if quick else 5, graph=False)
            us = statistics.median(t)
            out[key] = {"n": n, "median_us": us, "flops_per_s": 2 * n ** 3 / (us * 1e-6)}
            step(f"matmul {key}", i + 1, len(plan))
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old
    return out


def _element_rates(torch, quick: bool, step: Progress) -> dict:
    """Elements per second of the kernel families priced by elements as well as bytes (OpCost.loop):
    a broadcast add (PyTorch's generic strided loop), softmax over rows of 512, LayerNorm over
    rows of 768; ~32 M elements each (16 M when quick)."""
    import torch.nn.functional as F
    n = (1 << 24) if quick else (1 << 25)
    x32 = torch.randn(n // 4096, 4096, device="cuda")
    bias = torch.randn(4096, device="cuda")
    rows512 = torch.randn(n // 512, 512, device="cuda", dtype=torch.bfloat16)
    rows768 = torch.randn(n // 768, 768, device="cuda", dtype=torch.bfloat16)
    w, b = torch.randn(768, device="cuda", dtype=torch.bfloat16), torch.randn(768, device="cuda", dtype=torch.bfloat16)
    plan = [("strided", lambda: x32 + bias, x32.numel()),
            ("softmax", lambda: torch.softmax(rows512, -1), rows512.numel()),
            ("norm", lambda: F.layer_norm(rows768, (768,), w, b, 1e-5), rows768.numel())]
    out = {}
    for i, (key, fn, elements) in enumerate(plan):
        us = statistics.median(back_to_back_us(fn, 4, 3 if quick else 5, graph=True))
        out[key] = {"elements": elements, "median_us": us, "elements_per_s": elements / (us * 1e-6)}
        step(f"element rate {key}", i + 1, len(plan))
    return out


def _launch_costs(torch, quick: bool) -> tuple[float, float]:
    """(GPU µs per back-to-back one-element kernel, CPU µs per eager launch)."""
    x = torch.zeros(1, device="cuda")
    gpu = statistics.median(back_to_back_us(lambda: x.add_(1.0), 1000, 5, graph=True))
    n = 2000 if quick else 5000
    cpu = []
    for _ in range(3):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(n):
            x.add_(1.0)
        cpu.append((time.perf_counter() - t0) / n * 1e6)   # issue time only: the GPU keeps up
        torch.cuda.synchronize()
    return gpu, statistics.median(cpu)


def _spread(copy: list[dict], others: list[list[dict]]) -> tuple[float, float]:
    """(lo, hi) multipliers of the copy kernel's bandwidth: its samples' spread (p10/p90 over the
    median) and the other streams' bandwidth over its own (triad, memcpy), at sizes where
    bandwidth, not the fixed cost, dominates."""
    ratios = [1.0]
    big = [r for r in copy if r["bytes"] >= 1 << 20]
    for row in big:
        ratios += [row["median_us"] / row["p90_us"], row["median_us"] / row["p10_us"]]
    for other in others:
        by_size = {r["bytes"]: r for r in other}
        for row in big:
            # The row of the nearest size moved (triad sizes are multiples of 12 bytes).
            near = by_size[min(by_size, key=lambda b: abs(b - row["bytes"]))]
            ratios.append((near["bytes"] / near["median_us"]) / (row["bytes"] / row["median_us"]))
    return max(0.5, min(ratios)), min(1.5, max(ratios))


def calibrate(quick: bool = False, progress: Progress | None = None) -> DeviceProfile:
    """Measure the current CUDA GPU. Raises EnvironmentProblem without one."""
    torch = _require_gpu()
    step = progress or (lambda what, done, total: None)
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    name = torch.cuda.get_device_name()
    l2_bytes = int(getattr(props, "L2_cache_size", 0) or 0)
    # Largest transfer: 4 GiB moved, within an eighth of the GPU's memory.
    max_bytes = min(4 * GiB if not quick else 1 * GiB, props.total_memory // 8)
    sizes = _sizes(max_bytes, quick)
    samples = 5 if quick else 10
    # Each stage's buffers are freed when it returns; the cache is emptied so that the next
    # stage's large allocations do not fail on a GPU with little memory.
    copy = _stream_curve(torch, "copy", sizes, samples, step)
    torch.cuda.empty_cache()
    triad = _stream_curve(torch, "triad", sizes, samples, step)
    torch.cuda.empty_cache()
    memcpy = _stream_curve(torch, "memcpy", sizes, samples, step)
    torch.cuda.empty_cache()
    matmul = _matmul_peaks(torch, quick, step)
    torch.cuda.empty_cache()
    rates = _element_rates(torch, quick, step)
    torch.cuda.empty_cache()
    min_kernel_us, launch_us = _launch_costs(torch, quick)
    step("launch overhead", 1, 1)
    curve = [(r["bytes"], r["bytes"] / (r["median_us"] * 1e-6)) for r in copy]
    # Asymptotic copy bandwidth: the best median among transfers far larger than L2.
    large = [bw for b, bw in curve if b >= 4 * max(l2_bytes, 1 << 20)] or [curve[-1][1]]
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return DeviceProfile(
        name=name, source="calibrated", hbm_bytes_per_s=max(large),
        peak_flops={k: v["flops_per_s"] for k, v in matmul.items()},
        launch_us=launch_us, min_kernel_us=min_kernel_us, l2_bytes=l2_bytes,
        num_sms=int(props.multi_processor_count), bandwidth_curve=curve,
        element_rates={k: v["elements_per_s"] for k, v in rates.items()},
        bandwidth_spread=_spread(copy, [triad, memcpy]),
        calibration={"gpu_name": name, "driver": driver_version(), "cuda": torch.version.cuda,
                     "torch": torch.__version__, "triton": triton_version,
                     "date": datetime.date.today().isoformat(), "quick": quick,
                     "raw": {"copy": copy, "triad": triad, "memcpy": memcpy, "matmul": matmul,
                             "element_rates": rates,
                             "empty_kernel_us": min_kernel_us, "launch_us": launch_us}},
    )
