"""What the example scripts share, so each shows only its model and its loss: the command line
they start from and the timed training loop (loss, backward, optimizer step, a printed line).

The examples import it from their own folder: `python examples/x.py`, `fusion-advisor profile
examples/x.py` and `apply --verify` all put the script's folder first on sys.path. To take an
example elsewhere, copy this file beside it.
"""
import argparse
import time
from typing import Callable

import torch


def arguments(doc: str, steps: int) -> argparse.ArgumentParser:
    """A parser with the script's docstring as its help and --steps; the script adds its own sizes."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=steps)
    return p


def train(opt: torch.optim.Optimizer, steps: int, loss_of_step: Callable[[], torch.Tensor],
          print_every: int = 1) -> None:
    """Run `steps` training steps: `loss_of_step()` (forward and loss), backward, step, zero_grad.

    Every `print_every` steps (and the last) it prints the loss and the step's time; on a GPU it
    synchronizes first, so that time is the step's, not its launch's. Reading the loss is a sync
    too: printing less often keeps a host-bound step's launches ahead of the GPU."""
    for step in range(steps):
        start = time.perf_counter()
        loss = loss_of_step()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step % print_every == 0 or step == steps - 1:
            if loss.is_cuda:
                torch.cuda.synchronize()
            print(f"step {step:3d}  loss {loss.item():.4f}  {1e3 * (time.perf_counter() - start):.1f} ms", flush=True)
