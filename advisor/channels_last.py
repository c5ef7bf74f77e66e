"""The channels_last change at run time: `fusion_advisor.patch(model, patterns=["channels_last"])`.

The model's 4-D parameters and buffers (convolution weights) go to torch.channels_last, and a
forward pre-hook on the model converts every 4-D floating-point tensor it is called with: the
activations stay NHWC through the convolutions, and cuDNN's NCHW <-> NHWC transposes around them
(analyzers/layout.py) are gone. It is what the report's channels_last recommendation asks for by
hand, done on one model instance, and what `apply --include-estimates --verify` measures (the
recommendation is priced on the transposes' measured time, an estimate of the saving).

torch converts parameters in place (their `.data`), so an optimizer built before keeps working;
`restore()` removes the hook and converts them back to the contiguous format. Each hooked call
counts once as "channels_last" (fusion_advisor.calls), the proof `apply --verify` reads.
"""
from __future__ import annotations

from typing import Callable

from fusion_advisor import calls

NAME = "channels_last"


def convert(model) -> tuple[Callable[[], None], int]:
    """Put `model` in channels_last (see the module docstring): (restore, 4-D tensors converted)."""
    import torch

    four_d = sum(1 for t in (*model.parameters(), *model.buffers()) if t.dim() == 4)
    model.to(memory_format=torch.channels_last)

    def to_nhwc(value):
        if isinstance(value, torch.Tensor) and value.dim() == 4 and value.is_floating_point():
            return value.contiguous(memory_format=torch.channels_last)
        return value

    def pre_hook(module, args, kwargs):
        calls.hit_eager(NAME)
        return tuple(to_nhwc(a) for a in args), {k: to_nhwc(v) for k, v in kwargs.items()}

    hook = model.register_forward_pre_hook(pre_hook, with_kwargs=True)

    def restore() -> None:
        hook.remove()
        model.to(memory_format=torch.contiguous_format)
    return restore, four_d
