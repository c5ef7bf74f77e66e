"""How many times each replacement ran: the proof behind `apply --verify`.

Every launch path of a replacement (a fused op's launcher, a generated kernel, a swapped function,
a regionally compiled module) calls `hit(name)` once per call. `apply --verify` reads the counts
after the patched run and divides by the steps: a replacement planned and never called is an
error, never "losses match".

A dict increment costs ~50 ns against the µs of a kernel launch; nothing here imports torch at
import time. Code that torch.compile may trace counts through `hit_eager`.
"""
from __future__ import annotations

_counts: dict[str, int] = {}


def hit_eager(name: str) -> None:
    """`hit(name)`, except in code torch.compile traces: dynamo would turn the increment into a
    guard on this dict's contents and recompile the region at every call until it fell back to
    eager (T5's compiled blocks on the H100 zoo: 44 graphs for 6 blocks). Calls inside a compiled
    graph go uncounted, as verify says of them."""
    import torch   # loaded already: only code that runs tensors calls this

    if not torch.compiler.is_compiling():
        _counts[name] = _counts.get(name, 0) + 1


def hit(name: str) -> None:
    """Count one call of the replacement `name` (a pattern name, e.g. "rms_norm", or "generic:<hash>",
    or "compile:<module class>")."""
    _counts[name] = _counts.get(name, 0) + 1


def snapshot() -> dict[str, int]:
    """The counts so far (a copy)."""
    return dict(_counts)


def reset() -> None:
    _counts.clear()
