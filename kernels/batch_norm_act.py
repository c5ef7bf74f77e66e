"""BatchNorm + activation: y = act(batch_norm(x)), training and eval, as Triton kernels each way.

Replaces the conv nets' BN -> activation (ResNet's BatchNorm2d -> ReLU, EfficientNet's and YOLO's
BN -> SiLU, MobileNet's BN -> ReLU6 / Hardswish), over (N, C, *spatial) inputs of BatchNorm1d/2d/3d,
contiguous or channels_last. One set of kernels (batch_norm_core.py) serves every activation of
activations.py: relu, silu, gelu, gelu_tanh, leaky_relu, sigmoid, relu6, hardswish (a compile-time
constant, part of the pattern's params). Under
autocast the input may be bf16/fp16 with fp32 weight, bias and running statistics, as eager
batch_norm takes them (autocast registers no cast for batch_norm): the output is in x's dtype, the
parameter gradients in the parameters' dtype.

Bytes for x of M = N*C*S elements (element size e), C channels, k of weight and bias present; the
parameters and running statistics of one element size w (the params' `weight_dtype`); eager CUDA
(cudnn) first:
  unfused forward, training: BN reads x for the statistics, reads x and writes its output; the
                   activation reads that and writes y:                              M*5e
  unfused forward, eval:     BN reads x, writes; the activation reads, writes:      M*4e
  unfused backward, training: the activation backward reads dy and its input, writes dz; BN's
                   backward reads dz and x for the per-channel sums, then both again and writes dx:
                                                                                    M*8e
  unfused backward, eval:    the activation backward M*3e; BN's backward M*3e (dx), plus M*2e for
                   the parameter sums when it has parameters:                       M*6e to M*8e
Fused (`fused_bytes` returns exactly these; P = the plan's SPLIT programs a channel block; per-channel
vectors counted once for each kernel that reads or writes them):
  forward, training:  stats reads x; apply reads x, writes y: M*3e
                      + partial (count, mean, M2) rows written and read: 2*3*P*C*4
                      + mean and rstd written, read by apply: 2*2*C*4 + k*C*w
                      + running mean and var read and written: 4*C*w (when tracked)
  forward, eval:      apply reads x, writes y: M*2e + running mean and var read 2*C*w + k*C*w
  backward, training: sums read dy and x; dx reads dy and x, writes dx: M*5e
                      + partial (sum dz, sum dz*xhat) rows written and read: 2*2*P*C*4
                      + mean and rstd read twice: 2*2*C*4; weight and bias read twice: 2*k*C*w
                      + their grads written: k*C*w; dx's two terms written and read: 2*2*C*4
  backward, eval:     dx reads dy and x, writes dx: M*3e + 2*C*w + k*C*w; with parameters (k > 0)
                      the sums pass too: M*2e + 2*C*w + k*C*w + 2*2*P*C*4 + k*C*w
Not yet measured on a GPU.
"""
from __future__ import annotations

import copy
import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from fusion_advisor.kernels import batch_norm_core as core
from fusion_advisor.kernels.activations import activation_id, module_activation, torch_activation
from fusion_advisor.kernels.common import check_device, check_dtype
from fusion_advisor.kernels.fused_op import fused_op
from fusion_advisor.kernels.registry import (Inputs, OpRecord, dtype_from_trace, dtype_name, param_dtype,
                                             register_pattern)


def _check(x: torch.Tensor, tensors: dict, training: bool, eps: float) -> None:
    op = "batch_norm_act"
    check_dtype(x, op)
    check_device(x, *tensors.values(), op=op)
    if x.dim() < 2:
        raise ValueError(f"{op}: expected an (N, C, *) input, got shape {list(x.shape)}")
    for name, t in tensors.items():
        if t is None:
            continue
        check_dtype(t, op)
        if tuple(t.shape) != (x.shape[1],) or not t.is_contiguous():
            raise ValueError(f"{op}: {name} of shape {list(t.shape)} is not a contiguous ({x.shape[1]},)")
    if training and x.shape[0] * math.prod(x.shape[2:]) == 1:
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {x.size()}")
    if (training and eps <= 0.0) or eps < 0.0:
        raise ValueError(f"batch_norm eps must be positive, got {eps}")
    if not training and (tensors["running_mean"] is None or tensors["running_var"] is None):
        raise ValueError(f"{op}: eval mode (training=False) needs running_mean and running_var")


