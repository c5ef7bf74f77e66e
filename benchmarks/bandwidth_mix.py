"""HBM bandwidth by read:write mix: how fast a streaming kernel moves bytes when it reads R tensors and
writes W of the same size, against the 1:1 copy that `% of copy` divides by.

    python benchmarks/bandwidth_mix.py            # 256 MiB a tensor, bf16, GPU only

Why: a causal softmax forward reads the kept half of each score row and writes the whole row (1:2),
a norm's forward reads one tensor and writes one (1:1), its backward reads two and writes one
(2:1). If writes stream slower than reads, a write-heavy kernel cannot reach the copy's figure, and
its `% of copy` says less than it seems. Each mix runs one Triton kernel (4,096 elements a program,
8 warps, 16-byte accesses), timed by triton.testing.do_bench (median, L2 flushed between calls).
"""
from __future__ import annotations

import argparse
import sys

MIXES = ((1, 0), (0, 1), (1, 1), (2, 1), (1, 2), (3, 1))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mib", type=int, default=256, help="MiB a tensor")
    args = ap.parse_args(argv)
    import torch
    if not torch.cuda.is_available():
        print("error: bandwidth_mix.py needs a CUDA GPU", file=sys.stderr)
        return 3
    import triton
    import triton.language as tl
    import triton.testing

    @triton.jit
    def stream(A, B, C, Y, Z, SUM, READS: tl.constexpr, WRITES: tl.constexpr, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        v = tl.full((BLOCK,), 1.0, tl.float32)
        if READS >= 1:
            v = tl.load(A + offs).to(tl.float32)
        if READS >= 2:
            v += tl.load(B + offs).to(tl.float32)
        if READS >= 3:
            v += tl.load(C + offs).to(tl.float32)
        if WRITES >= 1:
            tl.store(Y + offs, v.to(Y.dtype.element_ty))
        if WRITES >= 2:
            tl.store(Z + offs, (v * 2).to(Z.dtype.element_ty))
        if WRITES == 0:   # keeps the loads: one value a program, never taken for random data
            s = tl.sum(v, axis=0)
            if s == 12345.678:
                tl.store(SUM + tl.program_id(0), s)

    block = 4096
    n = args.mib * 2**20 // 2 // block * block
    t = [torch.randn(n, device="cuda", dtype=torch.bfloat16) for _ in range(5)]
    total = torch.empty(n // block, device="cuda")
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}; "
          f"{args.mib} MiB a tensor (bf16)")
    rates = {}
    for reads, writes in MIXES:
        def call():
            stream[(n // block,)](t[0], t[1], t[2], t[3], t[4], total, READS=reads, WRITES=writes, BLOCK=block,
                                  num_warps=8)
        ms = triton.testing.do_bench(call, warmup=25, rep=200, return_mode="median")
        moved = (reads + writes) * n * 2
        rates[(reads, writes)] = moved / (ms * 1e-3)
    copy = rates[(1, 1)]
    for (reads, writes), rate in rates.items():
        print(f"  read {reads} : write {writes}   {rate / 1e9:8.1f} GB/s   {100 * rate / copy:5.1f} % of the 1:1 copy")
    return 0


if __name__ == "__main__":
    sys.exit(main())
