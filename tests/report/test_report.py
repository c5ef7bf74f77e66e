"""The report: terminal, JSON and HTML renderers, the `report` command, and the HTML page in a real
headless Chromium. The data is tests/data/result-sample.json (a synthetic fixture: see its notes and
tests/data/make_result_sample.py)."""
from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fusion_advisor.cli import app
from fusion_advisor.report import charts, default_html_path, load_result, write_html
from fusion_advisor.report.facts import report_facts, waterfall
from fusion_advisor.report.html_report import render as render_html
from fusion_advisor.report.terminal import render as render_terminal
from fusion_advisor.core.result import AdvisorResult, Benchmark

HOSTILE = '<img src=x onerror="document.body.setAttribute(\'data-pwned\',\'1\')"></script><script>alert(1)</script>&amp;{{css}}'


# -- a tiny DOM from html.parser, enough to query the page ------------------------------------
class Node:
    def __init__(self, tag: str, attrs: dict, parent: "Node | None"):
        self.tag, self.attrs, self.parent, self.children, self.text = tag, attrs, parent, [], []

    def walk(self):
        yield self
        for c in self.children:
            yield from c.walk()

    def find_all(self, tag: str | None = None, **attrs) -> list["Node"]:
        return [n for n in self.walk() if (tag is None or n.tag == tag)
                and all(n.attrs.get(k.rstrip("_").replace("_", "-")) == v for k, v in attrs.items())]

    def classes(self) -> set[str]:
        return set((self.attrs.get("class") or "").split())

    def all_text(self) -> str:
        return "".join(t for n in self.walk() for t in n.text)


class _TreeBuilder(HTMLParser):
    VOID = {"meta", "br", "img", "input", "link", "hr", "area", "base", "col", "embed", "source", "wbr"}

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.root = self.current = Node("#document", {}, None)

    def handle_starttag(self, tag, attrs):
        node = Node(tag, dict(attrs), self.current)
        self.current.children.append(node)
        if tag not in self.VOID:
            self.current = node

    def handle_startendtag(self, tag, attrs):
        self.current.children.append(Node(tag, dict(attrs), self.current))

    def handle_endtag(self, tag):
        node = self.current
        while node is not None and node.tag != tag:
            node = node.parent
        if node is not None and node.parent is not None:
            self.current = node.parent

    def handle_data(self, data):
        self.current.text.append(data)


def parse(page: str) -> Node:
    b = _TreeBuilder()
    b.feed(page)
    b.close()
    return b.root


# -- fixtures --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sample_path() -> Path:
    return Path(__file__).parents[1] / "data" / "result-sample.json"


@pytest.fixture
def sample(sample_path) -> AdvisorResult:
    return load_result(sample_path)


@pytest.fixture
def hostile(sample) -> AdvisorResult:
    """The sample with markup in every kind of string the page shows."""
    r = copy.deepcopy(sample)
    r.run["script"] = f"/tmp/train{HOSTILE}.py"
    r.kernels[0]["name"] = f"kernel{HOSTILE}"
    r.timeline[0]["name"] = f"kernel{HOSTILE}"
    c = next(c for c in r.clusters if c.id == r.recommendations[0].cluster_id)
    c.kernels[0] = f"kernel{HOSTILE}"
    c.source = f"model.py:1{HOSTILE}"
    r.recommendations[0].title = f"Fuse{HOSTILE}"
    r.recommendations[0].patch["diff"] += f"+ x = '{HOSTILE}'\n"
    r.benchmarks[-1].reason = f"reason{HOSTILE}"
    r.notes.append(f"note{HOSTILE}")
    return r


def not_run_variant(sample: AdvisorResult) -> AdvisorResult:
    """What a CPU-only run gives: clusters and estimates, no benchmark, no measured saving."""
    r = copy.deepcopy(sample)
    r.benchmarks = [Benchmark(cluster_id=c.id, pattern=c.pattern or "generic", params={}, passes="forward+backward",
                              verdict="not run", reason="no CUDA GPU on this machine") for c in r.clusters]
    for rec in r.recommendations:
        rec.measured_saving_us_per_step = None
        rec.confidence = "estimate"
    return r


