"""patch's batch_norm_act form: a conv -> BN -> activation block swapped for a copy of itself whose BN
runs fused with the activation, checked on deep copies (training and eval, running statistics
compared), reverted exactly."""
import copy
import time

import pytest
import torch
from torch import nn

import fusion_advisor
from fusion_advisor.kernels.batch_norm_act import BatchNormAct
from fusion_advisor.kernels.tolerances import tolerance


class ConvLayer(nn.Module):
    """Hugging Face's ResNetConvLayer, as its forward is written."""

    def __init__(self, cin, cout, activation):
        super().__init__()
        self.convolution = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
        self.normalization = nn.BatchNorm2d(cout)
        self.activation = activation

    def forward(self, x):
        return self.activation(self.normalization(self.convolution(x)))


class BasicBlock(nn.Module):
    """torchvision's BasicBlock: one ReLU after bn1 and again after the residual add."""

    def __init__(self, c):
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + x)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(inplace=True))
        self.layer = ConvLayer(6, 8, nn.SiLU())
        self.block = BasicBlock(8)
        self.head = nn.Sequential(nn.BatchNorm1d(8), nn.LeakyReLU(0.1))

    def forward(self, x):
        return self.head(self.block(self.layer(self.stem(x))).mean(dim=(2, 3)))


@pytest.fixture
def net(device):
    torch.manual_seed(0)
    return Net().to(device)


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _train_step(model, x):
    """Loss, input grad and every parameter grad of one training step."""
    model.train()
    model.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    loss = (model(x) ** 2).sum()
    loss.backward()
    return loss.detach(), x.grad, {n: p.grad for n, p in model.named_parameters()}


def test_blocks_swapped_checked_and_reverted_exactly(net, device):
    before_state = _state(net)
    originals = dict(net.named_modules())
    handle = fusion_advisor.patch(net, patterns=["batch_norm_act"])
    assert sorted(s.path for s in handle.swaps) == ["head", "layer", "stem"], handle.summary()
    assert isinstance(net.stem[1], BatchNormAct) and isinstance(net.stem[2], nn.Identity)
    assert net.layer.normalization.weight is originals["layer.normalization"].weight    # shared, not copied
    assert net.head[0].negative_slope == 0.1 and isinstance(net.head[1], nn.Identity)
    # The BasicBlock's BN -> ReLU is one pair, but its ReLU runs after the residual add too: refused.
    assert [p for p, _ in handle.skipped] == ["block"] and "numerics check failed" in handle.skipped[0][1]
    # The check ran on copies: the model's statistics and state are as they were, keys unchanged.
    after_state = net.state_dict()
    assert list(after_state) == list(before_state)
    for key, value in before_state.items():
        assert torch.equal(after_state[key], value), key
    handle.revert()
    assert dict(net.named_modules()) == originals
    assert all(a is b for a, b in zip(dict(net.named_modules()).values(), originals.values()))


def test_patched_model_trains_and_evaluates_like_the_original(net, device):
    eager = copy.deepcopy(net)
    handle = fusion_advisor.patch(net, patterns=["batch_norm_act"])
    assert len(handle.swaps) == 3
    x = torch.randn(4, 3, 7, 6, device=device)
    tol = tolerance(torch.float32)
    for step in range(2):
        loss, dx, grads = _train_step(net, x + step)
        loss_ref, dx_ref, grads_ref = _train_step(eager, x + step)
        torch.testing.assert_close(loss, loss_ref, **tol)
        torch.testing.assert_close(dx, dx_ref, **tol)
        for name, g in grads_ref.items():
            torch.testing.assert_close(grads[name], g, **tolerance(torch.float32, x.numel() // 3), msg=name)
    for key, value in eager.state_dict().items():   # running statistics and num_batches_tracked
        torch.testing.assert_close(net.state_dict()[key], value, **tol, msg=key)
    net.eval(), eager.eval()
    with torch.no_grad():
        torch.testing.assert_close(net(x.contiguous(memory_format=torch.channels_last)), eager(x), **tol)
    handle.revert()


def test_an_optimizer_built_before_patching_keeps_training_the_model(net, device):
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    weight = net.stem[1].weight.detach().clone()
    with fusion_advisor.patched(net, patterns=["batch_norm_act"]):
        _train_step(net, torch.randn(4, 3, 5, 5, device=device))
        optimizer.step()
    assert not torch.equal(net.stem[1].weight, weight)


def test_a_block_starting_with_its_batch_norm_gets_its_own_input(device):
    model = nn.Sequential(nn.Sequential(nn.BatchNorm3d(4), nn.GELU(approximate="tanh")), nn.Flatten()).to(device)
    handle = fusion_advisor.patch(model, patterns=["batch_norm_act"])
    assert len(handle.swaps) == 1 and handle.swaps[0].replacement[0].activation == "gelu_tanh", handle.summary()


def test_hf_resnet_conv_layers_are_swapped(device):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], num_channels=3,
                                       num_labels=5)   # bottleneck layers, as ResNet-50's
    model = transformers.ResNetForImageClassification(config).to(device)
    eager = copy.deepcopy(model)
    start = time.monotonic()
    handle = fusion_advisor.patch(model, patterns=["batch_norm_act"])
    if time.monotonic() - start > 20:
        pytest.skip("patch's checks took over 20 s here")
    swapped = [s for s in handle.swaps if type(s.original).__name__ == "ResNetConvLayer"]
    # The stem and each bottleneck's first two convs have a ReLU after their BN; its last conv
    # (activation=None, the ReLU comes after the residual add) and the shortcut's BN have none: left,
    # saying so.
    assert len(swapped) == 5 and len(handle.swaps) == 5, handle.summary()
    assert len(handle.skipped) == 2
    assert all("no BatchNorm child followed by a supported activation" in why for _, why in handle.skipped)
    pixels = torch.randn(2, 3, 16, 16, device=device)
    model.train(), eager.train()
    logits, logits_ref = model(pixels).logits, eager(pixels).logits
    torch.testing.assert_close(logits, logits_ref, **tolerance(torch.float32))
    logits.square().sum().backward()
    logits_ref.square().sum().backward()
    ref_grads = dict(eager.named_parameters())
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref_grads[name].grad, **tolerance(torch.float32, 2 * 16 * 16), msg=name)
    handle.revert()


