"""Fused cross-entropy vs `F.cross_entropy(logits.float(), target)` (HF) and on the logits as they are.

Under the interpreter the vocab block is 256, so a 1000-word vocab runs the chunked loop four times
with a masked tail: the path a 128k vocab takes on the GPU.
"""
import pytest
import torch

from conftest import DATA
from fusion_advisor.kernels import cross_entropy as mod
from kernel_checks import check_against_reference
from traced_ops import traced_ops


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("tokens,vocab", [(13, 1000), (16, 512)])
def test_matches_hf_cross_entropy(tokens, vocab, dtype, device):
    check_against_reference(mod.PATTERN, {"tokens": tokens, "vocab": vocab, "dtype": dtype}, device)


@pytest.mark.parametrize("reduction,label_smoothing,upcast", [("sum", 0.1, True), ("none", 0.0, False),
                                                              ("mean", 0.2, False), ("none", 0.3, True)])
def test_reductions_label_smoothing_and_bf16_logits_directly(reduction, label_smoothing, upcast, device):
    check_against_reference(mod.PATTERN, {"tokens": 9, "vocab": 300, "dtype": "bfloat16", "reduction": reduction,
                                          "label_smoothing": label_smoothing, "upcast": upcast}, device)


def test_vocab_wider_than_a_gpu_block(device):
    """4100 words: on the GPU (4096-wide chunks) the loop runs twice with a 4-word tail."""
    check_against_reference(mod.PATTERN, {"tokens": 3, "vocab": 4100, "dtype": "bfloat16", "label_smoothing": 0.1},
                            device)


def test_gradient_written_over_the_logits_when_inplace(device):
    check_against_reference(mod.PATTERN, {"tokens": 7, "vocab": 300, "dtype": "float32", "inplace": True}, device)
    logits = torch.randn(5, 300, device=device, requires_grad=True)
    hidden = logits * 1.0  # a non-leaf, as the LM head's output is
    target = torch.randint(0, 300, (5,), device=device)
    loss = mod.cross_entropy(hidden, target, inplace=True)
    assert hidden._version == 0   # the forward reads the logits only
    loss.backward()
    assert hidden._version > 0    # the backward wrote over them; the op declared it, so autograd sees it
    torch.testing.assert_close(logits.grad, torch.func.grad(lambda x: mod.reference(x, target))(logits.detach()))


def test_strided_rows_and_transposed_logits(device):
    wide = torch.randn(6, 400, device=device)
    target = torch.randint(0, 300, (6,), device=device)
    for logits in (wide[:, :300], torch.randn(300, 6, device=device).t()):  # row stride 400; last dim strided
        a, b = logits.clone().requires_grad_(), logits.clone().requires_grad_()
        torch.testing.assert_close(mod.cross_entropy(a, target), mod.reference(b, target))
        mod.cross_entropy(a, target).backward()
        mod.reference(b, target).backward()
        torch.testing.assert_close(a.grad, b.grad)


def test_all_ignored_batch_and_masked_vocab(device):
    logits = torch.randn(4, 600, device=device, requires_grad=True)
    ignored = torch.full((4,), -100, device=device)
    loss = mod.cross_entropy(logits, ignored)
    assert torch.isnan(loss) and torch.isnan(mod.reference(logits, ignored))  # 0/0, as PyTorch
    loss.backward()
    assert (logits.grad == 0).all()
    # Whole vocab chunks of -inf (a masked vocabulary) must not turn the logsumexp into NaN.
    masked = torch.randn(4, 600, device=device)
    masked[:, :300] = float("-inf")
    target = torch.randint(300, 600, (4,), device=device)
    torch.testing.assert_close(mod.cross_entropy(masked, target, reduction="none"),
                               mod.reference(masked, target, reduction="none"))


def test_no_gradient_buffer_without_grad(device):
    logits = torch.randn(6, 300, device=device)
    target = torch.randint(0, 300, (6,), device=device)
    torch.testing.assert_close(mod.cross_entropy(logits, target, label_smoothing=0.1),
                               mod.reference(logits, target, label_smoothing=0.1))


def test_second_backward_accumulates_and_is_refused_only_when_inplace(device):
    """The gradient is computed in the backward from the saved logits: a second backward through the
    same loss (retain_graph=True) adds the same gradient again, as eager's does. With inplace the
    first one wrote over the logits, so a second is refused."""
    logits = torch.randn(3, 100, device=device, requires_grad=True)
    target = torch.randint(0, 100, (3,), device=device)
    loss = mod.cross_entropy(logits, target)
    loss.backward(retain_graph=True)
    once = logits.grad.clone()
    loss.backward()
    torch.testing.assert_close(logits.grad, 2 * once)
    hidden = logits * 1.0
    loss = mod.cross_entropy(hidden, target, inplace=True)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward ran twice"):
        loss.backward()


