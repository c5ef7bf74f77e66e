"""What every renderer shares: the `Renderer` base (`render(result) -> str`, as in pyinstrument) and
the number formats, so the terminal, HTML and JSON reports print a figure the same way."""
from __future__ import annotations

import math
from abc import ABC, abstractmethod
from numbers import Real

from fusion_advisor.core.result import AdvisorResult


class Renderer(ABC):
    """One output format of the report. Renderers read only the AdvisorResult."""

    name: str = ""
    extension: str = ""

    @abstractmethod
    def render(self, result: AdvisorResult) -> str:
        """The whole report as text."""


def is_number(x) -> bool:
    return isinstance(x, Real) and not isinstance(x, bool) and math.isfinite(x)


def fmt_us(x) -> str:
    """12.3 µs, 4.56 ms, 1.23 s; '—' when there is no figure."""
    if not is_number(x):
        return "—" if x is None else str(x)
    if abs(x) >= 1e6:
        return f"{x / 1e6:,.2f} s"
    if abs(x) >= 1000:
        return f"{x / 1000:,.2f} ms"
    return f"{x:,.1f} µs"


def fmt_usd(x) -> str:
    if not is_number(x):
        return "—" if x is None else str(x)
    return f"${x:,.0f}" if abs(x) >= 100 else f"${x:,.2f}"


def fmt_bytes(x) -> str:
    if not is_number(x):
        return "—" if x is None else str(x)
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(x) >= size:
            return f"{x / size:,.1f} {unit}"
    return f"{x:,.0f} B"


def fmt_pct(x, digits: int = 1) -> str:
    if not is_number(x):
        return "—" if x is None else str(x)
    return f"{x:.{digits}f} %"


def fmt_num(x) -> str:
    """A count or ratio: 8, 1,024, 0.5, 12.25."""
    if not is_number(x):
        return "—" if x is None else str(x)
    if x == int(x):
        return f"{int(x):,}"
    return f"{x:,.2f}" if abs(x) >= 10 else f"{x:.3g}"
