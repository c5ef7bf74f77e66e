"""The small public API a training script may call: `step()` and `region(name)`.

Both are cheap no-ops when the script is not running under `fusion-advisor profile`, so a script
can keep them in for good.
"""
from __future__ import annotations

import contextlib
import functools
from typing import Callable

_step_listener: Callable[[], None] | None = None
_steps_paused = 0  # > 0 while fusion-advisor itself runs modules (patch checks): not the script's steps


@contextlib.contextmanager
def _paused_steps():
    global _steps_paused
    _steps_paused += 1
    try:
        yield
    finally:
        _steps_paused -= 1


def steps_paused() -> bool:
    """True while fusion-advisor runs its own checks inside the user's process (patch's numerics
    checks): their forwards and backwards are not the script's steps or losses."""
    return _steps_paused > 0


def _set_step_listener(fn: Callable[[], None] | None) -> None:
    global _step_listener
    _step_listener = fn


def step() -> None:
    """Mark the end of one training step. Once a script calls this, it alone defines steps
    (the optimizer and forward-call heuristics are switched off)."""
    if _step_listener is not None:
        _step_listener()


class region(contextlib.ContextDecorator):
    """Name a range of code; it shows in the trace (record_function) and in Nsight (NVTX).

    Use as `with fusion_advisor.region("attention"): ...` or as a decorator.
    """

    def __init__(self, name: str):
        if not isinstance(name, str) or not name:
            raise ValueError("region() needs a non-empty name")
        self.name = name
        self._stack: list[contextlib.ExitStack] = []

    def __enter__(self):
        import torch   # here, not at import: `import fusion_advisor` (and `fusion-advisor -h`) loads no torch

        stack = contextlib.ExitStack()
        stack.enter_context(torch.profiler.record_function(self.name))
        nvtx = _nvtx()
        if nvtx is not None:
            stack.enter_context(nvtx.annotate(self.name, domain="fusion_advisor"))
        self._stack.append(stack)
        return self

    def __exit__(self, *exc):
        self._stack.pop().close()
        return False


@functools.lru_cache(maxsize=1)
def _nvtx():
    try:
        import nvtx  # noqa: PLC0415 - optional at run time: a missing NVTX library must not break a script
    except Exception:  # pragma: no cover - nvtx is a declared dependency
        return None
    return nvtx