def batch_norm_act_fwd(x: torch.Tensor, running_mean: Optional[torch.Tensor], running_var: Optional[torch.Tensor],
                       weight: Optional[torch.Tensor], bias: Optional[torch.Tensor], training: bool, momentum: float,
                       eps: float, activation: str, negative_slope: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launcher: (y, mean, rstd), see batch_norm_core.forward; updates the running statistics in
    training."""
    _check(x, {"running_mean": running_mean, "running_var": running_var, "weight": weight, "bias": bias},
           training, eps)
    return core.forward(x, running_mean, running_var, weight, bias, training, momentum, eps,
                        activation_id(activation), negative_slope)


def batch_norm_act_bwd(dy: torch.Tensor, x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                       center: torch.Tensor, spread: torch.Tensor, training: bool, eps: float, activation: str,
                       negative_slope: float, param_grads: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launcher: (dx, dweight, dbias), see batch_norm_core.backward."""
    return core.backward(dy, x, weight, bias, center, spread, training, eps, activation_id(activation),
                         negative_slope, param_grads)


def _fwd_eager(x, running_mean, running_var, weight, bias, training, momentum, eps, activation, negative_slope):
    out = batch_norm_act_fwd(x, running_mean, running_var, weight, bias, training, momentum, eps, activation,
                             negative_slope)
    if training:   # what the op's declared mutation does, as eager's in-place update does
        for t in (running_mean, running_var):
            if t is not None:
                torch.autograd.graph.increment_version(t)
    return out


def _fwd_fake(x, running_mean, running_var, weight, bias, training, momentum, eps, activation, negative_slope):
    stats = x.new_empty((x.shape[1] if training else 0,), dtype=torch.float32)
    return torch.empty_like(core.dense(x)), stats, stats.new_empty(stats.shape)


def _bwd_fake(dy, x, weight, bias, center, spread, training, eps, activation, negative_slope, param_grads):
    grads = [torch.empty_like(p) if p is not None else x.new_empty(0) for p in (weight, bias)]
    return torch.empty_like(core.dense(x)), *grads


# torch.library ops: a patched model still runs under torch.compile(fullgraph=True). Eager calls run
# the launchers directly (see fused_op).
_forward = fused_op("fusion_advisor::batch_norm_act_fwd", fake=_fwd_fake, mutates_args=("running_mean", "running_var"),
                    eager=_fwd_eager)(batch_norm_act_fwd)
_backward = fused_op("fusion_advisor::batch_norm_act_bwd", fake=_bwd_fake)(batch_norm_act_bwd)


class BatchNormActFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, running_mean, running_var, weight, bias, training, momentum, eps, activation, negative_slope):
        x = core.dense(x)   # (a copy where the kernels cannot read x in place: made once, saved for backward)
        y, mean, rstd = _forward(x, running_mean, running_var, weight, bias, training, momentum, eps, activation,
                                 negative_slope)
        # The backward's per-channel statistics: the batch's (training), else the running ones.
        ctx.save_for_backward(x, weight, bias, *((mean, rstd) if training else (running_mean, running_var)))
        ctx.training, ctx.eps, ctx.activation, ctx.negative_slope = training, eps, activation, negative_slope
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, bias, center, spread = ctx.saved_tensors
        param_grads = ctx.needs_input_grad[3] or ctx.needs_input_grad[4]
        dx, dw, db = _backward(dy, x, weight, bias, center, spread, ctx.training, ctx.eps, ctx.activation,
                               ctx.negative_slope, param_grads)
        return (dx, None, None, dw if ctx.needs_input_grad[3] else None, db if ctx.needs_input_grad[4] else None,
                None, None, None, None, None)


def batch_norm_act(x: torch.Tensor, running_mean: Optional[torch.Tensor], running_var: Optional[torch.Tensor],
                   weight: Optional[torch.Tensor] = None, bias: Optional[torch.Tensor] = None, training: bool = False,
                   momentum: float = 0.1, eps: float = 1e-5, activation: str = "relu",
                   negative_slope: float = 0.01) -> torch.Tensor:
    """Fused `act(F.batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps))`,
    forward and backward, with F.batch_norm's arguments and its updates of the running statistics.
    `negative_slope` is used by leaky_relu only."""
    return BatchNormActFunction.apply(x, running_mean, running_var, weight, bias, bool(training), float(momentum),
                                      float(eps), activation, float(negative_slope))


