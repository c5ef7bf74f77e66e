"""`apply --verify` cannot lie (issue 15): every planned replacement is counted in the patched run,
however the script loads its model file, and a patch that never ran fails the verification; only
measured wins are applied; the step time is the steady one, not the warm-up's."""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from fusion_advisor import apply as apply_mod
from fusion_advisor.core.errors import AdvisorError
from fusion_advisor.core.result import AdvisorResult, Benchmark, Cluster, Recommendation
from measured import measured_win

MODEL = textwrap.dedent('''\
    import torch
    from torch import nn


    class LlamaRMSNorm(nn.Module):
        def __init__(self, hidden, eps=1e-6):
            super().__init__()
            self.weight = nn.Parameter(torch.ones(hidden))
            self.variance_epsilon = eps

        def forward(self, x):
            input_dtype = x.dtype
            h = x.to(torch.float32)
            variance = h.pow(2).mean(-1, keepdim=True)
            h = h * torch.rsqrt(variance + self.variance_epsilon)
            return self.weight * h.to(input_dtype)


    class Net(nn.Module):
        def __init__(self, hidden=16):
            super().__init__()
            self.inp = nn.Linear(hidden, hidden)
            self.norm = LlamaRMSNorm(hidden)
            self.out = nn.Linear(hidden, 1)

        def forward(self, x):
            return self.out(self.norm(self.inp(x)))
    ''')

LOADERS = {
    "import": "from model import Net",
    "spec_from_file_location": textwrap.dedent('''\
        import importlib.util
        spec = importlib.util.spec_from_file_location("model", os.path.join(HERE, "model.py"))
        model_module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(model_module)
        Net = model_module.Net'''),
    "runpy.run_path": "import runpy\nNet = runpy.run_path(os.path.join(HERE, 'model.py'))['Net']",
    "exec(compile(open(...)))": textwrap.dedent('''\
        path = os.path.join(HERE, "model.py")
        namespace = {}
        exec(compile(open(path).read(), path, "exec"), namespace)
        Net = namespace["Net"]'''),
    # os.read reaches no hook the verification can set: the call counts must catch it
    "os.read": textwrap.dedent('''\
        path = os.path.join(HERE, "model.py")
        fd = os.open(path, os.O_RDONLY)
        namespace = {}
        exec(compile(os.read(fd, 1 << 20).decode(), path, "exec"), namespace)
        Net = namespace["Net"]'''),
}

TRAIN = textwrap.dedent('''\
    import os
    import torch
    HERE = os.path.dirname(os.path.abspath(__file__))
    {loader}

    torch.manual_seed(0)
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for step in range(40):
        loss = model(torch.randn(4, 16)).pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
    ''')


def _project(tmp_path: Path, loader: str, rec_source: str = "model.py:12", pattern: str = "rms_norm",
             bench: Benchmark | None = None) -> Path:
    (tmp_path / "model.py").write_text(MODEL)
    script = tmp_path / "train.py"
    script.write_text(TRAIN.format(loader=LOADERS[loader]))
    cluster = Cluster(id="c1", direction="forward", pattern=pattern, module_class="Net/LlamaRMSNorm", source=rec_source)
    rec = Recommendation(rank=1, cluster_id="c1", pattern=pattern, title=f"{pattern} as one kernel",
                         measured_saving_us_per_step=10.0, estimate_saving_us_per_step=12.0, confidence="measured")
    result = AdvisorResult(run={"script": str(script), "argv": [str(script)], "cwd": str(tmp_path)},
                           clusters=[cluster], recommendations=[rec],
                           benchmarks=[bench if bench is not None else measured_win("c1", pattern)])
    result.save(tmp_path / "result.json")
    return tmp_path / "result.json"


