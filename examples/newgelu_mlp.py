"""A stack of minGPT-style MLP blocks whose activation is minGPT's NewGELU, written on one Python line
with Python-level constants: `0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 *
torch.pow(x, 3.0))))`. Eager PyTorch runs its eight ops as eight kernels each way; one generated kernel
each way does the same. Under --autocast (bf16, fp32 master weights) CUDA's autocast runs the pow in
fp32, and the line returns fp32: the generated kernel does the same.

    fusion-advisor profile examples/newgelu_mlp.py                 # CPU or GPU
    fusion-advisor profile examples/newgelu_mlp.py -- --hidden 768 --tokens 8192 --layers 4 --autocast
"""
import math

import torch
from torch import nn

from train_loop import arguments, train


class NewGELU(nn.Module):
    def forward(self, x):
        return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


class MLP(nn.Module):
    def __init__(self, hidden: int):
        super().__init__()
        self.c_fc = nn.Linear(hidden, 4 * hidden)
        self.act = NewGELU()
        self.c_proj = nn.Linear(4 * hidden, hidden)

    def forward(self, x):
        return x + self.c_proj(self.act(self.c_fc(x)))


def main():
    p = arguments(__doc__, steps=20)
    p.add_argument("--hidden", type=int, default=32)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--autocast", action="store_true", help="bf16 autocast with fp32 master weights")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()

    torch.manual_seed(0)
    device = torch.device(args.device)
    model = nn.Sequential(*[MLP(args.hidden) for _ in range(args.layers)]).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randn(args.tokens, args.hidden, device=device)
    target = torch.randn(args.tokens, args.hidden, device=device)

    def mse_loss():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.autocast):
            return nn.functional.mse_loss(model(x).float(), target)

    train(opt, args.steps, mse_loss, print_every=5)


if __name__ == "__main__":
    main()
