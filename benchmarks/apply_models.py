"""Training-step time and peak memory of real models, before and after fusion-advisor's patch,
beside torch.compile and Liger-Kernel on the same model (GPU).

Models are built from local configs (no hub download): Hugging Face LlamaForCausalLM,
GPT2LMHeadModel and BertModel (eager attention), and examples/llama_train.py's LlamaModel. Each
variant runs in its own fresh process (same seed: the same initial weights and batches), so no
variant inherits another's allocator state, compiled graphs or global patches (Liger's RoPE is
process-global); `--repeats R` runs every variant R times, interleaved round by round, and reports
the median of the runs' median step times with their spread (a single run of the HF Llama
variants on an H200 moved by up to 25 %). Variants: eager, fusion-advisor (`fusion_advisor.patch`
with PATCH_PATTERNS: modules, plus HF's rope function and loss_function), fusion-advisor +
torch.compile, torch.compile, Liger-Kernel (`_apply_liger_kernel_to_instance` defaults).

`enqueue_ms` is the host time of a step up to the loss's sync (forward, backward and optimizer
calls returning): close to `median_step_ms`, the step is bound by the CPU launching kernels, not
by the GPU running them; CUDA graphs or torch.compile are then the remedy, not faster kernels.

`fusion-advisor+flce` adds the linear_cross_entropy pattern (HF causal LMs: in training with labels
the loss comes from the LM head's input in row chunks, the logits are never materialised and
`outputs.logits` is None; the LM head's weight gradient accumulated in bf16, as Liger does);
`fusion-advisor+flce-fp32acc` the same with an fp32 accumulator (V*H*2 bytes more at the peak).

    python benchmarks/apply_models.py --models hf-llama --variants eager,fusion-advisor,fusion-advisor+flce,liger

    python benchmarks/apply_models.py --out apply-models.csv --repeats 3
    python benchmarks/apply_models.py --models llama-example --steps 10
"""
from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODELS = ("llama-example", "hf-llama", "hf-gpt2", "hf-bert")
# Module swaps (norms, gated MLPs) and function swaps (HF's apply_rotary_pos_emb, the model's
# loss_function): each pattern applies where the model has what it replaces.
PATCH_PATTERNS = ("rms_norm", "swiglu", "layer_norm", "rope", "cross_entropy")
FLCE_VARIANTS = ("fusion-advisor+flce", "fusion-advisor+flce-fp32acc")  # + linear_cross_entropy
COLUMNS = ["gpu", "torch", "triton", "transformers", "model", "config", "variant", "median_step_ms", "step_ms_runs",
           "speedup_vs_eager", "enqueue_ms", "peak_mem_gib", "max_loss_rel_diff", "swapped", "error"]


