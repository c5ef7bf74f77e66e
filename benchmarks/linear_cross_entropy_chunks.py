"""linear_cross_entropy (an LM head + cross-entropy without the full logits) at one LLM shape:
forward+backward time and peak memory for several chunk sizes and weight-gradient accumulators,
beside eager (F.linear + logits.float() + F.cross_entropy) and Liger-Kernel's fused linear
cross-entropy (GPU).

    python benchmarks/linear_cross_entropy_chunks.py                  # tokens 4096, hidden 2048, vocab 32000
    python benchmarks/linear_cross_entropy_chunks.py --tokens 8192 --vocab 128256
"""
from __future__ import annotations

import argparse
import statistics
import sys

import torch
import torch.nn.functional as F


def measure(fn, hidden, weight, target, reps: int = 10) -> tuple[float, float]:
    """(median ms of forward+backward, peak bytes above what was allocated before)."""
    for _ in range(3):
        fn(hidden, weight, target).backward()
        hidden.grad = weight.grad = None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn(hidden, weight, target).backward()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
        hidden.grad = weight.grad = None
    return statistics.median(times), torch.cuda.max_memory_allocated() - base


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--vocab", type=int, default=32000)
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("linear_cross_entropy_chunks.py needs a CUDA GPU", file=sys.stderr)
        return 3
    from fusion_advisor.kernels.linear_cross_entropy import linear_cross_entropy

    torch.manual_seed(0)
    dev, dt = "cuda", torch.bfloat16
    hidden = torch.randn(args.tokens, args.hidden, device=dev, dtype=dt, requires_grad=True)
    weight = (torch.randn(args.vocab, args.hidden, device=dev) / args.hidden ** 0.5).to(dt).requires_grad_()
    target = torch.randint(0, args.vocab, (args.tokens,), device=dev)
    rows = [("eager", lambda h, w, t: F.cross_entropy(F.linear(h, w).float(), t))]
    for chunk in (256, 512, 1024, 2048):
        for fp32 in (True, False):
            rows.append((f"ours chunk {chunk} acc {'fp32' if fp32 else 'bf16'}",
                         lambda h, w, t, c=chunk, a=fp32: linear_cross_entropy(h, w, t, chunk_rows=c, grad_weight_fp32=a)))
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
        liger = LigerFusedLinearCrossEntropyLoss()
        rows.append(("liger", lambda h, w, t: liger(w, h, t)))
    except ImportError as exc:
        print(f"liger: not run ({exc})")
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; tokens {args.tokens}, hidden {args.hidden}, "
          f"vocab {args.vocab}, bf16")
    print(f"{'variant':<28} {'fwd+bwd ms':>10} {'peak MiB':>9}")
    for name, fn in rows:
        ms, peak = measure(fn, hidden, weight, target)
        print(f"{name:<28} {ms:>10.3f} {peak / 2**20:>9.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
