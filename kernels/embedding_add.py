"""Token + position embedding: GPT-2's `wte(idx) + wpe(pos)` in one launch.

Eager PyTorch runs two embedding gathers (index_select) that each write a (tokens, hidden) tensor,
then an add that reads both back; the backward runs embedding_dense_backward once per table.

Forward: one program per (token, hidden chunk) reads its two weight rows and writes the sum once.

Backward, deterministic, no atomics: per table, the flat indices are sorted (stable) and
`searchsorted(right=True)` gives where each index's run of equal values ends. One launch covers both
tables: the program at sorted position i does nothing unless i starts a run; the start sums dy over
its run in token order (fp32) and writes that weight row's gradient once. The sum order is fixed by
the sort, so the gradient is bitwise the same on every run, unlike `tl.atomic_add` into the weight
gradient, whose fp32 add order changes with scheduling (and which in bf16 would round at every add).
The price: a sort and a searchsorted of n int64 per table, and a token id that repeats k times is
summed by one program (k rows serially, parallel over hidden chunks) rather than by k in parallel.

Bytes for n tokens, hidden H, weight element sizes a (wte), b (wpe), output size o = max(a, b),
vocab V and P positions (index tensors int64):
  unfused forward:  gather 8n + nHa + nHa, gather 8n + nHb + nHb, add nH(a + b + o):
                    n*(16 + H*(3a + 3b + o))
  fused forward:    read both indices and both rows, write the sum once: n*(16 + H*(a + b + o))
  fused backward:   zero both weight gradients: H*(V*a + P*b); per table, sort (read 8n, write 16n)
                    and searchsorted (read 16n, write 8n), then the kernel reads the sorted index and
                    its neighbour (16n), the run end (8n), the sort order (8n) and dy (nHo), and
                    writes each distinct row once (at most min(V, n)*H*a and min(P, n)*H*b):
                    H*(V*a + P*b) + 2*n*(80 + H*o) + H*(min(V, n)*a + min(P, n)*b)
`fused_bytes` returns exactly these numbers (the distinct-row writes at their upper bound).
"""
from __future__ import annotations

import math
import torch
import triton
import triton.language as tl

from fusion_advisor.kernels.common import cdiv, check_device, check_dtype, next_power_of_2
from fusion_advisor.kernels.fused_op import fused_op
from fusion_advisor.kernels.registry import (Inputs, OpRecord, dtype_from_trace, dtype_name, param_dtype,
                                             register_pattern)

_INDEX_DTYPES = (torch.int64, torch.int32)