# -- the fixture itself ----------------------------------------------------------------------
def test_sample_is_labelled_synthetic_and_consistent(sample):
    assert any("SYNTHETIC TEST FIXTURE" in n and "Nothing here was benchmarked" in n for n in sample.notes)
    ids = {c.id for c in sample.clusters}
    assert {r.cluster_id for r in sample.recommendations} <= ids
    assert {b.cluster_id for b in sample.benchmarks} <= ids
    assert {t["cluster_id"] for t in sample.timeline} - {None} <= ids
    assert [r.rank for r in sample.recommendations] == [1, 2, 3]
    for rec in sample.recommendations:  # a measured saving only where a benchmark timed the cluster
        bench = next((b for b in sample.benchmarks if b.cluster_id == rec.cluster_id), None)
        assert (rec.measured_saving_us_per_step is not None) == bool(bench and bench.measured)


# -- terminal and JSON -----------------------------------------------------------------------
def test_terminal_ranks_and_labels_every_figure(sample):
    text = render_terminal(sample, width=160)
    ranked = text[text.index("Recommendations, ranked"):text.index("Potential saving")]
    rank_rows = [ln for ln in ranked.splitlines() if re.match(r"^\s{1,3}\d\s{2,}\S", ln)]
    assert [r.split()[0] for r in rank_rows] == ["1", "2", "3"]
    assert "Fuse RMSNorm" in rank_rows[0] and "(measured)" in rank_rows[0]
    assert "(estimate)" in rank_rows[1] and "—" in rank_rows[1]   # bench did not time #2: no measured figure
    for header in ("saving/step", "measured", "estimate"):
        assert header in text
    assert "Rejected replacements" in text and "failed numerics" in text and "not faster than eager" in text
    assert "launch-bound" in text and "CUDA graphs" in text
    assert "datasheet figures, not calibrated" in text
    assert "Not benchmarked" not in text
    assert text.index("Recommendations, ranked") < text.index("Rejected replacements")
    assert "GPU time per step by kernel" not in text   # behind --detail
    assert "GPU time per step by kernel" in render_terminal(sample, width=160, detail=True)
    assert text.rstrip().splitlines()[-1].strip() == "fusion-advisor apply fusion-report/result.json --write"


def test_terminal_says_when_bench_did_not_run(sample):
    text = render_terminal(not_run_variant(sample), width=160)
    assert "Not benchmarked: no CUDA GPU on this machine" in text
    assert "(measured)" not in text[text.index("Recommendations, ranked"):]


def test_terminal_keeps_markup_as_text(hostile):
    text = render_terminal(hostile, width=400)
    assert "[bold]" not in text and "<script>alert(1)</script>" in text


def test_json_report_round_trips(sample):
    assert AdvisorResult.from_dict(json.loads(sample.to_json())).to_dict() == sample.to_dict()


# -- charts and facts ------------------------------------------------------------------------
def test_roofline_points_lie_under_the_roofs(sample):
    facts = report_facts(sample)
    fig, caption = charts.roofline(sample, facts)
    bw = facts.device.bw_gbps
    peak = max(r.tflops for r in facts.device.roofs)
    points = [t for t in fig["data"] if t.get("mode") == "markers" and "measured" not in t["name"]
              and "estimate" not in t["name"]]
    assert {t["name"] for t in points} == {"memory-bound kernels", "compute-bound kernels"}
    for t in points:
        for x, y in zip(t["x"], t["y"]):
            # Real kernels may sit a little above the HBM roof when their inputs are still in L2
            # (seen: a pow at 5.1 TB/s on the H200 against the 4.32 TB/s datasheet profile).
            assert y <= min(1.25 * bw * x / 1e3, peak) * 1.0001
    assert fig["layout"]["xaxis"]["type"] == "log" and fig["layout"]["yaxis"]["type"] == "log"
    assert "not placed" in caption  # copies do no arithmetic: said, not hidden


def test_waterfall_adds_up_and_keeps_bases_apart(sample):
    facts = report_facts(sample)
    steps = waterfall(facts)
    assert [s["basis"] for s in steps] == ["measured", "estimate", "measured"]
    total = sum(s["saving_us"] for s in steps)
    assert steps[-1]["after_us"] == pytest.approx(facts.step_us - total)
    fig, _ = charts.savings_waterfall(facts)
    names = [t["name"] for t in fig["data"]]
    assert names == ["step time", "saving (measured)", "saving (estimate)"]
    fig, _ = charts.savings_waterfall(report_facts(not_run_variant(sample)))
    assert "saving (measured)" not in [t["name"] for t in fig["data"]]


