"""Hugging Face LlamaForCausalLM built from a local config (no download) and trained for a few
steps; `--patch` swaps fusion-advisor's fused modules into the model first.

    fusion-advisor profile examples/hf_llama_train.py -- --hidden 2048 --layers 8 --seq 2048
    fusion-advisor profile examples/hf_llama_train.py -o runs/patched -- --patch
Needs `transformers`.
"""
import argparse
import time

import torch


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--intermediate", type=int, default=0, help="default: 2.75 x hidden")
    p.add_argument("--vocab", type=int, default=1024)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--patch", action="store_true", help="fusion_advisor.patch the RMSNorm and MLP modules")
    args = p.parse_args()

    from transformers import LlamaConfig, LlamaForCausalLM
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, num_hidden_layers=args.layers,
                         num_attention_heads=args.heads, num_key_value_heads=args.heads,
                         intermediate_size=args.intermediate or int(2.75 * args.hidden),
                         max_position_embeddings=max(args.seq, 128))
    model = LlamaForCausalLM(config).to(device=device, dtype=torch.bfloat16)
    if args.patch:
        import fusion_advisor
        print(fusion_advisor.patch(model, patterns=["rms_norm", "swiglu"]).summary().splitlines()[0])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, foreach=True)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), device=device)
    for step in range(args.steps):
        t0 = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        print(f"step {step} loss {loss.item():.4f} {1e3 * (time.perf_counter() - t0):.1f} ms", flush=True)


if __name__ == "__main__":
    main()
