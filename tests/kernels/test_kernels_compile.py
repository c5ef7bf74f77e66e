"""Every registered pattern's kernels compile for Hopper (sm_90), not only run in the interpreter.

The interpreter runs a kernel as Python; Triton's compiler front end is stricter (seen: a name set
inside a loop and read after it ran in the interpreter and failed to compile). This records the
launches of each pattern's forward and backward on small inputs and generates their Triton IR for
sm_90 in a subprocess, with the argument types the JIT would specialise to.
"""
import os

import pytest
import torch

from fusion_advisor.kernels import all_patterns
from kernel_checks import hopper_compile_errors, recorded_launches

# Params beyond each pattern's example_params that take other code paths (constexpr branches).
EXTRA_PARAMS = {
    "layer_norm": [{"shape": [2, 64], "dtype": "bfloat16", "weight": False, "bias": False}],
    "group_norm": [{"shape": [4, 256], "dtype": "bfloat16", "num_groups": 4},  # whole-sample plan, positions 1
                   {"shape": [2, 8, 16], "dtype": "float32", "num_groups": 2, "weight": False, "bias": False}],
}


def _small(params: dict) -> dict:
    """Fewer rows (or samples) than the example: the kernels' specialisations stay the same."""
    if "shape" not in params:  # patterns with several named shapes keep their small example
        return dict(params)
    shape = list(params["shape"])
    return {**params, "shape": [min(shape[0], 2), *shape[1:]]}


@pytest.fixture(scope="module")
def every_pattern_launch() -> list[dict]:
    """Every registered pattern's launches (forward and backward, fp32 and bf16, the extra params),
    recorded once for both Tritons' compile tests (CPU: these tests skip on a GPU)."""
    device = torch.device("cpu")
    with recorded_launches() as launches:
        for pattern in all_patterns():
            runs = [_small({**pattern.example_params, "dtype": d}) for d in ("float32", "bfloat16")]
            for params in runs + EXTRA_PARAMS.get(pattern.name, []):
                inputs = pattern.make_inputs(params, device, True)
                out = pattern.fused(*inputs.args, **inputs.kwargs)
                outs = [out] if isinstance(out, torch.Tensor) else [o for o in out if isinstance(o, torch.Tensor)]
                torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])
        # GroupNorm's sliced plan (too few groups to fill a GPU), which the interpreter takes only when told
        from fusion_advisor.kernels import group_norm, group_norm_slices
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(group_norm_slices, "PROGRAMS_INTERPRETED", 8)
            for dtype in (torch.float32, torch.bfloat16):
                x = torch.randn(2, 16, 600, device=device, dtype=dtype, requires_grad=True)
                w = torch.ones(16, device=device, dtype=dtype, requires_grad=True)
                group_norm.group_norm(x, 1, w, torch.zeros_like(w).requires_grad_()).sum().backward()
        # the norms' read-twice backward (opt-in at rows of 16,384 until timed), column masks dropped
        from fusion_advisor.kernels import add_layer_norm, norm_tiles, rms_norm
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(norm_tiles, "RELOAD_COLS", 64)
            for dtype in (torch.float32, torch.bfloat16):
                x, r = (torch.randn(4, 64, device=device, dtype=dtype, requires_grad=True) for _ in range(2))
                w = torch.ones(64, device=device, dtype=dtype, requires_grad=True)
                rms_norm.rms_norm(x, w, 1e-6).sum().backward()
                y, s = add_layer_norm.add_layer_norm(x, r, (64,), w, torch.zeros_like(w).requires_grad_())
                (y.sum() + s.sum()).backward()
    assert {launch["name"] for launch in launches} >= {"_rms_norm_fwd_kernel", "_group_norm_bwd_kernel",
                                                         "_slice_apply_kernel", "_slice_dx_kernel"}
    assert any(launch["name"] == "_rms_norm_bwd_kernel" and launch["args"]["RELOAD"][1] for launch in launches)
    return launches


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU every kernel test compiles its kernels for real")
def test_every_pattern_kernel_compiles_for_hopper(every_pattern_launch):
    errors = hopper_compile_errors(every_pattern_launch)
    assert not errors, "\n\n".join(errors)


