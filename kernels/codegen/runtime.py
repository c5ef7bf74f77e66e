"""Helpers every generated kernel module carries: launch-time shape checks, index constants,
block sizes, gradient partial sums, and the @triton.jit math the expressions call.

emit.py copies the code below the EMBED marker verbatim into each generated module, so a module
dropped into fusion_kernels/<cluster>.py needs torch and triton only; the pattern imports the same
code from here (bytes, tests).

Words:
  spec     the static facts of one generated kernel, a literal dict in its module: `name`, `rank`,
           `groups`, `reduction` (whether the chain ends in one), the constexpr names each kernel
           takes (`forward_constants`, `backward_constants`), `inputs` as (name, dtype, kept flag
           per group)
  plan     a LaunchPlan: everything a call's launches derive from its inputs' shapes, dtypes and
           devices, computed on the first call with them and looked up on every later one
  groups   the loop shape's dims cut into runs of adjacent dims over which every input is either
           kept (its dims equal the loop's) or broadcast (its dims are 1). Index arithmetic is per
           group: a (C,1,1) bias over (N,C,H,W) costs one // and one % by compile-time constants.
  flat     the pointwise forward's layout: 1-D blocks over the flattened loop shape
  rows     the layout of reductions and of every backward: (rows, cols) tiles, cols = the last group
"""
# ---- EMBED: everything below is copied into generated modules ----
import math
import os

import torch
import triton
import triton.language as tl

MAX_ROW = 65536      # a reduction keeps its whole row in registers
MAX_GRID_Y = 65535   # CUDA's limit on a launch grid's second dim


def interpreting():
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def check_inputs(spec, tensors):
    """A clear error unless the inputs are tensors of the traced dtypes on one device (a CUDA one,
    or any under the interpreter)."""
    if len(tensors) != len(spec["inputs"]):
        raise TypeError(f"{spec['name']}: expected {len(spec['inputs'])} tensors, got {len(tensors)}")
    device = tensors[0].device if isinstance(tensors[0], torch.Tensor) else None
    for (name, dtype, _kept), t in zip(spec["inputs"], tensors):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{spec['name']}: {name} must be a tensor, got {type(t).__name__}")
        if t.dtype != dtype:
            raise TypeError(f"{spec['name']}: {name} is {t.dtype}; the traced chain had {dtype}")
        if t.device != device:
            raise ValueError(f"{spec['name']}: {name} is on {t.device}, the first input on {device}")
    if device.type != "cuda" and not interpreting():
        raise RuntimeError(f"{spec['name']}: tensors must be on a CUDA device (or run with TRITON_INTERPRET=1)")


def padded(shape, rank):
    shape = tuple(shape)
    return (1,) * (rank - len(shape)) + shape


def logical(shape, block):
    """A padded shape in the kernels' logical order: the reduced block of adjacent dims (first,
    last), when it is not at the end, moved last."""
    shape = tuple(shape)
    if block is None:
        return shape
    a, b = block
    return shape[:a] + shape[b + 1:] + shape[a:b + 1]


def to_logical(spec, t):
    """A broadcast input of a reduction over dims that are not the last, as the kernels index it:
    contiguous in the logical order (it is small: a (C,1,1) bias; full-size inputs are not copied)."""
    rank, (a, b) = spec["rank"], spec["reduce_dims"]
    k = b - a + 1
    return t.reshape(padded(t.shape, rank)).movedim(tuple(range(a, b + 1)), tuple(range(rank - k, rank))).contiguous()


