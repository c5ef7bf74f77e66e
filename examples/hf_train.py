"""A Hugging Face model built from a local config (no download), trained for a few bf16 AdamW steps:
LlamaForCausalLM, GPT2LMHeadModel or BertModel (eager attention, a mean-square loss on its last
hidden state). The default sizes are benchmarks/apply_models.py's. `--patch PATTERNS` applies
fusion_advisor.patch first (what `fusion-advisor apply` does at run time for library code).

    fusion-advisor profile examples/hf_train.py -- --model llama
    fusion-advisor apply fusion-report/result.json --verify
    fusion-advisor profile examples/hf_train.py -- --model gpt2 --layers 2
Needs `transformers`.
"""
import argparse
import time

import torch

MODELS = {   # hidden, layers, heads, seq, batch, vocab
    "llama": (2048, 8, 16, 2048, 2, 32000),
    "gpt2": (1024, 8, 16, 1024, 4, 50257),
    "bert": (768, 12, 12, 512, 8, 30522),
}


def build(name: str, hidden: int, layers: int, heads: int, seq: int, vocab: int):
    """(model, loss function of (model, ids)) in fp32 on the CPU; the caller moves it."""
    import transformers as tf
    if name == "llama":
        conf = tf.LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=int(2.75 * hidden),
                              num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                              max_position_embeddings=max(seq, 128))
        model = tf.LlamaForCausalLM._from_config(conf, attn_implementation="sdpa")
    elif name == "gpt2":
        conf = tf.GPT2Config(vocab_size=vocab, n_embd=hidden, n_layer=layers, n_head=heads, n_positions=max(seq, 128),
                             resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
        model = tf.GPT2LMHeadModel._from_config(conf, attn_implementation="eager")
    else:
        conf = tf.BertConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                             intermediate_size=4 * hidden, max_position_embeddings=max(seq, 512),
                             hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
        model = tf.BertModel._from_config(conf, attn_implementation="eager")
        return model, lambda m, ids: m(input_ids=ids).last_hidden_state.float().pow(2).mean()
    return model, lambda m, ids: m(input_ids=ids, labels=ids).loss


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=sorted(MODELS), default="llama")
    for flag in ("hidden", "layers", "heads", "seq", "batch", "vocab"):
        p.add_argument(f"--{flag}", type=int, help="default: the model's size in benchmarks/apply_models.py")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--patch", default="", metavar="PATTERNS",
                   help="fusion_advisor.patch these patterns first, comma-separated "
                        "(e.g. rms_norm,swiglu,rope,cross_entropy,linear_cross_entropy)")
    args = p.parse_args()
    hidden, layers, heads, seq, batch, vocab = (getattr(args, f) or d for f, d in zip(
        ("hidden", "layers", "heads", "seq", "batch", "vocab"), MODELS[args.model]))

    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    model, loss_fn = build(args.model, hidden, layers, heads, seq, vocab)
    model = model.to(device=device, dtype=torch.bfloat16)
    if args.patch:
        import fusion_advisor
        print(fusion_advisor.patch(model, patterns=args.patch.split(",")).summary().splitlines()[0])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, foreach=True)
    ids = torch.randint(0, vocab, (batch, seq), device=device)
    for step in range(args.steps):
        t0 = time.perf_counter()
        loss = loss_fn(model, ids)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        print(f"step {step} loss {loss.item():.4f} {1e3 * (time.perf_counter() - t0):.1f} ms", flush=True)


if __name__ == "__main__":
    main()
