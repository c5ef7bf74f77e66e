"""Fused `residual + F.dropout(x, p)`: what can be compared, and why it is not the usual comparison.

The other kernel tests run the fused op and its reference on the same inputs and compare outputs and
gradients. Dropout's output depends on random draws: the kernel draws its mask from Triton's Philox
(`tl.rand4x`, keyed by a seed and the element's offset), PyTorch's CUDA dropout from its own Philox
stream with other offsets, and its CPU dropout from a different generator again. No seed makes the
masks equal, so for p > 0 the reference's output is not a target. What is tested instead:
  - where no randomness is left, the reference is exact: p = 0 in training and eval mode
    (`check_against_reference`, and bitwise);
  - for p > 0 the output is exactly `residual + x * mask / (1 - p)` (the dropped x rounded to x's
    dtype first, as eager's dropout does) for the mask that the backward reveals (dy = 1 gives
    dx = mask / (1 - p)), and the forward's output agrees with that mask wherever it tells the two
    cases apart: the backward regenerates the forward's mask;
  - the kept fraction is within 5 binomial standard deviations of 1 - p;
  - the same seed gives the same mask, another seed another.
"""
import math

import pytest
import torch

from fusion_advisor.kernels import dropout_add as mod
from fusion_advisor.core.records import OpRecord
from kernel_checks import check_against_reference, round_like_kernel


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("training", [True, False])
def test_p0_and_eval_mode_equal_the_reference(dtype, training, device):
    params = {"shape": [6, 42, 431] if dtype == "float32" else [3, 1000], "dtype": dtype, "p": 0.0 if training else 0.5,
              "training": training}
    check_against_reference(mod.PATTERN, params, device)
    torch.manual_seed(0)
    inputs = mod.make_inputs(params, device, requires_grad=False)
    x, residual = inputs.args
    # residual + x, added in fp32 and rounded once, as eager's add does and as the kernel does at p=0
    # (eval mode runs eager's add itself).
    expected = round_like_kernel(residual.float() + x.float(), x.dtype) if training else residual + x
    assert torch.equal(mod.dropout_add(*inputs.args, **inputs.kwargs), expected)


def test_bench_checks_numerics_without_randomness(device):
    params = mod.PATTERN.numerics_params(mod.PATTERN.bench_params[0])
    assert params["p"] == 0.0 and params["shape"] == mod.PATTERN.bench_params[0]["shape"]
    check_against_reference(mod.PATTERN, dict(params, shape=[7, 33]), device)


def _run(x, residual, p, seed):
    """Output and the gradients for dy = 1: dx is the mask times 1/(1-p), d residual is dy."""
    x = x.detach().requires_grad_()
    residual = residual.detach().requires_grad_()
    y = mod.dropout_add(x, residual, p, seed=seed)
    y.backward(torch.ones_like(y))
    return y.detach(), x.grad, residual.grad


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("p", [0.1, 0.5])
def test_output_is_residual_plus_masked_scaled_x(dtype, p, device):
    torch.manual_seed(1)
    shape = (5, 1001)  # odd: the last block is partly masked
    x = torch.randn(shape, device=device).to(getattr(torch, dtype))
    residual = torch.randn(shape, device=device).to(getattr(torch, dtype))
    y, dx, dres = _run(x, residual, p, seed=1234)
    scale = 1.0 / (1.0 - p)
    keep = dx != 0  # the backward's mask
    assert torch.equal(dx, round_like_kernel(keep * scale, x.dtype))
    assert torch.equal(dres, torch.ones_like(residual))
    # The forward used the same mask: with it, the output is exactly eager's formula, x * scale
    # rounded to x's dtype, then added to residual in fp32 and rounded once...
    dropped = round_like_kernel(torch.where(keep, x.float() * scale, 0.0), x.dtype)
    assert torch.equal(y, round_like_kernel(residual.float() + dropped.float(), x.dtype))
    # ...and wherever keeping and dropping give different outputs, the output says which it was.
    kept_y, dropped_y = residual + (x.float() * scale).to(x.dtype), residual
    distinct = (kept_y - dropped_y).abs() > 4 * residual.abs().float().clamp(min=1) * 2**-7
    from_output = (y - dropped_y).abs() > (y - kept_y).abs()
    assert distinct.float().mean() > 0.9 and torch.equal(from_output[distinct], keep[distinct])
    # The kept fraction is 1 - p, within 5 binomial standard deviations.
    n = keep.numel()
    assert abs(keep.sum().item() - n * (1 - p)) <= 5 * math.sqrt(n * p * (1 - p))


def test_same_seed_same_mask_other_seed_other_mask(device):
    x = torch.randn(4, 300, device=device)
    residual = torch.zeros_like(x)
    a = mod.dropout_add(x, residual, 0.3, seed=7)
    assert torch.equal(a, mod.dropout_add(x, residual, 0.3, seed=7))
    assert not torch.equal(a != 0, mod.dropout_add(x, residual, 0.3, seed=8) != 0)
    torch.manual_seed(3)
    b = mod.dropout_add(x, residual, 0.3)
    torch.manual_seed(3)
    assert torch.equal(b, mod.dropout_add(x, residual, 0.3))  # unseeded calls follow torch.manual_seed


