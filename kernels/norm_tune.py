"""Search the norm kernels' tiles on this GPU, once, offline; the launchers read what it chose.

    python -m fusion_advisor.kernels.norm_tune                        # the 11 row lengths, bf16 and fp32
    python -m fusion_advisor.kernels.norm_tune --n 768,1024 --dtypes bfloat16

For each row length (padded to a power of two) and element size, a few tiles around the heuristic
(`norm_core.fwd_config` / `bwd_config`) are timed on the heaviest member of the family, residual
add + LayerNorm with weight, bias and the returned residual's grad, at 64k rows (fewer where a
tensor would pass 2^27 bytes); the fastest forward and backward tiles are merged into
`norm_core.tuned_path(GPU name)` under the user cache dir. A user's calls never search: without
that file (or in the interpreter) the heuristic answers.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Callable

import torch

from fusion_advisor.kernels import norm_core
from fusion_advisor.kernels.common import next_power_of_2

ROW_LENGTHS = (64, 128, 256, 512, 768, 1024, 2048, 4096, 5120, 8192, 16384)


def fwd_candidates(block_n: int) -> list[norm_core.TileConfig]:
    """Tiles of half, once and twice the heuristic's elements, at 8 or 16 elements a thread."""
    base = max(norm_core.FWD_TILE, block_n)
    out = []
    for tile in (base // 2, base, base * 2):
        if tile < block_n or tile > 16384:
            continue
        for per_thread in (8, 16):
            cfg = norm_core.TileConfig(tile // block_n, block_n, norm_core._warps(tile, per_thread))
            if cfg not in out:
                out.append(cfg)
    return out


def bwd_candidates(block_n: int) -> list[norm_core.TileConfig]:
    """Tiles of 1024-4096 elements (one row where it is longer), 8 or 16 elements a thread (32 too
    for rows of 8192+), one or two programs an SM where a program has 8 warps or fewer; each with
    and without the next tile's loads issued ahead (prefetch)."""
    out = []
    for tile in sorted({max(t, block_n) for t in (1024, 2048, 4096)}):
        for per_thread in (8, 16, 32) if block_n >= 8192 else (8, 16):
            warps = norm_core._warps(tile, per_thread)
            for per_sm in ((1, 2) if warps <= 8 else (1,)):
                for prefetch in (True, False):
                    cfg = norm_core.TileConfig(tile // block_n, block_n, warps, per_sm, prefetch)
                    if cfg not in out:
                        out.append(cfg)
    return out


def _median_ms(fn: Callable[[], object]) -> float:
    import triton.testing
    return float(triton.testing.do_bench(fn, warmup=5, rep=25, return_mode="median"))


def tune_one(n: int, dtype: torch.dtype, device: torch.device, rows: int = 65536,
             max_tensor_bytes: int = 1 << 27, log: Callable[[str], None] = print,
             verbose: bool = False) -> dict[str, list[int]]:
    """The fastest forward and backward tiles for rows of n elements of `dtype`: {tuned_key: [block_m,
    num_warps, programs_per_sm(, prefetch)]}. A tile that fails to compile or run is skipped; with
    `verbose`, every candidate's time is logged."""
    rows = max(1, min(rows, max_tensor_bytes // (n * dtype.itemsize)))
    torch.manual_seed(0)
    x, r, dso = (torch.randn(rows, n, device=device, dtype=dtype) for _ in range(3))
    w, b = torch.randn(n, device=device, dtype=dtype), torch.randn(n, device=device, dtype=dtype)
    y, s, mean, rstd = norm_core.norm_fwd(x, r, w, b, 1e-5, rms=False, out_dtype=dtype, sum_dtype=dtype)
    dy = torch.randn_like(y)
    block_n = next_power_of_2(n)
    runs = {
        "fwd": (fwd_candidates(block_n), lambda cfg: norm_core.norm_fwd(
            x, r, w, b, 1e-5, rms=False, out_dtype=dtype, sum_dtype=dtype, config=cfg)),
        "bwd": (bwd_candidates(block_n), lambda cfg: norm_core.norm_bwd(
            dy, dso, s, w, b, mean, rstd, rms=False, residual=True, config=cfg)),
    }
    chosen = {}
    for kind, (candidates, call) in runs.items():
        timed = []
        for cfg in candidates:
            try:
                timed.append((_median_ms(lambda cfg=cfg: call(cfg)), cfg))
                if verbose:
                    log(f"    {kind} N={n} {tuple(cfg)}: {timed[-1][0] * 1e3:.1f} us")
            except Exception as exc:  # out of registers or shared memory on this GPU: not a candidate
                log(f"    {kind} {tuple(cfg)} skipped: {type(exc).__name__}: {str(exc)[:120]}")
        if timed:
            ms, best = min(timed)
            chosen[norm_core.tuned_key(kind, block_n, dtype.itemsize)] = [best.block_m, best.num_warps,
                                                                          best.programs_per_sm, best.prefetch]
            log(f"  {kind} N={n} {str(dtype).replace('torch.', '')}: {tuple(best)} {ms * 1e3:.1f} us "
                f"(of {len(timed)}; slowest {max(timed)[0] * 1e3:.1f} us)")
    return chosen


def tune(n_values, dtypes, device: torch.device, log: Callable[[str], None] = print, verbose: bool = False) -> str:
    """Search every (row length, dtype), merge into this GPU's file, make the launchers read it;
    returns the file's path."""
    gpu = norm_core.gpu_name(device)
    if not gpu:
        raise RuntimeError("norm_tune: needs a CUDA GPU (the interpreter always uses the heuristic)")
    path = norm_core.tuned_path(gpu)
    try:
        configs = json.loads(path.read_text(encoding="utf-8"))["configs"]
    except (OSError, ValueError, KeyError):
        configs = {}
    for n in n_values:
        for dtype in dtypes:
            configs.update(tune_one(n, dtype, device, log=log, verbose=verbose))
    from fusion_advisor.core.files import atomic_output
    with atomic_output(path) as fh:
        json.dump({"gpu": gpu, "torch": torch.__version__, "configs": dict(sorted(configs.items()))}, fh, indent=1)
    for cached in (norm_core.tuned_table, norm_core.fwd_config, norm_core.bwd_config):
        cached.cache_clear()
    return str(path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", default=",".join(map(str, ROW_LENGTHS)), help="comma-separated row lengths")
    ap.add_argument("--dtypes", default="bfloat16,float32")
    ap.add_argument("--verbose", action="store_true", help="log every candidate tile's time")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("error: norm_tune needs a CUDA GPU", file=sys.stderr)
        return 3
    dtypes = [getattr(torch, d.strip()) for d in args.dtypes.split(",") if d.strip()]
    path = tune([int(v) for v in args.n.split(",") if v.strip()], dtypes, torch.device("cuda"), verbose=args.verbose)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
