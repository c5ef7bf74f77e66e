"""Text from a result file (titles, notes, names, reasons) made safe for a terminal.

A result is data anyone can hand us: an ANSI or other control sequence inside it must not reach
the terminal, where it could recolour, move the cursor, retitle the window or hide text. Every
string is stripped of escape sequences and control characters (newlines and tabs stay) before
the terminal renderers see it; the JSON and HTML outputs escape such text on their own.
"""
from __future__ import annotations

import copy
import dataclasses
import re

# CSI (ESC [ ... final), OSC (ESC ] ... BEL or ESC \), other two-byte ESC sequences, then any
# C0 / C1 control character left (a lone ESC included) except newline and tab.
_CONTROL = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)?|\x1b[@-_]"
                      r"|[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def strip_controls(text: str) -> str:
    return _CONTROL.sub("", text)


def terminal_safe(obj):
    """A copy of `obj` (an AdvisorResult, or any dataclass / dict / list of them) whose strings hold
    no control sequence; `obj` itself is left as it was (it is what gets saved)."""
    return _clean(copy.deepcopy(obj))


def _clean(obj):
    if isinstance(obj, str):
        return strip_controls(obj)
    if isinstance(obj, list):
        return [_clean(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_clean(v) for v in obj)
    if isinstance(obj, dict):
        return {_clean(k): _clean(v) for k, v in obj.items()}
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        for f in dataclasses.fields(obj):
            object.__setattr__(obj, f.name, _clean(getattr(obj, f.name)))
    return obj
