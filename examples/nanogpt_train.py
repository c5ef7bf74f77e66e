"""A GPT-2 (124M by default) written the way nanoGPT and minGPT write it, trained under bf16
autocast with fp32 master weights: a hand-written `LayerNorm` class (F.layer_norm with an optional
bias, its eps a literal), minGPT's `NewGELU` tanh approximation as one Python line, flash attention
through F.scaled_dot_product_attention, a tied LM head and cross-entropy over a 50,304 vocabulary.
No class here is one the advisor knows by name: what it patches, it patches by what a module computes.

    fusion-advisor profile examples/nanogpt_train.py
    fusion-advisor apply fusion-report/result.json --verify
    python examples/nanogpt_train.py --layers 2 --hidden 64 --heads 2 --seq 32 --batch 2 --vocab 128 --device cpu
"""
import math

import torch
import torch.nn.functional as F
from torch import nn

from train_loop import arguments, train


class LayerNorm(nn.Module):
    """LayerNorm with an optional bias (PyTorch's has no bias=False before 2.1)."""

    def __init__(self, ndim, bias):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))
        self.bias = nn.Parameter(torch.zeros(ndim)) if bias else None

    def forward(self, input):
        return F.layer_norm(input, self.weight.shape, self.weight, self.bias, 1e-5)


class NewGELU(nn.Module):
    """minGPT's GELU: the tanh approximation, as in Google BERT and OpenAI GPT."""

    def forward(self, x):
        return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


class CausalSelfAttention(nn.Module):
    def __init__(self, hidden, heads):
        super().__init__()
        self.heads = heads
        self.c_attn = nn.Linear(hidden, 3 * hidden)
        self.c_proj = nn.Linear(hidden, hidden)

    def forward(self, x):
        b, t, c = x.shape
        q, k, v = self.c_attn(x).split(c, dim=2)
        q, k, v = (z.view(b, t, self.heads, c // self.heads).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).contiguous().view(b, t, c))


class MLP(nn.Module):
    def __init__(self, hidden):
        super().__init__()
        self.c_fc = nn.Linear(hidden, 4 * hidden)
        self.gelu = NewGELU()
        self.c_proj = nn.Linear(4 * hidden, hidden)

    def forward(self, x):
        return self.c_proj(self.gelu(self.c_fc(x)))


class Block(nn.Module):
    def __init__(self, hidden, heads):
        super().__init__()
        self.ln_1 = LayerNorm(hidden, bias=True)
        self.attn = CausalSelfAttention(hidden, heads)
        self.ln_2 = LayerNorm(hidden, bias=True)
        self.mlp = MLP(hidden)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, vocab, seq, layers, heads, hidden):
        super().__init__()
        self.wte = nn.Embedding(vocab, hidden)
        self.wpe = nn.Embedding(seq, hidden)
        self.h = nn.ModuleList(Block(hidden, heads) for _ in range(layers))
        self.ln_f = LayerNorm(hidden, bias=True)
        self.lm_head = nn.Linear(hidden, vocab, bias=False)
        self.wte.weight = self.lm_head.weight   # weight tying

    def forward(self, idx, targets):
        pos = torch.arange(idx.shape[1], device=idx.device)
        x = self.wte(idx) + self.wpe(pos)
        for block in self.h:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1))


def main():
    p = arguments(__doc__, steps=30)
    p.add_argument("--hidden", type=int, default=768)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--vocab", type=int, default=50304)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()

    torch.manual_seed(0)
    model = GPT(args.vocab, args.seq, args.layers, args.heads, args.hidden).to(args.device)
    opt = torch.optim.AdamW(model.parameters(), lr=6e-4, weight_decay=0.1)
    data = torch.randint(0, args.vocab, (args.batch, args.seq + 1), device=args.device)
    x, y = data[:, :-1], data[:, 1:]

    def loss_under_autocast():
        with torch.autocast(device_type=args.device, dtype=torch.bfloat16):
            return model(x, y)

    train(opt, args.steps, loss_under_autocast)


if __name__ == "__main__":
    main()
