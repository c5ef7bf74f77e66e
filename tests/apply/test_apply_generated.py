"""The generic-fusion loop on examples/conv_pointwise.py's real (CPU) trace: analyze finds the
unnamed chain, reads its dataflow off the script, recommends a generated kernel; apply writes it to
fusion_kernels/ and calls it instead of the chain; --revert undoes both; --verify runs it."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fusion_advisor import apply as apply_mod
from fusion_advisor.analyzers.trace import Trace
from fusion_advisor.pipeline import analyze
from fusion_advisor.pipeline import rank
from fusion_advisor.core.result import AdvisorResult
from fusion_advisor.kernels.tolerances import tolerance
from generated_apply import kernels_importable, load

ROOT = Path(__file__).resolve().parents[2]
FIXTURE = ROOT / "tests" / "data" / "conv-pointwise-cpu.json.gz"
SMALL = ["--batch", "2", "--size", "8", "--channels", "16", "--steps", "4"]


@pytest.fixture(scope="module")
def analyzed(tmp_path_factory):
    """The fixture trace, analyzed as if recorded from a copy of the example in a fresh folder."""
    root = tmp_path_factory.mktemp("project")
    script = root / "conv_pointwise.py"
    shutil.copy(ROOT / "examples" / "conv_pointwise.py", script)
    trace = Trace.load(FIXTURE)
    trace.meta["fusion_advisor"] = dict(trace.run_info, script=str(script), cwd=str(root),
                                        argv=[str(script), *SMALL])
    result = rank(analyze(trace))
    return root, script, result


@pytest.fixture
def project(analyzed, tmp_path):
    root, script, result = analyzed
    shutil.copy(script, tmp_path / script.name)
    result = AdvisorResult.from_dict(json.loads(json.dumps(result.to_dict())))
    result.run = dict(result.run, script=str(tmp_path / script.name), cwd=str(tmp_path))
    for c in result.clusters:   # the call's path moves with the project
        call = (c.pattern_params.get("chain") or {}).get("call")
        if call:
            call["path"] = str(tmp_path / script.name)
    path = tmp_path / "result.json"
    result.save(path)
    return tmp_path, tmp_path / script.name, path


def test_the_unnamed_chain_gets_a_generated_kernel_both_ways(analyzed):
    _, _, result = analyzed
    generic = [c for c in result.clusters if (c.pattern or "").startswith("generic:")]
    assert {c.direction for c in generic} == {"forward", "backward"}
    assert len({c.pattern for c in generic}) == 1            # one kernel each way, shared
    fwd = next(c for c in generic if c.direction == "forward")
    assert [o["name"].split("::")[1] for o in fwd.pattern_params["chain"]["ops"]] == \
        ["add", "mul", "clamp", "mul", "sigmoid", "mul", "clamp_max"]
    assert fwd.pattern_params["chain"]["call"]["args"] == ["y", "bias"]
    assert fwd.estimate.bytes_fused < fwd.estimate.bytes_now
    rec = next(r for r in result.recommendations if r.pattern == fwd.pattern)
    assert rec.confidence == "estimate"                       # CPU trace: nothing timed
    assert rec.patch["kind"] == "generated" and "def fused(" in rec.patch["code"]


def test_apply_writes_the_kernel_and_calls_it(project):
    root, script, result = project
    before = script.read_text()
    plan = apply_mod.plan(AdvisorResult.load(result), include_estimates=True)  # a CPU trace: estimates only
    diff = plan.diff(str(root))
    stem = next(Path(f.path).stem for f in plan.changed if f.created and Path(f.path).stem.startswith("g_"))
    assert f"+    return fused_{stem}(y, bias, s0=scale, s1=1.702)" in diff
    assert f"+from fusion_kernels.{stem} import fused as fused_{stem}" in diff
    assert "-    y = y * torch.sigmoid(1.702 * y)      # quick-GELU" in diff
    assert "--- /dev/null" in diff and script.read_text() == before   # a dry run writes nothing
    backup = apply_mod.write(plan, root)
    assert (root / "fusion_kernels" / f"{stem}.py").is_file() and (root / "fusion_kernels" / "__init__.py").is_file()

    # The patched script's function computes what the original did, forward and backward.
    with kernels_importable(root):
        patched = load(script, "patched_conv")
        original = load(ROOT / "examples" / "conv_pointwise.py", "original_conv")
        torch.manual_seed(0)
        y = (3 * torch.randn(2, 16, 4, 5)).requires_grad_()
        bias = torch.randn(16, 1, 1, requires_grad=True)
        got, want = patched.pointwise_tail(y, bias, 1.5), original.pointwise_tail(y, bias, 1.5)
        torch.testing.assert_close(got, want, **tolerance(torch.float32))
        g = torch.randn_like(want)
        for a, b, rows in zip(torch.autograd.grad(got, (y, bias), g), torch.autograd.grad(want, (y, bias), g),
                              (1, 40)):
            torch.testing.assert_close(a, b, **tolerance(torch.float32, rows))

    apply_mod.revert(root, backup)
    assert script.read_text() == before
    assert not (root / "fusion_kernels").exists()


def test_verify_runs_the_generated_kernel_before_anything_is_written(project):
    root, script, result = project
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    r = subprocess.run([sys.executable, "-m", "fusion_advisor.cli", "apply", str(result), "--verify", "--steps", "2",
                        "--warmup", "1", "--include-estimates", "--json"], cwd=root, capture_output=True, text=True,
                       timeout=600, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    v = json.loads(r.stdout)["verification"]
    assert v["losses_match"] and len(v["after"]["losses"]) >= 3
    rows = {r["name"].split(":")[0]: r for r in v["replacements"]}   # each counted as it ran
    assert set(rows) == {"generic", "cross_entropy"}
    assert all(r["status"] == "ran" and r["calls_per_step"] >= 1 for r in rows.values()), rows
    assert not (root / "fusion_kernels").exists()            # served from memory, not written


def test_gpu_trace_backward_clusters_share_the_forward_kernel():
    """On the GPU the autograd engine splits the chain's backward in two clusters (the clamp masks
    and the bias's sum); both take the forward cluster's generated kernel, whose one backward
    replaces them, and bench times them with it (tests/data/README.md: recorded on an H200)."""
    trace = Trace.load(ROOT / "tests" / "data" / "conv-pointwise-bf16-h200.json.gz")
    trace.meta["fusion_advisor"] = dict(trace.run_info, script=str(ROOT / "examples" / "conv_pointwise.py"),
                                        cwd=str(ROOT))
    result = analyze(trace)
    generic = [c for c in result.clusters if (c.pattern or "").startswith("generic:")]
    fwd = [c for c in generic if c.direction == "forward"]
    bwd = [c for c in generic if c.direction == "backward"]
    assert len(fwd) == 1 and len(bwd) == 2 and {c.pattern for c in generic} == {fwd[0].pattern}
    assert fwd[0].pattern_params["inputs"][0]["dtype"] == "bfloat16"
    assert all(fwd[0].id in c.notes[0] for c in bwd)
    share = sum(c.estimate.bytes_fused for c in bwd)
    from fusion_advisor.kernels import resolve
    assert share == pytest.approx(resolve(fwd[0].pattern, fwd[0].pattern_params).fused_bytes(
        fwd[0].pattern_params)["backward"], abs=2)


def test_a_chain_edited_since_the_profile_is_not_rewritten(project):
    root, script, result = project
    text = script.read_text().replace("    y = y * scale\n", "    y = y * scale  # edited\n    y = y - 0.0\n")
    script.write_text(text)
    plan = apply_mod.plan(AdvisorResult.load(result), include_estimates=True)  # a CPU trace: estimates only
    assert not any("fusion_kernels" in f.path for f in plan.changed)       # no orphan kernel file
    assert any("no longer hold the traced chain" in n for n in plan.notes)
