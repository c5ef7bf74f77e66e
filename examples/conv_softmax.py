"""ConvTranspose2d, then softmax over the channels (dim=1), a per-channel bias, a scale and a
sigmoid: four pointwise/reduction kernels each way in eager PyTorch, one generated kernel each way.

    fusion-advisor profile examples/conv_softmax.py                 # CPU or GPU
    fusion-advisor profile examples/conv_softmax.py -- --channels 64 --size 64 --batch 128 --autocast
"""
import torch
from torch import nn

from train_loop import arguments, train


class Model(nn.Module):
    def __init__(self, cin: int, channels: int, scaling_factor: float):
        super().__init__()
        self.conv_transpose = nn.ConvTranspose2d(cin, channels, 3, stride=2, padding=1, output_padding=1)
        self.bias = nn.Parameter(0.1 * torch.randn(channels, 1, 1))
        self.scaling_factor = scaling_factor

    def forward(self, x):
        x = self.conv_transpose(x)
        x = torch.softmax(x, dim=1)
        x = x + self.bias
        x = x * self.scaling_factor
        x = torch.sigmoid(x)
        return x


def main():
    p = arguments(__doc__, steps=20)
    p.add_argument("--cin", type=int, default=8)
    p.add_argument("--channels", type=int, default=16)
    p.add_argument("--size", type=int, default=8, help="input height and width (the output's are twice)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--autocast", action="store_true", help="bf16 autocast with fp32 master weights")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()

    torch.manual_seed(0)
    device = torch.device(args.device)
    model = Model(args.cin, args.channels, 2.0).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randn(args.batch, args.cin, args.size, args.size, device=device)
    target = torch.rand(args.batch, args.channels, 2 * args.size, 2 * args.size, device=device)

    def mse_loss():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.autocast):
            return nn.functional.mse_loss(model(x).float(), target)

    train(opt, args.steps, mse_loss, print_every=5)


if __name__ == "__main__":
    main()
