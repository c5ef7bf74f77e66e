"""LayerNorm over dim 1 of (N, C, *spatial) (kernels/channel_norm.py), against the exact eager code it
replaces: Hugging Face ConvNextLayerNorm's channels_first branch (permute, F.layer_norm, permute)."""
import pytest
import torch
import torch.nn.functional as F

from fusion_advisor.kernels.channel_norm import ChannelsFirstLayerNorm, channels_first_layer_norm
from fusion_advisor.kernels.numerics import compare
from fusion_advisor.kernels.registry import Inputs
from fusion_advisor.kernels.tolerances import tolerance


def eager(x, weight=None, bias=None, eps=1e-6):
    """ConvNextLayerNorm.forward with data_format="channels_first", for any number of spatial dims."""
    features = x.movedim(1, -1)
    features = F.layer_norm(features, (x.shape[1],), weight, bias, eps)
    return features.movedim(-1, 1)


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(2, 96, 7, 5), (3, 131, 4, 4), (1, 8, 33), (2, 16, 3, 2, 5), (2, 300, 1, 1)])
def test_matches_convnext_channels_first(shape, dtype, affine, device):
    """Forward and every gradient, by the one rule (kernels/numerics.py: the tolerance table, and
    where eager's own bf16/fp16 rounding is the larger error, its float64 run decides)."""
    x = (torch.randn(shape, device=device) + 0.5 * torch.randn(shape[0], 1, *shape[2:], device=device)).to(dtype)
    c = shape[1]
    params = (((1 + 0.3 * torch.randn(c, device=device)).to(dtype), (0.1 * torch.randn(c, device=device)).to(dtype))
              if affine else (None, None))
    grads = (0, 1, 2) if affine else (0,)
    inputs = Inputs((x.requires_grad_(), *(p.requires_grad_() if p is not None else None for p in params)),
                    {"eps": 1e-6}, grad_inputs=grads)
    result = compare(eager, channels_first_layer_norm, inputs, reduced_grads=(1, 2))
    assert result.ok, result.detail
    assert channels_first_layer_norm(x.detach(), *params).is_contiguous()


def test_a_permuted_input_is_read_as_its_values(device):
    x = torch.randn(2, 5, 6, 24, device=device).permute(0, 3, 1, 2)   # channels-last memory, NCHW view
    w, b = torch.randn(24, device=device), torch.randn(24, device=device)
    torch.testing.assert_close(channels_first_layer_norm(x, w, b, 1e-5), eager(x, w, b, 1e-5))


def test_under_autocast_it_returns_what_eager_returns(device):
    if device.type != "cuda":
        pytest.skip("needs CUDA: the real torch.autocast('cuda') policy (CPU's keeps layer_norm in bf16)")
    x = torch.randn(2, 16, 3, 3, dtype=torch.bfloat16, device=device)
    w, b = torch.ones(16, device=device), torch.zeros(16, device=device)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        want, got = eager(x, w, b, 1e-6), channels_first_layer_norm(x, w, b, 1e-6)
    assert got.dtype == want.dtype == torch.float32
    torch.testing.assert_close(got, want, **tolerance(torch.float32))


def test_bad_inputs_say_what_is_wrong():
    with pytest.raises(ValueError, match=r"expected \(N, C, \*spatial\)"):
        channels_first_layer_norm(torch.randn(4, 8))
    with pytest.raises(ValueError, match="weight shape"):
        channels_first_layer_norm(torch.randn(2, 8, 3), torch.ones(7))


def test_convnext_channels_first_norm_is_wrapped(device):
    modeling = pytest.importorskip("transformers.models.convnext.modeling_convnext")
    from fusion_advisor.kernels.layer_norm import LayerNorm
    norm = modeling.ConvNextLayerNorm(24, eps=1e-6, data_format="channels_first").to(device)
    fused = LayerNorm.from_module(norm)
    assert isinstance(fused, ChannelsFirstLayerNorm) and fused.weight is norm.weight
    x = torch.randn(2, 24, 5, 5, device=device)
    torch.testing.assert_close(fused(x), norm(x), **tolerance(torch.float32))


# Registers and spills as ptxas (bundled with Triton) builds the kernels for sm_90, read back with
# cuobjdump: no spills at ConvNeXt's channel counts, and one program's registers fit an SM.
_RESOURCES = r"""
import json, os, re, subprocess, sys, tempfile
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler.compiler import ASTSource
from fusion_advisor.kernels import channel_norm as cn

cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
out = []
for c in json.load(sys.stdin):
    for fn, tile in ((cn._channel_norm_fwd_kernel, cn.FWD_TILE), (cn._channel_norm_bwd_kernel, cn.BWD_TILE)):
        block_c, block_s, warps = cn._blocks(c, 56 * 56, tile)
        consts = {"HAS_WEIGHT": True, "HAS_BIAS": True, "BLOCK_C": block_c, "BLOCK_S": block_s}
        kinds = {"X": "*bf16", "W": "*bf16", "B": "*bf16", "Y": "*bf16", "DY": "*bf16", "DX": "*bf16",
                 "MEAN": "*fp32", "RSTD": "*fp32", "DW_PARTIAL": "*fp32", "DB_PARTIAL": "*fp32", "eps": "fp32"}
        sig = {p.name: "constexpr" if p.name in consts else kinds.get(p.name, "i32") for p in fn.params}
        aligned = {(i,): [["tt.divisibility", 16]] for i, p in enumerate(fn.params)
                   if p.name not in consts and p.name != "eps"}
        kernel = triton.compile(ASTSource(fn, sig, consts, aligned), target=GPUTarget("cuda", 90, 32),
                                options={"num_warps": warps})
        with tempfile.NamedTemporaryFile(suffix=".cubin") as fh:
            fh.write(kernel.asm["cubin"])
            fh.flush()
            usage = subprocess.run([cuobjdump, "-res-usage", fh.name], capture_output=True, text=True).stdout
        regs, stack = re.search(r"REG:(\d+).*?STACK:(\d+)", usage).groups()
        out.append([c, fn.__name__, warps, int(regs), int(stack)])
json.dump(out, sys.stdout)
"""


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the kernels are built for real")
def test_registers_fit_and_nothing_spills_at_convnext_channel_counts():
    import json
    import os
    import subprocess
    import sys

    import triton
    bin_dir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    if not all(os.path.exists(os.path.join(bin_dir, tool)) for tool in ("ptxas", "cuobjdump")):
        pytest.skip("this Triton ships no ptxas / cuobjdump")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    done = subprocess.run([sys.executable, "-c", _RESOURCES], input=json.dumps([96, 384, 768, 1536]), env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    for c, name, warps, regs, stack in json.loads(done.stdout):
        assert stack == 0, (c, name, stack)
        assert regs * 32 * warps <= 65536, (c, name, warps, regs)