def loop_shape(spec, shapes):
    """The inputs' broadcast shape, checked against the traced broadcast structure (same rank,
    the same dims kept or broadcast); any sizes may differ from the traced ones."""
    rank = spec["rank"]
    try:
        shape = tuple(torch.broadcast_shapes(*shapes))
    except RuntimeError as exc:
        raise ValueError(f"{spec['name']}: the inputs do not broadcast ({exc})") from None
    if len(shape) > rank:
        raise ValueError(f"{spec['name']}: inputs broadcast to rank {len(shape)}, the traced chain had rank {rank}")
    block = spec.get("reduce_dims")
    if block is not None and len(shape) != rank:
        raise ValueError(f"{spec['name']}: the chain reduces dims {list(block)} of rank-{rank} tensors; "
                         f"these inputs broadcast to rank {len(shape)}")
    full = logical(padded(shape, rank), block)
    for (name, _dtype, kept), s in zip(spec["inputs"], shapes):
        p = logical(padded(s, rank), block)
        for g, dims in enumerate(spec["groups"]):
            if any((p[d] != full[d]) if kept[g] else (p[d] != 1) for d in dims):
                raise ValueError(f"{spec['name']}: {name} {tuple(s)} broadcasts over {shape} unlike in the traced "
                                 f"chain (dims {list(dims)} {'kept' if kept[g] else 'broadcast'}); build a pattern "
                                 f"for these shapes")
    return shape


def group_sizes(spec, shape):
    """Sizes of the groups of a loop shape (physical: put in the logical order here)."""
    full = logical(padded(shape, spec["rank"]), spec.get("reduce_dims"))
    return [math.prod(full[d] for d in dims) for dims in spec["groups"]]


def index_constants(spec, shape, shapes, layout):
    """The kernels' constexpr index arithmetic: G{g}_SIZE and G{g}_INNER (product of the later
    groups' sizes: every later group in the `flat` layout, later row groups in `rows`), and
    IN{k}_STRIDE{g}, input k's element stride over group g where it is kept. None depends on
    the first dim's size: a new batch size does not recompile."""
    rank = spec["rank"]
    sizes = group_sizes(spec, shape)
    n = len(sizes) if layout == "flat" else len(sizes) - 1
    consts = {}
    for g in range(n):
        consts[f"G{g}_SIZE"] = sizes[g]
        consts[f"G{g}_INNER"] = math.prod(sizes[g + 1:n])
    for k, (_name, _dtype, kept) in enumerate(spec["inputs"]):
        p = logical(padded(shapes[k], rank), spec.get("reduce_dims"))   # as to_logical lays it out
        for g, dims in enumerate(spec["groups"]):
            if kept[g]:
                consts[f"IN{k}_STRIDE{g}"] = math.prod(p[max(dims) + 1:])
    return consts


def flat_block(n):
    """(BLOCK_SIZE, num_warps) of the 1-D pointwise kernel: 8 elements per thread in flight."""
    return (1024, 4) if n <= (1 << 20) else (2048, 8)


