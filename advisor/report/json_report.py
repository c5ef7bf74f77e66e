"""The JSON report: the AdvisorResult itself, as every stage reads and writes it."""
from __future__ import annotations

from fusion_advisor.report.base import Renderer
from fusion_advisor.core.result import AdvisorResult


class JSONRenderer(Renderer):
    name = "json"
    extension = "json"

    def __init__(self, indent: int | None = 2):
        self.indent = indent

    def render(self, result: AdvisorResult) -> str:
        return result.to_json(indent=self.indent)


def render(result: AdvisorResult) -> str:
    return JSONRenderer().render(result)
