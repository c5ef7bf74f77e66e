"""Generic fusion: one generated Triton kernel (each way) for any traced chain of pointwise ops,
optionally with one reduction over one dim or one block of adjacent dims (any of them: softmax over
the channels of NCHW, mean over (H, W)); a softmax / log_softmax may be followed by pointwise ops.

    segments = split_supported(ops)            # [(ops, why the segment ended), ...]
    pattern = build_pattern(segments[0][0])    # a FusionPattern named generic:<hash>
    pattern.fused(*inputs.args, **inputs.kwargs)
    print(pattern_source(pattern))             # the standalone module apply writes

Files: ops.py (the supported ops: parsing, forward expressions, local derivatives), graph.py
(the linking rule: a traced op list -> an expression graph), emit.py (the Triton source),
runtime.py (helpers every generated module carries), pattern.py (the FusionPattern, the module
file, bytes).
"""
from fusion_advisor.kernels.codegen.graph import Graph, build_graph, records_from_frame, split_supported
from fusion_advisor.kernels.codegen.ops import Unsupported, supported_names
from fusion_advisor.kernels.codegen.pattern import build_pattern, generated, pattern_source

__all__ = ["Graph", "Unsupported", "build_graph", "build_pattern", "generated", "pattern_source",
           "records_from_frame", "split_supported", "supported_names"]
