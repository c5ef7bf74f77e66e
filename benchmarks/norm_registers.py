"""Registers and spills of the norm backward at long rows, as ptxas (bundled with Triton) builds it
for sm_90, without a GPU: the whole-row tile (dW/dB sums added to memory every row) against the
chunked walk's candidates (norm_tune.bwd_candidates).

    python benchmarks/norm_registers.py              # N = 16384, bf16
    python benchmarks/norm_registers.py --n 8192

The figures depend on the Triton version (its ptxas and its code generation): the README quotes
them under triton 3.6.0, the device's (`pip install triton==3.6.0` in a separate environment).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from kernel_checks import sm90_resources  # noqa: E402  (the tests' ptxas helper)

KERNELS = {"add_layer_norm": ("_add_layer_norm_bwd_kernel", {"HAS_DS_OUT": True, "HAS_BIAS": True}),
           "layer_norm": ("_layer_norm_bwd_kernel", {"HAS_DS_OUT": False, "HAS_BIAS": True}),
           "rms_norm": ("_rms_norm_bwd_kernel", {"HAS_DS_OUT": False, "HAS_BIAS": False, "GEMMA": False})}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=16384, help="row length (padded to a power of two)")
    args = ap.parse_args(argv)
    import triton
    from fusion_advisor.kernels import norm_tiles, norm_tune
    from fusion_advisor.kernels.common import next_power_of_2

    block_n = next_power_of_2(args.n)
    tiles = [norm_tiles.bwd_config(args.n, 1 << 20)] + [c for c in norm_tune.bwd_candidates(block_n) if c.chunk]
    types = {name: "*bf16" for name in ("DY", "DS_OUT", "X", "W", "DX")}
    types.update({name: "*fp32" for name in ("MEAN", "RSTD", "DW_PARTIAL", "DB_PARTIAL")})
    cases, labels = [], []
    for cfg in tiles:
        acc_in_memory = not cfg.chunk and cfg.block_n >= norm_tiles.ACC_IN_MEMORY_COLS   # as norm_bwd decides
        stages = 1 if acc_in_memory else cfg.stages
        for pattern, (kernel, flags) in KERNELS.items():
            consts = {"HAS_WEIGHT": True, **flags, "BLOCK_M": cfg.block_m, "BLOCK_N": cfg.block_n,
                      "ACC_IN_MEMORY": acc_in_memory, "PREFETCH": cfg.prefetch and stages == 1 and not cfg.chunk,
                      "STAGES": stages, "CHUNK": cfg.chunk}
            cases.append({"module": "fusion_advisor.kernels.norm_core", "kernel": kernel, "types": types,
                          "constexprs": consts, "num_warps": cfg.num_warps, "unaligned": ["n_rows"]})
            tile = (f"chunks of {cfg.chunk}" if cfg.chunk else "whole rows") + f", {cfg.block_m} row(s) a tile"
            labels.append(f"{pattern:<15} {tile:<32} {cfg.num_warps:>2} warps x {cfg.programs_per_sm} an SM, "
                          f"{stages} stage(s)")
    print(f"N = {args.n} bf16 backward, sm_90, triton {triton.__version__}: registers / stack (spilled) bytes a thread")
    for label, (regs, stack) in zip(labels, sm90_resources(cases)):
        print(f"  {label}: {regs:>3} registers, {stack:>4} bytes of stack")
    return 0


if __name__ == "__main__":
    sys.exit(main())