def build(name: str, device, dtype):
    """(model, batch function, loss function, config text)."""
    import torch
    torch.manual_seed(0)
    if name == "llama-example":
        spec = importlib.util.spec_from_file_location("llama_train", ROOT / "examples" / "llama_train.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        hidden, layers, seq, batch, vocab = 2048, 8, 2048, 2, 32000
        model = mod.LlamaModel(vocab, hidden, layers, 16, 5632)
        cfg = f"hidden {hidden}, {layers} layers, seq {seq}, batch {batch}"
        return model.to(device, dtype), (batch, seq, vocab), lambda m, ids: _lm_loss(m(ids[:, :-1]), ids), cfg
    import transformers as tf
    if name == "hf-llama":
        conf = tf.LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=8,
                              num_attention_heads=16, num_key_value_heads=16, max_position_embeddings=2048)
        model, shape = tf.LlamaForCausalLM._from_config(conf, attn_implementation="sdpa"), (2, 2048, 32000)
    elif name == "hf-gpt2":
        conf = tf.GPT2Config(n_embd=1024, n_layer=8, n_head=16, n_positions=1024, resid_pdrop=0.0, embd_pdrop=0.0,
                             attn_pdrop=0.0)
        model, shape = tf.GPT2LMHeadModel._from_config(conf, attn_implementation="eager"), (4, 1024, 50257)
    elif name == "hf-bert":
        conf = tf.BertConfig(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                             hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
        model, shape = tf.BertModel._from_config(conf, attn_implementation="eager"), (8, 512, 30522)
    else:
        raise SystemExit(f"unknown model {name}")
    batch, seq, _ = shape
    cfg = f"{type(model).__name__}, hidden {conf.hidden_size}, {conf.num_hidden_layers} layers, seq {seq}, batch {batch}"
    if name == "hf-bert":
        loss = lambda m, ids: m(input_ids=ids[:, :-1]).last_hidden_state.float().pow(2).mean()  # noqa: E731
    else:
        loss = lambda m, ids: m(input_ids=ids[:, :-1], labels=ids[:, :-1]).loss  # noqa: E731
    return model.to(device, dtype), shape, loss, cfg


def swapped_text(handle) -> str:
    """What the patch changed, for the CSV: module count, the functions by name, what it skipped."""
    text = f"{len(handle.swaps)} modules"
    if handle.functions:
        text += " + " + ", ".join(f"{f.path.rsplit('.', 1)[-1]} ({f.pattern})" for f in handle.functions)
    if handle.skipped:
        text += f"; skipped {len(handle.skipped)}: " + "; ".join(f"{p}: {why}" for p, why in handle.skipped)[:300]
    return text


def _lm_loss(logits, ids):
    import torch.nn.functional as F
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


def run_variant(model, shape, loss_fn, steps: int, warmup: int, device):
    import torch
    batch, seq, vocab = shape
    gen = torch.Generator(device="cpu").manual_seed(1)
    batches = [torch.randint(0, vocab, (batch, seq + 1), generator=gen).to(device) for _ in range(4)]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, foreach=True)
    losses, times, enqueue = [], [], []
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        loss = loss_fn(model, batches[i % len(batches)])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        t1 = time.perf_counter()
        losses.append(float(loss.detach().float()))  # syncs: the step is over when this returns
        if i >= warmup:
            times.append(time.perf_counter() - t0)
            enqueue.append(t1 - t0)
    return statistics.median(times), statistics.median(enqueue), torch.cuda.max_memory_allocated(), losses


def one_variant(name: str, variant: str, steps: int, warmup: int) -> dict:
    """One variant of one model, in this (fresh) process: the row, with the step losses."""
    import torch
    import triton
    import fusion_advisor
    from fusion_advisor.kernels import linear_cross_entropy as flce_module
    device, dtype = torch.device("cuda"), torch.bfloat16
    model, shape, loss_fn, cfg = build(name, device, dtype)
    try:
        import transformers
        tf_version = transformers.__version__
    except ImportError:
        tf_version = ""
    row = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "triton": triton.__version__,
           "transformers": tf_version, "model": name, "config": cfg, "variant": variant, "swapped": "", "error": ""}
    try:
        if variant.startswith("fusion-advisor"):
            flce = variant in FLCE_VARIANTS
            flce_module.GRAD_WEIGHT_FP32 = variant == "fusion-advisor+flce-fp32acc"
            patterns = list(PATCH_PATTERNS) + (["linear_cross_entropy"] if flce else [])
            row["swapped"] = swapped_text(fusion_advisor.patch(model, patterns=patterns))
        if variant.endswith("compile"):
            model = torch.compile(model)
        if variant == "liger":
            from liger_kernel.transformers import _apply_liger_kernel_to_instance
            _apply_liger_kernel_to_instance(model=model)
        step_s, enqueue_s, peak, losses = run_variant(model, shape, loss_fn, steps, warmup, device)
        row.update(step_ms=step_s * 1e3, enqueue_ms=round(enqueue_s * 1e3, 3),
                   peak_mem_gib=round(peak / 2**30, 3), losses=losses)
    except Exception as exc:  # reported in the row: one variant failing must not lose the others' figures
        row["error"] = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ''}"
    return row


