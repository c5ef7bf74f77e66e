"""Which of the norm modules in Hugging Face transformers `fusion_advisor.patch` swaps (CPU, Triton
interpreter: no GPU, no timing).

Every class of a `transformers/models/*/modeling_*.py` whose name ends in RMSNorm or LayerNorm is
built (its constructor given no argument, else `(32,)`, else `(32, 1e-6)`), one per distinct forward
(many models copy a class under their own name), and patched alone with the rms_norm and layer_norm
forms. Each swap is proven by patch's numerics check against the class's own forward and
gradients; a refusal is that check's, or the form's reason for not trying.

    python benchmarks/norm_coverage.py
    python benchmarks/norm_coverage.py --verbose     # every class, not one line a verdict
"""
from __future__ import annotations

import argparse
import collections
import importlib
import inspect
import os
import sys
import warnings

os.environ.setdefault("TRITON_INTERPRET", "1")   # before the kernels load: CPU tensors run the kernels


def norm_classes():
    """(name, class) of each distinct norm module in transformers' modeling files."""
    import torch
    import transformers
    root = os.path.join(os.path.dirname(transformers.__file__), "models")
    seen = set()
    for folder in sorted(os.listdir(root)):
        if not os.path.exists(os.path.join(root, folder, f"modeling_{folder}.py")):
            continue
        try:
            module = importlib.import_module(f"transformers.models.{folder}.modeling_{folder}")
        except Exception:   # a model whose optional dependency is missing here
            continue
        for name, cls in vars(module).items():
            if not (inspect.isclass(cls) and issubclass(cls, torch.nn.Module) and cls.__module__ == module.__name__
                    and name.endswith(("RMSNorm", "LayerNorm"))):
                continue
            source = inspect.getsource(cls.forward)
            if source not in seen:   # the same forward under another model's name
                seen.add(source)
                yield name, cls


def verdict(cls) -> str:
    import torch
    import fusion_advisor
    from fusion_advisor.module_forms import norm_parts
    module = None
    for args in ((), (32,), (32, 1e-6)):   # () first: an unweighted norm's one argument is its eps
        try:
            module = cls(*args)
            break
        except Exception:
            continue
    if module is None:
        return "not built"
    handle = fusion_advisor.patch(torch.nn.Sequential(module), patterns=["rms_norm", "layer_norm"])
    try:
        if handle.swaps:
            new = handle.swaps[0].replacement
            return f"swapped: {type(new).__name__}" + (" (1 + weight)" if getattr(new, "gemma", False) else "")
        if handle.skipped:
            return "refused: " + handle.skipped[0][1].split("; ")[0][:90]
        parts = norm_parts(module)
        return "not a candidate: " + (parts if isinstance(parts, str) else "no form matched")
    finally:
        handle.revert()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--verbose", action="store_true", help="one line a class")
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore")
    import torch
    import transformers
    by_verdict = collections.defaultdict(list)
    for name, cls in norm_classes():
        v = verdict(cls)
        by_verdict[v].append(name)
        if args.verbose:
            print(f"{name:<40} {v}")
    built = sum(len(names) for v, names in by_verdict.items() if v != "not built")
    swapped = sum(len(names) for v, names in by_verdict.items() if v.startswith("swapped"))
    print(f"norm modules of transformers {transformers.__version__} (torch {torch.__version__}), one a distinct "
          f"forward: {swapped} of the {built} built swapped")
    for v, names in sorted(by_verdict.items(), key=lambda kv: (-len(kv[1]), kv[0])):
        print(f"{len(names):4d}  {v}   ({', '.join(names[:4])}{', ...' if len(names) > 4 else ''})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
