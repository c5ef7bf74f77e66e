"""The norm kernels' tiles (kernels/norm_core.py): which tile each launch runs, for every row length.

The heuristic (`fwd_config`, `bwd_config`, cached per shape): rows stacked up to FWD_TILE / BWD_TILE
elements a program, the persistent backward's programs per SM (WARPS_PER_SM warps of them), register
prefetch where it fits. Over it, the tiles searched on a GPU model: `python -m
fusion_advisor.kernels.norm_tune` (GPU only, offline; `fusion-advisor calibrate --kernel-tiles`)
times a few tiles around the heuristic per (row length, element size, family: the residual add +
norm, or the norm alone) and saves the fastest per GPU model under the user cache dir; the table
measured on an H100 ships in tiles/. `fwd_config` / `bwd_config` read those once (the user's over
the shipped, key by key) and fall back to the heuristic. A call never searches; the interpreter
always uses the heuristic.

A tuned entry is [block_m, num_warps, programs_per_sm, prefetch, stages] under
"fwd|bwd[-plain]/<row padded to a power of two>/<element size>[/small]" (older files' shorter entries read
with the defaults; "/small": searched on launches of at most SMALL_LAUNCH_BYTES, used for those); an entry that is
not a valid tile is left out, and the heuristic answers. Older files' entries may have a sixth field, the
chunked backward's column chunk (removed: slower than whole rows everywhere it was timed): 0 is read and
ignored, anything else (a chunked tile) leaves the entry out.
"""
from __future__ import annotations

import functools
import json
import re
from pathlib import Path
from typing import NamedTuple, Optional

import torch

from fusion_advisor.cost_model.device import cache_dir
from fusion_advisor.kernels.common import cdiv, interpreting, next_power_of_2, sm_count

MAX_BLOCK_N = 65536     # a row held in registers: wider rows are refused with a clear error
FWD_TILE = 4096         # elements per forward program (16 a thread at 8 warps: 16-byte vectors)
BWD_TILE = 2048         # elements per backward loop iteration (8 a thread at 8 warps)
BWD_PER_THREAD = 8      # at 8, ~95 registers a thread (cuobjdump of the sm_90 cubin): two 8-warp programs fit
                        # an SM; at 16, 130-150, and only one does
ACC_IN_MEMORY_COLS = 16384  # from this row length the backward adds its dweight sums to its partial row
                            # (L2) every tile: held in registers with the dbias sums they spill more (Triton
                            # 3.6's sm_90 build of add + LayerNorm's backward at 16384: 256 bytes a thread at
                            # 32 warps; with the dweight sums in memory, 200 at 16 warps, 184 at 32)
DB_IN_MEMORY_COLS = 32768   # and its dbias sums from this length: below it they stay in registers (one fp32 a
                            # column, 32 a thread at 16384 and 16 warps). Each sum in memory reads and writes
                            # a 4-byte partial per element of dy: at 16384 bf16, LayerNorm's two move 2.1 GB
                            # (counted) through L2 beside the 0.8 GB the backward reads and writes in HBM. H100, 8192 x
                            # 16384 bf16 fwd+bwd: LayerNorm 54 -> 65 % of copy, add + LayerNorm 57 -> 63 %
                            # (benchmarks/results/norm-sums-placement-h100-5ee0779.txt)
RELOAD_COLS = 1 << 30   # from this row length the backward reads each tile twice (`_norm_bwd_tiles` RELOAD: the
                        # row sums, then dx and the dweight / dbias sums, the second read from L1): no fp32 tile
                        # held across the row reduction. With it and both sums in registers at 16384 (bench
                        # flags --reload-cols 16384 --acc-in-memory-cols 32768), Triton 3.9's ptxas spills 16
                        # bytes a thread for (add +) LayerNorm at 16 warps against 136-192 now. Not timed on a
                        # GPU yet (`scripts/gpu_runs.sh long`), so off: a row length never reaches it
