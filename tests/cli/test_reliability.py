"""Hostile input, on every command (issue 16): nothing lost, nothing looping, nothing silently wrong.

Each test names the issue item it covers. Commands run in-process through typer's CliRunner where
that is enough (analyze takes ~40 ms on the small fixture) and as a subprocess where a signal, a
working directory or a second run is the point.
"""
from __future__ import annotations

import copy
import gzip
import json
import math
import os
import random
import signal
import stat
import subprocess
import sys
import textwrap
import time
import tracemalloc
from pathlib import Path

import pytest
from measured import measured_win
from typer.testing import CliRunner

from fusion_advisor.cli import app
# What `analyze` imports, imported here so the time limits below time the work, not the imports.
from fusion_advisor import pipeline  # noqa: F401,E402
from fusion_advisor.report import terminal  # noqa: F401,E402

DATA = Path(__file__).parents[1] / "data"
SMALL_TRACE = DATA / "conv-pointwise-cpu.json.gz"   # 992 events, CPU-only: ~40 ms to analyse


def run_cli(*args, timeout_s: float = 10.0):
    """The command in this process, stopped by SIGALRM if it runs past `timeout_s`."""
    def on_alarm(signum, frame):
        raise TimeoutError(f"fusion-advisor {' '.join(map(str, args))} ran past {timeout_s} s")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, timeout_s)
    try:
        result = CliRunner().invoke(app, [str(a) for a in args])
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    if isinstance(result.exception, TimeoutError):
        raise result.exception
    return result