def _apply(result: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    return subprocess.run([sys.executable, "-m", "fusion_advisor.cli", "apply", str(result), *args],
                          cwd=result.parent, capture_output=True, text=True, timeout=600, env=env)


@pytest.mark.parametrize("loader", ["import", "spec_from_file_location", "runpy.run_path", "exec(compile(open(...)))"])
def test_verify_patches_a_model_file_however_it_is_loaded(tmp_path, loader):
    result = _project(tmp_path, loader)
    r = _apply(result, "--verify", "--steps", "3", "--warmup", "1", "--json")
    assert r.returncode == 0, r.stderr[-2000:]
    v = json.loads(r.stdout)["verification"]
    [row] = v["replacements"]
    assert row["name"] == "rms_norm" and row["how"] == "source: model.py"
    assert row["status"] == "ran" and row["calls_per_step"] == pytest.approx(1.0)   # one norm, one call a step
    assert v["proven"] and v["losses_match"]
    assert v["before"]["calls"] == {}                                                 # the unpatched run ran none
    assert (tmp_path / "model.py").read_text() == MODEL                               # nothing written


def test_a_model_file_the_verification_cannot_reach_fails_with_the_reason(tmp_path):
    result = _project(tmp_path, "os.read")
    r = _apply(result, "--verify", "--steps", "2", "--warmup", "1")
    assert r.returncode == 5, r.stderr[-2000:]
    last = r.stderr.strip().splitlines()[-1]
    assert "not verified: rms_norm (source: model.py) never ran" in last and "never read the patched model.py" in last
    assert "losses match" not in r.stdout


def test_a_runtime_swap_that_finds_nothing_fails_instead_of_matching(tmp_path):
    """rope patches HF's apply_rotary_pos_emb; this model has none: zero swaps must not read as "losses match"."""
    result = _project(tmp_path, "import", rec_source="transformers/models/llama/modeling_llama.py:150", pattern="rope")
    r = _apply(result, "--verify", "--steps", "2", "--warmup", "1")
    assert r.returncode == 5, r.stderr[-2000:]
    assert "not verified: rope (runtime swap) never ran" in r.stderr
    assert "`--skip rope` verifies the rest" in r.stderr
    assert "losses match" not in r.stdout


def test_skip_leaves_a_replacement_out_by_either_of_its_names(tmp_path):
    """GPT-NeoX on the H100 zoo: one replacement that never ran failed the whole verification; the
    user leaves it out by the name verify gave it and verifies the rest."""
    result = AdvisorResult.load(_project(tmp_path, "import"))
    assert apply_mod.plan(result).replacements == {"rms_norm": "source: model.py"}
    p = apply_mod.plan(result, skip=["rms_norm"])
    assert p.replacements == {} and p.changed == []
    assert any("left out (--skip)" in n for n in p.notes), p.notes
    with pytest.raises(AdvisorError, match=r"--skip rope: no recommendation of this result is called that \(its names: .*rms_norm"):
        apply_mod.plan(result, skip=["rope"])


def test_a_result_whose_bench_did_not_time_it_applies_nothing_by_default(tmp_path):
    untimed = Benchmark(cluster_id="c1", pattern="rms_norm", params={}, passes="forward+backward", verdict="not run",
                        reason="could not build the inputs: a bfloat16 input with a float32 residual", timing="none")
    result = AdvisorResult.load(_project(tmp_path, "import", bench=untimed))
    p = apply_mod.plan(result)
    assert p.changed == [] and p.replacements == {}
    assert any("not timed on a GPU" in n and "--include-estimates" in n for n in p.notes), p.notes
    with_estimates = apply_mod.plan(result, include_estimates=True)
    assert with_estimates.replacements == {"rms_norm": "source: model.py"} and with_estimates.estimates == ["rms_norm"]
    r = _apply(tmp_path / "result.json", "--verify")
    assert r.returncode == 2 and "nothing to verify" in r.stderr


def test_a_failed_numerics_check_is_never_applied(tmp_path):
    failed = measured_win("c1", "rms_norm")
    failed.numerics_ok, failed.verdict, failed.numerics_detail = False, "rejected", "max abs diff 0.3"
    p = apply_mod.plan(AdvisorResult.load(_project(tmp_path, "import", bench=failed)), include_estimates=True)
    assert p.replacements == {} and p.changed == []


def test_patch_takes_only_measured_recommendations(tmp_path):
    from fusion_advisor.patching import recommended_patterns
    result = AdvisorResult.load(_project(tmp_path, "import"))
    assert recommended_patterns(result) == ["rms_norm"]
    result.benchmarks[0].timing, result.benchmarks[0].verdict = "cpu-interpreter", "not run"
    assert recommended_patterns(result) == [] and recommended_patterns(result, include_estimates=True) == ["rms_norm"]


SLOW_WARMUP = textwrap.dedent('''\
    import time
    import torch
    import fusion_advisor
    model = torch.nn.Linear(8, 8)
    for step in range(40):
        model(torch.randn(2, 8)).sum().backward()
        time.sleep(0.15 if step < 3 else 0.05)   # warm-up steps 3x slower than the steady ones
        fusion_advisor.step()
    ''')


def test_the_step_time_is_the_steady_one_not_the_warmup(tmp_path):
    script = tmp_path / "slow_start.py"
    script.write_text(SLOW_WARMUP)
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-m", "fusion_advisor.cli", "profile", str(script), "--warmup", "3", "--steps",
                        "2", "--no-bench", "-o", str(out)], capture_output=True, text=True, timeout=600,
                       env={**os.environ, "COLUMNS": "160"})
    assert r.returncode == 0, r.stderr[-2000:]
    run = json.loads((out / "run.json").read_text())
    assert len(run["step_times_s_steady"]) == 5 and len(run["step_times_s_warmup"]) == 3
    assert min(run["step_times_s_warmup"]) > 0.14
    assert 0.045 < run["step_time_s_unprofiled"] < 0.1, run
    assert "5 unprofiled steps after the trace" in run["step_time_basis"]
    assert run["steps_seen"] == 3 + 2 + 5        # stopped once the steady steps were timed
    line = next(l for l in r.stdout.splitlines() if "step wall time (unprofiled)" in l)
    assert " ms" in line and 45 < float(line.split()[-2].replace(",", "")) < 100, line


