"""torchrun jobs (issue 19, CPU part): every rank profiled through torch.distributed.run (gloo),
one merged result; collectives classified and never fused; patch on a DDP-wrapped model."""
import gc
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fusion_advisor.analyzers.communication import exposed_time
from fusion_advisor.analyzers.kernel_classes import kernel_class

ROOT = Path(__file__).resolve().parents[2]


def cli(*args, cwd, env=None):
    return subprocess.run([sys.executable, "-m", "fusion_advisor.cli", *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=600, env=env)


def whole(stderr: str) -> str:
    """A failed job's stderr for the assertion: its head (where the first failing rank says why; one
    CI run lost a rank's SIGABRT message to a 3,000-character tail) and its tail."""
    return stderr if len(stderr) <= 9000 else stderr[:6000] + "\n[...]\n" + stderr[-3000:]


def test_a_two_rank_ddp_job_gives_rank_traces_and_one_merged_result(tmp_path):
    r = cli("profile", "--nproc-per-node", "2", ROOT / "examples" / "ddp_train.py", "-w", "2", "-n", "2",
            "--no-bench", "-o", tmp_path / "job", "--", "--hidden", "32", "--tokens", "64", "--steps", "12",
            cwd=tmp_path)
    assert r.returncode == 0, whole(r.stderr)
    out = tmp_path / "job"
    assert (out / "trace.rank0.json.gz").is_file() and (out / "trace.rank1.json.gz").is_file()
    runs = [json.loads((out / f"run.rank{k}.json").read_text()) for k in (0, 1)]
    assert [m["rank"] for m in runs] == [0, 1] and all(m["world_size"] == 2 for m in runs)
    result = json.loads((out / "result.json").read_text())
    job = result["distributed"]
    assert job["world_size"] == 2 and [x["rank"] for x in job["ranks"]] == [0, 1]
    steps = {x["rank"]: x["step_time_s"] for x in job["ranks"]}
    assert steps[job["slowest_rank"]] == max(steps.values())
    for x in job["ranks"]:
        comm = x["communication"]
        assert comm["basis"] == "cpu ops" and comm["comm_us_per_step"] > 0
        assert "c10d::allreduce_" in comm["collectives"]            # DDP's gradient all-reduce, once a step
        assert all(kernel_class(name) == "communication" for name in comm["collectives"])
    assert f"wrote {out / 'trace.rank1.json.gz'}" in r.stderr
    assert f"2-rank job: rank {job['slowest_rank']} is the slowest" in " ".join(r.stdout.split())
    assert 'id="ranks"' in (out / "report.html").read_text()
    for cluster in result["clusters"]:                              # collectives never join a cluster
        assert not any("allreduce" in op["name"] for op in cluster.get("ops", []))


def test_profile_rank_needs_the_launchers_environment(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}
    r = cli("profile-rank", ROOT / "examples" / "ddp_train.py", cwd=tmp_path, env=env)
    assert r.returncode == 2 and "RANK and WORLD_SIZE unset" in r.stderr


def test_exposed_communication_is_what_no_compute_overlaps():
    comm = [(0.0, 10.0), (20.0, 30.0), (25.0, 35.0)]        # 10 + 15 µs of collectives (the last two overlap)
    compute = [(5.0, 22.0), (28.0, 29.0)]
    assert exposed_time(comm, compute) == pytest.approx(5.0 + 0.0 + (8.0 - 1.0) + 5.0 - 0.0)
    assert exposed_time(comm, []) == pytest.approx(25.0)
    assert exposed_time([], compute) == 0.0


def test_patch_swaps_and_reverts_inside_a_ddp_model(tmp_path):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    import fusion_advisor
    from fusion_advisor.kernels.layer_norm import LayerNorm as FusedLayerNorm

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    ddp = None
    try:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 1))
        ddp = DistributedDataParallel(model)
        x = torch.randn(4, 8)
        ddp(x).sum().backward()
        want = [p.grad.clone() for p in model.parameters()]
        state = {k: v.clone() for k, v in model.state_dict().items()}
        original = model[1]
        handle = fusion_advisor.patch(ddp, patterns=["layer_norm"])
        assert len(handle.swaps) == 1 and isinstance(model[1], FusedLayerNorm)
        assert model[1].weight is original.weight                   # the DDP-registered parameters, shared
        model.zero_grad()
        ddp(x).sum().backward()                                     # gradients still all-reduced by DDP's hooks
        for got, ref in zip(model.parameters(), want):
            torch.testing.assert_close(got.grad, ref, rtol=1e-4, atol=1e-5)
        handle.revert()
        assert model[1] is original
        assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    finally:
        # Tear down in an order that cannot deadlock. CI hung here once: at the test's end the DDP
        # Reducer's release destroyed the process group, whose destructor joins gloo's worker thread
        # while holding the GIL, and that worker, releasing its last allreduce, was waiting for the
        # GIL (py-spy: ~Reducer -> ~ProcessGroupGloo -> thread::join; ~AsyncWork -> gil_scoped_acquire).
        # So: let the worker finish with the GIL free, drop DDP while the group is still registered,
        # then destroy the group with its workers idle.
        dist.barrier()
        time.sleep(0.2)
        del ddp
        gc.collect()
        dist.destroy_process_group()


