"""Peak GPU memory and time of one cross-entropy forward + backward: eager (HF's `logits.float()`
and bf16 logits directly), the fused kernel (gradient buffer, and written over the logits) and
Liger-Kernel when it is installed.

    python benchmarks/cross_entropy_memory.py                      # 16k tokens x 128k vocab, bf16
    python benchmarks/cross_entropy_memory.py --tokens 4096 --vocab 32768 --check

Peak = torch.cuda.max_memory_allocated() over the forward and the backward, minus what was allocated
before them (the logits and the target); the logits' gradient ends in `logits.grad` for every
variant, so it is counted the same way for all. `--check` exits 1 unless the fused kernel's peak is at
most 1/3 of eager HF's (gradient buffer) and of eager's on the logits as they are (inplace). Times are the median of
`--reps` runs, each on freshly written logits.
"""
from __future__ import annotations

import argparse
import statistics
import sys

import torch

from fusion_advisor.kernels import cross_entropy as ce


def _variants() -> dict:
    variants = {
        "eager HF (logits.float())": lambda x, t: ce.reference(x, t, upcast=True),
        "eager, logits as they are": lambda x, t: ce.reference(x, t, upcast=False),
        "fused, gradient buffer": lambda x, t: ce.cross_entropy(x, t, upcast=True),
        "fused, inplace": lambda x, t: ce.cross_entropy(x, t, upcast=True, inplace=True),
    }
    try:
        import liger_kernel  # noqa: F401
        variants["liger (inplace)"] = lambda x, t: ce.liger(x, t)
    except ImportError:
        pass
    return variants


def measure(fn, tokens: int, vocab: int, dtype: torch.dtype, reps: int) -> tuple[int, float]:
    """(peak bytes above the inputs, median ms) of fn(logits, target).backward()."""
    device = torch.device("cuda")
    logits = torch.empty(tokens, vocab, dtype=dtype, device=device).requires_grad_()
    target = torch.randint(0, vocab, (tokens,), device=device)
    target[::10] = -100
    peaks, times = [], []
    for _ in range(reps + 1):  # the first run compiles
        logits.grad = None
        with torch.no_grad():
            logits.normal_(0.0, 2.0)
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn(logits, target).backward()
        end.record()
        torch.cuda.synchronize()
        peaks.append(torch.cuda.max_memory_allocated() - base)
        times.append(start.elapsed_time(end))
    del logits, target
    torch.cuda.empty_cache()
    return max(peaks[1:]), statistics.median(times[1:])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--vocab", type=int, default=131072)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--check", action="store_true", help="exit 1 unless the fused peaks are <= 1/3 of eager's")
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 3
    dtype = getattr(torch, args.dtype)
    gib = 2**30
    print(f"{torch.cuda.get_device_name()}  {args.tokens} tokens x {args.vocab} vocab, {args.dtype} logits "
          f"({args.tokens * args.vocab * dtype.itemsize / gib:.2f} GiB)")
    peaks = {}
    for name, fn in _variants().items():
        peak, ms = measure(fn, args.tokens, args.vocab, dtype, args.reps)
        peaks[name] = peak
        print(f"  {name:<28} peak {peak / gib:7.2f} GiB   {ms:8.2f} ms fwd+bwd")
    hf, direct = peaks["eager HF (logits.float())"], peaks["eager, logits as they are"]
    buffer, inplace = peaks["fused, gradient buffer"], peaks["fused, inplace"]
    print(f"  fused buffer / eager HF = {buffer / hf:.3f}   fused buffer / eager as-is = {buffer / direct:.3f}")
    print(f"  fused inplace / eager HF = {inplace / hf:.3f}   fused inplace / eager as-is = {inplace / direct:.3f}")
    if args.check and not (buffer <= hf / 3 and inplace <= direct / 3):
        print("FAILED: a fused peak is above 1/3 of eager's", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
