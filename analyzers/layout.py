"""Layout transposes around convolutions, measured in the trace.

cuDNN's fast bf16/fp16 convolution kernels work on NHWC. Handed an NCHW (contiguous) tensor, it
transposes the input in (`nchwToNhwcKernel`) and the result back (`nhwcToNchwKernel`), forward and
backward: examples/conv_pointwise.py's bf16 trace on an H200 (tests/data) has 9 such kernels a step,
about 9 % of its GPU time. A model and inputs in torch.channels_last are NHWC end to end and need none of them;
whole-model torch.compile gets the same through inductor's layout optimisation. Their measured
time is what converting saves at most (the convolution kernels themselves may change too), so the
recommendation built on it is an estimate, and `apply --verify` is the measurement.
"""
from __future__ import annotations

import re

TRANSPOSE_KERNEL = re.compile(r"nchwToNhwc|nhwcToNchw")


def layout_transposes(trace) -> dict | None:
    """{transpose_us_per_step, transposes_per_step, share_of_gpu_busy, kernels} for the profiled
    steps (the whole trace without step markers); None without such kernels."""
    k = trace.kernels
    if k.empty:
        return None
    steps = trace.step_ids
    if steps:
        k = k[k["step"].isin(steps)]
    names = k["name"].astype(str)
    mask = names.str.contains(TRANSPOSE_KERNEL).to_numpy()
    if not mask.any():
        return None
    n_steps = max(len(steps), 1)
    transpose_us = float(k["dur"].to_numpy(dtype=float)[mask].sum()) / n_steps
    busy_us = float(k["dur"].to_numpy(dtype=float).sum()) / n_steps
    short = sorted({TRANSPOSE_KERNEL.search(n).group(0) + "Kernel" for n in names[mask]})
    return {"transpose_us_per_step": round(transpose_us, 3), "transposes_per_step": round(int(mask.sum()) / n_steps, 3),
            "share_of_gpu_busy": round(transpose_us / busy_us, 4) if busy_us else None, "kernels": short}
