"""On a GPU: check registered patterns at their LLM-training bench shapes and time them.

    python3 scripts/gpu_check_patterns.py [PATTERN ...]      (default: every registered pattern)

For each pattern: forward and every grad vs the reference at bench_params[0] (the kernel tests'
comparison, on CUDA), then median µs per call, forward and forward+backward, for eager
(`reference`), Liger-Kernel (where the pattern has an adapter and liger_kernel imports), the
fused kernel, and torch.compile(reference) at one shape; GB/s of the fused kernel from
`fused_bytes`. A quick check for kernel authors, not the benchmark stage.
"""
import json
import sys
import time
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from kernel_checks import check_against_reference  # noqa: E402

from fusion_advisor.kernels import all_patterns, get  # noqa: E402


def reduced(inputs) -> tuple[tuple[int, ...], int | None]:
    """Grad positions that sum over input 0 (parameters smaller than it) and their term count."""
    x = inputs.args[0]
    small = [i for i in inputs.grad_inputs if i and inputs.args[i].numel() < x.numel()]
    return tuple(small), (x.numel() // inputs.args[small[0]].numel() if small else None)


def median_us(fn, leaves=None) -> float:
    return 1e3 * triton.testing.do_bench(fn, warmup=25, rep=100, grad_to_none=leaves, return_mode="median")


def main(names: list[str]) -> None:
    device = torch.device("cuda")
    rows = []
    for pattern in [get(n) for n in names] if names else all_patterns():
        if not pattern.bench_params:
            continue
        t0 = time.time()
        probe = pattern.make_inputs(pattern.bench_params[0], device, True)
        positions, terms = reduced(probe)
        check_against_reference(pattern, pattern.bench_params[0], device, reduced_grads=positions, reduced_rows=terms)
        print(f"{pattern.name}: forward and grads match the reference at {pattern.bench_params[0]} "
              f"({time.time() - t0:.1f} s)", flush=True)
        del probe
        for i, params in enumerate(pattern.bench_params):
            inputs = pattern.make_inputs(params, device, True)
            leaves = [inputs.args[j] for j in inputs.grad_inputs]
            providers = {"eager": pattern.reference, "fused": pattern.fused}
            if pattern.liger is not None:
                providers["liger"] = pattern.liger
            if i == len(pattern.bench_params) // 2:
                providers["compile"] = torch.compile(pattern.reference, fullgraph=True)
            row = {"pattern": pattern.name, "params": params, "bytes": pattern.fused_bytes(params)}
            for name, fn in providers.items():
                try:
                    out = fn(*inputs.args, **inputs.kwargs)
                    outs = [out] if isinstance(out, torch.Tensor) else [o for o in out if isinstance(o, torch.Tensor)]
                    grads = [torch.randn_like(o) for o in outs]

                    def forward_backward():
                        o = fn(*inputs.args, **inputs.kwargs)
                        os_ = [o] if isinstance(o, torch.Tensor) else [t for t in o if isinstance(t, torch.Tensor)]
                        torch.autograd.backward(os_, grads)

                    with torch.no_grad():
                        fwd = median_us(lambda: fn(*inputs.args, **inputs.kwargs))
                    row[name] = [round(fwd, 1), round(median_us(forward_backward, leaves), 1)]
                except Exception as e:  # e.g. liger_kernel missing, or an option it lacks
                    row[name] = f"{type(e).__name__}: {str(e)[:60]}"
            if isinstance(row["fused"], list):
                b = row["bytes"]
                row["fused_GBps"] = [round(b["forward"] / row["fused"][0] / 1e3),
                                     round((b["forward"] + b["backward"]) / row["fused"][1] / 1e3)]
            rows.append(row)
            print(json.dumps(row), flush=True)
            del inputs, leaves
            torch.cuda.empty_cache()
    print(f"\n{torch.cuda.get_device_name()}: median µs per call [forward, forward+backward]")
    for r in rows:
        cells = "  ".join(f"{k}={r[k]}" for k in ("eager", "compile", "liger", "fused", "fused_GBps") if k in r)
        print(f"{r['pattern']:15s} {str(r['params']['shape']):16s} {cells}")


if __name__ == "__main__":
    main(sys.argv[1:])