def summarize(runs: list[dict]) -> list[dict]:
    """One row per (model, variant): the median over runs of each run's median step time, the runs'
    step times, speedup against the same model's eager row, and the loss difference against eager's
    first run (same seed and batches)."""
    grouped: dict[tuple, list[dict]] = {}
    for r in runs:
        grouped.setdefault((r.get("model", ""), r.get("variant", "")), []).append(r)
    rows = []
    for (model, variant), group in grouped.items():
        ok = [r for r in group if not r.get("error") and "step_ms" in r]
        row = {k: v for k, v in group[0].items() if k in COLUMNS}
        if not ok:
            rows.append(row)
            continue
        row = {k: v for k, v in ok[0].items() if k in COLUMNS}
        row["median_step_ms"] = round(statistics.median(r["step_ms"] for r in ok), 3)
        row["step_ms_runs"] = " ".join(f"{r['step_ms']:.1f}" for r in ok)
        row["enqueue_ms"] = round(statistics.median(r["enqueue_ms"] for r in ok), 3)
        row["peak_mem_gib"] = max(r["peak_mem_gib"] for r in ok)
        eager = [r for r in grouped.get((model, "eager"), []) if not r.get("error") and "step_ms" in r]
        if eager:
            row["speedup_vs_eager"] = round(statistics.median(r["step_ms"] for r in eager) / row["median_step_ms"], 3)
            want, got = eager[0]["losses"], ok[0]["losses"]
            n = min(len(want), len(got))
            row["max_loss_rel_diff"] = f"{max(abs(a - b) / abs(b) for a, b in zip(got[:n], want[:n])):.2e}"
        rows.append(row)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--variants", default="eager,fusion-advisor,fusion-advisor+compile,compile,liger")
    ap.add_argument("--steps", type=int, default=15)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=1, help="fresh-process runs of every variant, interleaved")
    ap.add_argument("--out", default="apply-models.csv")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    variants = [v for v in args.variants.split(",") if v]
    if args.one:
        print(json.dumps(one_variant(args.one, variants[0], args.steps, args.warmup)), flush=True)
        return 0
    runs = []
    for round_no in range(args.repeats):
        for name in [m for m in args.models.split(",") if m]:
            for variant in [v for v in variants if not (v == "liger" and name == "llama-example")]:
                proc = subprocess.run([sys.executable, __file__, "--one", name, "--steps", str(args.steps),
                                       "--warmup", str(args.warmup), "--variants", variant],
                                      capture_output=True, text=True)
                got = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
                if not got:
                    last = proc.stderr.strip().splitlines()[-1][:200] if proc.stderr.strip() else "failed"
                    got = [{"model": name, "variant": variant, "error": last}]
                runs += got
                r = got[-1]
                print(f"run {round_no + 1}/{args.repeats} {name:<14} {variant:<26} "
                      f"{r.get('step_ms', float('nan')):>8.2f} ms  enqueue {r.get('enqueue_ms', '—')} ms  "
                      f"{r.get('peak_mem_gib', '—')} GiB {r.get('error', '')}", flush=True)
        rows = summarize(runs)
        with open(args.out, "w", newline="") as fh:  # after every round: a cut-short run keeps its figures
            w = csv.DictWriter(fh, fieldnames=COLUMNS, extrasaction="ignore")
            w.writeheader()
            w.writerows(rows)
    for r in summarize(runs):
        print(f"{r.get('model', ''):<14} {r.get('variant', ''):<26} {r.get('median_step_ms', '—'):>9} ms "
              f"({r.get('step_ms_runs', '')}) {r.get('speedup_vs_eager', '—'):>6}x  enqueue {r.get('enqueue_ms', '—')} ms  "
              f"{r.get('peak_mem_gib', '—')} GiB  loss diff {r.get('max_loss_rel_diff', '—')}  {r.get('swapped', '')} "
              f"{r.get('error', '')}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