def test_p1_drops_everything_and_residual_dtype_promotes(device):
    x = torch.randn(3, 64, device=device, dtype=torch.bfloat16, requires_grad=True)
    residual = torch.randn(3, 64, device=device, requires_grad=True)  # fp32 residual stream
    y = mod.dropout_add(x, residual, 1.0)
    assert y.dtype == torch.float32 and torch.equal(y, residual)
    y.sum().backward()
    assert (x.grad == 0).all() and x.grad.dtype == torch.bfloat16 and residual.grad.dtype == torch.float32


def test_non_contiguous_input(device):
    x = torch.randn(64, 48, device=device).t()
    residual = torch.randn(48, 64, device=device)
    torch.testing.assert_close(mod.dropout_add(x, residual, 0.0), residual + x)
    y = mod.dropout_add(x, residual, 0.5, seed=3)
    assert ((y == residual) | (y == residual + 2 * x)).all()


def test_bad_inputs_are_refused(device):
    x = torch.randn(4, 8, device=device)
    with pytest.raises(TypeError, match="float64 is not supported"):
        mod.dropout_add(x.double(), x.double(), 0.1)
    with pytest.raises(ValueError, match="same shape"):
        mod.dropout_add(x, x[:, :4], 0.1)
    with pytest.raises(ValueError, match="between 0 and 1"):
        mod.dropout_add(x, x, 1.5)
    with pytest.raises(ValueError, match="seed"):
        mod.dropout_add(x, x, 0.1, seed=-2)


def test_module_follows_train_and_eval(device):
    block = mod.DropoutAdd.from_dropout(torch.nn.Dropout(0.5))
    x, residual = torch.randn(8, 32, device=device), torch.randn(8, 32, device=device)
    assert not torch.equal(block(x, residual), residual + x)
    block.eval()
    assert torch.equal(block(x, residual), residual + x)


def test_custom_ops_pass_opcheck(device):
    x, residual = torch.randn(3, 50, device=device), torch.randn(3, 50, device=device)
    torch.library.opcheck(torch.ops.fusion_advisor.dropout_add_fwd.default, (x, residual, 0.2, 11))
    torch.library.opcheck(torch.ops.fusion_advisor.dropout_add_bwd.default,
                          (torch.randn(3, 50, device=device), torch.tensor(11), 0.2, torch.float32))


def test_runs_under_torch_compile_fullgraph(device):
    x = torch.randn(4, 64, device=device, requires_grad=True)
    residual = torch.randn(4, 64, device=device)
    compiled = torch.compile(lambda a, r: mod.dropout_add(a * 2.0, r, 0.25), fullgraph=True, backend="aot_eager")
    y = compiled(x, residual)
    y.backward(torch.ones_like(y))
    keep = x.grad != 0
    torch.testing.assert_close(y, residual + torch.where(keep, 2.0 * x.detach() / 0.75, 0.0))


def test_params_read_from_traced_ops():
    """`x + self.drop(self.proj(h))` as torch.profiler records it (the format transcribed from real
    traces). On CUDA aten::dropout runs aten::native_dropout; on CPU it decomposes into bernoulli_,
    div_ and mul. Either way the add of the same shape follows."""
    shape, bf = (4, 128, 256), "c10::BFloat16"
    p = ("", "0.10000000000000001", "True")
    linear = OpRecord("aten::linear", ((4, 128, 1024), (256, 1024), (256,)), (bf, bf, bf), ("", "", ""))
    dropout = OpRecord("aten::dropout", (shape, (), ()), (bf, "Scalar", "Scalar"), p)
    add = OpRecord("aten::add", (shape, shape, ()), (bf, bf, "Scalar"), ("", "", "1"))
    cuda = [linear, dropout, OpRecord("aten::native_dropout", (shape, (), ()), (bf, "Scalar", "Scalar"), p), add]
    cpu = [linear, dropout, OpRecord("aten::empty_like", (shape, (), (), (), (), ()), (bf, "", "", "", "", ""), ()),
           OpRecord("aten::bernoulli_", (shape, (), ()), (bf, "Scalar", ""), ("", "0.90000000000000002", "")),
           OpRecord("aten::div_", (shape, ()), (bf, "Scalar"), ("", "0.90000000000000002")),
           OpRecord("aten::mul", (shape, shape), (bf, bf), ("", "")), add]
    expected = {"shape": [4, 128, 256], "dtype": "bfloat16", "residual_dtype": "bfloat16", "p": 0.1}
    for ops in (cuda, cpu, [linear, dropout, add]):
        assert mod.PATTERN.match(ops) == expected
    # An fp32 residual stream added to a bf16 branch; eval mode (train=False) launches nothing to fuse.
    mixed = OpRecord("aten::add", (shape, shape, ()), ("float", bf, "Scalar"), ("", "", "1"))
    assert mod.PATTERN.match([dropout, mixed])["residual_dtype"] == "float32"
    eval_dropout = OpRecord("aten::dropout", (shape, (), ()), (bf, "Scalar", "Scalar"), ("", "0.1", "False"))
    assert mod.PATTERN.match([eval_dropout, add]) is None
