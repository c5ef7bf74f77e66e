"""fusion-advisor: find the memory-bound kernel chains in a PyTorch training script, time fused
Triton replacements on its own shapes, and patch them in.

In a training script: `fusion_advisor.step()` marks a step explicitly and
`with fusion_advisor.region("name"):` names a range; both are no-ops outside `fusion-advisor profile`.
`fusion_advisor.patch(model, result)` swaps the recommended fused modules into one model instance.
"""
__version__ = "0.1.0"

from fusion_advisor.api import region, step  # noqa: E402

__all__ = ["__version__", "patch", "patched", "region", "step"]


def __getattr__(name):
    # patch/patched import the kernels (and Triton): only when asked for.
    if name in ("patch", "patched"):
        from fusion_advisor import patching
        return getattr(patching, name)
    raise AttributeError(f"module 'fusion_advisor' has no attribute {name!r}")