def test_a_failing_patched_run_is_blamed_as_the_patched_one(tmp_path):
    """A source-only patch (no runtime swap) whose patched run fails: the message names the patched
    run, never the user's unpatched script."""
    result = _project(tmp_path, "import")
    script = tmp_path / "train.py"
    script.write_text(script.read_text().replace(
        "model = Net()\n", "model = Net()\nassert type(model.norm).__name__ == 'LlamaRMSNorm', 'patched'\n"))
    r = _apply(result, "--verify", "--steps", "2", "--warmup", "1")
    assert r.returncode == 1, r.stderr[-2000:]
    assert "the patched run failed: AssertionError: patched" in r.stderr


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="what --verify does without a GPU")
def test_verify_without_a_gpu_runs_both_scripts_in_the_interpreter(tmp_path):
    """No TRITON_INTERPRET in the user's environment and no GPU: the kernels would refuse CPU
    tensors ("must be on a CUDA device"); verify runs both scripts in Triton's interpreter instead."""
    result = _project(tmp_path, "import")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-m", "fusion_advisor.cli", "apply", str(result), "--verify", "--steps", "2",
                        "--warmup", "1", "--json"], cwd=tmp_path, capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads(r.stdout)["verification"]["replacements"][0]["status"] == "ran"


def _measurement(calls: dict, skipped: list[str]):
    from fusion_advisor.verify import RunMeasurement
    return RunMeasurement(patched=True, steps_run=4, losses=[1.0] * 4, step_times_s=[0.01] * 4, median_step_s=0.01,
                          peak_mem_bytes=None, skipped=skipped, calls=calls)


def test_a_swap_the_patch_refused_is_listed_as_refused_not_claimed():
    """H100 zoo, HF Llama: the generated rotary chain's swap was refused (the module holds the
    inv_freq buffer); the verification stands on what ran and says what was refused and why."""
    from fusion_advisor.verify import compare
    before = _measurement({}, [])
    after = _measurement({"rms_norm": 36}, ["model.rotary_emb: generic:c7e8345cec: LlamaRotaryEmbedding has "
                                            "parameters or buffers"])
    v = compare(before, after, planned={"rms_norm": "runtime swap", "generic:c7e8345cec": "runtime swap"})
    rows = {r.name: r for r in v.replacements}
    assert rows["rms_norm"].status == "ran" and rows["rms_norm"].calls_per_step == 9
    assert rows["generic:c7e8345cec"].status == "refused"
    assert rows["generic:c7e8345cec"].why == "LlamaRotaryEmbedding has parameters or buffers"
    assert v.proven and v.losses_match and not v.never_called
    only_refused = compare(before, _measurement({}, after.skipped), planned={"generic:c7e8345cec": "runtime swap"})
    assert not only_refused.proven and not only_refused.losses_match   # nothing ran: nothing to claim