def reference(x: torch.Tensor, running_mean: Optional[torch.Tensor], running_var: Optional[torch.Tensor],
              weight: Optional[torch.Tensor] = None, bias: Optional[torch.Tensor] = None, training: bool = False,
              momentum: float = 0.1, eps: float = 1e-5, activation: str = "relu",
              negative_slope: float = 0.01) -> torch.Tensor:
    """BN then the activation, as nn.BatchNorm2d -> nn.ReLU (and kin) run them."""
    return torch_activation(F.batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps),
                            activation, negative_slope)


# -- the module ---------------------------------------------------------------------------------
_BatchNorm = nn.modules.batchnorm._BatchNorm


def _hooked(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks)


def activation_of(module: nn.Module) -> tuple[str, float] | None:
    """(activation name, negative_slope) of a module that is one of the activations fused here, else None."""
    return None if _hooked(module) else module_activation(module)   # (a hooked one's hooks would no longer run)


def batch_norm_refusal(bn: nn.Module) -> str | None:
    """Why BatchNormAct cannot take this module's place (None: it can)."""
    if not isinstance(bn, _BatchNorm):
        return f"{type(bn).__name__} is not a BatchNorm"
    if isinstance(bn, nn.SyncBatchNorm):
        return "SyncBatchNorm reduces its statistics across processes"
    if type(bn).forward is not _BatchNorm.forward:
        return f"{type(bn).__name__} has a forward of its own"
    if _hooked(bn):
        return "it has hooks"
    if any(isinstance(t, nn.parameter.UninitializedTensorMixin) for t in (*bn.parameters(), *bn.buffers())):
        return "a lazy BatchNorm not yet run"
    return None


class BatchNormAct(nn.Module):
    """A BatchNorm module followed by an activation, as one fused op: built from an existing
    BatchNorm1d/2d/3d, whose parameters and buffers it holds under the same names (shared, not
    copied: state_dict keys and an optimizer built before are unchanged). Its forward is
    _BatchNorm.forward's (num_batches_tracked, momentum=None's cumulative average, running
    statistics untracked, eval mode) with the fused functional in place of F.batch_norm."""

    _version = 2   # _BatchNorm's state_dict version

    def __init__(self, bn: nn.Module, activation: str = "relu", negative_slope: float = 0.01):
        refusal = batch_norm_refusal(bn)
        if refusal:
            raise ValueError(f"BatchNormAct: cannot take {type(bn).__name__}'s place: {refusal}")
        activation_id(activation)
        super().__init__()
        self.num_features, self.eps, self.momentum = bn.num_features, bn.eps, bn.momentum
        self.affine, self.track_running_stats = bn.affine, bn.track_running_stats
        self.activation, self.negative_slope = activation, float(negative_slope)
        self.input_class = type(bn)    # its _check_input_dim says which input dims it takes
        for name in ("weight", "bias"):
            self.register_parameter(name, getattr(bn, name))
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            self.register_buffer(name, getattr(bn, name), persistent=name not in bn._non_persistent_buffers_set)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.input_class._check_input_dim(self, x)
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        use_batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        tracked = not self.training or self.track_running_stats
        return batch_norm_act(x, self.running_mean if tracked else None, self.running_var if tracked else None,
                              self.weight, self.bias, use_batch_stats, factor, self.eps, self.activation,
                              self.negative_slope)

    def extra_repr(self) -> str:
        return (f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, affine={self.affine}, "
                f"track_running_stats={self.track_running_stats}, then {self.activation} (fused Triton)")


def fusable_pairs(container: nn.Module) -> list[tuple[str, str, str, float]]:
    """(BN child, activation child, activation, negative_slope) for each BatchNorm child immediately
    followed, in registration order, by an activation child fused here."""
    children = list(container.named_children())
    pairs = []
    for (bn_name, bn), (act_name, act) in zip(children, children[1:]):
        found = activation_of(act)
        if found is not None and batch_norm_refusal(bn) is None:
            pairs.append((bn_name, act_name, *found))
    return pairs


def is_conv_norm_act(container: nn.Module) -> bool:
    """A block of leaf modules (torchvision's Conv2dNormActivation, HF's ResNetConvLayer, YOLO's Conv,
    an nn.Sequential of them) with a BN child followed by an activation child. Only blocks of leaves:
    the equivalence check then runs one block, and the modules of a larger one (a whole ResNet's
    stem) stay reachable for their own swaps."""
    children = list(container.children())
    return (len(children) >= 2 and all(next(c.children(), None) is None for c in children)
            and bool(fusable_pairs(container)))


