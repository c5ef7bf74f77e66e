"""Eager calls of the fused functionals run the launchers directly (no torch.library dispatch, which
costs µs a call on a host-bound step); under torch.compile the graph still holds the custom ops."""
import pytest
import torch
from torch._dynamo.testing import AotEagerAndRecordGraphs
from torch.utils._python_dispatch import TorchDispatchMode

from fusion_advisor.kernels import all_patterns, get


class _RecordOps(TorchDispatchMode):
    """Records the namespace-qualified name of every op that reaches the dispatcher's Python mode."""

    def __init__(self):
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func))
        return func(*args, **(kwargs or {}))


def _small(params: dict) -> dict:
    if "shape" not in params:
        return dict(params)
    shape = list(params["shape"])
    return {**params, "shape": [min(shape[0], 2), *shape[1:]]}


def test_eager_forward_and_backward_do_not_dispatch_to_the_custom_ops(device):
    with _RecordOps() as record:
        for pattern in all_patterns():
            inputs = pattern.make_inputs(_small(pattern.example_params), device, True)
            out = pattern.fused(*inputs.args, **inputs.kwargs)
            outs = [out] if isinstance(out, torch.Tensor) else [o for o in out if isinstance(o, torch.Tensor)]
            torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])
            assert all(inputs.args[i].grad is not None for i in inputs.grad_inputs), pattern.name
    assert any(n.startswith("aten.") for n in record.names)  # the mode did see the launchers' torch calls
    assert not [n for n in record.names if n.startswith("fusion_advisor.")]


def test_a_fake_tensor_goes_through_the_op_and_its_fake():
    from torch._subclasses.fake_tensor import FakeTensorMode
    from fusion_advisor.kernels import rms_norm as mod
    with FakeTensorMode():
        x, w = torch.empty(3, 40), torch.empty(40)
        y, rstd = mod._forward(x, w, 1e-6, False)  # the launcher would try to launch on fake tensors
    assert y.shape == (3, 40) and rstd.shape == (3,)


@pytest.mark.parametrize("name", ["rms_norm", "cross_entropy"])
def test_compiled_fullgraph_calls_the_custom_ops(name, device):
    pattern = get(name)
    inputs = pattern.make_inputs(_small(pattern.example_params), device, True)
    backend = AotEagerAndRecordGraphs()
    compiled = torch.compile(lambda *a: pattern.fused(*a, **inputs.kwargs), backend=backend, fullgraph=True)
    x = inputs.args[0]
    eager_x = x.detach().clone().requires_grad_(True)
    got = compiled(x, *inputs.args[1:])
    want = pattern.fused(eager_x, *inputs.args[1:], **inputs.kwargs)
    got.sum().backward()
    want.sum().backward()
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(x.grad, eager_x.grad)
    forward_code = "\n".join(g.code for g in backend.fw_graphs)
    backward_code = "\n".join(g.code for g in backend.bw_graphs)
    assert f"fusion_advisor.{name}_fwd" in forward_code
    assert f"fusion_advisor.{name}_bwd" in backward_code
