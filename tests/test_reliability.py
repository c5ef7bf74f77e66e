"""Hostile input, on every command (issue 16): nothing lost, nothing looping, nothing silently wrong.

Each test names the issue item it covers. Commands run in-process through typer's CliRunner where
that is enough (analyze takes ~40 ms on the small fixture) and as a subprocess where a signal, a
working directory or a second run is the point.
"""
from __future__ import annotations

import contextlib
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
from typer.testing import CliRunner

from fusion_advisor.cli import app

DATA = Path(__file__).parent / "data"
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
        r = run_cli("analyze", path, "--json", timeout_s=5)
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
    from fusion_advisor.result import AdvisorResult
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


def test_bench_without_a_gpu_exits_3_and_leaves_the_result(tmp_path):
    src = _gpu_result(tmp_path)
    before = src.read_bytes()
    r = run_cli("bench", src, timeout_s=120)
    assert r.exit_code == 3, r.output
    assert "bench needs a CUDA GPU" in r.output
    assert src.read_bytes() == before


def test_bench_cpu_writes_only_where_out_says(tmp_path):
    src = _gpu_result(tmp_path)
    before = src.read_bytes()
    r = run_cli("bench", src, "--cpu", "--providers", "eager,triton", timeout_s=300)
    assert r.exit_code == 0, r.output
    assert src.read_bytes() == before and "nothing written" in r.output
    r = run_cli("bench", src, "--cpu", "--providers", "eager,triton", "-o", tmp_path / "cpu.json", timeout_s=300)
    assert r.exit_code == 0, r.output
    assert src.read_bytes() == before and (tmp_path / "cpu.json").is_file()
