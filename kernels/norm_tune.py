"""Search the norm kernels' tiles on this GPU, once, offline; the launchers read what it chose.

    python -m fusion_advisor.kernels.norm_tune                        # the 11 row lengths, bf16 and fp32
    python -m fusion_advisor.kernels.norm_tune --n 768,1024 --dtypes bfloat16
    python -m fusion_advisor.kernels.norm_tune --jobs 12 --verbose          # compile in 12 processes first
    python -m fusion_advisor.kernels.norm_tune --small --dtypes bfloat16    # the tiles of small launches

For each row length (padded to a power of two), element size and family, a few tiles around the
heuristic (`norm_tiles.fwd_config` / `bwd_config`) are timed on the family's heaviest member: residual
add + LayerNorm with weight, bias and the returned residual's grad ("add"), LayerNorm with weight
and bias ("plain": RMSNorm and GroupNorm over channels read its tiles too), at up to 1M rows (fewer where a
tensor would pass 2^27 bytes: 65,536 at 1024 bf16); the fastest forward and backward tiles are merged into
`norm_tiles.tuned_path(GPU name)` under the user cache dir (with --small: timed on 8 MiB launches, kept
under "/small" keys for launches of at most 16 MiB, where a wave or two of tiles set the time), over the table shipped for that GPU in
kernels/tiles/ (copy the file there to ship a search). A user's calls never search: where neither
file has the row length (and in the interpreter) the heuristic answers.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Callable

import torch

from fusion_advisor.kernels import norm_core, norm_tiles
from fusion_advisor.kernels.common import next_power_of_2

ROW_LENGTHS = (64, 128, 256, 512, 768, 1024, 2048, 4096, 5120, 8192, 16384)


def fwd_candidates(block_n: int) -> list[norm_tiles.TileConfig]:
    """Tiles of half, once and twice the heuristic's elements, at 8 or 16 elements a thread, a
    program per tile; and persistent programs (2 or 4 an SM) over tiles of once and twice the
    heuristic's, their loop pipelined into 2 or 3 stages."""
    base = max(norm_tiles.FWD_TILE, block_n)
    out = []
    for tile in (base // 2, base, base * 2):
        if tile < block_n or tile > 16384:
            continue
        for per_thread in (8, 16, 32) if block_n >= 8192 else (8, 16):   # 32: 16 warps, four programs an SM
            cfg = norm_tiles.TileConfig(tile // block_n, block_n, norm_tiles._warps(tile, per_thread))
            if cfg not in out:
                out.append(cfg)
    for tile in (base, base * 2):
        if tile > 16384:
            continue
        for per_sm in (2, 4):
            for stages in (2, 3):
                out.append(norm_tiles.TileConfig(tile // block_n, block_n, norm_tiles._warps(tile), per_sm, True,
                                                stages))
    return out


def bwd_candidates(block_n: int) -> list[norm_tiles.TileConfig]:
    """Tiles of 1024-4096 elements (one row where it is longer), 8 or 16 elements a thread (32 too
    for rows of 8192+), one or two programs an SM where a program has 8 warps or fewer; each with
    and without the next tile's loads issued ahead in registers (prefetch). Then, below the rows
    whose sums go to memory, the loop pipelined by Triton (2-4 stages) in place of prefetch: tiles
    of 2048 and 4096 elements at 8 a thread, 16 or 32 warps an SM."""
    out = []
    for tile in sorted({max(t, block_n) for t in (1024, 2048, 4096)}):
        for per_thread in (8, 16, 32) if block_n >= 8192 else (8, 16):
            warps = norm_tiles._warps(tile, per_thread)
            for per_sm in ((1, 2) if warps <= 8 else (1,)):
                for prefetch in (True, False):
                    cfg = norm_tiles.TileConfig(tile // block_n, block_n, warps, per_sm, prefetch)
                    if cfg not in out:
                        out.append(cfg)
    if not any(norm_tiles.sums_in_memory(block_n)):
        for tile in sorted({max(t, block_n) for t in (2048, 4096)}):
            warps = min(16, norm_tiles._warps(tile, 8))
            for per_sm in sorted({max(1, 16 // warps), max(1, 32 // warps)}):
                for stages in (2, 3, 4):
                    cfg = norm_tiles.TileConfig(tile // block_n, block_n, warps, per_sm, False, stages)
                    if cfg not in out:
                        out.append(cfg)
    return out


def _median_ms(fn: Callable[[], object]) -> float:
    import triton.testing
    return float(triton.testing.do_bench(fn, warmup=5, rep=25, return_mode="median"))


FAMILIES = ("add", "plain")   # tuned_key's two: residual add + LayerNorm, and LayerNorm alone


def _runs(n: int, dtype: torch.dtype, device: torch.device, rows: int, family: str = "add") -> dict:
    """{"fwd" / "bwd": (candidates, call(cfg))} on the heaviest member of the family at `rows` rows
    (`tune_rows`'): LayerNorm with weight and bias, after a residual add whose returned sum gets a
    grad too ("add") or alone ("plain")."""
    torch.manual_seed(0)
    x, r, dso = (torch.randn(rows, n, device=device, dtype=dtype) for _ in range(3))
    w, b = torch.randn(n, device=device, dtype=dtype), torch.randn(n, device=device, dtype=dtype)
    if family == "plain":
        r = dso = None
    y, s, mean, rstd = norm_core.norm_fwd(x, r, w, b, 1e-5, rms=False, out_dtype=dtype, sum_dtype=dtype)
    dy = torch.randn_like(y)
    block_n = next_power_of_2(n)
    return {
        "fwd": (fwd_candidates(block_n), lambda cfg: norm_core.norm_fwd(
            x, r, w, b, 1e-5, rms=False, out_dtype=dtype, sum_dtype=dtype, config=cfg)),
        "bwd": (bwd_candidates(block_n), lambda cfg: norm_core.norm_bwd(
            dy, dso, x if s is None else s, w, b, mean, rstd, rms=False, residual=r is not None, config=cfg)),
    }


TUNE_ROWS = 1 << 20   # up to 1M rows within 2^27-byte tensors (65,536 at N = 1024 in bf16): at N = 64,
                      # 65,536 rows are 8 MB, inside L2's 50 MB, and tiles chosen there suit L2, not HBM
SMALL_TUNE_BYTES = norm_tiles.SMALL_LAUNCH_BYTES // 2   # --small: 8 MiB launches (65,536 rows of 64 in bf16,
                                                        # 4,096 of 1024), mid-range of what the small tiles serve


def tune_rows(n: int, dtype: torch.dtype, rows: int, max_tensor_bytes: int) -> int:
    """The rows a search times on: `rows`, fewer where a tensor would pass max_tensor_bytes; a
    multiple of 16 where there are 16 or more (what Triton specialises n_rows on, so the parallel
    compile's kernels are the ones timed)."""
    rows = max(1, min(rows, max_tensor_bytes // (n * dtype.itemsize)))
    return rows - rows % 16 if rows >= 16 else rows


def tune_one(n: int, dtype: torch.dtype, device: torch.device, rows: int = TUNE_ROWS,
             max_tensor_bytes: int = 1 << 27, log: Callable[[str], None] = print,
             verbose: bool = False, family: str = "add") -> dict[str, list[int]]:
    """The fastest forward and backward tiles for rows of n elements of `dtype`: {tuned_key: [block_m,
    num_warps, programs_per_sm, prefetch, stages]}, under the "/small" keys where the rows
    timed make a small launch (`norm_tiles.small_launch`). A tile that fails to compile or run is
    skipped; with `verbose`, every candidate's time is logged."""
    chosen = {}
    block_n = next_power_of_2(n)
    rows = tune_rows(n, dtype, rows, max_tensor_bytes)
    small = norm_tiles.small_launch(rows, block_n, dtype.itemsize)
    for kind, (candidates, call) in _runs(n, dtype, device, rows, family).items():
        timed = []
        for cfg in candidates:
            try:
                timed.append((_median_ms(lambda cfg=cfg: call(cfg)), cfg))
                if verbose:
                    log(f"    {kind} {family} N={n} {tuple(cfg)}: {timed[-1][0] * 1e3:.1f} us")
            except Exception as exc:  # out of registers or shared memory on this GPU: not a candidate
                log(f"    {kind} {tuple(cfg)} skipped: {type(exc).__name__}: {str(exc)[:120]}")
        if timed:
            ms, best = min(timed)
            chosen[norm_tiles.tuned_key(kind, block_n, dtype.itemsize, family == "add", small)] = [
                best.block_m, best.num_warps, best.programs_per_sm, int(best.prefetch), best.stages]
            log(f"  {kind} {family}{' small' if small else ''} N={n} {str(dtype).replace('torch.', '')}: "
                f"{tuple(best)} {ms * 1e3:.1f} us "
                f"(of {len(timed)}; slowest {max(timed)[0] * 1e3:.1f} us)")
    return chosen


def compile_shard(n_values, dtypes, device: torch.device, shard: int, shards: int,
                  families=FAMILIES) -> int:
    """Run (and so compile, into Triton's on-disk cache) every `shards`-th candidate from `shard` on,
    untimed: `tune(jobs=K)` starts K of these at once, so its timing loop finds every kernel built
    (12 processes built the 11 row lengths' candidates in 16-17 s on an H100 machine's 16 cores).
    Returns how many ran."""
    index = ran = 0
    for n, dtype, family in ((n, d, f) for n in n_values for d in dtypes for f in families):
        for candidates, call in _runs(n, dtype, device, tune_rows(n, dtype, TUNE_ROWS, 1 << 27), family).values():
            for cfg in candidates:
                if index % shards == shard:
                    try:
                        call(cfg)
                        ran += 1
                    except Exception:  # tune_one reports it
                        pass
                index += 1
    torch.cuda.synchronize()
    return ran


def run_shards(argv: list[str], flag: str, jobs: int) -> str:
    """`argv + [flag, "i/jobs"]` for i < jobs, all at once, waited for: how long it took, and the
    first failure's last words (norm_tune's and bench_norms.py's parallel compiles)."""
    import subprocess
    import time
    started = time.perf_counter()
    procs = [subprocess.Popen(argv + [flag, f"{i}/{jobs}"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              text=True) for i in range(jobs)]
    failed = [p.communicate()[1][-300:] for p in procs if p.wait() != 0]
    return (f"in {jobs} processes in {time.perf_counter() - started:.0f} s"
            + (f"; {len(failed)} failed: {failed[0]}" if failed else ""))


def _compile_in_parallel(n_values, dtypes, families, jobs: int, log: Callable[[str], None]) -> None:
    argv = [sys.executable, "-m", "fusion_advisor.kernels.norm_tune", "--n", ",".join(map(str, n_values)),
            "--dtypes", ",".join(str(d).replace("torch.", "") for d in dtypes), "--families", ",".join(families)]
    log("  compiled the candidates " + run_shards(argv, "--compile-shard", jobs))


def tune(n_values, dtypes, device: torch.device, log: Callable[[str], None] = print, verbose: bool = False,
         jobs: int = 1, families=FAMILIES, small: bool = False) -> str:
    """Search every (row length, dtype), merge into this GPU's file, make the launchers read it;
    returns the file's path. jobs > 1 first compiles the candidates in that many processes (the
    kernels specialise on the row count modulo 16 alone, so they serve the small search too).
    `small`: on launches of SMALL_TUNE_BYTES, for the "/small" keys."""
    gpu = norm_tiles.gpu_name(device)
    if not gpu:
        raise RuntimeError("norm_tune: needs a CUDA GPU (the interpreter always uses the heuristic)")
    path = norm_tiles.tuned_path(gpu)
    configs = norm_tiles.tuned_entries(gpu)   # the shipped table and earlier searches: this one goes over them
    if jobs > 1:
        _compile_in_parallel(n_values, dtypes, families, jobs, log)
    for n in n_values:
        for dtype in dtypes:
            for family in families:
                configs.update(tune_one(n, dtype, device, max_tensor_bytes=SMALL_TUNE_BYTES if small else 1 << 27,
                                        log=log, verbose=verbose, family=family))
    import triton
    from fusion_advisor.core.files import atomic_output
    with atomic_output(path) as fh:
        json.dump({"gpu": gpu, "torch": torch.__version__, "triton": triton.__version__,
                   "configs": dict(sorted(configs.items()))}, fh, indent=1)
    for cached in (norm_tiles.tuned_table, norm_tiles.fwd_config, norm_tiles.bwd_config):
        cached.cache_clear()
    return str(path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", default=",".join(map(str, ROW_LENGTHS)), help="comma-separated row lengths")
    ap.add_argument("--dtypes", default="bfloat16,float32")
    ap.add_argument("--families", default=",".join(FAMILIES),
                    help="add: tiles for the residual add + norm patterns; plain: for the norms alone")
    ap.add_argument("--small", action="store_true", help="search the tiles of small launches (at most 16 MiB of "
                                                         "rows; timed on 8 MiB: 65,536 rows of 64 in bf16)")
    ap.add_argument("--verbose", action="store_true", help="log every candidate tile's time")
    ap.add_argument("--jobs", type=int, default=1, help="compile the candidates in this many processes first "
                                                        "(the GPU machine's cores; the timing stays serial)")
    ap.add_argument("--compile-shard", default=None, help=argparse.SUPPRESS)   # I/K: --jobs' workers
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("error: norm_tune needs a CUDA GPU", file=sys.stderr)
        return 3
    dtypes = [getattr(torch, d.strip()) for d in args.dtypes.split(",") if d.strip()]
    n_values = [int(v) for v in args.n.split(",") if v.strip()]
    families = [f.strip() for f in args.families.split(",") if f.strip()]
    if any(f not in FAMILIES for f in families):
        ap.error(f"--families: of {', '.join(FAMILIES)}")
    if args.compile_shard:
        shard, shards = (int(v) for v in args.compile_shard.split("/"))
        compile_shard(n_values, dtypes, torch.device("cuda"), shard, shards, families)
        return 0
    path = tune(n_values, dtypes, torch.device("cuda"), verbose=args.verbose, jobs=args.jobs, families=families,
                small=args.small)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
