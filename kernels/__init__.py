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

__all__ = ["FunctionPatch", "FusionPattern", "OpRecord", "Rewrite", "all_patterns", "get", "match", "register", "PATTERN_MODULES"]