GPU_TRITON = os.environ.get("FUSION_ADVISOR_GPU_TRITON")   # .ci/run installs the GPU machines' Triton there


@pytest.mark.skipif(not GPU_TRITON, reason="FUSION_ADVISOR_GPU_TRITON names no folder holding the GPU machines' "
                                           "Triton (.ci/run installs 3.6.0 there)")
@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU every kernel test compiles its kernels for real")
def test_every_pattern_kernel_compiles_under_the_gpu_machines_triton(every_pattern_launch):
    """The same launches compiled by the Triton the GPU machines run (3.6 with torch 2.11), which
    took what 3.9 takes less often: a jit helper's default arguments broke every norm forward there."""
    import subprocess
    import sys
    version = subprocess.run([sys.executable, "-c", "import triton; print(triton.__version__)"], text=True,
                             capture_output=True, env={**os.environ, "PYTHONPATH": GPU_TRITON}).stdout.strip()
    assert version.startswith("3.6"), version
    errors = hopper_compile_errors(every_pattern_launch, triton_path=GPU_TRITON)
    assert not errors, "\n\n".join(errors)


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU every kernel test compiles its kernels for real")
def test_kernels_behind_module_forms_compile_for_hopper(device):
    """Kernels no pattern's functional reaches: the channels_first LayerNorm, Gemma's RMSNorm form,
    the packed gated MLP's activation."""
    from fusion_advisor.kernels.channel_norm import channels_first_layer_norm
    from fusion_advisor.kernels.glu import packed_glu
    from fusion_advisor.kernels.rms_norm import rms_norm
    with recorded_launches() as launches:
        for dtype in (torch.float32, torch.bfloat16):
            x = torch.randn(2, 24, 3, 5, device=device, dtype=dtype, requires_grad=True)
            w = torch.ones(24, device=device, dtype=dtype, requires_grad=True)
            channels_first_layer_norm(x, w, torch.zeros_like(w).requires_grad_(), 1e-6).sum().backward()
            rms_norm(x.detach().movedim(1, -1).requires_grad_(), w, 1e-6, gemma=True).sum().backward()
            packed_glu(torch.randn(4, 48, device=device, dtype=dtype, requires_grad=True) * 1, "silu",
                       private_input=True).sum().backward()
    assert {launch["name"] for launch in launches} >= {"_channel_norm_fwd_kernel", "_channel_norm_bwd_kernel",
                                                         "_rms_norm_bwd_kernel", "_glu_bwd_kernel"}
    errors = hopper_compile_errors(launches)
    assert not errors, "\n\n".join(errors)


def test_no_jit_function_takes_a_default_argument():
    """The GPU machines run Triton 3.6, whose compiler passes a jit helper's default value (EVICT="",
    EVEN=False) raw where it expects a constexpr: every norm forward failed to compile there for a day
    ("'str' object has no attribute 'type'", the H100 of 2026-12-07), while CI's Triton 3.9 and the
    interpreter took them. Every jit function's arguments are passed explicitly."""
    import ast
    from pathlib import Path
    root = Path(__file__).resolve().parents[2] / "kernels"

    def is_jit(decorator) -> bool:
        node = decorator.func if isinstance(decorator, ast.Call) else decorator
        return isinstance(node, ast.Attribute) and node.attr == "jit" or isinstance(node, ast.Name) and node.id == "jit"

    with_defaults = [f"{path.relative_to(root)}:{node.lineno} {node.name}"
                     for path in sorted(root.rglob("*.py"))
                     for node in ast.walk(ast.parse(path.read_text()))
                     if isinstance(node, ast.FunctionDef) and any(is_jit(d) for d in node.decorator_list)
                     and (node.args.defaults or any(d is not None for d in node.args.kw_defaults))]
    assert with_defaults == []