def test_module_is_a_drop_in_for_nn_cross_entropy_loss(device):
    ref = torch.nn.CrossEntropyLoss(ignore_index=0, label_smoothing=0.05)
    fused = mod.CrossEntropyLoss.from_module(ref)
    logits = torch.randn(8, 50, device=device, dtype=torch.bfloat16)
    target = torch.randint(0, 50, (8,), device=device)
    out = fused(logits, target)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, ref(logits, target), atol=2e-2, rtol=1.6e-2)
    with pytest.raises(ValueError, match="class weights"):
        mod.CrossEntropyLoss.from_module(torch.nn.CrossEntropyLoss(weight=torch.ones(50)))


def test_bad_inputs_are_refused(device):
    target = torch.zeros(4, dtype=torch.long, device=device)
    with pytest.raises(TypeError, match="float64 is not supported"):
        mod.cross_entropy(torch.randn(4, 10, dtype=torch.float64, device=device), target)
    with pytest.raises(ValueError, match=r"flatten first"):
        mod.cross_entropy(torch.randn(2, 2, 10, device=device), target)
    with pytest.raises(TypeError, match="class indices"):
        mod.cross_entropy(torch.randn(4, 10, device=device), target.float())
    with pytest.raises(ValueError, match="reduction 'avg'"):
        mod.cross_entropy(torch.randn(4, 10, device=device), target, reduction="avg")


def test_custom_ops_pass_opcheck(device):
    logits = torch.randn(5, 300, device=device)
    target = torch.tensor([1, -100, 299, 0, 7], device=device)
    grad = torch.zeros_like(logits)
    torch.library.opcheck(torch.ops.fusion_advisor.cross_entropy_fwd.default, (logits, target, -100, 0.1, "mean"))
    torch.library.opcheck(torch.ops.fusion_advisor.cross_entropy_fwd.default, (logits, target, -100, 0.0, "none"))
    _, lse, n_valid = mod.cross_entropy_fwd(logits, target, -100, 0.1, "mean")
    torch.library.opcheck(torch.ops.fusion_advisor.cross_entropy_bwd.default,
                          (logits, target, lse, n_valid, torch.tensor(0.5, device=device), grad, -100, 0.1, "mean"))


def test_runs_under_torch_compile_fullgraph(device):
    logits = torch.randn(6, 300, device=device, requires_grad=True)
    target = torch.randint(0, 300, (6,), device=device)
    compiled = torch.compile(lambda x, t: mod.cross_entropy(x * 2.0, t), fullgraph=True, backend="aot_eager")
    compiled(logits, target).backward()
    torch.testing.assert_close(logits.grad, torch.func.grad(lambda x: mod.reference(x * 2.0, target))(logits.detach()))


@pytest.mark.parametrize("trace,dtype", [("gpt-bf16-h200.json.gz", "bfloat16"), ("gpt-fp32-h200.json.gz", "float32")])
def test_params_read_from_traced_ops(trace, dtype):
    """HF-style `logits.float()` + F.cross_entropy, top-level ops and with everything nested under them."""
    expected = {"tokens": 4096, "vocab": 1024, "dtype": dtype, "upcast": dtype != "float32", "reduction": "mean",
                "ignore_index": -100, "label_smoothing": 0.0}
    for depth in (0, None):
        ops = traced_ops(DATA / trace, "aten::to", "aten::cross_entropy_loss", max_depth=depth)
        assert mod.PATTERN.match(ops) == expected
    # The same loss written as log_softmax + nll_loss (the ops nested under cross_entropy_loss).
    nested = traced_ops(DATA / trace, "aten::log_softmax", "aten::nll_loss_forward", max_depth=None)
    assert [o.short for o in nested][0] == "log_softmax"
    assert mod.PATTERN.match(nested) == dict(expected, upcast=False, dtype="float32")


def test_fused_bytes_at_16k_by_128k_bf16():
    n, v = 16384, 131072
    assert mod.fused_bytes({"tokens": n, "vocab": v, "dtype": "bfloat16"}) == {
        "forward": n * v * 2 + 28 * n, "backward": 2 * n * v * 2 + 12 * n + 4}


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the kernels are built for real")
def test_launches_compile_for_hopper(device):
    """Both kernels (the loss and logsumexp forward, the gradient backward, inplace and not, each
    reduction) through Triton's front end for sm_90."""
    from kernel_checks import hopper_compile_errors, recorded_launches
    with recorded_launches() as launches:
        for params in ({"tokens": 5, "vocab": 300, "dtype": "bfloat16", "label_smoothing": 0.1},
                       {"tokens": 5, "vocab": 300, "dtype": "float32", "reduction": "none", "inplace": True}):
            check_against_reference(mod.PATTERN, params, device)
    assert {r["name"] for r in launches} >= {"_cross_entropy_fwd_kernel", "_cross_entropy_bwd_kernel"}
    assert hopper_compile_errors(launches) == []
