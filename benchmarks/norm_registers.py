"""Registers and spills of the norm backward at rows of 16,384, as the ptxas bundled with this Triton
builds it for sm_90 (no GPU needed): the shipped backward (the tile read once, dweight sums in memory)
beside the one that reads each tile twice (opt-in: norm_tiles.RELOAD_COLS), bf16 and fp32, 16 and 32
warps. The README's figures for the read-twice backward and for fp32's warps come from this.

    python benchmarks/norm_registers.py
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from kernel_checks import sm90_resources  # noqa: E402  (the tests' ptxas helper)

KERNELS = (("_layer_norm_bwd_kernel", False), ("_add_layer_norm_bwd_kernel", True), ("_rms_norm_bwd_kernel", False))
PATHS = (("shipped (read once, dweight in memory)", False), ("read twice, both sums in registers", True))


def cases(dtype: str, warps: int) -> list[dict]:
    types = {name: f"*{dtype}" for name in ("DY", "DS_OUT", "X", "W", "DX")}
    types.update({name: "*fp32" for name in ("MEAN", "RSTD", "DW_PARTIAL", "DB_PARTIAL")})
    out = []
    for kernel, residual in KERNELS:
        for _, reload in PATHS:
            consts = {"HAS_DS_OUT": residual, "HAS_WEIGHT": True, "HAS_BIAS": not kernel.startswith("_rms"),
                      "BLOCK_M": 1, "BLOCK_N": 16384, "DW_IN_MEMORY": not reload, "DB_IN_MEMORY": False,
                      "PREFETCH": False, "STAGES": 1, "LAUNCH_DEPENDENTS": True, "RELOAD": reload, "EVEN": reload}
            if kernel.startswith("_rms"):
                consts["GEMMA"] = False
            out.append({"module": "fusion_advisor.kernels.norm_core", "kernel": kernel, "types": types,
                        "constexprs": consts, "num_warps": warps, "unaligned": ["n_rows"]})
    return out


def main() -> int:
    import triton
    print(f"norm backward at 16384 columns, sm_90 (Triton {triton.__version__}'s ptxas): registers / spill bytes a thread")
    for dtype in ("bf16", "fp32"):
        for warps in (16, 32):
            built = iter(sm90_resources(cases(dtype, warps)))
            for kernel, _ in KERNELS:
                for label, _ in PATHS:
                    regs, stack = next(built)
                    print(f"  {dtype} {warps:>2} warps  {kernel:<28} {label:<40} {regs:>4} / {stack:>5}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
