"""Knowledge distillation of a small GPT-2-style student from a frozen teacher, for a few steps.

The student has what the loss/embedding/dropout kernels replace: token + position embeddings
added (`wte(idx) + wpe(pos)`), residual dropout (`x + dropout(f(x))`), Hugging Face's loss
(`logits.float()` then F.cross_entropy) and a KL-divergence distillation term
(`F.kl_div(log_softmax(student / T), softmax(teacher / T), reduction="batchmean") * T^2`).

    fusion-advisor profile examples/distill_train.py
    fusion-advisor profile examples/distill_train.py -- --dtype float32 --hidden 512
"""
import torch
import torch.nn.functional as F
from torch import nn

from train_loop import arguments, train


class Block(nn.Module):
    def __init__(self, hidden, dropout):
        super().__init__()
        self.ln = nn.LayerNorm(hidden)
        self.fc = nn.Linear(hidden, 4 * hidden)
        self.proj = nn.Linear(4 * hidden, hidden)
        self.drop = nn.Dropout(dropout)

    def forward(self, x):
        return x + self.drop(self.proj(F.gelu(self.fc(self.ln(x)), approximate="tanh")))


class GPT(nn.Module):
    def __init__(self, vocab, hidden, layers, seq, dropout):
        super().__init__()
        self.wte = nn.Embedding(vocab, hidden)
        self.wpe = nn.Embedding(seq, hidden)
        self.h = nn.ModuleList(Block(hidden, dropout) for _ in range(layers))
        self.ln_f = nn.LayerNorm(hidden)
        self.lm_head = nn.Linear(hidden, vocab, bias=False)

    def forward(self, idx):
        pos = torch.arange(idx.shape[1], device=idx.device)
        x = self.wte(idx) + self.wpe(pos)
        for block in self.h:
            x = block(x)
        return self.lm_head(self.ln_f(x))


def main():
    p = arguments(__doc__, steps=8)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--vocab", type=int, default=1024)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--dropout", type=float, default=0.1)
    p.add_argument("--temperature", type=float, default=2.0)
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="bfloat16")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(args.seed)
    teacher = GPT(args.vocab, 2 * args.hidden, args.layers, args.seq, 0.0).to(device=device, dtype=dtype).eval()
    teacher.requires_grad_(False)
    student = GPT(args.vocab, args.hidden, args.layers, args.seq, args.dropout).to(device=device, dtype=dtype)
    opt = torch.optim.AdamW(student.parameters(), lr=1e-4, foreach=True)
    data = torch.randint(0, args.vocab, (args.batch, args.seq + 1), device=device)
    idx, labels = data[:, :-1], data[:, 1:].reshape(-1)
    t = args.temperature

    def distillation_loss():
        with torch.no_grad():
            teacher_logits = teacher(idx).float().view(-1, args.vocab)
        logits = student(idx).float().view(-1, args.vocab)
        ce = F.cross_entropy(logits, labels)
        kl = F.kl_div(F.log_softmax(logits / t, dim=-1), F.softmax(teacher_logits / t, dim=-1),
                      reduction="batchmean") * t * t
        return 0.5 * ce + 0.5 * kl

    train(opt, args.steps, distillation_loss)


if __name__ == "__main__":
    main()
