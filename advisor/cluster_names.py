"""How the report and the recommendations name a cluster, for a person: its module or, module-less,
its pattern (else its first ops), at its source line. Imports nothing heavy (no torch)."""
from __future__ import annotations

from fusion_advisor.core.result import is_generated


# Modules that only wrap a function: transformers 5.2x runs apply_rotary_pos_emb through the `kernels`
# package's `Func` module (so a hub kernel can replace it), and Mixtral's RoPE read "Fuse Func @
# modeling_mixtral.py:207"; the module that calls it names the place.
FUNCTION_WRAPPERS = frozenset({"Func"})


def module_leaf(cluster) -> str | None:
    """"LlamaRMSNorm" of "LlamaModel/LlamaDecoderLayer/LlamaRMSNorm", "MixtralAttention" of
    ".../MixtralAttention/Func/Func"; None for the analyzers' placeholders ("(no module)")."""
    parts = [p for p in (cluster.module_class or "").split("/") if p and p not in FUNCTION_WRAPPERS]
    leaf = parts[-1] if parts else None
    return None if not leaf or leaf.startswith("(") else leaf


def short_source(source: str | None) -> str | None:
    """"modeling_llama.py:62" of "transformers/models/llama/modeling_llama.py:62"."""
    return source.replace("\\", "/").rsplit("/", 1)[-1] if source else None


def where_label(cluster) -> str:
    """"LlamaRMSNorm @ llama_train.py:96", "cross_entropy @ llama_train.py:145 (backward)"."""
    name = module_leaf(cluster)
    if not name:
        if cluster.pattern and not is_generated(cluster.pattern):
            name = cluster.pattern
        else:
            ops = [str(op.get("name", "?")).split("::")[-1] for op in cluster.ops if isinstance(op, dict)]
            name = "+".join(ops[:3]) + ("+…" if len(ops) > 3 else "") if ops else cluster.id
    source = short_source(cluster.source)
    label = f"{name} @ {source}" if source else name
    return label + (" (backward)" if cluster.direction == "backward" else "")