WARPS_PER_SM = 16       # the persistent backward's programs per SM: 16 warps of them (2 of 8 warps)
BWD_PREFETCH_TILE = 4096  # the backward loads the next tile ahead for tiles up to this many elements
SMALL_LAUNCH_BYTES = 1 << 24  # a launch over at most this many bytes of rows (padded; 16 MiB) is "small": a
                              # wave or two of tiles, where latency and a loop's prologue set the time, not
                              # the stream; the tuned table has its own tiles for it (norm_tune --small)


TILED_PATTERNS = ("rms_norm", "add_rms_norm", "layer_norm", "add_layer_norm", "group_norm")   # their tiles are here


def untuned_note(timed_patterns, gpu: str) -> Optional[str]:
    """What a report says where these patterns were timed on a GPU model with no searched tiles
    (none shipped, none from the user's own search): they ran the heuristic's. None otherwise."""
    mine = sorted(set(timed_patterns) & set(TILED_PATTERNS))
    if not mine or not gpu or tuned_table(gpu):
        return None
    return (f"Our {', '.join(mine)} kernels ran their default tiles on this {gpu}: no tile search is cached "
            "for it. `fusion-advisor calibrate --kernel-tiles` searches them (a few minutes, once); on an H100 "
            "the search took add + LayerNorm's backward at 65,536 x 768 bf16 from 169.2 to 152.4 us.")


class TileConfig(NamedTuple):
    block_m: int
    block_n: int
    num_warps: int
    programs_per_sm: int = 1   # the persistent programs' (the backward's; the forward's where stages > 1)
    prefetch: bool = True      # the persistent backward loads the next tile before this one's math
    stages: int = 1            # > 1: the loop over tiles pipelined by Triton into this many stages (the
                               # forward then persistent too); never with prefetch or sums in memory