def fuse_conv_norm_act(container: nn.Module) -> nn.Module:
    """A shallow copy of the container (same class and attributes, its own child table) with each
    BN -> activation pair's BN replaced by a BatchNormAct and the activation by nn.Identity: the
    container's own forward runs unchanged. Where its forward uses the activation elsewhere too (a
    ResNet BasicBlock's one ReLU, also after the residual add), the copy computes something else:
    patch's equivalence check refuses it."""
    pairs = fusable_pairs(container)
    if not pairs:
        raise ValueError("no BatchNorm child followed by a supported activation child "
                         f"({', '.join(type(c).__name__ for c in container.children())})")
    new = copy.copy(container)
    new._modules = type(container._modules)(container._modules)
    new._parameters = type(container._parameters)(container._parameters)
    new._buffers = type(container._buffers)(container._buffers)
    for bn_name, act_name, activation, negative_slope in pairs:
        new._modules[bn_name] = BatchNormAct(container._modules[bn_name], activation, negative_slope)
        new._modules[act_name] = nn.Identity()
    return new


# -- the pattern ----------------------------------------------------------------------------------
def make_inputs(params: dict, device: torch.device, requires_grad: bool = True) -> Inputs:
    """params: shape (N, C, *), dtype, activation; optional training (default True), momentum, eps,
    weight / bias / running_stats (bools, default True), weight_dtype (of the parameters and running
    statistics; default dtype), memory_format ("channels_last"), negative_slope."""
    shape, channels = params["shape"], params["shape"][1]
    dtype, pdtype = param_dtype(params), param_dtype(params, "weight_dtype")
    # Channels of their own offsets and scales: the statistics differ per channel, and are far from 0 and 1.
    view = (1, channels) + (1,) * (len(shape) - 2)
    x = (torch.randn(shape, device=device) * (0.5 + torch.rand(view, device=device))
         + torch.randn(view, device=device)).to(dtype)
    if params.get("memory_format") == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last if len(shape) == 4 else torch.channels_last_3d)
    x.requires_grad_(requires_grad)
    running = params.get("running_stats", True)
    running_mean = (0.3 * torch.randn(channels, device=device)).to(pdtype) if running else None
    running_var = (0.5 + torch.rand(channels, device=device)).to(pdtype) if running else None
    weight = bias = None
    if params.get("weight", True):
        weight = (1.0 + 0.3 * torch.randn(channels, device=device)).to(pdtype).requires_grad_(requires_grad)
    if params.get("bias", True):
        bias = (0.3 * torch.randn(channels, device=device)).to(pdtype).requires_grad_(requires_grad)
    grads = (0,) + tuple(i for i, p in ((3, weight), (4, bias)) if p is not None)
    return Inputs((x, running_mean, running_var, weight, bias),
                  {"training": params.get("training", True), "momentum": params.get("momentum", 0.1),
                   "eps": params.get("eps", 1e-5), "activation": params["activation"],
                   "negative_slope": params.get("negative_slope", 0.01)},
                  grad_inputs=grads if requires_grad else ())


def plan_for(params: dict) -> core.Plan:
    """The launchers' plan for these params on a GPU of params["num_sms"] SMs (default 132, an H100)."""
    fmt = torch.contiguous_format
    if params.get("memory_format") == "channels_last":
        fmt = torch.channels_last if len(params["shape"]) == 4 else torch.channels_last_3d
    x = torch.empty(params["shape"], device="meta", memory_format=fmt)
    return core.plan(core.channel_view(x), params.get("num_sms", 132))


def fused_bytes(params: dict) -> dict:
    shape, channels = params["shape"], params["shape"][1]
    m = math.prod(shape)
    e = param_dtype(params).itemsize
    w = param_dtype(params, "weight_dtype").itemsize
    k = int(params.get("weight", True)) + int(params.get("bias", True))
    running = params.get("running_stats", True)
    splits = plan_for(params).splits
    if params.get("training", True):
        forward = m * 3 * e + 2 * 3 * splits * channels * 4 + 2 * 2 * channels * 4 + k * channels * w
        forward += 4 * channels * w if running else 0
        backward = (m * 5 * e + 2 * 2 * splits * channels * 4 + 2 * 2 * channels * 4 + 2 * k * channels * w
                    + k * channels * w + 2 * 2 * channels * 4)
        return {"forward": forward, "backward": backward}
    backward = m * 3 * e + 2 * channels * w + k * channels * w
    if k:
        backward += m * 2 * e + 2 * channels * w + k * channels * w + 2 * 2 * splits * channels * 4 + k * channels * w
    return {"forward": m * 2 * e + 2 * channels * w + k * channels * w, "backward": backward}


