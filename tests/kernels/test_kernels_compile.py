"""Every registered pattern's kernels compile for Hopper (sm_90), not only run in the interpreter.

The interpreter runs a kernel as Python; Triton's compiler front end is stricter (seen: a name set
inside a loop and read after it ran in the interpreter and failed to compile). This records the
launches of each pattern's forward and backward on small inputs and generates their Triton IR for
sm_90 in a subprocess, with the argument types the JIT would specialise to.
"""
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


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU every kernel test compiles its kernels for real")
def test_every_pattern_kernel_compiles_for_hopper(device):
    with recorded_launches() as launches:
        for pattern in all_patterns():
            runs = [_small({**pattern.example_params, "dtype": d}) for d in ("float32", "bfloat16")]
            for params in runs + EXTRA_PARAMS.get(pattern.name, []):
                inputs = pattern.make_inputs(params, device, True)
                out = pattern.fused(*inputs.args, **inputs.kwargs)
                outs = [out] if isinstance(out, torch.Tensor) else [o for o in out if isinstance(o, torch.Tensor)]
                torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])
    assert {launch["name"] for launch in launches} >= {"_rms_norm_fwd_kernel", "_group_norm_bwd_kernel"}
    errors = hopper_compile_errors(launches)
    assert not errors, "\n\n".join(errors)
