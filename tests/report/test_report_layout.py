"""The committed example reports (docs/example-*/report.html) as a reader sees them: in headless
Chromium at 1400x900, after a resize to 1000 px and on a 390x844 phone. No console error, no chart
over a heading, a caption or another chart, nothing drawn outside its chart's box, no token broken
over two lines, no sideways page scroll on the phone, and the first recommendation's change shown.

And the terminal report of each example at 80 columns: no line splits a word or a file:line.

The page is framed by a small harness page (tests/layout_harness.js measures it from there), so
the frame can be narrowed like a window. Gated like the other browser test: skipped without
chromium unless FUSION_ADVISOR_REQUIRE_BROWSER is set.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from test_report import chromium_binary, dump_dom, parse
from fusion_advisor.report import load_result
from fusion_advisor.report.terminal import render as render_terminal

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted(p.parent.name for p in (ROOT / "docs").glob("example-*/report.html"))
HARNESS = """<!DOCTYPE html><html><head><meta charset="utf-8"><title>layout</title>
<style>body {{ margin: 0 }} iframe {{ border: 0; display: block }}</style></head><body>
<iframe id="wide" data-src="report.html" style="width:1400px;height:900px"></iframe>
<iframe id="phone" style="width:390px;height:844px"></iframe>
<pre id="layout-results"></pre>
<script>{harness}</script></body></html>"""


def test_every_example_has_a_committed_report():
    results = sorted(p.parent.name for p in (ROOT / "docs").glob("example-*/result.json"))
    assert results and EXAMPLES == results, "regenerate docs/example-*/report.html with `fusion-advisor report`"


@pytest.mark.browser
@pytest.mark.parametrize("example", EXAMPLES)
def test_example_report_layout_in_chromium(example, tmp_path):
    if chromium_binary() is None:
        if os.environ.get("FUSION_ADVISOR_REQUIRE_BROWSER"):
            pytest.fail("FUSION_ADVISOR_REQUIRE_BROWSER is set and no chromium binary was found")
        pytest.skip("no chromium binary (apt-get install chromium)")
    shutil.copy(ROOT / "docs" / example / "report.html", tmp_path / "report.html")
    harness = (Path(__file__).parents[1] / "layout_harness.js").read_text()
    page = tmp_path / "harness.html"
    page.write_text(HARNESS.format(harness=harness))
    doc = parse(dump_dom(page, tmp_path, budget_ms=30000, extra=["--allow-file-access-from-files",
                                                                 "--window-size=1440,1800"]))
    assert doc.find_all("body")[0].attrs.get("data-layout-done") == "yes", "the harness did not finish"
    results = json.loads(doc.find_all("pre", id="layout-results")[0].all_text())
    for view in ("desktop", "resized", "phone"):
        found = results[view]
        assert found["errors"] == [], f"{view}: the page logged errors: {found['errors']}"
        assert found["charts"] >= 1 and found["charts_rendered"] == str(found["charts"]), (view, found)
        assert found["overlaps"] == [], f"{view}: {found['overlaps']}"
        assert found["clipped"] == [], f"{view}: {found['clipped']}"
        assert found["broken_tokens"] == [], f"{view}: tokens broken over two lines: {found['broken_tokens']}"
        assert found["first_change"] > 0 and found["first_change_open"], f"{view}: no change under #1 ({found})"
    assert results["resized"]["viewport_width"] == 1000
    phone = results["phone"]
    assert phone["viewport_width"] == 390
    assert phone["page_width"] <= phone["viewport_width"], f"the page scrolls sideways on a phone: {phone['wide']}"


# -- the terminal at 80 columns ----------------------------------------------------------------
@pytest.mark.parametrize("example", EXAMPLES)
def test_example_terminal_report_at_80_columns_breaks_no_token(example, monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    result = load_result(ROOT / "docs" / example / "result.json")
    text = render_terminal(result, width=80, diff=True, result_path=f"docs/{example}/result.json")
    lines = text.splitlines()
    # The recommendations come first (after a short heading), the apply commands last.
    assert text.index("Recommendations, ranked") < 1500
    assert any(ln.strip().startswith("fusion-advisor apply") for ln in lines[-8:]) or "would change nothing" in text
    # Each title, wrapped on its own lines under "#N ", joins back into itself: no word, no
    # file:line was split (a split would leave "llama_trai" and "n.py:96").
    for rec in result.recommendations:
        start = next(i for i, ln in enumerate(lines) if ln.startswith(f"#{rec.rank} ") and rec.title.split()[0] in ln)
        words = lines[start].split()[1:]
        for ln in lines[start + 1:]:
            if not ln.startswith("   ") or ln.lstrip().startswith(("where:", "saving/step:")):
                break
            words += ln.split()
        assert " ".join(words) == rec.title, f"#{rec.rank} wrapped as {words}"
    # Every line of prose fits 80 columns and ends at a word's end; only a diff's code lines
    # (never re-wrapped) may run past the edge.
    prose = [ln for ln in lines if not ln.startswith(("+", "-", "@", "    ", " "))]
    assert max(len(ln) for ln in prose) <= 80
    tokens = {t for ln in lines for t in ln.split()}
    for c in result.clusters:
        if c.source and any(c.id == r.cluster_id for r in result.recommendations):
            assert any(t.startswith(c.source.rsplit("/", 1)[-1]) for t in tokens), c.source
