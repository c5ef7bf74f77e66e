"""Regional torch.compile where bench measured compile fastest: the plan names the provider of each
cluster with its measured times, patch() compiles exactly the instances of that class (one graph
per class), revert() puts the very forward objects back, and apply --verify runs it."""
import json
import subprocess
import sys

import pytest
import torch
from torch import nn

import fusion_advisor
from fusion_advisor import apply as apply_mod
from fusion_advisor import calls, regional_compile
from fusion_advisor.bench import judge
from fusion_advisor.compile_reference import fastest
from fusion_advisor.patching import recommended_patterns
from fusion_advisor.recommend import recommend
from fusion_advisor.core.result import AdvisorResult, Benchmark, Cluster, ProviderTiming


class RMSNorm(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.weight


class LlamaMLP(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.gate, self.up, self.down = nn.Linear(d, 2 * d), nn.Linear(d, 2 * d), nn.Linear(2 * d, d)

    def forward(self, x):
        return self.down(nn.functional.silu(self.gate(x)) * self.up(x))


class Block(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.norm, self.mlp = RMSNorm(d), LlamaMLP(d)

    def forward(self, x):
        return x + self.mlp(self.norm(x))


class Net(nn.Module):
    def __init__(self, d=8, layers=3):
        super().__init__()
        self.blocks = nn.ModuleList(Block(d) for _ in range(layers))
        self.head = nn.Linear(d, 4)

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return self.head(x)


def _bench(cluster_id, pattern, **us):
    measured = {p: ProviderTiming(t, t, t) for p, t in us.items()}
    numerics = {p: "ok" for p in us if p != "eager"}
    verdict, reason, best = judge(measured, numerics, "gpu")
    return Benchmark(cluster_id, pattern, {}, "forward+backward", measured, numerics_ok=True, verdict=verdict,
                     reason=reason, timing="gpu", device="NVIDIA H100", numerics_by_provider=numerics,
                     best_provider=best)


def _result():
    """The MLP's cluster won by torch.compile (ours within noise of eager, compile 3x faster), the
    norm's by our kernel, a third cluster by nothing."""
    clusters = [Cluster("c1", "forward", "swiglu", module_class="Net/Block/LlamaMLP", occurrences_per_step=3),
                Cluster("c2", "forward", "rms_norm", module_class="Net/Block/RMSNorm", occurrences_per_step=3),
                Cluster("c3", "forward", "layer_norm", module_class="Net/LayerNorm", occurrences_per_step=1)]
    result = AdvisorResult(clusters=clusters, benchmarks=[
        _bench("c1", "swiglu", eager=300.0, triton=295.0, compile=100.0),
        _bench("c2", "rms_norm", eager=50.0, triton=20.0, compile=30.0),
        _bench("c3", "layer_norm", eager=10.0, triton=12.0, compile=10.1)])
    return recommend(result)


@pytest.fixture
def counting_backend(monkeypatch):
    """The graphs dynamo hands the backend, compiled with aot_eager (forward and backward, no C++)."""
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return torch._dynamo.lookup_backend("aot_eager")(gm, example_inputs)
    monkeypatch.setattr(regional_compile, "DEFAULT_BACKEND", backend)
    torch._dynamo.reset()
    yield graphs
    torch._dynamo.reset()


def test_the_plan_gives_each_cluster_its_measured_fastest_provider_with_the_times():
    plan = apply_mod.plan(_result())
    by_cluster = {c["cluster_id"]: c for c in plan.providers}
    assert by_cluster["c1"]["provider"] == "compile" and by_cluster["c1"]["runtime_pattern"] == "compile:LlamaMLP"
    assert by_cluster["c1"]["measured_us"] == {"eager": 300.0, "triton": 295.0, "compile": 100.0}
    assert "eager 300.0 µs, ours 295.0 µs, compile 100.0 µs" in by_cluster["c1"]["why"]
    assert "adds one compile" in by_cluster["c1"]["why"]
    assert by_cluster["c2"]["provider"] == "triton" and "ours 20.0 µs" in by_cluster["c2"]["why"]
    assert "c3" not in by_cluster   # nothing beat eager there: not even recommended
    assert plan.runtime_patterns == ["compile:LlamaMLP", "rms_norm"]
    assert any("regional torch.compile (compile:LlamaMLP" in n for n in plan.notes)


@pytest.mark.parametrize("us, module, why", [
    ({"eager": 300.0, "triton": 200.0, "compile": 100.0}, "Net/Block/LlamaMLP", "our kernel measured fastest"),
    ({"eager": 150.0, "triton": 149.0, "compile": 60.0}, "Net/Block/LlamaMLP", "less than a compiled region costs"),
    ({"eager": 300.0, "triton": 299.0, "compile": 100.0}, "Net", "the model itself"),
    # padded_linear's cluster is one nn.Linear: compile:Linear would compile every GEMM of the model
    ({"eager": 3000.0, "triton": 2999.0, "compile": 1000.0}, "Net/Head/Linear", "each of its GEMMs")])
def test_regional_compile_only_where_it_pays_in_the_step(us, module, why):
    """Our kernel stays wherever it beats eager; a region must save more than a compiled region
    costs in the step; the model itself is no region."""
    result = _result()
    result.clusters[0].module_class = module
    result.benchmarks[0] = _bench("c1", "swiglu", **us)
    recommend(result)
    plan = apply_mod.plan(result)
    c1 = next((c for c in plan.providers if c["cluster_id"] == "c1"), None)
    assert c1 is not None and c1["provider"] != "compile" and why in c1["why"], c1
    assert not any(p.startswith("compile:") for p in plan.runtime_patterns)


def test_compile_within_noise_of_ours_goes_to_ours():
    result = _result()
    result.benchmarks[0] = _bench("c1", "swiglu", eager=100.0, triton=40.5, compile=40.0)
    recommend(result)
    c1 = next(c for c in apply_mod.plan(result).providers if c["cluster_id"] == "c1")
    assert c1["provider"] == "triton"


def test_patch_compiles_exactly_those_instances_once_per_class_and_reverts(counting_backend):
    torch.manual_seed(0)
    model = Net()
    x = torch.randn(2, 5, 8)
    want = model(x)
    originals = {name: m.forward for name, m in model.named_modules()}
    calls.reset()
    handle = fusion_advisor.patch(model, patterns=["compile:LlamaMLP"])
    compiled = {f.path for f in handle.functions}
    assert compiled == {f"blocks.{i}.mlp.forward" for i in range(3)}
    assert [n for n, m in model.named_modules() if "forward" in vars(m)] == [f"blocks.{i}.mlp" for i in range(3)]
    for _ in range(2):
        got = model(x)
        got.sum().backward()
    torch.testing.assert_close(got, want)
    assert len(counting_backend) == 1                 # one graph for three instances, two steps
    assert calls.snapshot()["compile:LlamaMLP"] == 6  # counted per call, outside the compiled code
    assert all(p.grad is not None for p in model.blocks[2].mlp.parameters())
    info = regional_compile.report()["compile:LlamaMLP"]
    assert info["graphs"] >= 1 and info["first_call_s"] is not None
    handle.revert()
    assert not any("forward" in vars(m) for m in model.modules())
    assert all(m.forward == originals[n] for n, m in model.named_modules())
    graphs = len(counting_backend)
    torch.testing.assert_close(model(x), want)
    assert len(counting_backend) == graphs            # reverted: nothing compiled runs


def test_an_instance_forward_of_its_own_comes_back_as_the_same_object(counting_backend):
    model = Net()
    own = model.blocks[1].mlp.forward
    model.blocks[1].mlp.forward = own                 # e.g. another patch left an instance forward
    handle = regional_compile.compile_regions(model, ["compile:LlamaMLP"])
    assert model.blocks[1].mlp.forward is not own
    model(torch.randn(1, 3, 8)).sum().backward()
    handle.revert()
    assert vars(model.blocks[1].mlp)["forward"] is own
    assert "forward" not in vars(model.blocks[0].mlp)


def test_nested_and_backbone_classes_are_not_compiled_and_say_why(counting_backend):
    model = Net()
    handle = regional_compile.compile_regions(model, ["compile:Block", "compile:LlamaMLP", "compile:Net",
                                                      "compile:GELU"])
    assert {f.path for f in handle.forwards} == {"blocks.0", "blocks.1", "blocks.2"}
    why = dict(handle.skipped)
    assert "inside the compiled blocks.0" in why["blocks.0.mlp"]
    assert "whole-model compilation" in why["(model)"]
    assert any("no GELU module" in r for _, r in handle.skipped)
    handle.revert()
    assert not any("forward" in vars(m) for m in model.modules())


def test_a_module_our_kernel_swap_put_there_is_not_compiled(counting_backend):
    from fusion_advisor.kernels.rms_norm import RMSNorm as FusedRMSNorm
    model = Net()
    model.blocks[0].norm = FusedRMSNorm(8)
    handle = regional_compile.compile_regions(model, ["compile:RMSNorm"])
    assert {f.path for f in handle.forwards} == {"blocks.1.norm", "blocks.2.norm"}
    assert "already our fused module" in dict(handle.skipped)["blocks.0.norm"]
    handle.revert()


def test_whole_model_compile_is_the_model_itself(counting_backend):
    model = Net()
    x = torch.randn(2, 3, 8)
    want = model(x)
    handle = fusion_advisor.patch(model, patterns=[regional_compile.WHOLE_MODEL])
    assert [f.path for f in handle.functions] == ["(model).forward"]
    torch.testing.assert_close(model(x), want)
    handle.revert()
    assert "forward" not in vars(model)


def test_patch_with_a_result_compiles_what_compile_won():
    names = recommended_patterns(_result())
    assert "compile:LlamaMLP" in names and "swiglu" not in names and "rms_norm" in names


def test_fastest_configuration_verdict():
    name, text = fastest({"unpatched": 0.010, "patched": 0.008, "torch.compile (whole model)": 0.007})
    assert name == "torch.compile (whole model)" and "patched 1.25x" in text and "7.00 ms" in text
    assert fastest({"unpatched": None})[0] == ""


def test_a_gain_within_the_run_to_run_spread_is_not_named_faster():
    rows = {"unpatched": 0.0100, "patched": 0.0098, "compiled blocks": 0.0099}
    name, text = fastest(rows, spread=0.03)       # 2 % faster, the unpatched runs 3 % apart
    assert name == "unpatched" and "no configuration measurably faster" in text and "3.0%" in text
    name, text = fastest(rows, spread=0.01)
    assert name == "patched" and text.startswith("fastest: patched") and "differed by 1.0%" in text


SCRIPT = '''
import sys, torch
sys.path.insert(0, {here!r})
from test_regional_compile import Net
torch.manual_seed(0)
model = Net()
opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
for _ in range(50):
    loss = model(torch.randn(2, 5, 8)).pow(2).mean()
    loss.backward()
    opt.step()
    opt.zero_grad()
'''


def test_apply_verify_compiles_the_won_cluster_in_the_patched_run(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(SCRIPT.format(here=str(__import__("pathlib").Path(__file__).parent)))
    result = _result()
    result.benchmarks[1] = _bench("c2", "rms_norm", eager=50.0, triton=60.0, compile=49.9)  # nothing there
    recommend(result)
    result.run = {"script": str(script), "argv": [str(script)], "cwd": str(tmp_path)}
    result.save(tmp_path / "result.json")
    env = {**__import__("os").environ, "FUSION_ADVISOR_COMPILE_BACKEND": "aot_eager"}
    r = subprocess.run([sys.executable, "-m", "fusion_advisor.cli", "apply", str(tmp_path / "result.json"), "--verify",
                        "--steps", "3", "--warmup", "1", "--json"], cwd=tmp_path, capture_output=True, text=True,
                       timeout=600, env=env)
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["runtime_patterns"] == ["compile:LlamaMLP"]
    assert [c["provider"] for c in report["providers"]] == ["compile"]
    v = report["verification"]
    assert v["losses_match"]
    assert sorted(v["after"]["swapped"]) == [f"blocks.{i}.mlp.forward: fused (compile:LlamaMLP)" for i in range(3)]
    assert v["after"]["compiled"] is False      # our compile is not the script's: calls stay counted
    rows = {r["name"]: r for r in v["replacements"]}
    assert rows["compile:LlamaMLP"]["status"] == "ran" and rows["compile:LlamaMLP"]["calls_per_step"] >= 3
    compiled = v["after"]["regional_compiles"]["compile:LlamaMLP"]
    assert compiled["instances"] == 3 and compiled["graphs"] >= 1 and compiled["first_call_s"] > 0


def test_compile_reference_runs_the_script_with_the_whole_model_compiled(tmp_path, monkeypatch):
    from fusion_advisor.compile_reference import compile_reference
    from fusion_advisor.verify import RunSpec, run_script
    script = tmp_path / "train.py"
    script.write_text(SCRIPT.format(here=str(__import__("pathlib").Path(__file__).parent)))
    monkeypatch.setenv("FUSION_ADVISOR_COMPILE_BACKEND", "aot_eager")
    ref = compile_reference(str(script), [], steps=3, warmup=2)
    assert ref.error is None and ref.median_step_s and len(ref.step_times_s) == 3
    assert ref.swapped == ["(model).forward: fused (compile:*)"]
    eager = run_script(RunSpec(str(script), [], 3, 2))
    torch.testing.assert_close(torch.tensor(ref.losses), torch.tensor(eager.losses), rtol=1e-4, atol=1e-6)
    with pytest.raises(Exception, match="warmup >= 2"):
        compile_reference(str(script), [], warmup=1)


def test_our_kernel_failing_numerics_leaves_compile_or_nothing_with_the_reason():
    from fusion_advisor import provider_choice
    result = _result()
    cluster, rec = result.clusters[0], result.recommendations[0]
    bench = _bench("c1", "swiglu", eager=300.0, triton=20.0, compile=40.0)
    bench.numerics_ok, bench.numerics_detail = False, "max abs diff 0.3"
    bench.numerics_by_provider.pop("triton")
    assert provider_choice.choose(rec, cluster, bench).provider == "compile"
    bench.measured["compile"] = ProviderTiming(299.5, 299.5, 299.5)
    choice = provider_choice.choose(rec, cluster, bench)
    assert choice.provider is None and "numerics failed: triton: max abs diff 0.3" in choice.why


def _apply_verify_json(tmp_path, *flags: str):
    """`apply --verify --json FLAGS` of the MLP/norm result on SCRIPT (aot_eager: no C++ compile)."""
    script = tmp_path / "train.py"
    script.write_text(SCRIPT.format(here=str(__import__("pathlib").Path(__file__).parent)))
    result = _result()
    result.run = {"script": str(script), "argv": [str(script)], "cwd": str(tmp_path)}
    result.save(tmp_path / "result.json")
    env = {**__import__("os").environ, "FUSION_ADVISOR_COMPILE_BACKEND": "aot_eager"}
    r = subprocess.run([sys.executable, "-m", "fusion_advisor.cli", "apply", str(tmp_path / "result.json"), "--verify",
                        "--steps", "3", "--warmup", "2", *flags, "--json"], cwd=tmp_path,
                       capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stderr
    return r


def test_repeated_blocks_are_the_classes_a_module_list_holds_twice():
    model = Net()
    assert regional_compile.repeated_block_classes(model) == ["Block"]
    model.extra = nn.ModuleList([LlamaMLP(8), RMSNorm(8)])       # one of each: no repeated block
    assert regional_compile.repeated_block_classes(model) == ["Block"]
    assert regional_compile.repeated_block_classes(Net(layers=1)) == []
    model.heads = nn.ModuleList(nn.LayerNorm(4) for _ in range(4))  # StableLM's per-head norms: leaves
    assert regional_compile.repeated_block_classes(model) == ["Block"]


def test_compile_blocks_compiles_each_repeated_block_and_leaves_its_insides_to_the_compiler(counting_backend):
    model = Net()
    x = torch.randn(2, 3, 8, requires_grad=True)
    want = model(x)
    want.sum().backward()
    want_grad = x.grad.clone()
    x.grad = None
    calls.reset()
    handle = fusion_advisor.patch(model, patterns=["rms_norm", "compile:LlamaMLP"], compile_blocks=True)
    assert sorted(f.path for f in handle.functions) == [f"blocks.{i}.forward" for i in range(3)]
    assert all(f.pattern == regional_compile.BLOCKS for f in handle.functions)
    assert {type(b.norm) for b in model.blocks} == {RMSNorm}   # no opaque custom op inside the graphs
    why = dict(handle.skipped)
    assert all("left to torch.compile" in why[f"blocks.{i}.norm"] for i in range(3))
    got = model(x)
    got.sum().backward()
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(x.grad, want_grad)
    assert calls.snapshot().get(regional_compile.BLOCKS) == 3 and len(counting_backend) >= 1
    handle.revert()
    assert not any("forward" in vars(m) for m in model.modules())


def test_compile_blocks_without_a_repeated_block_says_so(counting_backend):
    handle = fusion_advisor.patch(Net(layers=1), patterns=[], compile_blocks=True)
    assert not handle.functions
    assert any("no nn.ModuleList" in why for _, why in handle.skipped)


def test_apply_verify_times_the_compiled_configurations(tmp_path):
    """--compile-reference: the same script under whole-model torch.compile, timed as verify times;
    --compile-blocks: the patch plus regional compile of the repeated blocks, checked against the
    unpatched run (its blocks' calls counted); a column each, and a verdict naming the fastest
    configuration measured."""
    r = _apply_verify_json(tmp_path, "--compile-reference", "--compile-blocks")
    v = json.loads(r.stdout)["verification"]
    ref = v["compile_reference"]
    assert ref["median_step_s"] > 0 and len(ref["losses"]) == 2
    names = ("unpatched", "patched", "patched + compiled blocks", "torch.compile (whole model)")
    assert ref["fastest"] in names and ref["fastest"] == v["fastest"]["configuration"]
    assert ref["verdict"].startswith(f"fastest: {ref['fastest']} (") and "vs unpatched" in ref["verdict"]
    blocks = v["compiled_blocks"]
    assert blocks["proven"] and blocks["losses_match"] and blocks["median_step_s"] > 0
    rows = {row["name"]: row for row in blocks["replacements"]}
    assert rows[regional_compile.BLOCKS]["status"] == "ran" and rows[regional_compile.BLOCKS]["calls_per_step"] == 3
    assert blocks["regional_compiles"][regional_compile.BLOCKS]["instances"] == 3
    assert "patched + compiled blocks" in ref["verdict"]   # timed, so named among the speedups


def _with_host(bench: Benchmark, **host_us) -> Benchmark:
    for provider, us in host_us.items():
        bench.measured[provider].host_us = us
    return bench


@pytest.mark.parametrize("busy_share, applied", [(0.85, False), (0.95, True)])
def test_host_time_counts_where_the_gpu_waits_for_the_host(busy_share, applied):
    """H100 zoo, BERT (GPU busy 85 % of the step): LayerNorm kernels 1.5x faster on the GPU but at
    400 µs of host time a call against eager's 171 made the step 9 % slower. Where the GPU idles
    more than 10 % of the step, a call costs at least its host time; a busier GPU hides it."""
    result = _result()
    result.benchmarks[1] = _with_host(_bench("c2", "rms_norm", eager=76.0, triton=48.0, compile=64.0),
                                      eager=171.0, triton=400.0, compile=364.0)
    result.launch_bound = {"verdict": "gpu-bound", "gpu_busy_share_unprofiled": busy_share}
    assert result.host_counts() is (busy_share < 0.9)
    recommend(result)
    plan = apply_mod.plan(result)
    c2 = next((c for c in plan.providers if c["cluster_id"] == "c2"), None)
    assert (c2 is not None and c2["provider"] == "triton") is applied, c2
    assert ("rms_norm" in plan.runtime_patterns) is applied
    assert ("rms_norm" in recommended_patterns(result)) is applied
    if not applied:   # not even recommended: by host time our call costs more than eager's
        assert not any(r.cluster_id == "c2" for r in result.recommendations)


class NewGELU(nn.Module):
    def forward(self, x):
        return 0.5 * x * (1.0 + torch.tanh(0.7978845608028654 * (x + 0.044715 * torch.pow(x, 3.0))))


class GeluBlock(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.fc, self.act = nn.Linear(d, d), NewGELU()

    def forward(self, x):
        return x + self.act(self.fc(x))


def test_compiled_blocks_around_a_counted_swap_compile_once(counting_backend):
    """H100 zoo, T5: compiled blocks holding our generated NewGELU recompiled at every call (44
    graphs for 6 blocks), because the swap's call counter, traced, became a guard on its count.
    Counted only in eager, the blocks compile one graph and keep it (as a script's own
    torch.compile over a patched model does)."""
    model = nn.Sequential(nn.ModuleList(GeluBlock(8) for _ in range(3)))
    blocks = model[0]
    model.forward = lambda x: [x := b(x) for b in blocks][-1]
    x = torch.randn(2, 3, 8, requires_grad=True)   # as the later blocks' inputs: one graph fits all
    handle = fusion_advisor.patch(model, patterns=["pointwise_chain"])
    assert {type(b.act).__name__ for b in blocks} == {"PointwiseChainModule"}
    compiled = regional_compile.compile_regions(model, [regional_compile.BLOCKS])
    for _ in range(4):
        model(x)
    assert len(counting_backend) == 1, f"{len(counting_backend)} graphs: recompiled"
    compiled.revert()
    handle.revert()


def test_verify_runs_compiled_blocks_without_our_kernels_inside_or_hook_recompiles(tmp_path, monkeypatch):
    """The compiled-blocks run as apply --verify makes it (the BLOCKS name among its patterns):
    the modules inside the blocks are left to the compiler, and the step finder's global hooks,
    skipped inside traced code, cost at most their one documented recompile (graphs: x with and
    without requires_grad, hooks live in the first step and gone after). Before: the norms were
    swapped in and the hooks' counters recompiled every step (5 graphs in 5 steps)."""
    from fusion_advisor.verify import RunSpec, run_script
    script = tmp_path / "train.py"
    script.write_text(SCRIPT.format(here=str(__import__("pathlib").Path(__file__).parent)))
    monkeypatch.setenv("FUSION_ADVISOR_COMPILE_BACKEND", "aot_eager")
    m = run_script(RunSpec(str(script), [], 4, 2, 0, ["rms_norm", regional_compile.BLOCKS], {}, patched=True,
                           modules={"rms_norm": ["RMSNorm"]}))
    assert m.error is None
    assert sorted(s for s in m.skipped if "left to torch.compile" in s) == [
        f"blocks.{i}.norm: inside the compiled block blocks.{i}: left to torch.compile" for i in range(3)]
    assert not any("RMSNorm ->" in s for s in m.swapped)
    compiled = m.regional_compiles[regional_compile.BLOCKS]
    assert compiled["instances"] == 3 and compiled["graphs"] <= 4, compiled


def test_apply_verify_with_nothing_to_patch_still_times_the_compiled_blocks(tmp_path):
    """Every cluster lost to eager or to torch.compile: no patch, but the repeated blocks compiled
    (nothing of ours inside) are timed and checked against the unpatched run, and the verdict
    names the fastest. Without --compile-blocks there is nothing to verify (exit 2, nothing run)."""
    script = tmp_path / "train.py"
    script.write_text(SCRIPT.format(here=str(__import__("pathlib").Path(__file__).parent)))
    result = _result()
    result.benchmarks[0] = _bench("c1", "swiglu", eager=300.0, triton=310.0, compile=299.0)
    result.benchmarks[1] = _bench("c2", "rms_norm", eager=50.0, triton=60.0, compile=49.9)
    recommend(result)
    result.run = {"script": str(script), "argv": [str(script)], "cwd": str(tmp_path)}
    result.save(tmp_path / "result.json")
    env = {**__import__("os").environ, "FUSION_ADVISOR_COMPILE_BACKEND": "aot_eager"}
    cmd = [sys.executable, "-m", "fusion_advisor.cli", "apply", str(tmp_path / "result.json"), "--verify",
           "--steps", "3", "--warmup", "2", "--no-compile-reference"]
    r = subprocess.run(cmd + ["--compile-blocks", "--rerun-unpatched", "--json"], cwd=tmp_path, capture_output=True,
                       text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["replacements"] == {}
    v = report["verification"]
    again = v["unpatched_again"]
    assert again["median_step_s"] > 0 and again["spread"] == pytest.approx(
        abs(again["median_step_s"] - v["before"]["median_step_s"]) / v["before"]["median_step_s"])
    assert "after" not in v and v["before"]["median_step_s"] > 0
    blocks = v["compiled_blocks"]
    assert blocks["configuration"] == "compiled blocks" and blocks["proven"] and blocks["losses_match"]
    assert blocks["regional_compiles"][regional_compile.BLOCKS]["instances"] == 3
    assert v["fastest"]["configuration"] in ("unpatched", "compiled blocks")
    r = subprocess.run(cmd + ["--no-compile-blocks"], cwd=tmp_path, capture_output=True, text=True, timeout=600,
                       env=env)
    assert r.returncode == 2 and "no recommendations to apply" in r.stderr


class Stage(nn.Module):
    """A CNN stage: each one of a different width, so each needs a graph of its own."""
    def __init__(self, c_in, c_out):
        super().__init__()
        self.proj = nn.Linear(c_in, c_out)

    def forward(self, x):
        return torch.relu(self.proj(x)) + 1.0


class Pyramid(nn.Module):
    """Stages of widths 4, 8, ... 4 * 2**n: the last one holds most of the parameters (ResNet's
    last stage holds 61 %)."""
    def __init__(self, n=5):
        super().__init__()
        self.stages = nn.ModuleList(Stage(4 * 2 ** i, 4 * 2 ** (i + 1)) for i in range(n))

    def forward(self, x):
        for s in self.stages:
            x = s(x)
        return x


def test_repeated_blocks_of_every_width_are_compiled_even_the_one_holding_most_parameters(counting_backend):
    model = Pyramid()
    last = sum(p.numel() for p in model.stages[-1].parameters()) / sum(p.numel() for p in model.parameters())
    assert last > regional_compile.BACKBONE_SHARE
    x = torch.randn(2, 4)
    want = model(x)
    limit = torch._dynamo.config.recompile_limit
    torch._dynamo.config.recompile_limit = 3    # below the 5 graphs the 5 widths need
    try:
        handle = fusion_advisor.patch(model, patterns=[regional_compile.BLOCKS])
        assert {f.path for f in handle.functions} == {f"stages.{i}.forward" for i in range(5)}
        assert torch._dynamo.config.recompile_limit >= 2 * 5 + 2
        torch.testing.assert_close(model(x), want)
        assert len(counting_backend) == 5           # one graph a width: none fell back to eager
        handle.revert()
        assert torch._dynamo.config.recompile_limit == 3
    finally:
        torch._dynamo.config.recompile_limit = limit


def test_apply_verify_measures_the_channels_last_estimate_as_a_configuration(tmp_path):
    """A channels_last recommendation is an estimate (the transposes' time): without
    --include-estimates the patch leaves it out, and --verify times the compiled blocks again with the
    model in channels_last, checked like them (losses, the change counted), as one more candidate for
    the fastest configuration. With --include-estimates the patched run has it, and no extra run."""
    script = tmp_path / "train.py"
    script.write_text(SCRIPT.format(here=str(__import__("pathlib").Path(__file__).parent)))
    result = _result()
    result.benchmarks[0] = _bench("c1", "swiglu", eager=300.0, triton=310.0, compile=299.0)
    result.benchmarks[1] = _bench("c2", "rms_norm", eager=50.0, triton=60.0, compile=49.9)
    result.layout = {"transpose_us_per_step": 900.0, "transposes_per_step": 9, "share_of_gpu_busy": 0.09,
                     "kernels": ["nchwToNhwcKernel"]}
    recommend(result)
    assert [r.kind for r in result.recommendations] == ["channels_last"]
    result.run = {"script": str(script), "argv": [str(script)], "cwd": str(tmp_path)}
    result.save(tmp_path / "result.json")
    env = {**__import__("os").environ, "FUSION_ADVISOR_COMPILE_BACKEND": "aot_eager"}
    cmd = [sys.executable, "-m", "fusion_advisor.cli", "apply", str(tmp_path / "result.json"), "--verify",
           "--steps", "3", "--warmup", "2", "--no-compile-reference", "--no-rerun-unpatched", "--compile-blocks"]
    r = subprocess.run(cmd + ["--json"], cwd=tmp_path, capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stderr
    v = json.loads(r.stdout)["verification"]
    layout = v["compiled_blocks_channels_last"]
    assert layout["configuration"] == "compiled blocks + channels_last"
    assert layout["proven"] and layout["losses_match"], layout
    ran = {row["name"]: row for row in layout["replacements"]}
    assert ran["channels_last"]["status"] == "ran" and ran["compile:blocks"]["status"] == "ran"
    assert v["fastest"]["configuration"] in ("unpatched", "compiled blocks", "compiled blocks + channels_last")
    r = subprocess.run(cmd + ["--include-estimates", "--json"], cwd=tmp_path, capture_output=True, text=True,
                       timeout=600, env=env)
    assert r.returncode == 0, r.stderr
    v = json.loads(r.stdout)["verification"]
    assert "compiled_blocks_channels_last" not in v and v["after"]["calls"].get("channels_last")