def test_a_result_hints_the_block_that_holds_the_traced_batch_norm(device):
    """A BN -> ReLU cluster's module is the BatchNorm2d; the swap is of the block holding it. From a
    result, patch tries that block's class (a user's nn.Sequential) by its shape: the conv -> BN ->
    ReLU blocks are swapped, the other Sequential (no activation after its BN) is left without a word."""
    from fusion_advisor import patching
    from fusion_advisor.core.result import AdvisorResult, Cluster, Recommendation
    from measured import measured_win

    model = nn.Sequential(nn.Sequential(nn.Conv2d(3, 8, 3, bias=False), nn.BatchNorm2d(8), nn.ReLU()),
                          nn.Sequential(nn.Conv2d(8, 8, 3, bias=False), nn.BatchNorm2d(8)),
                          nn.Sequential(nn.Conv2d(8, 8, 3, bias=False), nn.BatchNorm2d(8), nn.ReLU())).to(device)
    cluster = Cluster(id="c1", direction="forward", pattern="batch_norm_act", module_class="Sequential/Sequential/BatchNorm2d")
    rec = Recommendation(rank=1, cluster_id="c1", pattern="batch_norm_act", title="BN + ReLU",
                         measured_saving_us_per_step=5.0, estimate_saving_us_per_step=5.0, confidence="measured")
    result = AdvisorResult(clusters=[cluster], recommendations=[rec], benchmarks=[measured_win("c1", "batch_norm_act")])
    assert patching.module_hints(result) == {"batch_norm_act": {"Sequential"}}
    with fusion_advisor.patched(model, result) as handle:
        assert [s.path for s in handle.swaps] == ["0", "2"] and handle.skipped == [], handle.summary()
        assert isinstance(model[0][1], BatchNormAct) and isinstance(model[2][2], nn.Identity)
    assert isinstance(model[0][1], nn.BatchNorm2d)


def test_mobilenet_blocks_with_relu6_and_hardswish_are_swapped(device):
    """MobileNet-v2's conv -> BN -> ReLU6 and v3's conv -> BN -> Hardswish blocks."""
    model = nn.Sequential(nn.Sequential(nn.Conv2d(3, 8, 3, bias=False), nn.BatchNorm2d(8), nn.ReLU6(inplace=True)),
                          nn.Sequential(nn.Conv2d(8, 8, 3, bias=False), nn.BatchNorm2d(8), nn.Hardswish())).to(device)
    eager = copy.deepcopy(model)
    x = 3 * torch.randn(2, 3, 9, 8, device=device)   # spans ReLU6's and Hardswish's bends
    with fusion_advisor.patched(model, patterns=["batch_norm_act"]) as handle:
        assert [s.replacement[1].activation for s in handle.swaps] == ["relu6", "hardswish"], handle.summary()
        loss, dx, grads = _train_step(model, x)
        loss_ref, dx_ref, grads_ref = _train_step(eager, x)
        torch.testing.assert_close(loss, loss_ref, **tolerance(torch.float32))
        torch.testing.assert_close(dx, dx_ref, **tolerance(torch.float32))