# Traced op name -> activation. gelu's `approximate` is not in the trace: a traced gelu reads as exact GELU.
# relu6 is traced as hardtanh (its bounds, 0 and 6, in the Concrete Inputs: checked below).
_TRACED_ACTIVATIONS = {"relu": "relu", "silu": "silu", "gelu": "gelu", "leaky_relu": "leaky_relu",
                       "sigmoid": "sigmoid", "hardtanh": "relu6", "hardswish": "hardswish"}
_TRACED_NORMS = ("batch_norm", "cudnn_batch_norm", "native_batch_norm")


def _flag(text) -> bool | None:
    return {"True": True, "False": False, "true": True, "false": False, "1": True, "0": False}.get(str(text))


def _number(text, default: float) -> float:
    try:
        return float(text)
    except (TypeError, ValueError):
        return default


def params_from_ops(ops: Sequence[OpRecord]) -> dict | None:
    """Shape, dtypes, mode and scalars from a traced aten::batch_norm (input, weight, bias,
    running_mean, running_var, training, momentum, eps, cudnn_enabled), cudnn_batch_norm or
    native_batch_norm (the same first eight), followed by an activation on a tensor of its shape."""
    for i, op in enumerate(ops):
        if op.short not in _TRACED_NORMS or not op.dims or not op.dims[0] or not op.types:
            continue
        dims = list(op.dims) + [()] * 8
        types = list(op.types) + [""] * 8
        concrete = [c if isinstance(c, str) else ("" if c is None else str(c)) for c in op.concrete] + [""] * 8
        shape, dtype, training = [int(d) for d in dims[0]], dtype_from_trace(types[0]), _flag(concrete[5])
        act_op = next((o for o in ops[i + 1:] if o.short.rstrip("_") in _TRACED_ACTIVATIONS), None)
        if (dtype is None or len(shape) < 2 or training is None or act_op is None or not act_op.dims
                or [int(d) for d in act_op.dims[0] or ()] != shape):
            continue
        present = {name: bool(dims[at]) for name, at in
                   (("weight", 1), ("bias", 2), ("running_mean", 3), ("running_var", 4))}
        running = present["running_mean"] and present["running_var"]
        if not training and not running:
            continue   # eval mode needs running statistics: not a valid call
        activation = _TRACED_ACTIVATIONS[act_op.short.rstrip("_")]
        if activation == "relu6" and [_number(c, None) for c in act_op.concrete[1:3]] != [0.0, 6.0]:
            continue   # a hardtanh with other bounds
        params = {"shape": shape, "dtype": dtype_name(dtype), "activation": activation, "training": training,
                  "momentum": _number(concrete[6], 0.1), "eps": _number(concrete[7], 1e-5)}
        for name in ("weight", "bias"):
            if not present[name]:
                params[name] = False
        if not running:
            params["running_stats"] = False
        pdtype = next((dtype_from_trace(types[at]) for at in (1, 2, 3, 4) if dims[at]), None)
        if pdtype is not None and pdtype != dtype:
            params["weight_dtype"] = dtype_name(pdtype)
        if activation == "leaky_relu" and len(act_op.concrete) > 1:
            slope = _number(act_op.concrete[1], None)
            if slope is not None:
                params["negative_slope"] = slope
        return params
    return None


# ResNet-50 training activations (batch 256, 224 x 224): each stage's BN -> ReLU; one BN -> SiLU.
_RESNET50 = ([256, 64, 112, 112], [256, 256, 56, 56], [256, 512, 28, 28], [256, 1024, 14, 14], [256, 2048, 7, 7])

PATTERN = register_pattern(
    __name__,
    description="BatchNorm (training or eval) + activation (ReLU, SiLU, GELU, ...) as Triton kernels each way",
    forward_signature=r"\b(?:cudnn_|native_)?batch_norm (?:\S+ ){0,4}(?:relu|silu|gelu|leaky_relu|sigmoid|hardtanh|hardswish)_?\b",
    modules=("Conv1dNormActivation", "Conv2dNormActivation", "Conv3dNormActivation", "ResNetConvLayer"),
    module_factory=fuse_conv_norm_act,
    module_shape=is_conv_norm_act,
    stateful_modules=True,
    module_is_block=True,
    example_params={"shape": [3, 5, 7, 9], "dtype": "float32", "activation": "relu"},
    bench_params=tuple({"shape": s, "dtype": "bfloat16", "activation": "relu"} for s in _RESNET50)
    + ({"shape": [256, 256, 56, 56], "dtype": "bfloat16", "activation": "silu"},),
)
