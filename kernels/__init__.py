"""Fused Triton kernels, one file per op, each registered once as a FusionPattern.

To add a pattern: write kernels/<name>.py (kernels, launcher, autograd.Function, functional,
module, reference, `register_pattern(__name__, ...)`) and add its module name to
registry.PATTERN_MODULES. Patterns load on the first lookup (registry.get and the others below).

This folder is installed as `fusion_advisor.kernels` (pyproject.toml's package-dir). Imported as
a top-level `kernels` (a script started at the repository root, where the working directory comes
first on sys.path), it hands over to whatever `kernels` is installed, Hugging Face's package that
transformers imports, or else stands as an empty namespace package, as a folder without this file
would (setuptools' editable install cannot map `fusion_advisor.kernels` to a folder without an
__init__.py, so the file stays).
"""
from __future__ import annotations

if __name__ == "kernels":
    import importlib.machinery
    import importlib.util
    import os
    import sys

    def _installed_kernels_spec():
        """The spec of a top-level `kernels` found anywhere but in this repository's root."""
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        saved = sys.path[:]
        sys.path[:] = [p for p in saved if os.path.abspath(p or os.curdir) != root]
        try:
            for finder in sys.meta_path:
                spec = finder.find_spec("kernels", None) if hasattr(finder, "find_spec") else None
                if spec is not None:
                    return spec
            return None
        finally:
            sys.path[:] = saved

    # Not installed: an empty namespace package (no __file__, nothing under it), as PEP 420 makes of
    # a plain folder; transformers' availability check then reads `kernels` as absent.
    _spec = _installed_kernels_spec() or importlib.machinery.ModuleSpec("kernels", None, is_package=True)
    _module = importlib.util.module_from_spec(_spec)
    sys.modules["kernels"] = _module   # what `import kernels` returns once this file has run
    if _spec.loader is not None:
        _spec.loader.exec_module(_module)
else:
    from fusion_advisor.kernels.registry import (PATTERN_MODULES, FunctionPatch, FusionPattern, OpRecord, Rewrite,
                                                 all_patterns, get, match, register, resolve)

    __all__ = ["FunctionPatch", "FusionPattern", "OpRecord", "Rewrite", "all_patterns", "get", "match", "register",
               "resolve", "PATTERN_MODULES"]