def test_apply_verify_runs_both_jobs_on_every_rank(tmp_path):
    """A result from `profile --nproc-per-node 2`: --verify runs the unpatched and the patched job
    under torchrun, losses of rank 0, the runtime swap counted in the patched job."""
    import shutil

    from fusion_advisor.core.result import AdvisorResult, Cluster, Recommendation
    from measured import measured_win

    script = tmp_path / "ddp_train.py"
    shutil.copy(ROOT / "examples" / "ddp_train.py", script)
    argv = [str(script), "--hidden", "32", "--tokens", "64", "--layers", "2", "--steps", "40"]
    cluster = Cluster(id="c1", direction="forward", pattern="layer_norm", module_class="Sequential/Block/LayerNorm",
                      source="torch/nn/modules/normalization.py:229")
    rec = Recommendation(rank=1, cluster_id="c1", pattern="layer_norm", title="LayerNorm as one kernel",
                         measured_saving_us_per_step=5.0, estimate_saving_us_per_step=5.0, confidence="measured")
    AdvisorResult(run={"script": str(script), "argv": argv, "cwd": str(tmp_path), "rank": 0, "world_size": 2},
                  clusters=[cluster], recommendations=[rec],
                  benchmarks=[measured_win("c1", "layer_norm")]).save(tmp_path / "result.json")
    r = cli("apply", tmp_path / "result.json", "--verify", "--steps", "3", "--warmup", "1", "--json", cwd=tmp_path,
            env={**os.environ, "TRITON_INTERPRET": "1"})
    assert r.returncode == 0, whole(r.stderr)
    v = json.loads(r.stdout)["verification"]
    [row] = v["replacements"]
    assert row["name"] == "layer_norm" and row["how"] == "runtime swap" and row["calls_per_step"] == pytest.approx(2.0)
    assert v["losses_match"] and len(v["after"]["losses"]) >= 4
    assert len(v["after"]["swapped"]) == 2                          # rank 0's two LayerNorms, inside DDP


@pytest.mark.parametrize("patch_first", [True, False])
def test_fsdp2_models_are_patched_before_fully_shard(tmp_path, patch_first):
    """Patched before `fully_shard`, the fused LayerNorm trains with sharded parameters and gives
    the unpatched gradients; patched after, the swap is refused with that advice, never applied
    to shards."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    import fusion_advisor

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 1))
        x = torch.randn(4, 8)
        model(x).sum().backward()
        want = [p.grad.clone() for p in model.parameters()]
        model.zero_grad(set_to_none=True)
        if patch_first:
            handle = fusion_advisor.patch(model, patterns=["layer_norm"])
        fully_shard(model, mesh=init_device_mesh("cpu", (1,)))
        if not patch_first:
            handle = fusion_advisor.patch(model, patterns=["layer_norm"])
            assert handle.swaps == [] and "before fully_shard" in handle.skipped[0][1]
            return
        assert len(handle.swaps) == 1
        model(x).sum().backward()
        for p, ref in zip(model.parameters(), want):
            torch.testing.assert_close(p.grad.full_tensor(), ref, rtol=1e-4, atol=1e-5)
    finally:
        dist.destroy_process_group()
