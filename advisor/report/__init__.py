"""Renderers of an AdvisorResult, sharing one base (`render(result) -> str`): terminal (rich) and a
self-contained HTML page. They read the AdvisorResult and nothing else; the JSON report is the
AdvisorResult itself (`result.to_json()`)."""
from __future__ import annotations

import contextlib
import os

from fusion_advisor.core.errors import AdvisorError
from fusion_advisor.report.base import Renderer
from fusion_advisor.report.html_report import HTMLRenderer, default_html_path, write_html
from fusion_advisor.report.terminal import TerminalRenderer
from fusion_advisor.core.result import AdvisorResult


def load_result(path: str | os.PathLike) -> AdvisorResult:
    """A saved AdvisorResult, checked enough to render by its loader (the typed converter):
    AdvisorError (exit 2) with one line if not."""
    return AdvisorResult.load(path)


@contextlib.contextmanager
def malformed_result_errors(source: str):
    """Around rendering a result read from a file: a field of the wrong type (a hand-edited or
    foreign JSON) becomes a one-line AdvisorError (exit 2) that names the problem."""
    from rich.errors import NotRenderableError
    try:
        yield
    except (TypeError, ValueError, KeyError, AttributeError, IndexError, NotRenderableError) as exc:
        raise AdvisorError(f"{source}: not a well-formed AdvisorResult ({type(exc).__name__}: {exc})") from None


__all__ = ["HTMLRenderer", "Renderer", "TerminalRenderer", "default_html_path",
           "load_result", "malformed_result_errors", "write_html"]
