"""A traced op chain -> a FusionPattern backed by a generated Triton module.

The module is written to a cache folder (FUSION_ADVISOR_CACHE, else ~/.cache/fusion-advisor) and
imported from there: Triton reads a kernel's source from its file, and the pattern then runs the
very text `pattern_source` returns, which `apply` writes to fusion_kernels/<cluster>.py.
Generic patterns are not in the global registry; `build_pattern` caches them by content.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import os
import re
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Sequence

import torch

from fusion_advisor import __version__
from fusion_advisor.kernels.codegen import runtime
from fusion_advisor.kernels.codegen.emit import Layout, describe, partition, spec_of
from fusion_advisor.kernels.codegen.module import module_source
from fusion_advisor.kernels.codegen.graph import Graph, build_graph
from fusion_advisor.kernels.codegen.ops import Unsupported
from fusion_advisor.kernels.registry import FusionPattern, Inputs, OpRecord, dtype_from_name, dtype_name


@dataclass
class GeneratedChain:
    pattern_name: str      # "generic:1a2b3c4d5e"
    module_name: str       # "g_1a2b3c4d5e" (also the custom ops' stem)
    graph: Graph
    layout: Layout
    source: str
    path: Path
    module: ModuleType


_GENERATED: dict[str, GeneratedChain] = {}
_PATTERNS: dict[str, FusionPattern] = {}


def build_pattern(ops: Sequence[OpRecord], *, bind: dict[tuple[int, int], str] | None = None,
                  source: str | None = None, exact: bool = False) -> FusionPattern:
    """One generated kernel (each way) for the whole chain. `ops` are the chain's top-level
    forward ops in trace order (split first with `split_supported`: an unsupported op raises
    Unsupported). `bind`, `exact`: see graph.py. `source` ("file.py:line") goes into the module header."""
    ops = list(ops)
    key = json.dumps({"ops": [[o.name, _plain(o.dims), _plain(o.types), _plain(o.concrete), o.module] for o in ops],
                      "bind": sorted([list(k), v] for k, v in (bind or {}).items()), "source": source,
                      "exact": exact},
                     sort_keys=True)
    digest = hashlib.sha1(key.encode()).hexdigest()[:10]
    name = f"generic:{digest}"
    if name in _PATTERNS:
        return _PATTERNS[name]
    graph = build_graph(ops, bind, exact)
    module_name = f"g_{digest}"
    params = _params(graph)
    header = _header(graph, name, module_name, ops, source, params)
    generated = module_source(graph, module_name, header)
    path, module = _load(module_name, generated.source)
    chain = GeneratedChain(name, module_name, graph, generated.layout, generated.source, path, module)
    signature = "^" + " ".join(re.escape(o.short) for o in ops) + "$"
    pattern = FusionPattern(
        name=name,
        description=f"generated kernel for the {len(ops)}-op chain {_chain_text(ops)}",
        reference=module.reference,
        fused=module.fused,
        make_inputs=lambda p, device, requires_grad=True: make_inputs(chain, p, device, requires_grad),
        fused_bytes=lambda p: fused_bytes(graph, chain.layout, p),
        forward_signature=signature,
        params_from_ops=lambda other: _params_if_same_structure(chain, other, bind, exact),
        example_params=params,
        bench_params=(params,),
    )
    _GENERATED[name] = chain
    _PATTERNS[name] = pattern
    return pattern


def pattern_source(pattern: FusionPattern) -> str:
    """The generated module as text: drop it into fusion_kernels/<cluster>.py and import `fused`."""
    return generated(pattern).source


def generated(pattern: FusionPattern) -> GeneratedChain:
    try:
        return _GENERATED[pattern.name]
    except KeyError:
        raise KeyError(f"{pattern.name!r} is not a generated pattern (build it with build_pattern)") from None


# -- inputs and bytes -----------------------------------------------------------------------------
def _params(graph: Graph) -> dict:
    return {"inputs": [{"shape": list(x.shape), "dtype": dtype_name(x.dtype)} for x in graph.inputs],
            "scalars": {s.name: s.placeholder for s in graph.scalars}}


def make_inputs(chain: GeneratedChain, params: dict, device: torch.device, requires_grad: bool = True) -> Inputs:
    """External inputs at the captured shapes and dtypes: N(0, 1), except inputs that feed a
    divisor, log, sqrt, rsqrt, reciprocal or pow directly, drawn from [0.5, 1.5]; bool masks are
    fair coins. Scalars the trace does not hold get the placeholders listed in the header."""
    args = []
    for x, meta in zip(chain.graph.inputs, params["inputs"]):
        shape, dtype = meta["shape"], dtype_from_name(meta["dtype"])
        if dtype == torch.bool:
            args.append(torch.rand(shape, device=device) < 0.5)
            continue
        base = 0.5 + torch.rand(shape, device=device) if x.positive else torch.randn(shape, device=device)
        args.append(base.to(dtype).requires_grad_(requires_grad))
    grads = tuple(k for k, x in enumerate(chain.graph.inputs) if x.dtype != torch.bool) if requires_grad else ()
    return Inputs(tuple(args), dict(params.get("scalars", {})), grad_inputs=grads)


def fused_bytes(graph: Graph, layout: Layout, params: dict, num_sms: int | None = None) -> dict:
    """Bytes one call moves. Forward: every external input read once, the output written once.
    Backward: the output gradient and every input read once (values are recomputed, not
    stored), each gradient written once, plus each broadcast input's fp32 partial-sum buffer
    written by the kernel and read by the second small reduction."""
    num_sms = num_sms or params.get("num_sms", 132)
    spec = spec_of(graph, layout, "bytes")
    shapes = [tuple(meta["shape"]) for meta in params["inputs"]]
    dtypes = [dtype_from_name(meta["dtype"]) for meta in params["inputs"]]
    in_bytes = sum(math.prod(s) * d.itemsize for s, d in zip(shapes, dtypes))
    shape = runtime.loop_shape(spec, shapes)
    out = graph.nodes[-1]
    red = graph.reduction
    n_loop = math.prod(shape)
    block = graph.reduced_block
    full = runtime.padded(shape, len(graph.loop_shape))
    reduced = math.prod(full[block[0]:block[1] + 1]) if block is not None else 1
    n_out = n_loop if red is None or red.reduction in ("softmax", "log_softmax") else n_loop // max(reduced, 1)
    out_bytes = n_out * out.dtype.itemsize + (n_out * 8 if red is not None and red.reduction == "max" else 0)
    sizes = runtime.group_sizes(spec, shape)
    n_rows, n_cols = math.prod(sizes[:-1]), sizes[-1]
    block_r, block_c, _ = runtime.row_tile(n_rows, n_cols, whole_row=red is not None)
    n_col_tiles = -(-n_cols // block_c)
    programs, _ = runtime.row_programs(-(-n_rows // block_r), n_col_tiles, None, num_sms=num_sms)
    backward = n_out * out.dtype.itemsize + in_bytes
    for k, (s, d) in enumerate(zip(shapes, dtypes)):
        if d == torch.bool:
            continue
        backward += math.prod(s) * d.itemsize
        kind = runtime.grad_kind(layout.kept[k])
        if kind != "full":
            backward += 2 * 4 * math.prod(runtime.grad_buffer_shape(kind, sizes, programs, n_col_tiles))
    return {"forward": in_bytes + out_bytes, "backward": backward}


def _params_if_same_structure(chain: GeneratedChain, ops: Sequence[OpRecord], bind, exact) -> dict | None:
    """Params for other ops of the same chain (another layer, other sizes), else None."""
    mine = [(o.name, o.types, o.concrete) for o in (n.record for n in chain.graph.nodes)]
    if [(o.name, tuple(o.types), tuple(o.concrete)) for o in ops] != mine:
        return None
    try:
        graph = build_graph(list(ops), bind, exact)
        runtime.loop_shape(chain.module.SPEC, [x.shape for x in graph.inputs])
    except (Unsupported, ValueError):
        return None
    return _params(graph)


# -- the module file ------------------------------------------------------------------------------
def _cache_dir() -> Path:
    root = os.environ.get("FUSION_ADVISOR_CACHE")
    folder = (Path(root) if root else Path.home() / ".cache" / "fusion-advisor") / "generated"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        if os.access(folder, os.W_OK):
            return folder
    except OSError:
        pass
    folder = Path(tempfile.gettempdir()) / "fusion-advisor-generated"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _load(module_name: str, source: str) -> tuple[Path, ModuleType]:
    qualified = f"fusion_advisor_generated_{module_name}"
    path = _cache_dir() / f"{module_name}.py"
    if not path.exists() or path.read_text(encoding="utf-8") != source:
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(source, encoding="utf-8")
        os.replace(tmp, path)                      # atomic: another process may read it meanwhile
    if qualified in sys.modules:
        return path, sys.modules[qualified]
    spec = importlib.util.spec_from_file_location(qualified, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[qualified] = module
    try:
        spec.loader.exec_module(module)
    except Exception:
        del sys.modules[qualified]
        raise
    return path, module


# -- the header -----------------------------------------------------------------------------------
def _header(graph: Graph, name: str, module_name: str, ops: Sequence[OpRecord], source: str | None,
            params: dict) -> str:
    where = " · ".join(x for x in (source, ops[0].module and f"module {ops[0].module}") if x) or "not recorded"
    lines = [f"Fused Triton kernels for a traced chain of {len(ops)} ops, generated by fusion-advisor {__version__}.",
             "", f"Source: {where}",
             "Chain (eager PyTorch runs one kernel per op; `fused` runs one kernel forward and one backward):"]
    lines += [f"    {n.name} = {describe(n)}" for n in graph.nodes]
    lines += ["", "External inputs (each read once per pass):"]
    lines += [f"    {x.name:<5} {dtype_name(x.dtype):<9} {str(tuple(x.shape)):<22} op {x.op_index} {x.slot}"
              for x in graph.inputs]
    if graph.scalars:
        lines += ["", "Scalars: Python numbers in your code. The trace does not record their values: pass yours",
                  "(the benchmark used the placeholder shown):"]
        lines += [f"    {s.name:<5} op {s.op_index} {graph.nodes[s.op_index].record.short} {s.slot}"
                  f"  (placeholder {s.placeholder!r})" for s in graph.scalars]
    out = graph.nodes[-1]
    lines += ["", f"Output: {dtype_name(out.dtype)} {tuple(out.shape)}"
              + (" and int64 indices" if out.reduction == "max" else "")]
    if graph.notes:
        lines += ["", "Notes:"] + [f"    - {note}" for note in graph.notes]
    b = fused_bytes(graph, partition(graph), params)
    lines += ["", f"Bytes at the traced shapes: forward {b['forward']:,} (inputs read once, output written once), "
                  f"backward {b['backward']:,}.",
              "Math runs in fp32 registers; explicit casts (`to`) round as eager does; every other intermediate",
              "stays fp32 (eager rounds each op's output to its dtype, so low-precision results differ by a few ulps).",
              "", "Use (needs torch and triton only):",
              "    from fusion_kernels.<this file> import fused, reference",
              f"    y = fused({', '.join(x.name for x in graph.inputs)}"
              f"{''.join(f', {s.name}=...' for s in graph.scalars)})   # == reference(...), autograd-aware",
              "", f"Pattern {name}; custom ops fusion_kernels::{module_name}_fwd / _bwd."]
    return "\n".join(lines).replace('"""', "'''") + "\n"


def _chain_text(ops: Sequence[OpRecord]) -> str:
    names = [o.short for o in ops]
    return " → ".join(names) if len(names) <= 8 else " → ".join(names[:4] + ["…"] + names[-3:])


def _plain(x):
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    return x
