"""Fused Triton kernels, one file per op, each registered once as a FusionPattern.

To add a pattern: write kernels/<name>.py (kernels, launcher, autograd.Function, functional,
module, reference, `register(FusionPattern(...))`) and add its module name to PATTERN_MODULES.
"""
from __future__ import annotations

import importlib

from fusion_advisor.kernels.registry import (FunctionPatch, FusionPattern, OpRecord, Rewrite, all_patterns, get, match,
                                             register)

PATTERN_MODULES: list[str] = [
    "rms_norm",
    "softmax",
    "bias_act",
    "swiglu",
    "geglu",
    "rope",
    "cross_entropy",
    "linear_cross_entropy",
    "kl_div",
    "embedding_add",
    "dropout_add",
    "add_rms_norm",
    "layer_norm",
    "add_layer_norm",
    "group_norm",
]

for _name in PATTERN_MODULES:
    importlib.import_module(f"fusion_advisor.kernels.{_name}")


def resolve(name: str, params: dict | None = None) -> FusionPattern:
    """A pattern by name: a registered one, or a generated one ("generic:<hash>") rebuilt from the
    cluster's pattern_params. KeyError when neither."""
    if not name.startswith("generic:"):
        return get(name)
    from fusion_advisor.kernels.codegen.candidate import pattern_from_params
    pattern = pattern_from_params(params or {})
    if pattern.name != name:
        raise KeyError(f"the params rebuild {pattern.name}, not {name} (a different fusion-advisor version?)")
    return pattern


__all__ = ["FunctionPatch", "FusionPattern", "OpRecord", "Rewrite", "all_patterns", "get", "match", "register",
           "resolve", "PATTERN_MODULES"]