def row_tile(n_rows, n_cols, whole_row, budget=2048):
    """(BLOCK_R, BLOCK_C, num_warps) of a (rows, cols) tile of about `budget` elements; a
    reduction needs the whole row in one tile."""
    if whole_row:
        block_c = triton.next_power_of_2(max(n_cols, 1))
        if block_c > MAX_ROW:
            raise ValueError(f"rows of {n_cols} elements are too wide for a one-tile reduction (max {MAX_ROW})")
    else:
        block_c = min(triton.next_power_of_2(max(n_cols, 1)), budget)
    block_r = max(1, min(triton.next_power_of_2(max(n_rows, 1)), budget // block_c))
    elements = block_r * block_c
    warps = 4 if elements <= 2048 else 8 if elements <= 8192 else 16 if elements <= 32768 else 32
    return block_r, block_c, warps


def row_programs(n_row_tiles, n_col_tiles, device, num_sms=None, accumulate=True):
    """(programs, tiles per program) along the rows of a backward launch. With a column
    accumulator (a "cols" gradient, below) about 4 programs per SM in all, each looping over a
    contiguous run of row tiles so that its column partial sums stay in registers and the
    (programs, cols) partial buffer stays small. Without one a loop only costs parallelism (its
    iterations' loads wait for the previous ones' stores): one tile per program, up to the grid's
    y limit."""
    if accumulate:
        if num_sms is None:
            on_gpu = device.type == "cuda" and not interpreting()
            num_sms = torch.cuda.get_device_properties(device).multi_processor_count if on_gpu else 1
        target = max(1, (4 * num_sms) // max(n_col_tiles, 1))
    else:
        target = MAX_GRID_Y
    programs = max(1, min(n_row_tiles, target))
    per_program = triton.cdiv(n_row_tiles, programs) if n_row_tiles else 0
    programs = triton.cdiv(n_row_tiles, per_program) if per_program else 1
    return programs, per_program


def grad_kind(kept):
    """How the backward kernel writes an input's gradient:
    full      the input has the loop's shape: stored directly, in its dtype
    cols      kept in the columns only (a per-feature bias): each row program sums its rows
              into a (programs, cols) fp32 buffer
    rows      broadcast in the columns (a per-channel (C,1,1) bias, a scalar): each tile sums its
              columns into a (col tiles, rows) fp32 buffer
    elements  anything else: per-element fp32 contributions (a full-size buffer)
    A small torch reduction then sums each buffer to the input's shape (finish_grad)."""
    if all(kept):
        return "full"
    if not kept[-1]:
        return "rows"
    if not any(kept[:-1]):
        return "cols"
    return "elements"


def grad_buffer_shape(kind, sizes, programs, n_col_tiles):
    n_rows, n_cols = math.prod(sizes[:-1]), sizes[-1]
    return {"cols": (programs, n_cols), "rows": (n_col_tiles, n_rows), "elements": (n_rows, n_cols)}[kind]


def grad_finish(kind, kept, sizes, buffer_shape):
    """(view, dims): the second, small reduction of a partial-sum buffer, one torch.sum of the
    buffer viewed as `view` over `dims`, leaves the input's gradient (in its kept groups' order)."""
    if kind == "cols":
        return buffer_shape, (0,)
    if kind == "rows":     # (col tiles, rows): over the col tiles and the broadcast row groups
        return (buffer_shape[0], *sizes[:-1]), (0, *(1 + g for g, k in enumerate(kept[:-1]) if not k))
    return tuple(sizes), tuple(g for g, k in enumerate(kept) if not k)


class LaunchPlan:
    """What the launches of a call derive from its inputs' shapes, dtypes and device: computed
    once per distinct (shapes, dtypes, devices) by `plan_launches` and kept in the module's
    PLANS dict, so that a call is a key, a dict lookup, the allocations and the launches.
    forward_sizes / backward_sizes are the kernels' runtime size arguments, *_meta their
    constexprs and launch options; grads[k] is None for an input without a gradient (bool), else
    (kind, buffer shape, buffer dtype, view, dims, input shape, input dtype) for grad_buffer and
    finish_grad."""

    def __init__(self, shape, empty, forward, backward, grads):
        self.shape, self.empty, self.grads = shape, empty, grads
        self.forward_grid, self.forward_sizes, self.forward_meta = forward
        self.backward_grid, self.backward_sizes, self.backward_meta = backward


def plan_launches(spec, tensors):
    """The LaunchPlan for these inputs, or a clear error if the kernels cannot take them."""
    check_inputs(spec, tensors)
    shapes = [tuple(t.shape) for t in tensors]
    shape = loop_shape(spec, shapes)
    sizes = group_sizes(spec, shape)
    n = math.prod(shape)
    n_rows, n_cols = math.prod(sizes[:-1]), sizes[-1]
    reduction = spec["reduction"]
    launch = {"INDEX_64": n >= 2**31}

    def constants(names, layout):
        consts = index_constants(spec, shape, shapes, layout)
        return {name: consts[name] for name in names}

    block = spec.get("reduce_dims")
    # A reduced block that is not at the end: the elements after it, between two of its columns.
    strided = () if block is None else (math.prod(shape[block[1] + 1:]),)
    if reduction:
        block_r, block_c, warps = row_tile(n_rows, n_cols, whole_row=True)
        forward = ((triton.cdiv(n_rows, block_r),), (n_rows, n_cols, *strided),
                   {**constants(spec["forward_constants"], "rows"), "BLOCK_R": block_r, "BLOCK_C": block_c,
                    **launch, "num_warps": warps})
    else:
        block, warps = flat_block(n)
        forward = ((triton.cdiv(n, block),), (n,),
                   {**constants(spec["forward_constants"], "flat"), "BLOCK_SIZE": block, **launch,
                    "num_warps": warps})

    block_r, block_c, warps = row_tile(n_rows, n_cols, whole_row=reduction)
    n_col_tiles = triton.cdiv(n_cols, block_c)
    kinds = [None if dtype == torch.bool else grad_kind(kept) for _name, dtype, kept in spec["inputs"]]
    programs, per_program = row_programs(triton.cdiv(n_rows, block_r), n_col_tiles, tensors[0].device,
                                         accumulate="cols" in kinds)
    backward = ((n_col_tiles, programs), (n_rows, n_cols, per_program, *strided),
                {**constants(spec["backward_constants"], "rows"), "BLOCK_R": block_r, "BLOCK_C": block_c,
                 **launch, "num_warps": warps})
    grads = []
    for (_name, dtype, kept), kind, s in zip(spec["inputs"], kinds, shapes):
        if kind is None:
            grads.append(None)
        elif kind == "full":
            grads.append((kind, s, dtype, None, None, s, dtype))
        else:
            buffer_shape = grad_buffer_shape(kind, sizes, programs, n_col_tiles)
            grads.append((kind, buffer_shape, torch.float32, *grad_finish(kind, kept, sizes, buffer_shape), s, dtype))
    return LaunchPlan(shape, n == 0, forward, backward, grads)


def grad_buffer(plan, k, device):
    """Where the backward kernel writes input k's gradient: the gradient itself, or fp32 partial sums."""
    _kind, shape, dtype = plan.grads[k][:3]
    return torch.empty(shape, dtype=dtype, device=device)


def finish_grad(plan, k, buffer):
    """Input k's gradient from what the kernel wrote: one small torch.sum of a partial-sum buffer."""
    kind, _shape, _dtype, view, dims, shape, dtype = plan.grads[k]
    if kind == "full":
        return buffer
    return buffer.view(view).sum(dims).view(shape).to(dtype)


# -- fp32 math the generated expressions call (tl has no tanh, log1p or gelu) ----------------------
@triton.jit
def round_to_bf16(x):
    """x rounded to the nearest bfloat16 (ties to even), kept in fp32: what x.to(tl.bfloat16) does on
    a GPU. Triton's interpreter truncates there instead, which would move values across a clamp."""
    bits = x.to(tl.uint32, bitcast=True)
    bits = bits + 0x7FFF + ((bits >> 16) & 1)
    return ((bits >> 16) << 16).to(tl.float32, bitcast=True)


@triton.jit
def tanh_f32(x):
    return 2.0 * tl.sigmoid(2.0 * x) - 1.0


@triton.jit
def softplus_f32(x, beta, threshold):
    z = x * beta
    return tl.where(z > threshold, x, tl.log(1.0 + tl.exp(z)) / beta)


@triton.jit
def gelu_erf(x):
    return 0.5 * x * (1.0 + tl.erf(x * 0.7071067811865476))


@triton.jit
def gelu_erf_grad(x):
    cdf = 0.5 * (1.0 + tl.erf(x * 0.7071067811865476))
    pdf = 0.3989422804014327 * tl.exp(-0.5 * x * x)
    return cdf + x * pdf


@triton.jit
def gelu_tanh(x):
    inner = 0.7978845608028654 * (x + 0.044715 * x * x * x)
    return 0.5 * x * (1.0 + tanh_f32(inner))


@triton.jit
def gelu_tanh_grad(x):
    inner = 0.7978845608028654 * (x + 0.044715 * x * x * x)
    t = tanh_f32(inner)
    return 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * 0.7978845608028654 * (1.0 + 3.0 * 0.044715 * x * x)


@triton.jit
def silu_grad(x):
    s = tl.sigmoid(x)
    return s * (1.0 + x * (1.0 - s))


@triton.jit
def mish_grad(x):
    t = tanh_f32(softplus_f32(x, 1.0, 20.0))
    return t + x * tl.sigmoid(x) * (1.0 - t * t)
