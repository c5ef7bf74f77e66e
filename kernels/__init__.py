"""Fused Triton kernels, one file per op, each registered once as a FusionPattern.

To add a pattern: write kernels/<name>.py (kernels, launcher, autograd.Function, functional,
module, reference, `register(FusionPattern(...))`) and add its module name to
registry.PATTERN_MODULES. Patterns load on the first lookup (registry.get and the others below).
"""
from __future__ import annotations

from fusion_advisor.kernels.registry import (PATTERN_MODULES, FunctionPatch, FusionPattern, OpRecord, Rewrite,
                                             all_patterns, get, match, register, resolve)

__all__ = ["FunctionPatch", "FusionPattern", "OpRecord", "Rewrite", "all_patterns", "get", "match", "register",
           "resolve", "PATTERN_MODULES"]