# -- the HTML page -----------------------------------------------------------------------------
def test_html_is_one_offline_file_with_plotly_once(sample):
    page = render_html(sample)
    assert page.count("plotly.js v") == 1  # the bundle's banner
    doc = parse(page)
    scripts = doc.find_all("script")
    assert len(scripts) == 5 and all("src" not in s.attrs for s in scripts)
    assert not doc.find_all("link") and not doc.find_all("img") and not doc.find_all("iframe")
    for node in doc.walk():
        for attr in ("src", "href", "action", "data"):
            assert not str(node.attrs.get(attr, "")).startswith(("http:", "https:", "//"))
    # Outside plotly's own bundle (which names URLs it never loads for these charts), no URL at all.
    plotly = max(scripts, key=lambda s: len(s.all_text())).all_text()
    rest = page.replace(plotly, "")
    assert "http://" not in rest and "https://" not in rest and "@import" not in rest
    csp = doc.find_all("meta", http_equiv="Content-Security-Policy")[0].attrs["content"]
    assert "default-src 'none'" in csp
    embedded = json.loads(doc.find_all("script", id="fa-result")[0].all_text())
    assert embedded == json.loads(sample.to_json())


def test_html_sections(sample):
    doc = parse(render_html(sample))
    rows = doc.find_all("tr", class_="rec-row")
    assert [r.attrs["data-rank"] for r in rows] == ["1", "2", "3"]
    assert len(doc.find_all("tr", class_="rejected-row")) == 2
    assert {d.attrs["data-figure"] for d in doc.find_all("div") if "data-figure" in d.attrs} == {
        "waterfall", "roofline", "timeline"}
    assert len(doc.find_all("article", class_="rec")) == 3
    diff = doc.find_all("pre", class_="diff")[0]
    assert any("add" in n.classes() for n in diff.walk()) and any("del" in n.classes() for n in diff.walk())
    text = doc.all_text()
    assert "SYNTHETIC TEST FIXTURE" in text and "datasheet figures, not calibrated" in text
    assert "launch-bound" in text and not doc.find_all(id="not-run")


def test_html_says_nothing_was_measured_when_bench_did_not_run(sample):
    doc = parse(render_html(not_run_variant(sample)))
    notice = doc.find_all(id="not-run")[0].all_text()
    assert "Not benchmarked" in notice and "no CUDA GPU on this machine" in notice and "nothing was timed" in notice
    for row in doc.find_all("tr", class_="rec-row"):
        cells = [c for c in row.children if c.tag == "td"]
        assert cells[4].all_text() == "—"                 # the measured column
        assert "measured" not in {t.all_text() for t in row.find_all("span")}


def test_html_escapes_every_string(hostile):
    page = render_html(hostile)
    doc = parse(page)
    assert len(doc.find_all("script")) == 5 and not doc.find_all("img")
    assert "alert(1)</script>" not in page and "<img src=x" not in page
    text = doc.all_text()
    assert "Fuse<img src=x" in text and "model.py:1<img" in text and "note<img" in text
    assert "{{css}}" in text  # a placeholder-like string stays a string
    embedded = json.loads(doc.find_all("script", id="fa-result")[0].all_text())
    assert embedded["recommendations"][0]["title"] == f"Fuse{HOSTILE}"
    figures = json.loads(doc.find_all("script", id="fa-figures")[0].all_text())
    hover = json.dumps(figures)
    assert "kernel&lt;img src=x" in hover and "kernel<img" not in hover  # plotly reads tags in labels


def test_result_without_later_stages_still_renders(sample):
    bare = AdvisorResult(run=sample.run, summary=sample.summary, notes=[])
    doc = parse(render_html(bare))
    assert not [d for d in doc.find_all("div") if "data-figure" in d.attrs]
    assert doc.find_all(id="no-clusters") and "No recommendation" in doc.all_text()
    assert "Step time" in doc.all_text()


# -- the `report` command ----------------------------------------------------------------------
runner = CliRunner()