def _warps(tile: int, per_thread: int = 16) -> int:
    """About `per_thread` elements a thread (16: two 16-byte vectors of bf16, four of fp32), 4 to
    32 warps."""
    return max(4, min(32, tile // (32 * per_thread)))


def _block_n(n_cols: int) -> int:
    block_n = next_power_of_2(n_cols)
    if block_n > MAX_BLOCK_N:
        raise ValueError(f"norm: rows of {n_cols} elements are wider than the {MAX_BLOCK_N} one program holds")
    return block_n


def sums_in_memory(block_n: int) -> tuple[bool, bool]:
    """Whether the backward keeps its (dweight, dbias) sums in its partial rows in memory, added
    to every tile, rather than in registers: for rows of block_n padded columns."""
    return block_n >= ACC_IN_MEMORY_COLS, block_n >= DB_IN_MEMORY_COLS


def reloads(block_n: int) -> bool:
    """Whether the backward reads each tile twice (RELOAD) for rows of block_n padded columns."""
    return block_n >= RELOAD_COLS


def tuned_path(gpu: str) -> Path:
    """Where norm_tune.py leaves the configs it chose on one GPU model."""
    return cache_dir() / "norm-tiles" / (re.sub(r"[^A-Za-z0-9.]+", "-", gpu).strip("-") + ".json")


def shipped_path(gpu: str) -> Path:
    """The tile table measured on this GPU model and committed with the package (norm_tune.py's
    output, copied in): what a user's first call reads where they never tuned."""
    return Path(__file__).resolve().parent / "tiles" / tuned_path(gpu).name


def tuned_key(kind: str, block_n: int, elem_size: int, residual: bool = True, small: bool = False) -> str:
    """"fwd/1024/2": tiles searched on the residual add + norm (two inputs read, two outputs written
    a row); "fwd-plain/1024/2": on the norm alone, where the best tile can differ (LayerNorm's
    forward at 262,144 x 512 bf16 on an H100: 82 % of copy on the add + norm's tile); a "/small"
    suffix: searched on a small launch (`small_launch`)."""
    return f"{kind}{'' if residual else '-plain'}/{block_n}/{elem_size}{'/small' if small else ''}"


def small_launch(n_rows: int, block_n: int, elem_size: int) -> bool:
    """Whether a launch over n_rows rows is small enough for the table's "/small" tiles."""
    return n_rows * block_n * elem_size <= SMALL_LAUNCH_BYTES


def _tuned(gpu: str, kind: str, block_n: int, elem_size: int, residual: bool, small: bool = False):
    """The tuned tile for this family, else the residual family's (the one every table has); for a
    small launch, the small tiles first."""
    table = tuned_table(gpu)
    keys = [(residual, True), (True, True)] if small else []
    for family, sized in keys + [(residual, False), (True, False)]:
        found = table.get(tuned_key(kind, block_n, elem_size, family, sized))
        if found:
            return found
    return None


@functools.lru_cache(maxsize=None)
def tuned_table(gpu: str) -> dict[str, tuple[int, int, int, bool, int]]:
    """{tuned_key: (block_m, num_warps, programs_per_sm, prefetch, stages)} searched on this GPU model
    by norm_tune.py, read once: the table measured here and shipped in kernels/tiles/, with the
    user's own search (the cache dir's file, `tuned_path`) over it key by key. Empty without a GPU
    name or either file; an entry that is not a valid tile is left out (the heuristic answers)."""
    return {key: cfg for key, entry in tuned_entries(gpu).items() if (cfg := _tuned_entry(key, entry)) is not None}


def tuned_entries(gpu: str) -> dict:
    """The raw entries of the shipped table and the user's file for `gpu`, the user's winning."""
    entries = {}
    for path in (shipped_path(gpu), tuned_path(gpu)) if gpu else ():
        try:
            configs = json.loads(path.read_text(encoding="utf-8"))["configs"]
            if isinstance(configs, dict):
                entries.update(configs)
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return entries


def _tuned_entry(key: str, entry) -> Optional[tuple[int, int, int, bool, int]]:
    """One tuned file entry, [block_m, num_warps, programs_per_sm(, prefetch(, stages(, 0)))],
    checked. A sixth field is an older file's chunk (the chunked backward, removed): 0 is ignored,
    anything else leaves the entry out."""
    try:
        block_m, warps, per_sm, *rest = (int(v) for v in entry)
        block_n = int(key.split("/")[1])
    except (TypeError, ValueError, IndexError):
        return None
    prefetch, stages = (bool(rest[0]) if rest else True), (rest[1] if len(rest) > 1 else 1)
    # The backward prefetches into registers or pipelines, never both; and rows whose sums go to
    # memory every tile are never pipelined (a load would read a partial row before its store).
    backward_ok = not key.startswith("bwd") or not (stages > 1 and (prefetch or any(sums_in_memory(block_n))))
    if (block_m < 1 or block_m & (block_m - 1) or block_m * block_n > MAX_BLOCK_N
            or warps not in (1, 2, 4, 8, 16, 32) or not 1 <= per_sm <= 8 or not 1 <= stages <= 6
            or not backward_ok or rest[2:] not in ([], [0])):   # a sixth field: 0 only
        return None
    return block_m, warps, per_sm, prefetch, stages


@functools.lru_cache(maxsize=4096)
def fwd_config(n_cols: int, n_rows: int, programs_wanted: int, elem_size: int = 2, gpu: str = "",
               residual: bool = True) -> TileConfig:
    """Rows stacked up to FWD_TILE elements a program (or as norm_tune.py chose on `gpu`), fewer
    while that leaves fewer than `programs_wanted` programs (twice the SMs: every SM busy), never
    more rows than there are."""
    block_n = _block_n(n_cols)
    tuned = _tuned(gpu, "fwd", block_n, elem_size, residual, small_launch(n_rows, block_n, elem_size))
    block_m = min(tuned[0] if tuned else max(1, FWD_TILE // block_n), next_power_of_2(max(n_rows, 1)))
    while block_m > 1 and block_m * block_n > 1024 and cdiv(n_rows, block_m) < programs_wanted:
        block_m //= 2
    if tuned and tuned[0] == block_m:
        return TileConfig(block_m, block_n, tuned[1], tuned[2], stages=tuned[4])
    return TileConfig(block_m, block_n, _warps(block_m * block_n))


@functools.lru_cache(maxsize=4096)
def bwd_config(n_cols: int, n_rows: int, elem_size: int = 2, gpu: str = "", residual: bool = True) -> TileConfig:
    """Rows stacked up to BWD_TILE elements an iteration, BWD_PER_THREAD a thread: the registers
    (dy, x, two fp32 accumulators and the addresses) leave room for two 8-warp programs an SM,
    one's loads overlapping the other's reductions. Rows of 4096+ take 16-32 warps, one program.
    Where norm_tune.py searched this row length on `gpu`, its choice."""
    block_n = _block_n(n_cols)
    tuned = _tuned(gpu, "bwd", block_n, elem_size, residual, small_launch(n_rows, block_n, elem_size))
    rows_cap = next_power_of_2(max(n_rows, 1))
    if tuned and tuned[0] <= rows_cap:
        return TileConfig(tuned[0], block_n, *tuned[1:])
    block_m = min(max(1, BWD_TILE // block_n), rows_cap)
    warps = _warps(block_m * block_n, BWD_PER_THREAD)
    if block_n >= min(ACC_IN_MEMORY_COLS, RELOAD_COLS) and elem_size <= 2:
        # 16: norm_tune's pick at 16384 bf16 on an H100 (it times 32 too); with the sums in registers 16 warps
        # beat 32 as well (LayerNorm 61 against 51 % of copy: norm-sums-placement-h100-5ee0779.txt). Not for
        # fp32, whose tile takes twice the registers: add + LayerNorm's backward at 16384 fp32 spills 1,816
        # bytes a thread at 16 warps, 176 at 32 (Triton 3.9's ptxas, sm_90; fp32 there is not timed yet)
        warps = min(warps, 16)
    # Prefetch holds a second tile in registers: at 768-4096 columns 97-99 registers a thread (79
    # without; two 8-warp programs an SM still fit), but at 8192 (32 warps, 64 registers at most)
    # it spills 96 bytes a thread (cuobjdump of the sm_90 cubin).
    return TileConfig(block_m, block_n, warps, max(1, WARPS_PER_SM // warps), block_m * block_n <= BWD_PREFETCH_TILE)


def bwd_programs(cfg: TileConfig, n_rows: int, device: torch.device) -> int:
    """The persistent backward's program count: cfg.programs_per_sm on every SM of a GPU, a
    handful in the interpreter (each program is slow there); never more than row tiles."""
    if interpreting() or device.type != "cuda":
        return _programs(cfg, n_rows, 4)
    return _programs(cfg, n_rows, sm_count(device) * cfg.programs_per_sm)


def backward_programs_for(n_cols: int, n_rows: int, num_sms: int, elem_size: int = 2) -> int:
    """P, the backward's program count on a GPU of `num_sms` SMs with the tile table (no tuned
    file): what `fused_bytes` counts the partial rows of."""
    cfg = bwd_config(n_cols, n_rows, elem_size)
    return _programs(cfg, n_rows, num_sms * cfg.programs_per_sm)


def _programs(cfg: TileConfig, n_rows: int, per_device: int) -> int:
    """per_device persistent programs, never more than row tiles."""
    return max(1, min(per_device, cdiv(n_rows, cfg.block_m)))


def _sm_programs(device: torch.device) -> int:
    """SMs on a GPU, a handful in the interpreter: sizes the forward grid (twice this)."""
    if interpreting() or device.type != "cuda":
        return 4
    return sm_count(device)


@functools.lru_cache(maxsize=None)
def _gpu_name_of(index: int) -> str:
    return torch.cuda.get_device_name(index)


def gpu_name(device: torch.device) -> str:
    """The GPU model the tuned table is keyed by; "" in the interpreter (the heuristic only)."""
    if interpreting() or device.type != "cuda":
        return ""
    return _gpu_name_of(device.index if device.index is not None else torch.cuda.current_device())