def test_a_block_swap_says_which_children_changed(device):
    model = nn.Sequential(nn.Sequential(nn.Conv2d(3, 8, 3, bias=False), nn.BatchNorm2d(8), nn.ReLU())).to(device)
    with fusion_advisor.patched(model, patterns=["batch_norm_act"]) as handle:
        assert handle.swaps[0].described() == "Sequential -> Sequential (1 -> BatchNormAct, 2 -> Identity)"
        assert "0: Sequential -> Sequential (1 -> BatchNormAct, 2 -> Identity) (batch_norm_act)" in handle.summary()


def test_hf_resnet_under_bf16_autocast_is_swapped_and_a_wrong_kernel_still_refused(device):
    """fp32 weights under bf16 autocast, as apply --verify patches them (at the first forward, inside
    the script's autocast): the convs run in bf16, so the check compares at bf16's tolerance. Before, every layer was refused at fp32's
    tolerance (found on an H100: the zoo's ResNet). A kernel that computes something else (its
    output 3 % off) is refused all the same."""
    transformers = pytest.importorskip("transformers")
    from fusion_advisor.kernels import batch_norm_act as bna
    torch.manual_seed(0)
    config = transformers.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], num_channels=3,
                                       num_labels=5)
    model = transformers.ResNetForImageClassification(config).to(device)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        handle = fusion_advisor.patch(model, patterns=["batch_norm_act"])
        swapped = [s for s in handle.swaps if type(s.original).__name__ == "ResNetConvLayer"]
        assert len(swapped) == 5 and "embedder" in swapped[0].path, handle.summary()
        handle.revert()
        right = bna.BatchNormAct.forward
        bna.BatchNormAct.forward = lambda self, x: right(self, x) * 1.03   # 3 % off: twice bf16's rtol
        try:
            refused = fusion_advisor.patch(model, patterns=["batch_norm_act"])
        finally:
            bna.BatchNormAct.forward = right
    assert not refused.swaps and any("numerics check failed" in why for _, why in refused.skipped), refused.summary()


def test_under_autocast_the_check_compares_at_the_precision_the_block_computed_in(device):
    """A conv -> BN -> ReLU block with fp32 weights under bf16 autocast computes in bf16: a
    replacement one bf16 ulp off the original (two orders of fp32 math rounding differently, as on
    the GPU) passes, where fp32's tolerance refused it; outside autocast, the same block computes in
    fp32 and the same bf16 ulp is refused."""
    from fusion_advisor.equivalence import check_on_copies
    from fusion_advisor.kernels.tolerances import computed_dtype

    def one_ulp_up(block):   # the same module, its output moved one bf16 ulp up
        def hook(module, args, y):
            rounded = y.to(torch.bfloat16)
            return torch.nextafter(rounded, torch.full_like(rounded, float("inf"))).to(y.dtype)
        block.register_forward_hook(hook)
        return block

    torch.manual_seed(0)
    block = ConvLayer(4, 8, nn.ReLU()).to(device)
    x = torch.randn(2, 4, 8, 8, device=device)
    assert computed_dtype(x, x) == torch.float32
    with torch.autocast(device.type, dtype=torch.bfloat16):
        assert computed_dtype(x, x) == torch.bfloat16
        assert check_on_copies(block, one_ulp_up) is None
    assert "output" in check_on_copies(block, one_ulp_up)   # in fp32, a bf16 ulp is far too much


class PaddedDepthwiseLayer(nn.Module):
    """Hugging Face's EfficientNetDepthwiseLayer: padding first, then a depthwise conv -> BN -> SiLU."""

    def __init__(self, c, stride):
        super().__init__()
        self.stride = stride
        self.depthwise_conv_pad = nn.ZeroPad2d(padding=(0, 1, 0, 1))
        self.depthwise_conv = nn.Conv2d(c, c, 3, stride=stride, groups=c, bias=False,
                                        padding="valid" if stride == 2 else "same")
        self.depthwise_norm = nn.BatchNorm2d(c)
        self.depthwise_act = nn.SiLU()

    def forward(self, x):
        if self.stride == 2:
            x = self.depthwise_conv_pad(x)
        return self.depthwise_act(self.depthwise_norm(self.depthwise_conv(x)))


@pytest.mark.parametrize("stride", [1, 2])
def test_a_block_whose_first_child_is_padding_is_checked_on_its_conv_input(stride, device):
    # The check's input is read off the first child past padding (EfficientNet's blocks were refused:
    # "no example input")
    torch.manual_seed(0)
    model = nn.Sequential(PaddedDepthwiseLayer(6, stride)).to(device)
    x = torch.randn(2, 6, 9, 9, device=device)
    want = copy.deepcopy(model)(x)
    handle = fusion_advisor.patch(model, patterns=["batch_norm_act"])
    assert [s.path for s in handle.swaps] == ["0"], handle.summary()
    assert isinstance(model[0].depthwise_norm, BatchNormAct)
    torch.testing.assert_close(model(x), want, **tolerance(torch.float32))