def test_report_command_writes_html_atomically(sample_path, tmp_path):
    src = tmp_path / "result.json"
    shutil.copy(sample_path, src)
    r = runner.invoke(app, ["report", str(src)])
    assert r.exit_code == 0, r.output
    assert f"wrote {tmp_path / 'report.html'}" in r.stderr
    assert "Recommendations, ranked" in r.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.html", "result.json"]  # no temporary left
    r = runner.invoke(app, ["report", str(src), "--html", str(tmp_path / "x" / "a.html"), "--json"])
    assert r.exit_code == 0 and json.loads(r.stdout)["schema_version"] == 1
    assert (tmp_path / "x" / "a.html").stat().st_size > 1_000_000
    r = runner.invoke(app, ["report", str(src), "--no-terminal"])
    assert r.exit_code == 0 and r.stdout == ""
    assert default_html_path(tmp_path / "runs" / "a.json") == tmp_path / "runs" / "a.html"


@pytest.mark.parametrize("content, message", [
    (None, "result not found"),
    ('{"schema_version": 1, "clusters": ', "is not valid JSON"),
    ('{"traceEvents": []}', "not an AdvisorResult"),
    ('{"schema_version": 1, "clusters": "none"}', "'clusters' should be a list"),
    ('{"schema_version": 1, "recommendations": [{"rank": 1}]}', "a Recommendation lacks cluster_id"),
    ('{"schema_version": 1, "recommendations": [7]}', "'recommendations[0]' is not a Recommendation"),
    ('{"schema_version": 1, "clusters": [{"id": [1], "direction": "forward"}]}', "cluster id in 'clusters'"),
    ('{"schema_version": 1, "summary": {"has_gpu": false, "top_cpu_ops": [1]}}', "not a well-formed AdvisorResult"),
])
def test_report_bad_input_is_one_line_exit_2(tmp_path, content, message):
    path = tmp_path / "r.json"
    if content is not None:
        path.write_text(content)
    r = runner.invoke(app, ["report", str(path)])
    assert r.exit_code == 2, r.output
    assert len(r.stderr.strip().splitlines()) == 1 and message in r.stderr
    assert not (tmp_path / "r.html").exists()


def test_report_unwritable_path_exits_4(sample_path, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("keep me")
    r = runner.invoke(app, ["report", str(sample_path), "--html", str(blocker / "report.html"), "--no-terminal"])
    assert r.exit_code == 4 and "cannot write" in r.stderr
    assert blocker.read_text() == "keep me"


# -- the page in a real browser ----------------------------------------------------------------
def chromium_binary() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


def dump_dom(page: Path, tmp_path: Path, budget_ms: int = 15000, extra: list[str] | None = None) -> str:
    """The DOM after the page's scripts ran, from headless Chromium. The flags keep it off the
    network (a closed network refuses its background connections) and out of the user's profile."""
    browser = chromium_binary()
    cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           "--disable-dev-shm-usage", f"--user-data-dir={tmp_path / 'chromium-profile'}",
           f"--virtual-time-budget={budget_ms}", *(extra or []), "--dump-dom", page.resolve().as_uri()]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "</html>" in r.stdout, f"chromium failed ({r.returncode}): {r.stderr[-2000:]}"
    return r.stdout


@pytest.mark.browser
def test_report_in_headless_chromium(hostile, tmp_path):
    if chromium_binary() is None:
        if os.environ.get("FUSION_ADVISOR_REQUIRE_BROWSER"):
            pytest.fail("FUSION_ADVISOR_REQUIRE_BROWSER is set and no chromium binary was found")
        pytest.skip("no chromium binary (apt-get install chromium)")
    page = tmp_path / "report.html"
    write_html(hostile, page)
    doc = parse(dump_dom(page, tmp_path))
    errors = doc.find_all("pre", id="fa-js-errors")[0].all_text()
    assert errors == "", f"the page logged errors:\n{errors}"
    body = doc.find_all("body")[0]
    assert "data-pwned" not in body.attrs
    assert body.attrs.get("data-charts-rendered") == "3"
    for chart in [d for d in doc.find_all("div") if "data-figure" in d.attrs]:
        assert chart.attrs.get("data-rendered") == "yes", chart.attrs
        assert [n for n in chart.walk() if "main-svg" in n.classes()], f"no plot in {chart.attrs['data-figure']}"
    rows = doc.find_all("tr", class_="rec-row")
    assert [r.attrs["data-rank"] for r in rows] == ["1", "2", "3"]
    assert "Fuse<img src=x" in rows[0].all_text()  # shown as text, not made an element
    assert not [n for n in body.walk() if n.tag == "img"]



