"""`fusion-advisor apply`: a diff by default, atomic writes with backups, revert, verify."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from fusion_advisor import apply as apply_mod
from fusion_advisor.core.result import AdvisorResult, Cluster, Recommendation
from measured import measured_win

ROOT = Path(__file__).resolve().parents[2]
TINY = ["--hidden", "32", "--layers", "1", "--heads", "2", "--seq", "8", "--vocab", "64", "--dtype", "float32",
        "--steps", "50"]


@pytest.fixture
def project(tmp_path):
    script = tmp_path / "llama_train.py"
    shutil.copy(ROOT / "examples" / "llama_train.py", script)
    cluster = Cluster(id="c1", direction="forward", pattern="rms_norm",
                      module_class="LlamaModel/LlamaDecoderLayer/LlamaRMSNorm", source="llama_train.py:22")
    rec = Recommendation(rank=1, cluster_id="c1", pattern="rms_norm", title="RMSNorm as one kernel",
                         measured_saving_us_per_step=100.0, estimate_saving_us_per_step=120.0, confidence="measured")
    result = AdvisorResult(run={"script": str(script), "argv": [str(script), *TINY], "cwd": str(tmp_path)},
                           clusters=[cluster], recommendations=[rec], benchmarks=[measured_win("c1", "rms_norm")])
    path = tmp_path / "result.json"
    result.save(path)
    return tmp_path, script, path


def cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "fusion_advisor.cli", *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=600)


def test_dry_run_prints_a_diff_and_writes_nothing(project):
    root, script, result = project
    before = script.read_text()
    r = cli("apply", result, cwd=root)
    assert r.returncode == 0, r.stderr
    assert "-        self.norm = LlamaRMSNorm(hidden)" in r.stdout
    assert "+        self.norm = FusedRMSNorm(hidden)" in r.stdout
    assert "+from fusion_advisor.kernels.rms_norm import RMSNorm as FusedRMSNorm" in r.stdout
    assert script.read_text() == before
    assert not (root / ".fusion-advisor").exists()


def test_write_then_revert_restores_the_file_exactly(project):
    root, script, result = project
    before = script.read_text()
    r = cli("apply", result, "--write", cwd=root)
    assert r.returncode == 0, r.stderr
    after = script.read_text()
    assert after != before and after.count("FusedRMSNorm(hidden)") == 3
    compile(after, str(script), "exec")  # still valid Python
    assert "backups in" in r.stderr
    r = cli("apply", result, "--revert", cwd=root)
    assert r.returncode == 0, r.stderr
    assert script.read_text() == before
    assert f"restored {script}" in r.stderr


def test_revert_without_backup_is_a_clear_error(project):
    root, _, result = project
    r = cli("apply", result, "--revert", cwd=root)
    assert r.returncode == 2 and "no backup to revert" in r.stderr


def test_a_failed_write_leaves_every_file_whole(project, monkeypatch):
    root, script, result = project
    before = script.read_text()
    plan = apply_mod.plan(AdvisorResult.load(result))

    def broken_replace(src, dst):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(Exception, match="No space left"):
        apply_mod.write(plan, root)
    assert script.read_text() == before
    assert [p.name for p in script.parent.iterdir() if p.name.endswith(".tmp")] == []


def test_apply_write_killed_midway_leaves_the_old_file_whole(project):
    """SIGKILL `fusion-advisor apply --write` while the new source is written (held inside fsync of
    the temporary file): the script is still its old self, byte for byte; a second --write works."""
    import signal
    import time
    root, script, result = project
    before = script.read_text()
    ready = root / "in-fsync"
    child = root / "slow_apply.py"
    child.write_text(
        "import os, pathlib, sys, time\n"
        "real = os.fsync\n"
        "def slow_fsync(fd):\n"
        "    real(fd)\n"
        f"    pathlib.Path({str(ready)!r}).write_text('x')\n"
        "    time.sleep(60)\n"
        "os.fsync = slow_fsync\n"
        "from fusion_advisor.cli import main\n"
        f"sys.argv = ['fusion-advisor', 'apply', {str(result)!r}, '--write']\n"
        "main()\n")
    proc = subprocess.Popen([sys.executable, str(child)], cwd=root, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while not ready.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        assert ready.exists(), "the write never reached fsync"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert script.read_text() == before
    r = cli("apply", result, "--write", cwd=root)
    assert r.returncode == 0, r.stderr
    assert script.read_text().count("FusedRMSNorm(hidden)") == 3


def test_a_file_changed_since_the_plan_is_not_overwritten(project):
    root, script, result = project
    plan = apply_mod.plan(AdvisorResult.load(result))
    script.write_text(script.read_text() + "\n# edited by the user\n")
    with pytest.raises(Exception, match="changed since the plan"):
        apply_mod.write(plan, root)
    assert script.read_text().endswith("# edited by the user\n")


def test_library_sources_become_runtime_patches(project):
    root, _, result = project
    data = json.loads(result.read_text())
    data["clusters"][0]["source"] = "transformers/models/llama/modeling_llama.py:62"
    result.write_text(json.dumps(data))
    plan = apply_mod.plan(AdvisorResult.load(result))
    assert plan.runtime_patterns == ["rms_norm"]
    assert "fusion_advisor.patch(model, result)" in plan.notes[0]


def test_verify_measures_the_patched_source(project):
    root, script, result = project
    r = cli("apply", result, "--verify", "--steps", "3", "--warmup", "1", "--json", cwd=root)
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    v = report["verification"]
    assert v["losses_match"] and len(v["after"]["losses"]) == len(v["before"]["losses"]) >= 4
    assert v["after"]["swapped"] == []  # the rewrite came through the source, not a runtime swap
    assert script.read_text().count("FusedRMSNorm") == 0  # --verify writes nothing


def test_real_hf_llama_result_applies_the_memory_trade_only_with_memory():
    """An H100 profile of examples/hf_train.py --model llama (docs/example-hf-h100): the LM head +
    loss trade was measured and ranked, and only `--memory` puts its runtime patch in the plan."""
    result = AdvisorResult.load(ROOT / "docs" / "example-hf-h100" / "result.json")
    trade = [r for r in result.recommendations if r.kind == "memory"]
    assert [r.pattern for r in trade] == ["linear_cross_entropy"] and trade[0].memory_saved_bytes > 2**30
    assert trade[0].measured_saving_us_per_step < 0            # slower: a trade, not a speed-up
    assert "linear_cross_entropy" not in apply_mod.plan(result).runtime_patterns
    assert apply_mod.plan(result, memory=True).runtime_patterns[-1] == "linear_cross_entropy"


def test_a_result_copied_with_its_checkout_patches_the_copy(project, tmp_path_factory):
    """The result records absolute paths; copied with the checkout elsewhere, apply reads them
    under the folder it runs in, and says so; without the script there it fails in one line."""
    root, script, result = project
    copy = tmp_path_factory.mktemp("elsewhere") / "checkout"
    shutil.copytree(root, copy)
    r = cli("apply", copy / "result.json", cwd=copy)
    assert r.returncode == 0, r.stderr
    assert f"+++ b/{script.name}" in r.stdout and "FusedRMSNorm(hidden)" in r.stdout
    assert f"recorded in {root}" in " ".join(r.stderr.split())
    r = cli("apply", copy / "result.json", "--write", cwd=copy)
    assert r.returncode == 0 and "FusedRMSNorm" in (copy / script.name).read_text()
    assert "FusedRMSNorm" not in script.read_text()          # the original checkout is untouched
    (copy / script.name).unlink()
    shutil.rmtree(root)
    r = cli("apply", copy / "result.json", "--verify", cwd=copy)
    assert r.returncode == 2 and "is not on this disk" in r.stderr.strip().splitlines()[-1]