def cli_subprocess(*args, cwd=None, timeout=300, env=None):
    env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
    return subprocess.run([sys.executable, "-m", "fusion_advisor.cli", *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=timeout, env=env)


def load_events(path: Path = SMALL_TRACE) -> dict:
    return json.loads(gzip.open(path).read())


def write_trace(tmp_path: Path, doc: dict, name: str = "trace.json") -> Path:
    p = tmp_path / name
    p.write_text(json.dumps(doc))   # json.dumps writes NaN as NaN: what a corrupt trace holds
    return p


def strict_json(text: str):
    """json.loads that refuses NaN / Infinity, as every non-Python parser does."""
    def refuse(token):
        raise ValueError(f"not JSON: {token}")
    return json.loads(text, parse_constant=refuse)


# -- 1. a malformed python_function event must not loop ------------------------------------------

def test_python_frame_without_ids_does_not_loop(tmp_path):
    doc = load_events()
    frame = next(e for e in doc["traceEvents"] if e.get("cat") == "python_function")
    del frame["args"]   # "Python id" and parent both read as -1: the frame is its own parent
    path = write_trace(tmp_path, doc)
    tracemalloc.start()
    try:
        r = run_cli("analyze", path, "--json", timeout_s=10)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert r.exit_code == 0, r.output
    assert peak < 300 * 2**20, f"analyze peaked at {peak / 2**20:.0f} MiB"
    result = strict_json(r.stdout)
    assert any("their own ancestor" in n for n in result["notes"]), result["notes"]


def test_python_frame_cycle_of_two_is_cut(tmp_path):
    doc = load_events()
    frames = [e for e in doc["traceEvents"] if e.get("cat") == "python_function" and e.get("args")]
    a, b = frames[10], frames[11]
    a["args"]["Python parent id"] = b["args"]["Python id"]
    b["args"]["Python parent id"] = a["args"]["Python id"]
    r = run_cli("analyze", write_trace(tmp_path, doc), "--json", timeout_s=5)
    assert r.exit_code == 0, r.output
    strict_json(r.stdout)


# -- 9. corrupt durations: dropped with a counted note, or exit 2; --json is strict JSON ----------

def _corrupt_ops(doc: dict, n: int, how) -> None:
    ops = [e for e in doc["traceEvents"] if e.get("cat") == "cpu_op"]
    for e in ops[5:5 + n]:
        how(e)


@pytest.mark.parametrize("how", [
    lambda e: e.update(dur=float("nan")),
    lambda e: e.update(dur=-250.0),
    lambda e: e.pop("dur"),
    lambda e: e.pop("ts"),
    lambda e: e.update(ts=float("inf")),
], ids=["nan-dur", "negative-dur", "missing-dur", "missing-ts", "inf-ts"])
def test_a_few_corrupt_spans_are_dropped_and_counted(tmp_path, how):
    doc = load_events()
    _corrupt_ops(doc, 3, how)
    r = run_cli("analyze", write_trace(tmp_path, doc), "--json")
    assert r.exit_code == 0, r.output
    result = strict_json(r.stdout)
    assert any(n.startswith("dropped 3 events with a missing, NaN, negative or huge ts/dur (3 cpu_op)")
               for n in result["notes"]), result["notes"]
    busy = result["summary"]
    assert all(not (isinstance(v, float) and (math.isnan(v) or v < 0)) for v in busy.values() if
               isinstance(v, (int, float)))


def test_a_mostly_corrupt_trace_is_bad_input(tmp_path):
    doc = load_events()
    _corrupt_ops(doc, 200, lambda e: e.update(dur=float("nan")))
    r = run_cli("analyze", write_trace(tmp_path, doc), "--json")
    assert r.exit_code == 2
    assert "have a missing, NaN, negative or huge ts/dur" in r.output


def test_json_output_never_holds_bare_nan():
    from fusion_advisor.core.result import AdvisorResult
    result = AdvisorResult(summary={"gpu_busy": float("nan"), "x": [float("inf"), 1.5]})
    data = strict_json(result.to_json())
    assert data["summary"] == {"gpu_busy": None, "x": [None, 1.5]}


# -- the property test: random damage to a small real trace --------------------------------------

_NUMBERS = [float("nan"), float("inf"), -float("inf"), -1.0, -1e30, 1e300, 2**63, 0, "12", None, True, [1], {}]
_FIELDS = ["ts", "dur", "name", "tid", "pid", "cat", "ph", "args"]
_ARG_FIELDS = ["Python id", "Python parent id", "External id", "correlation", "Sequence number",
               "Input Dims", "Input type", "Python module id"]


def _damage(doc: dict, rng: random.Random) -> dict:
    doc = copy.deepcopy(doc)
    events = doc["traceEvents"]
    for _ in range(rng.randint(1, 12)):
        e = rng.choice(events)
        if not isinstance(e, dict):
            continue
        action = rng.randrange(5)
        args = e.get("args") if isinstance(e.get("args"), dict) else None
        if action == 0:
            e.pop(rng.choice(_FIELDS), None)
        elif action == 1:
            e[rng.choice(["ts", "dur", "tid", "pid"])] = rng.choice(_NUMBERS)
        elif action == 2 and args:
            args.pop(rng.choice(_ARG_FIELDS), None)
        elif action == 3 and args:
            args[rng.choice(_ARG_FIELDS)] = rng.choice(_NUMBERS)
        elif action == 4 and args and "Python id" in args:   # a frame that is its own parent
            args["Python parent id"] = args["Python id"]
    return doc


def test_random_damage_ends_quickly_with_a_clear_outcome(tmp_path):
    base = load_events()
    rng = random.Random(16)
    started = time.monotonic()
    for case in range(30):
        path = write_trace(tmp_path, _damage(base, rng), f"case{case}.json")
        r = run_cli("analyze", path, "--json", timeout_s=5)
        assert r.exit_code in (0, 2), f"case {case}: exit {r.exit_code}\n{r.output}\n{r.exception!r}"
        if r.exit_code == 0:
            strict_json(r.stdout)
        else:
            assert r.output.strip().count("\n") == 0, f"case {case}: not one line:\n{r.output}"
    assert time.monotonic() - started < 30


# -- 2. bench without a GPU leaves a GPU result as it was ------------------------------------------

def _gpu_result(tmp_path: Path) -> Path:
    src = tmp_path / "result.json"
    src.write_bytes((DATA / "result-sample.json").read_bytes())
    assert any(b.get("measured") for b in json.loads(src.read_text())["benchmarks"])
    return src


def _has_cuda() -> bool:
    import torch
    return torch.cuda.is_available()


no_gpu_here = pytest.mark.skipif(_has_cuda(), reason="what bench does on a machine without a GPU")


@no_gpu_here
def test_bench_without_a_gpu_exits_3_and_leaves_the_result(tmp_path):
    src = _gpu_result(tmp_path)
    before = src.read_bytes()
    r = run_cli("bench", src, timeout_s=120)
    assert r.exit_code == 3, r.output
    assert "bench needs a CUDA GPU" in r.output
    assert src.read_bytes() == before


@no_gpu_here
def test_bench_cpu_writes_only_where_out_says(tmp_path):
    src = _gpu_result(tmp_path)
    before = src.read_bytes()
    r = run_cli("bench", src, "--cpu", "--providers", "eager,triton", timeout_s=300)
    assert r.exit_code == 0, r.output
    assert src.read_bytes() == before and "nothing written" in r.output
    r = run_cli("bench", src, "--cpu", "--providers", "eager,triton", "-o", tmp_path / "cpu.json", timeout_s=300)
    assert r.exit_code == 0, r.output
    assert src.read_bytes() == before and (tmp_path / "cpu.json").is_file()


# -- apply: 3 (revert keeps later edits), 4 (second --write), 5 (stale lines), 6 (read-only) ------

ROOT = Path(__file__).resolve().parents[2]


def _rec(rank, cluster_id, pattern):
    from fusion_advisor.core.result import Recommendation
    return Recommendation(rank=rank, cluster_id=cluster_id, pattern=pattern, title=f"{pattern} as one kernel",
                          measured_saving_us_per_step=100.0 / rank, estimate_saving_us_per_step=120.0,
                          confidence="measured")


@pytest.fixture
def project(tmp_path, monkeypatch):
    """llama_train.py with three recommendations: a class swap (rms_norm), an expression rewrite
    in LlamaMLP.forward (swiglu, def line 84) and one whose output matches its own template
    (cross_entropy: `cross_entropy(...)` is what `F.cross_entropy` also matches)."""
    from fusion_advisor.core.result import AdvisorResult, Cluster
    script = tmp_path / "llama_train.py"
    script.write_text((ROOT / "examples" / "llama_train.py").read_text())
    clusters = [Cluster(id="c1", direction="forward", pattern="rms_norm", source="llama_train.py:22",
                        module_class="LlamaModel/LlamaDecoderLayer/LlamaRMSNorm"),
                Cluster(id="c2", direction="forward", pattern="swiglu", source="llama_train.py:84",
                        module_class="LlamaModel/LlamaDecoderLayer/LlamaMLP"),
                Cluster(id="c3", direction="forward", pattern="cross_entropy", source="llama_train.py:119")]
    recs = [_rec(1, "c1", "rms_norm"), _rec(2, "c2", "swiglu"), _rec(3, "c3", "cross_entropy")]
    result = AdvisorResult(run={"script": str(script), "argv": [str(script)], "cwd": str(tmp_path)},
                           clusters=clusters, recommendations=recs,
                           benchmarks=[measured_win(c.id, c.pattern) for c in clusters])
    path = tmp_path / "result.json"
    result.save(path)
    monkeypatch.chdir(tmp_path)
    return tmp_path, script, path


def test_revert_refuses_to_lose_edits_made_after_write(project):
    root, script, result = project
    original = script.read_text()
    assert run_cli("apply", result, "--write", timeout_s=120).exit_code == 0
    edited = script.read_text() + "\n# my own change, made after --write\n"
    script.write_text(edited)
    r = run_cli("apply", result, "--revert")
    assert r.exit_code == 2, r.output
    assert "+# my own change, made after --write" in r.stdout         # the diff of the user's edits
    assert "changed since `apply --write`" in r.output
    assert script.read_text() == edited                               # nothing reverted
    assert list((root / ".fusion-advisor" / "backups").glob("*/manifest.json"))   # the backup stays
    r = run_cli("apply", result, "--revert", "--force")
    assert r.exit_code == 0, r.output
    assert script.read_text() == original
    kept = list((root / ".fusion-advisor" / "backups").glob("*/edited-*"))
    assert len(kept) == 1 and kept[0].read_text() == edited           # the only copy of the edit survives
    assert run_cli("apply", result, "--revert").exit_code == 2        # and is not a backup to revert


def test_a_second_write_changes_nothing_and_revert_still_restores(project):
    root, script, result = project
    original = script.read_text()
    assert run_cli("apply", result, "--write", timeout_s=120).exit_code == 0
    patched = script.read_text()
    assert "cross_entropy(logits.float()" in patched and "F.cross_entropy" not in patched
    r = run_cli("apply", result, "--write")
    assert r.exit_code == 0, r.output
    assert "nothing to write" in r.output and script.read_text() == patched
    assert len(list((root / ".fusion-advisor" / "backups").glob("*/manifest.json"))) == 1
    assert run_cli("apply", result, "--revert").exit_code == 0
    assert script.read_text() == original


def test_rewrite_tied_to_a_line_is_found_by_content_after_an_edit(project):
    from fusion_advisor import apply as apply_mod
    from fusion_advisor.core.result import AdvisorResult
    root, script, result = project
    script.write_text("# three lines added\n# above everything\n# since the profile\n" + script.read_text())
    plan = apply_mod.plan(AdvisorResult.load(result))
    after = plan.changed[0].after
    assert "swiglu(self.gate_proj(x), self.up_proj(x))" in after
    assert any("found by its content in the function at line 87" in n for n in plan.notes), plan.notes


def test_stale_rewrite_with_two_candidates_is_refused_with_a_note(project):
    from fusion_advisor import apply as apply_mod
    from fusion_advisor.core.result import AdvisorResult
    root, script, result = project
    text = script.read_text().replace(
        "class LlamaDecoderLayer(nn.Module):",
        "def other_mlp(g, u):\n    return F.silu(g) * u\n\n\nclass LlamaDecoderLayer(nn.Module):")
    script.write_text("# added\n" + text)
    plan = apply_mod.plan(AdvisorResult.load(result))
    assert "swiglu(" not in plan.changed[0].after
    assert any("appears in 2 functions; not rewritten" in n for n in plan.notes), plan.notes


def test_write_refuses_a_read_only_file(project):
    root, script, result = project
    before = script.read_text()
    script.chmod(0o444)
    try:
        r = run_cli("apply", result, "--write", timeout_s=120)
        assert r.exit_code == 4, r.output
        assert "read-only" in r.output
        assert script.read_text() == before and stat.S_IMODE(script.stat().st_mode) == 0o444
        assert not list((root / ".fusion-advisor" / "backups").glob("*/manifest.json")) if \
            (root / ".fusion-advisor" / "backups").exists() else True
    finally:
        script.chmod(0o644)


def test_write_cleans_what_a_killed_write_left(project):
    root, script, result = project
    leftover = root / ".llama_train.pyk3x9_q2z.tmp"
    leftover.write_text("half a file")
    r = run_cli("apply", result)
    assert r.exit_code == 0 and "temporary file(s) of an interrupted write" in r.output and leftover.exists()
    r = run_cli("apply", result, "--write", timeout_s=120)
    assert r.exit_code == 0, r.output
    assert not leftover.exists() and f"removed {leftover}" in r.output


def test_write_takes_a_lock(project):
    from fusion_advisor import apply as apply_mod
    from fusion_advisor.core.errors import OutputError
    from fusion_advisor.core.result import AdvisorResult
    root, script, result = project
    before = script.read_text()
    plan = apply_mod.plan(AdvisorResult.load(result))
    with apply_mod.apply_lock(root):
        with pytest.raises(OutputError, match="another .* is running"):
            apply_mod.write(plan, root)
    assert script.read_text() == before
    apply_mod.write(plan, root)   # free again once released
    assert script.read_text() != before


# -- profile: 8 (chdir), 11 (exit before any step), 12 (SIGTERM), 13 (one run per folder) -------

TRAIN = """
import os, pathlib, sys
import torch
model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 1))
opt = torch.optim.SGD(model.parameters(), lr=0.1)
{before}
for i in range({n}):
    loss = model(torch.randn(8, 16)).pow(2).mean()
    loss.backward()
    opt.step()
    opt.zero_grad()
    {each}
"""


def train_script(tmp_path: Path, n: int = 12, before: str = "", each: str = "", name: str = "train.py") -> Path:
    p = tmp_path / name
    p.write_text(TRAIN.format(n=n, before=textwrap.indent(textwrap.dedent(before), ""), each=each))
    return p


def test_a_script_that_changes_directory_does_not_move_the_outputs(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    s = train_script(tmp_path, before=f"os.chdir({str(elsewhere)!r})")
    r = cli_subprocess("profile", s.name, "--warmup", "1", "--steps", "1", "--no-bench", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    out = tmp_path / "fusion-report"
    assert {p.name for p in out.iterdir()} >= {"trace.json.gz", "run.json", "result.json", "report.html"}
    assert not list(elsewhere.iterdir())
    assert json.loads((out / "run.json").read_text())["cwd"] == str(tmp_path)
    assert "wrote fusion-report/result.json" in r.stderr


def test_a_script_that_prints_its_help_runs_once_and_exits_0(tmp_path):
    s = tmp_path / "train.py"
    s.write_text(textwrap.dedent(f"""
        import argparse, pathlib
        with open({str(tmp_path / 'runs.log')!r}, "a") as fh:
            fh.write("ran\\n")
        p = argparse.ArgumentParser(description="trains a thing")
        p.add_argument("--lr", type=float, default=0.1)
        p.parse_args()
        raise SystemExit("should not get here")
    """))
    r = cli_subprocess("profile", s, "-o", tmp_path / "o", "--", "-h")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "runs.log").read_text() == "ran\n"
    assert r.stdout.count("trains a thing") == 1
    assert "the script exited (status 0) before any step" in r.stderr


def test_a_script_that_exits_early_runs_once(tmp_path):
    s = tmp_path / "train.py"
    s.write_text(f"import sys\nopen({str(tmp_path / 'runs.log')!r}, 'a').write('ran\\n')\nsys.exit(0)\n")
    r = cli_subprocess("profile", s, "-o", tmp_path / "o")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "runs.log").read_text() == "ran\n"
    assert "the script exited (status 0) before any step" in r.stderr
    assert json.loads((tmp_path / "o" / "run.json").read_text())["script_exit_status"] == 0


def test_sigterm_keeps_the_recorded_steps_and_cleans_up(tmp_path):
    temp = tmp_path / "temp"
    temp.mkdir()
    marker = tmp_path / "recording"
    s = train_script(tmp_path, n=100_000, each=f"if i == 4: pathlib.Path({str(marker)!r}).write_text('x')")
    env = dict(os.environ, PYTHONUNBUFFERED="1", TMPDIR=str(temp))
    proc = subprocess.Popen([sys.executable, "-m", "fusion_advisor.cli", "profile", str(s), "-o", str(tmp_path / "o"),
                             "--warmup", "1", "--steps", "100000", "--no-bench"],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while not marker.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        assert marker.exists(), "the script never reached step 4"
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 1, stderr
    assert "terminated (SIGTERM)" in stderr and "the steps recorded before it are kept" in stderr
    meta = json.loads((tmp_path / "o" / "run.json").read_text())
    assert len(meta["steps_recorded"]) >= 3
    assert (tmp_path / "o" / "trace.json.gz").is_file() and (tmp_path / "o" / "result.json").is_file()
    assert not [p for p in temp.iterdir() if p.name.startswith("fusion-advisor-")]


def test_a_sigterm_inside_the_profilers_step_waits_for_the_step_to_finish(tmp_path, monkeypatch):
    """CI saw a SIGTERM land inside torch.profiler's step(): stop() then failed, no trace was
    written and the process died with status -11. The signal is now held until the step is done."""
    import torch
    from fusion_advisor.capture import CaptureOptions, capture
    calls = []
    original = torch.profiler.profile.step

    def step_with_a_signal_inside(self):
        calls.append("step")
        if calls.count("step") == 4:
            os.kill(os.getpid(), signal.SIGTERM)   # delivered at the next bytecode: inside the step
        original(self)
        calls.append("returned")

    monkeypatch.setattr(torch.profiler.profile, "step", step_with_a_signal_inside)
    s = train_script(tmp_path, n=1000)
    result = capture(CaptureOptions(str(s), warmup=1, steps=100, out_dir=str(tmp_path / "o"), cuda=False),
                     notice=lambda _: None)
    assert result.error == "terminated (SIGTERM)"
    assert calls[-2:] == ["step", "returned"] and calls.count("step") == 4
    assert result.trace_path and Path(result.trace_path).is_file()
    assert result.meta["steps_recorded"] == [1, 2, 3]


def test_a_failed_profile_does_not_sit_beside_an_older_run(tmp_path):
    out = tmp_path / "o"
    good = train_script(tmp_path, n=6)
    assert cli_subprocess("profile", good, "-o", out, "--warmup", "1", "--steps", "1", "--no-bench").returncode == 0
    bad = tmp_path / "bad.py"
    bad.write_text("raise RuntimeError('broken before any step')\n")
    r = cli_subprocess("profile", bad, "-o", out)
    assert r.returncode == 1
    assert {p.name for p in out.iterdir() if p.is_file()} == {"run.json"}
    assert {p.name for p in (out / "previous").iterdir()} == {"trace.json.gz", "run.json", "result.json", "report.html"}
    assert json.loads((out / "run.json").read_text())["script"] == str(bad)


def test_a_mistyped_option_before_the_separator_is_pointed_out(tmp_path):
    s = tmp_path / "train.py"
    s.write_text("import sys\nprint('args', sys.argv[1:])\nsys.exit(0)\n")
    r = cli_subprocess("profile", s, "-o", tmp_path / "o", "--step", "5")
    assert "--step is not a fusion-advisor option (did you mean --steps?)" in r.stderr
    r = cli_subprocess("profile", s, "-o", tmp_path / "o", "--", "--step", "5")
    assert "not a fusion-advisor option" not in r.stderr


# -- patch(): 10 (a dict result) and 13 (a second patch, reverts in any order) -------------------

@pytest.fixture
def llama_model():
    import importlib.util

    import torch
    spec = importlib.util.spec_from_file_location("llama_train", ROOT / "examples" / "llama_train.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    torch.manual_seed(0)
    return mod.LlamaModel(vocab=64, hidden=32, layers=1, heads=2, intermediate=64)


def test_patch_takes_the_result_json_as_a_dict(llama_model, project):
    import fusion_advisor
    root, script, result = project
    with open(result) as fh:
        handle = fusion_advisor.patch(llama_model, json.load(fh))
    try:
        assert len(handle.swaps) >= 3 and {s.pattern for s in handle.swaps} >= {"rms_norm"}
    finally:
        handle.revert()
    with pytest.raises(TypeError, match="result must be an AdvisorResult"):
        fusion_advisor.patch(llama_model, [1, 2])


def test_a_second_patch_wraps_nothing_and_reverts_in_any_order(llama_model):
    import fusion_advisor
    originals = dict(llama_model.named_modules())
    first = fusion_advisor.patch(llama_model, patterns=["rms_norm"])
    second = fusion_advisor.patch(llama_model, patterns=["rms_norm"])
    assert len(first.swaps) == 3 and second.swaps == []
    assert all("already fused" in why for _, why in second.skipped)
    first.revert()
    second.revert()
    assert dict(llama_model.named_modules()) == originals


# -- 13. raw ANSI escapes in a result never reach the terminal -----------------------------------

def test_control_sequences_in_a_result_are_stripped_before_the_terminal(tmp_path):
    data = json.loads((DATA / "result-sample.json").read_text())
    hostile = "\x1b]0;pwned\x07\x1b[2J\x1b[31mRED\x1b[0m\x07"
    data["notes"].append(f"note {hostile} end")
    data["recommendations"][0]["title"] = f"title {hostile}"
    src = tmp_path / "result.json"
    src.write_text(json.dumps(data))
    for args in (["report", src, "--html", tmp_path / "r.html"], ["recommend", src, "-o", tmp_path / "r2.json"]):
        r = run_cli(*args, timeout_s=120)
        assert r.exit_code == 0, r.output
        assert "\x1b" not in r.output and "\x07" not in r.output
        assert "RED" in r.output or args[0] == "recommend"   # recommend writes its own titles
    assert json.loads(src.read_text())["notes"][-1] == f"note {hostile} end"   # the data itself is kept


# -- 13. the atomic writer: folder fsynced, umask untouched; schema_version checked ---------------

def test_atomic_writer_fsyncs_the_folder_and_leaves_the_umask(tmp_path, monkeypatch):
    from fusion_advisor.core import files
    synced = []
    real_fsync = os.fsync

    def recording_fsync(fd):
        synced.append(stat.S_ISDIR(os.fstat(fd).st_mode))
        real_fsync(fd)

    def no_umask(*args):
        raise AssertionError("os.umask changes the whole process's umask (other threads create files too)")

    monkeypatch.setattr(os, "fsync", recording_fsync)
    monkeypatch.setattr(os, "umask", no_umask)
    files.write_text_atomic(tmp_path / "new.txt", "hello")
    assert (tmp_path / "new.txt").read_text() == "hello"
    assert synced == [False, True]   # the file's data, then the folder's entry for the rename
    assert [p.name for p in tmp_path.iterdir()] == ["new.txt"]


def test_new_files_get_what_open_would_give(tmp_path):
    from fusion_advisor.core import files
    files.write_text_atomic(tmp_path / "a.txt", "x")
    (tmp_path / "b.txt").write_text("x")
    assert stat.S_IMODE((tmp_path / "a.txt").stat().st_mode) == stat.S_IMODE((tmp_path / "b.txt").stat().st_mode)


@pytest.mark.parametrize("version", [0, -7, True, 1.0, "1"])
def test_a_result_with_a_nonsense_schema_version_is_refused(tmp_path, version):
    data = json.loads((DATA / "result-sample.json").read_text())
    data["schema_version"] = version
    src = tmp_path / "result.json"
    src.write_text(json.dumps(data))
    r = run_cli("report", src, "--no-terminal")
    assert r.exit_code == 2 and "schema_version" in r.output
    assert not (tmp_path / "report.html").exists()