# -- each recommendation's change, the CPU-only report, the report's options -------------------
EXAMPLE = Path(__file__).resolve().parents[2] / "docs" / "example-llama-h200" / "result.json"


@pytest.fixture
def example_here(tmp_path) -> tuple[AdvisorResult, Path]:
    """The committed Llama example, its run pointed at a copy of examples/llama_train.py here."""
    result = load_result(EXAMPLE)
    script = tmp_path / "llama_train.py"
    shutil.copy(EXAMPLE.parent.parent.parent / "examples" / "llama_train.py", script)
    result.run.update(script=str(script), cwd=str(tmp_path))
    for rec in result.recommendations:   # what apply plans now, not what was stored
        rec.patch.pop("diff", None)
    return result, tmp_path


def test_each_recommendation_carries_the_diff_apply_writes(example_here):
    from fusion_advisor import apply as apply_mod
    from fusion_advisor.report.changes import recommendation_changes
    result, folder = example_here
    changes = recommendation_changes(result, "runs/result.json")
    first = changes[1]
    assert first.applied_by_apply and "edits your source (llama_train.py)" in first.action
    assert "+from fusion_advisor.kernels.rms_norm import RMSNorm as FusedRMSNorm" in first.diff
    assert "--- a/llama_train.py" in first.diff    # relative to the run's folder
    assert "torch.compile measured faster" in first.by_hand
    # Each diff is exactly what `apply` writes for that recommendation alone.
    import dataclasses
    alone = dataclasses.replace(result, recommendations=[result.recommendations[1]])
    assert changes[2].diff == apply_mod.plan(alone, memory=True).diff(str(folder))
    doc = parse(render_html(result, "runs/result.json"))
    rec1 = doc.find_all("article", id="rec-1")[0]
    diff = rec1.find_all("pre", id="diff-1")[0]
    assert any("add" in n.classes() for n in diff.walk()) and "FusedRMSNorm" in diff.all_text()
    assert rec1.find_all("button", class_="copy")[0].attrs["data-copy"] == "diff-1"
    commands = doc.find_all("section", id="apply")[0].all_text()
    assert "fusion-advisor apply runs/result.json --verify" in commands
    assert "fusion-advisor apply runs/result.json --write" in commands
    text = render_terminal(result, width=80, diff=True, result_path="runs/result.json")
    assert "+from fusion_advisor.kernels.rms_norm import RMSNorm as FusedRMSNorm" in text
    assert text.rstrip().endswith("fusion-advisor apply runs/result.json --write")


def test_a_result_away_from_its_source_shows_the_stored_diff(example_here):
    from fusion_advisor.report.changes import fill_patch_diffs, recommendation_changes
    result, folder = example_here
    fill_patch_diffs(result)
    (folder / "llama_train.py").unlink()             # the result copied to another machine
    change = recommendation_changes(result)[1]
    assert "FusedRMSNorm" in change.diff and any("planned when the result was made" in n for n in change.notes)


def test_titles_name_the_code_and_tell_duplicates_apart():
    from fusion_advisor.recommend import RoiOptions, recommend
    result = load_result(EXAMPLE)
    recommend(result, RoiOptions())
    titles = [r.title for r in result.recommendations]
    assert len(set(titles)) == len(titles)
    assert not any("(no module)" in t for t in titles)
    assert "Fuse cross_entropy @ llama_train.py:145 (backward) with our cross_entropy Triton kernel" in titles
    # GPU busy 76 % of this H200 step: host time counts (AdvisorResult.host_counts), and by it
    # torch.compile's RMSNorm is faster still, ours is what apply puts in
    assert ("Fuse LlamaRMSNorm @ llama_train.py:22 with our rms_norm Triton kernel "
            "(torch.compile measured faster still)") in titles


def cpu_only_variant(sample: AdvisorResult) -> AdvisorResult:
    """A run without a GPU: a CPU step time, estimates for a target GPU, nothing benchmarked."""
    r = not_run_variant(sample)
    r.run["gpu_name"] = None
    r.summary["has_gpu"] = False
    r.benchmarks = [Benchmark(cluster_id=c.id, pattern=c.pattern or "generic", params={}, passes="forward",
                              verdict="not run", reason="no CUDA GPU") for c in r.clusters]
    return r


