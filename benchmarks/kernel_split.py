"""Where a fused op's time goes on the GPU: each kernel's duration and the gaps between them, for
our Triton provider (or eager / compile) of one pattern at one shape, read off torch.profiler.

    python benchmarks/kernel_split.py --patterns layer_norm,rms_norm,group_norm --n 64,128 --rows 65536
    python benchmarks/kernel_split.py --patterns softmax --shape 1,32,4096,4096 --mask causal

bench times a call between CUDA events (benchmarks/bench_norms.py's figures); this splits that call:
per kernel the median duration over the profiled calls, then the span from the first kernel's start
to the last one's end, whose excess over the kernels' sum is launch gaps. Input sets rotate as
bench's do, so no call reads what the one before left in L2. GPU only.
"""
from __future__ import annotations

import argparse
import statistics
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_norms import shape_params  # noqa: E402  (the sibling script)


def split(pattern, params: dict, provider: str, backward: bool, calls: int = 40) -> tuple[dict, float]:
    """({kernel name: median us}, median span us) of `calls` profiled calls."""
    import torch
    from fusion_advisor.measure import build_workload, provider_callable

    device = torch.device("cuda")
    work = build_workload(pattern, params, device, backward)
    fns = work.calls(provider_callable(pattern, provider))
    for fn in fns * 3:   # compiles, autotunes
        fn()
    torch.cuda.synchronize()
    spans: list[float] = []
    per_kernel: dict[str, list[float]] = defaultdict(list)
    for i in range(calls):
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            torch.cuda._sleep(200_000)   # keeps the host ahead: launch gaps are the GPU's, not Python's
            fns[i % len(fns)]()
            torch.cuda.synchronize()
        kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA
                   and "spin_kernel" not in e.name]   # torch.cuda._sleep's kernel
        if not kernels:
            continue
        start = min(e.time_range.start for e in kernels)
        end = max(e.time_range.end for e in kernels)
        spans.append(end - start)
        for e in kernels:
            per_kernel[e.name].append(e.time_range.end - e.time_range.start)
    return {k: statistics.median(v) for k, v in per_kernel.items()}, statistics.median(spans) if spans else 0.0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--patterns", default="layer_norm")
    ap.add_argument("--n", default="64", help="norms: comma-separated row lengths")
    ap.add_argument("--rows", default="65536", help="norms: comma-separated row counts")
    ap.add_argument("--shape", default=None, help="other patterns: the shape, comma-separated")
    ap.add_argument("--mask", default="causal", help="softmax: none, causal or additive")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--providers", default="triton,compile")
    ap.add_argument("--forward-only", action="store_true")
    args = ap.parse_args(argv)
    import torch
    if not torch.cuda.is_available():
        print("error: kernel_split.py needs a CUDA GPU", file=sys.stderr)
        return 3
    from fusion_advisor.kernels.registry import all_patterns, get as get_pattern
    known = {p.name for p in all_patterns()}
    unknown = [name for name in args.patterns.split(",") if name not in known]
    if unknown:
        print(f"error: unknown pattern {unknown[0]!r} (known: {', '.join(sorted(known))})", file=sys.stderr)
        return 2
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    cases = []
    for name in args.patterns.split(","):
        if args.shape:
            shape = [int(v) for v in args.shape.split(",")]
            params = {"shape": shape, "dtype": args.dtype, "scale": 0.125, "mask": args.mask}
            if args.mask == "additive":
                params["mask_shape"] = [shape[0], 1, shape[2], shape[3]]
            cases.append((name, params))
        else:
            cases += [(name, shape_params(name, int(n), int(r), args.dtype, sms))
                      for n in args.n.split(",") for r in args.rows.split(",")]
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; median us over 40 profiled calls")
    for name, params in cases:
        pattern = get_pattern(name)
        for provider in args.providers.split(","):
            kernels, span = split(pattern, params, provider, backward=not args.forward_only)
            total = sum(kernels.values())
            print(f"{name} {params['shape']} {provider}: span {span:.1f} us, kernels {total:.1f} us, "
                  f"gaps {span - total:.1f} us")
            for k, us in sorted(kernels.items(), key=lambda kv: -kv[1]):
                print(f"    {us:7.1f} us  {k[:100]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
