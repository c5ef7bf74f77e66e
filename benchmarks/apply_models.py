"""Training-step time and peak memory of real models, before and after fusion-advisor's patch,
beside torch.compile and Liger-Kernel on the same model (GPU).

Models are built from local configs (no hub download): Hugging Face LlamaForCausalLM,
GPT2LMHeadModel and BertModel (eager attention), and examples/llama_train.py's LlamaModel. Each
model runs in its own subprocess; inside it the variants run in this order, each on a fresh copy of
the same initial weights and the same batches: eager, fusion-advisor (`fusion_advisor.patch` with
PATCH_PATTERNS: modules, plus HF's rope function and loss_function), fusion-advisor + torch.compile,
torch.compile, and Liger-Kernel last (its patches are global to the process).

`fusion-advisor+flce` adds the linear_cross_entropy pattern (HF causal LMs: in training with labels
the loss comes from the LM head's input in row chunks, the logits are never materialised and
`outputs.logits` is None; the LM head's weight gradient accumulated in bf16, as Liger does);
`fusion-advisor+flce-fp32acc` the same with an fp32 accumulator (V*H*2 bytes more at the peak).

    python benchmarks/apply_models.py --models hf-llama --variants eager,fusion-advisor,fusion-advisor+flce,liger

    python benchmarks/apply_models.py --out apply-models.csv
    python benchmarks/apply_models.py --models llama-example --steps 10
"""
from __future__ import annotations

import argparse
import copy
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
COLUMNS = ["gpu", "torch", "triton", "transformers", "model", "config", "variant", "median_step_ms", "speedup_vs_eager",
           "peak_mem_gib", "max_loss_rel_diff", "swapped", "error"]


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
    losses, times = [], []
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        loss = loss_fn(model, batches[i % len(batches)])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach().float()))  # syncs: the step is over when this returns
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return statistics.median(times), torch.cuda.max_memory_allocated(), losses


def one_model(name: str, steps: int, warmup: int, variants: list[str]) -> list[dict]:
    import torch
    import triton
    import fusion_advisor
    from fusion_advisor.kernels import linear_cross_entropy as flce_module
    device, dtype = torch.device("cuda"), torch.bfloat16
    base, shape, loss_fn, cfg = build(name, device, dtype)
    state = copy.deepcopy(base.state_dict())
    try:
        import transformers
        tf_version = transformers.__version__
    except ImportError:
        tf_version = ""
    env = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "triton": triton.__version__,
           "transformers": tf_version, "model": name, "config": cfg}
    rows, eager = [], None
    for variant in variants:
        row = dict(env, variant=variant, swapped="", error="")
        try:
            model = base
            model.load_state_dict(state)
            if variant.startswith("fusion-advisor"):
                flce = variant in FLCE_VARIANTS
                flce_module.GRAD_WEIGHT_FP32 = variant == "fusion-advisor+flce-fp32acc"
                patterns = list(PATCH_PATTERNS) + (["linear_cross_entropy"] if flce else [])
                handle = fusion_advisor.patch(model, patterns=patterns)
                row["swapped"] = swapped_text(handle)
            if variant.endswith("compile") and variant != "liger":
                model = torch.compile(model)
            if variant == "liger":
                from liger_kernel.transformers import _apply_liger_kernel_to_instance
                _apply_liger_kernel_to_instance(model=model)
            step_s, peak, losses = run_variant(model, shape, loss_fn, steps, warmup, device)
            if variant.startswith("fusion-advisor"):
                handle.revert()
            row.update(median_step_ms=round(step_s * 1e3, 3), peak_mem_gib=round(peak / 2**30, 3))
            if eager is None:
                eager = (step_s, losses)
            row["speedup_vs_eager"] = round(eager[0] / step_s, 3)
            n = min(len(losses), len(eager[1]))
            row["max_loss_rel_diff"] = f"{max(abs(a - b) / abs(b) for a, b in zip(losses[:n], eager[1][:n])):.2e}"
        except Exception as exc:  # one variant failing must not lose the others' figures
            row["error"] = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ''}"
        finally:
            flce_module.GRAD_WEIGHT_FP32 = False
            torch._dynamo.reset()
            torch.cuda.empty_cache()
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--variants", default="eager,fusion-advisor,fusion-advisor+compile,compile,liger")
    ap.add_argument("--steps", type=int, default=15)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--out", default="apply-models.csv")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    variants = [v for v in args.variants.split(",") if v]
    if args.one:
        one_model(args.one, args.steps, args.warmup, variants)
        return 0
    rows = []
    for name in [m for m in args.models.split(",") if m]:
        variants_here = [v for v in variants if not (v == "liger" and name == "llama-example")]
        proc = subprocess.run([sys.executable, __file__, "--one", name, "--steps", str(args.steps),
                               "--warmup", str(args.warmup), "--variants", ",".join(variants_here)],
                              capture_output=True, text=True)
        got = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
        if proc.returncode and not got:
            got = [{"model": name, "error": proc.stderr.strip().splitlines()[-1][:200] if proc.stderr.strip() else "failed"}]
        rows += got
        with open(args.out, "w", newline="") as fh:  # after every model: a cut-short run keeps its figures
            w = csv.DictWriter(fh, fieldnames=COLUMNS, extrasaction="ignore")
            w.writeheader()
            w.writerows(rows)
        for r in got:
            print(f"{r.get('model', ''):<14} {r.get('variant', ''):<24} {r.get('median_step_ms', '—'):>10} ms "
                  f"{r.get('speedup_vs_eager', '—'):>7}x {r.get('peak_mem_gib', '—'):>8} GiB  "
                  f"loss diff {r.get('max_loss_rel_diff', '—')}  {r.get('swapped', '')} {r.get('error', '')}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