def test_cpu_only_report_compares_no_gpu_saving_with_the_cpu_step(sample):
    r = cpu_only_variant(sample)
    page = render_html(r)
    doc = parse(page)
    text = doc.all_text()
    assert "% of the step" not in text and "$ per month" not in text and "$/month" not in text
    assert "<strong>Not benchmarked: </strong>this machine has no CUDA GPU.</p>" in page
    assert "timed with its forward cluster" not in text
    assert not [d for d in doc.find_all("div") if d.attrs.get("data-figure") == "waterfall"]
    term = render_terminal(r, width=120)
    assert "$" not in term.split("Recommendations, ranked")[1].split("Next,")[0]
    assert "Not benchmarked: this machine has no CUDA GPU." in term


def test_report_options_diff_detail_quiet_open(sample_path, tmp_path, monkeypatch):
    import webbrowser
    src = tmp_path / "result.json"
    shutil.copy(sample_path, src)
    r = runner.invoke(app, ["report", str(src), "--diff", "--detail"])
    assert r.exit_code == 0, r.output
    assert "GPU time per step by kernel" in r.stdout and "+from fusion_advisor.kernels.rms_norm import" in r.stdout
    assert r.stdout.index("Recommendations, ranked") < r.stdout.index("GPU time per step by kernel")
    r = runner.invoke(app, ["report", str(src), "-q"])
    assert r.exit_code == 0 and r.stdout == "" and "wrote" in r.stderr

    def no_browser(*_):
        raise webbrowser.Error("none")
    monkeypatch.setattr(webbrowser, "get", no_browser)
    r = runner.invoke(app, ["report", str(src), "-q", "--open"])
    assert r.exit_code == 0 and "no web browser found here; open" in r.stderr


def test_kineto_lines_are_kept_off_stderr(tmp_path):
    import sys
    code = ("import os, sys\nfrom fusion_advisor.stderr_filter import without_kineto_lines\n"
            "with without_kineto_lines():\n"
            "    os.write(2, b'script line\\nUSDT:2026-12-06 13:19:19 1:1 SyncActivityProfilerHandler.cpp:52] profiler_start\\n')\n"
            "    os.write(2, b'progress 1/2\\r')\n"
            "    os.write(2, b'USDT:2026-12-06 13:19:20 1:1 SyncActivityProfilerHandler.cpp:59] profiler_st')\n"
            "    os.write(2, b'op\\nTraceback: kept\\n')\n"
            "    print('python stderr', file=sys.stderr)\n"
            "print('after', file=sys.stderr)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stderr == b"script line\nprogress 1/2\rTraceback: kept\npython stderr\nafter\n"


def test_runtime_lines_name_the_clusters_own_module_class():
    # A T5LayerNorm cluster is swapped by what it computes: its line names T5LayerNorm, not the
    # pattern's class-name hints (LlamaRMSNorm, Qwen2RMSNorm...), which a T5 model does not have.
    from types import SimpleNamespace
    from fusion_advisor.report.changes import _runtime_lines

    def lines(module_class):
        result = SimpleNamespace(clusters=[SimpleNamespace(id=3, module_class=module_class)])
        return _runtime_lines("rms_norm", result, SimpleNamespace(cluster_id=3))

    t5 = lines("T5Stack/T5Block/T5LayerNorm")
    assert len(t5) == 1 and t5[0].startswith("every T5LayerNorm of the model that computes the same -> ")
    assert "numerics check" in t5[0] and not any("LlamaRMSNorm" in line for line in t5)
    assert lines("LlamaModel/LlamaDecoderLayer/LlamaRMSNorm") == [
        line for line in lines("LlamaModel/LlamaDecoderLayer/LlamaRMSNorm") if line.startswith("every LlamaRMSNorm ")]
    assert len(lines("(no module)")) > 1   # no module known: the hints, each


def test_html_shows_the_now_an_estimate_starts_from(sample):
    """A cluster whose estimate starts from the trace's time says so beside that time; one priced by
    the roofline alone shows the roofline's."""
    traced = copy.deepcopy(sample)
    first = traced.clusters[0]
    first.estimate.now_traced_us = 1234.5
    text = parse(render_html(traced)).all_text()
    assert "1,234.5 µs (trace)" in text or "1.23 ms (trace)" in text
    assert "(trace)" not in parse(render_html(sample)).all_text()
