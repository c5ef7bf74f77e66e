"""Peak memory of HF LlamaForCausalLM bf16 training steps with one replacement at a time, ours
beside Liger-Kernel's (GPU): which pattern holds more memory than its Liger counterpart. Each run
is its own subprocess (Liger's RoPE patch is process-global).

    python benchmarks/memory_by_pattern.py               # hidden 2048, 8 layers, seq 2048, batch 2, vocab 32000
"""
from __future__ import annotations

import json
import subprocess
import sys

# name: (our patterns, Liger's flags)
PAIRS = {
    "none": ([], {}),
    "rms_norm": (["rms_norm"], {"rms_norm": True}),
    "rope": (["rope"], {"rope": True}),
    "swiglu": (["swiglu"], {"swiglu": True}),
    "loss": (["linear_cross_entropy"], {"fused_linear_cross_entropy": True}),
    "all": (["rms_norm", "rope", "swiglu", "linear_cross_entropy"],
            {"rms_norm": True, "rope": True, "swiglu": True, "fused_linear_cross_entropy": True}),
}
LIGER_OFF = {"rope": False, "cross_entropy": False, "fused_linear_cross_entropy": False, "rms_norm": False,
             "swiglu": False}


def one(provider: str, name: str, steps: int = 4) -> dict:
    import torch
    import transformers as tf
    torch.manual_seed(0)
    conf = tf.LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=8,
                          num_attention_heads=16, num_key_value_heads=16, max_position_embeddings=2048)
    model = tf.LlamaForCausalLM._from_config(conf, attn_implementation="sdpa").to("cuda", torch.bfloat16)
    ours, liger = PAIRS[name]
    if provider == "ours" and ours:
        import fusion_advisor
        fusion_advisor.patch(model, patterns=ours)
    if provider == "liger" and liger:
        from liger_kernel.transformers import _apply_liger_kernel_to_instance
        _apply_liger_kernel_to_instance(model=model, **{**LIGER_OFF, **liger})
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, foreach=True)
    ids = torch.randint(0, 32000, (2, 2048), device="cuda")
    for i in range(steps):
        if i == steps - 1:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    return {"provider": provider, "pattern": name, "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
            "loss": float(loss)}


def main() -> int:
    if len(sys.argv) == 3:
        print(json.dumps(one(sys.argv[1], sys.argv[2])))
        return 0
    import torch
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; peak GiB of the last of 4 steps")
    print(f"{'replaced':<10} {'ours':>8} {'liger':>8} {'ours - liger':>13}")
    for name in PAIRS:
        peaks = {}
        for provider in ("ours", "liger"):
            out = subprocess.run([sys.executable, __file__, provider, name], capture_output=True, text=True)
            lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
            peaks[provider] = json.loads(lines[-1])["peak_gib"] if lines else float("nan")
            if not lines:
                print(out.stderr[-800:], file=sys.stderr)
        print(f"{name:<10} {peaks['ours']:>8.3f} {peaks['liger']:>8.3f} {1024 * (peaks['ours'] - peaks['liger']):>10.0f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