@triton.jit
def _embedding_add_fwd_kernel(IDX, POS, WTE, WPE, OUT, n_cols, vocab, n_positions, stride_wte, stride_wpe,
                              BLOCK_SIZE: tl.constexpr):
    token = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = cols < n_cols
    i = tl.load(IDX + token).to(tl.int64)
    p = tl.load(POS + token).to(tl.int64)
    # An out-of-range index reads row 0 and makes the output NaN (PyTorch raises instead).
    i_ok = (i >= 0) & (i < vocab)
    p_ok = (p >= 0) & (p < n_positions)
    a = tl.load(WTE + tl.where(i_ok, i, 0) * stride_wte + cols, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(WPE + tl.where(p_ok, p, 0) * stride_wpe + cols, mask=mask, other=0.0).to(tl.float32)
    y = tl.where(i_ok & p_ok, a + b, float("nan"))
    tl.store(OUT + token * n_cols + cols, y.to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _run_sum(DY, SORTED, ORDER, RUN_END, DW, i, stride_dw, cols, mask, n_cols, BLOCK_SIZE: tl.constexpr):
    """If sorted position i starts a run of equal indices, write the sum of dy over the run to DW."""
    key = tl.load(SORTED + i)
    prev = tl.load(SORTED + tl.maximum(i - 1, 0))
    if (i == 0) | (prev != key):
        end = tl.load(RUN_END + i)
        acc = tl.zeros((BLOCK_SIZE,), dtype=tl.float32)
        for j in range(i, end):
            token = tl.load(ORDER + j)
            acc += tl.load(DY + token * n_cols + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(DW + key * stride_dw + cols, acc.to(DW.dtype.element_ty), mask=mask)


@triton.jit
def _embedding_add_bwd_kernel(DY, IDX_SORTED, IDX_ORDER, IDX_END, POS_SORTED, POS_ORDER, POS_END, DWTE, DWPE,
                              n_tokens, n_cols, stride_dwte, stride_dwpe, BLOCK_SIZE: tl.constexpr):
    # Programs [0, n_tokens) walk wte's sorted indices, [n_tokens, 2*n_tokens) wpe's.
    pid = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = cols < n_cols
    if pid < n_tokens:
        _run_sum(DY, IDX_SORTED, IDX_ORDER, IDX_END, DWTE, pid, stride_dwte, cols, mask, n_cols, BLOCK_SIZE)
    else:
        _run_sum(DY, POS_SORTED, POS_ORDER, POS_END, DWPE, pid - n_tokens, stride_dwpe, cols, mask, n_cols,
                 BLOCK_SIZE)


def _hidden_block(n_cols: int) -> tuple[int, int]:
    """(BLOCK_SIZE, num_warps): up to 1024 columns a program, so GPT-2's 768 is one chunk; 8 columns
    a thread (one 16-byte access in bf16)."""
    block = min(next_power_of_2(n_cols), 1024)
    return block, max(1, block // 256)


def _out_dtype(wte: torch.Tensor, wpe: torch.Tensor) -> torch.dtype:
    return torch.promote_types(wte.dtype, wpe.dtype)


def _flat_positions(idx: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """pos broadcast to idx's shape (GPT-2 passes arange(T) for (B, T) tokens), flat and contiguous."""
    try:
        shape = torch.broadcast_shapes(idx.shape, pos.shape)
    except RuntimeError:
        shape = None
    if shape != idx.shape:
        raise ValueError(f"embedding_add: positions {tuple(pos.shape)} do not broadcast to the token ids' "
                         f"shape {tuple(idx.shape)}")
    return pos.expand(idx.shape).reshape(-1).contiguous()


def _check(idx, pos, wte, wpe) -> None:
    check_dtype(wte, "embedding_add")
    check_dtype(wpe, "embedding_add")
    check_device(idx, pos, wte, wpe, op="embedding_add")
    for name, t in (("token ids", idx), ("positions", pos)):
        if t.dtype not in _INDEX_DTYPES:
            raise TypeError(f"embedding_add: {name} must be int64 or int32, got {dtype_name(t.dtype)}")
    if wte.dim() != 2 or wpe.dim() != 2 or wte.shape[1] != wpe.shape[1]:
        raise ValueError(f"embedding_add: weights must be (rows, hidden) with the same hidden size, got "
                         f"{tuple(wte.shape)} and {tuple(wpe.shape)}")


def embedding_add_fwd(idx: torch.Tensor, pos: torch.Tensor, wte: torch.Tensor, wpe: torch.Tensor) -> torch.Tensor:
    """Launcher: wte[idx] + wpe[pos], shape idx.shape + (hidden,)."""
    _check(idx, pos, wte, wpe)
    idx_flat = idx.reshape(-1).contiguous()
    pos_flat = _flat_positions(idx, pos)
    n_tokens, n_cols = idx_flat.numel(), wte.shape[1]
    # Rows must be contiguous; a weight with a strided row stride is fine.
    wte = wte if wte.stride(-1) == 1 else wte.contiguous()
    wpe = wpe if wpe.stride(-1) == 1 else wpe.contiguous()
    out = torch.empty((n_tokens, n_cols), dtype=_out_dtype(wte, wpe), device=wte.device)
    block, warps = _hidden_block(n_cols)
    if n_tokens and n_cols:
        _embedding_add_fwd_kernel[(n_tokens, cdiv(n_cols, block))](
            idx_flat, pos_flat, wte, wpe, out, n_cols, wte.shape[0], wpe.shape[0], wte.stride(0), wpe.stride(0),
            BLOCK_SIZE=block, num_warps=warps)
    return out.view(*idx.shape, n_cols)


def _runs(flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(sorted values, their original positions, where each value's run ends), no host sync."""
    flat = flat.to(torch.int64)
    sorted_vals, order = torch.sort(flat, stable=True)
    run_end = torch.searchsorted(sorted_vals, sorted_vals, right=True)
    return sorted_vals, order, run_end


def embedding_add_bwd(dy: torch.Tensor, idx: torch.Tensor, pos: torch.Tensor, wte_shape: list[int],
                      wte_dtype: torch.dtype, wpe_shape: list[int],
                      wpe_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Launcher: (d wte, d wpe), deterministic (see the module docstring)."""
    n_cols = wte_shape[1]
    dy2 = dy.reshape(-1, n_cols).contiguous()
    n_tokens = dy2.shape[0]
    dwte = torch.zeros(wte_shape, dtype=wte_dtype, device=dy.device)
    dwpe = torch.zeros(wpe_shape, dtype=wpe_dtype, device=dy.device)
    if not (n_tokens and n_cols):
        return dwte, dwpe
    idx_sorted, idx_order, idx_end = _runs(idx.reshape(-1))
    pos_sorted, pos_order, pos_end = _runs(_flat_positions(idx, pos))
    block, warps = _hidden_block(n_cols)
    _embedding_add_bwd_kernel[(2 * n_tokens, cdiv(n_cols, block))](
        dy2, idx_sorted, idx_order, idx_end, pos_sorted, pos_order, pos_end, dwte, dwpe, n_tokens, n_cols,
        dwte.stride(0), dwpe.stride(0), BLOCK_SIZE=block, num_warps=warps)
    return dwte, dwpe


# torch.library ops: a patched model still runs under torch.compile(fullgraph=True). Eager calls run
# the launchers directly (see fused_op).
_forward = fused_op("fusion_advisor::embedding_add_fwd", fake=lambda idx, pos, wte, wpe: wte.new_empty(
    (*idx.shape, wte.shape[1]), dtype=_out_dtype(wte, wpe)))(embedding_add_fwd)
_backward = fused_op("fusion_advisor::embedding_add_bwd", fake=lambda dy, idx, pos, wte_shape, wte_dtype, wpe_shape,
                     wpe_dtype: (dy.new_empty(wte_shape, dtype=wte_dtype), dy.new_empty(wpe_shape, dtype=wpe_dtype)))(
    embedding_add_bwd)


class EmbeddingAddFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, idx, pos, wte, wpe):
        out = _forward(idx, pos, wte, wpe)
        ctx.save_for_backward(idx, pos)
        ctx.shapes = (list(wte.shape), wte.dtype, list(wpe.shape), wpe.dtype)
        return out

    @staticmethod
    def backward(ctx, dy):
        idx, pos = ctx.saved_tensors
        dwte, dwpe = _backward(dy, idx, pos, *ctx.shapes)
        return None, None, dwte, dwpe


def embedding_add(idx: torch.Tensor, pos: torch.Tensor, wte: torch.Tensor, wpe: torch.Tensor) -> torch.Tensor:
    """Fused `F.embedding(idx, wte) + F.embedding(pos, wpe)`; pos broadcasts to idx's shape."""
    return EmbeddingAddFunction.apply(idx, pos, wte, wpe)


class EmbeddingAdd(torch.nn.Module):
    """GPT-2's token + position embedding over two existing nn.Embedding weights (shared, not copied)."""

    def __init__(self, wte: torch.nn.Parameter, wpe: torch.nn.Parameter):
        super().__init__()
        self.wte_weight = wte
        self.wpe_weight = wpe

    @classmethod
    def from_embeddings(cls, wte: torch.nn.Embedding, wpe: torch.nn.Embedding) -> "EmbeddingAdd":
        for name, emb in (("wte", wte), ("wpe", wpe)):
            unsupported = [opt for opt, on in (("padding_idx", emb.padding_idx is not None),
                                               ("max_norm", emb.max_norm is not None),
                                               ("scale_grad_by_freq", emb.scale_grad_by_freq),
                                               ("sparse", emb.sparse)) if on]
            if unsupported:
                raise ValueError(f"embedding_add: {name} uses {', '.join(unsupported)}, which the fused kernel does not")
        return cls(wte.weight, wpe.weight)

    def forward(self, idx: torch.Tensor, pos: torch.Tensor | None = None) -> torch.Tensor:
        if pos is None:
            pos = torch.arange(idx.shape[-1], device=idx.device)
        return embedding_add(idx, pos, self.wte_weight, self.wpe_weight)

    def extra_repr(self) -> str:
        return f"wte={tuple(self.wte_weight.shape)}, wpe={tuple(self.wpe_weight.shape)} (fused Triton)"


def reference(idx: torch.Tensor, pos: torch.Tensor, wte: torch.Tensor, wpe: torch.Tensor) -> torch.Tensor:
    """nanoGPT / GPT-2: `tok_emb = wte(idx); pos_emb = wpe(pos); x = tok_emb + pos_emb`, verbatim."""
    tok_emb = torch.nn.functional.embedding(idx, wte)
    pos_emb = torch.nn.functional.embedding(pos, wpe)
    return tok_emb + pos_emb


def make_inputs(params: dict, device: torch.device, requires_grad: bool = True) -> Inputs:
    """Token ids uniform over the vocab; positions arange(seq) (GPT-2's), batched if `pos_batched`."""
    dtype = param_dtype(params)
    pdtype = param_dtype(params, "pos_dtype")
    batch, seq = params["idx_shape"]
    hidden = params["hidden"]
    if seq > params["positions"]:   # caught here: on a GPU it is a device-side assert that ends the process's CUDA
        raise ValueError(f"embedding_add: a position table of {params['positions']} rows cannot index "
                         f"positions 0..{seq - 1}")
    idx = torch.randint(0, params["vocab"], (batch, seq), device=device)
    pos = torch.arange(seq, device=device)
    if params.get("pos_batched", False):
        pos = pos.expand(batch, seq).contiguous()
    wte = torch.randn(params["vocab"], hidden, device=device).to(dtype).requires_grad_(requires_grad)
    wpe = torch.randn(params["positions"], hidden, device=device).to(pdtype).requires_grad_(requires_grad)
    return Inputs((idx, pos, wte, wpe), {}, grad_inputs=(2, 3) if requires_grad else ())


def fused_bytes(params: dict) -> dict:
    batch, seq = params["idx_shape"]
    n = batch * seq
    h, v, p = params["hidden"], params["vocab"], params["positions"]
    a = param_dtype(params).itemsize
    b = param_dtype(params, "pos_dtype").itemsize
    o = max(a, b)
    return {"forward": n * (16 + h * (a + b + o)),
            "backward": h * (v * a + p * b) + 2 * n * (80 + h * o) + h * (min(v, n) * a + min(p, n) * b)}


def params_from_ops(ops: list[OpRecord]) -> dict | None:
    """Shapes and dtypes from two traced aten::embedding ops and the add of their outputs: the one
    with more indices is the token table, the other the position table."""
    ops = list(ops)
    embs = [o for o in ops if o.short == "embedding" and len(o.dims) >= 2 and len(o.dims[0]) == 2 and o.types]
    if len(embs) < 2:
        return None
    tok, pos = sorted(embs[:2], key=lambda o: -math.prod(o.dims[1]))
    (vocab, hidden), (positions, pos_hidden) = tok.dims[0], pos.dims[0]
    idx_shape = list(tok.dims[1])
    if hidden != pos_hidden or len(idx_shape) != 2 or not pos.dims[1] or pos.dims[1][-1] != idx_shape[-1]:
        return None
    if positions < idx_shape[-1]:
        # not a position table: BERT's and RoBERTa's token-type table (1 or 2 rows) is added first;
        # the kernel indexes the second table by position, which would run past its end
        return None
    dtype, pdtype = dtype_from_trace(tok.types[0]), dtype_from_trace(pos.types[0])
    if dtype is None or pdtype is None:
        return None
    last = max(ops.index(tok), ops.index(pos))
    if not any(o.short == "add" for o in ops[last + 1:]):
        return None
    return {"idx_shape": idx_shape, "vocab": vocab, "positions": positions, "hidden": hidden,
            "dtype": dtype_name(dtype), "pos_dtype": dtype_name(pdtype), "pos_batched": len(pos.dims[1]) == 2}



PATTERN = register_pattern(
    __name__,
    description="token + position embedding (two gathers and an add) as one Triton launch; "
                "deterministic sort-based weight gradients",
    forward_signature=r"(^| )embedding( \S+)* embedding( \S+)* add( |$)",
    example_params={"idx_shape": [3, 37], "vocab": 101, "positions": 64, "hidden": 200, "dtype": "float32"},
    bench_params=tuple({"idx_shape": [batch, seq], "vocab": 50304, "positions": 2048, "hidden": hidden,
                        "dtype": "bfloat16"}
                       for batch, seq in ((8, 512), (8, 2048), (16, 1024)) for hidden in (768, 1600)),
)
