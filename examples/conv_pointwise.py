"""A small conv net whose activation is a hand-written chain of pointwise ops nobody named: a
per-channel bias, a scale, a clamp, quick-GELU (y * sigmoid(1.702 y)) and a second clamp. Eager
PyTorch runs each of the seven ops as its own kernel, forward and backward, each reading and
writing the whole activation; one generated Triton kernel each way does the same work in one pass.

    fusion-advisor profile examples/conv_pointwise.py                 # CPU or GPU, a few seconds
    fusion-advisor profile examples/conv_pointwise.py -- --channels 128 --size 64 --batch 32 --dtype bfloat16
"""
import argparse
import time

import torch
import torch.nn.functional as F
from torch import nn


def pointwise_tail(y, bias, scale: float):
    """Seven pointwise ops: seven kernels forward, more backward, in eager PyTorch."""
    y = y + bias                          # per-channel bias, shape (C, 1, 1)
    y = y * scale
    y = y.clamp(-6.0, 6.0)
    y = y * torch.sigmoid(1.702 * y)      # quick-GELU
    return y.clamp_max(4.0)


class ConvBlock(nn.Module):
    def __init__(self, cin: int, cout: int, scale: float):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
        self.bias = nn.Parameter(torch.zeros(cout, 1, 1))
        self.scale = scale

    def forward(self, x):
        return pointwise_tail(self.conv(x), self.bias, self.scale)


class ConvNet(nn.Module):
    def __init__(self, channels: int, classes: int, blocks: int):
        super().__init__()
        self.blocks = nn.Sequential(*[ConvBlock(3 if i == 0 else channels, channels, scale=1.5)
                                      for i in range(blocks)])
        self.head = nn.Linear(channels, classes)

    def forward(self, x):
        return self.head(self.blocks(x).mean(dim=(2, 3)))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--channels", type=int, default=16)
    p.add_argument("--size", type=int, default=32, help="image height and width")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--blocks", type=int, default=2)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()

    torch.manual_seed(0)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    model = ConvNet(args.channels, args.classes, args.blocks).to(device=device, dtype=dtype)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    images = torch.randn(args.batch, 3, args.size, args.size, device=device, dtype=dtype)
    labels = torch.randint(0, args.classes, (args.batch,), device=device)
    for step in range(args.steps):
        start = time.perf_counter()
        loss = F.cross_entropy(model(images).float(), labels)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if step % 5 == 0 or step == args.steps - 1:
            print(f"step {step:3d}  loss {loss.item():.4f}  {1e3 * (time.perf_counter() - start):.1f} ms")


if __name__ == "__main__":
    main()
