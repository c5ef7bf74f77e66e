"""The kernels layer's answers to cluster finding (analyzers/clusters.py's PatternLookup): the
analyzers sit below the kernels and take these functions as an argument instead of importing them."""
from __future__ import annotations

from typing import Sequence

from fusion_advisor.analyzers.clusters import PatternLookup
from fusion_advisor.core.records import OpRecord


def pattern_lookup() -> PatternLookup:
    """Every registered pattern (imports the kernels, and Triton), generated kernels, the LM-head loss,
    misaligned Linears."""
    from fusion_advisor import kernels
    from fusion_advisor.kernels.linear_cross_entropy import params_from_lm_head
    from fusion_advisor.kernels.padded_linear import params_from_linear

    return PatternLookup(match=kernels.match, resolve=kernels.resolve, generated=_generated,
                         lm_head_params=params_from_lm_head, linear_params=params_from_linear)


def _generated(records: Sequence[OpRecord], source_file: str | None, def_line: int | None, label: str | None):
    """The generated-kernel candidate for a chain's forward ops; None where codegen does not cover it."""
    from fusion_advisor.kernels.codegen.candidate import candidate_for
    from fusion_advisor.kernels.codegen.ops import Unsupported

    try:
        return candidate_for(records, source_file, def_line, label=label)
    except Unsupported:
        return None
