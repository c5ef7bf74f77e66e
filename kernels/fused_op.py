"""`fused_op`: one decorator for what every fused launcher needs to run both eagerly and under
torch.compile: the torch.library custom op, its fake, and the eager bypass with the call counter.

Hand-written kernels (kernels/<op>.py) and generated ones (kernels/codegen) use the same rule;
codegen/module.py copies the code below the EMBED marker into each generated module, which must run
with torch and triton only.
"""
from __future__ import annotations

# ---- EMBED: everything below is copied into generated modules ----
import inspect
import re

import torch

try:  # each eager forward is counted, so `fusion-advisor apply --verify` can prove the kernel ran
    from fusion_advisor.calls import hit as count_call
except ImportError:  # a generated module also runs without fusion-advisor installed
    def count_call(name):
        pass

_PLAIN_TENSORS = (torch.Tensor, torch.nn.Parameter)
_COUNT_BY_NAME = object()


def fused_op(qualname, *, like=None, fake=None, schema=None, mutates_args=(), tags=(), eager=None,
             counted_as=_COUNT_BY_NAME):
    """Decorator over a launcher: registers it as the custom op `qualname` ("namespace::name", its
    schema read off the launcher's annotations unless `schema` is given) with a fake, and returns
    what an autograd.Function calls: the launcher itself in eager mode (or `eager`, where eager
    calls must do more than the op's body, e.g. bump the version of a tensor the op mutates), the
    registered op otherwise.

    The fake: `like` names the arguments the outputs are shaped and typed like (one name: one
    output, a tuple: a tuple), each a new contiguous tensor; otherwise `fake` computes them
    (same arguments as the launcher) for outputs whose shapes or dtypes are a rule of the inputs.

    Going through the op in eager costs torch.library's dispatch on every call (schema parsing of
    the arguments, the dispatcher, the Python kernel wrapper): several µs per launch, which on a
    host-bound training step is more than the fused kernel saves. The op is still what a traced
    graph must hold, so it is used while torch.compile / torch.export trace (`is_compiling`), and
    for inputs the launcher cannot run: tensor subclasses (FakeTensor, FunctionalTensor, DTensor:
    the op's dispatch and its fake handle them) and meta tensors. Anything else (not a tensor) goes
    to the launcher, whose checks say what is wrong with it.

    An eager forward launch counts one call of the replacement (`apply --verify` proves it ran),
    keyed by `counted_as`: by default the op's stem, "rms_norm" for fusion_advisor::rms_norm_fwd
    (FusionPattern.counted_as maps a pattern that shares another's launcher, swiglu -> "glu"), and
    nothing for other ops (the backward). Inside a compiled graph the op runs without this wrapper,
    uncounted. A second registration of the same name (the same generated module imported from
    another path) finds the op registered and uses it."""
    if (like is None) == (fake is None):
        raise TypeError(f"fused_op({qualname!r}): give exactly one of like= and fake=")
    namespace_name, name = qualname.split("::")
    namespace = getattr(torch.ops, namespace_name)
    if counted_as is _COUNT_BY_NAME:
        counted_as = name[:-4] if name.endswith("_fwd") else None

    def decorate(launcher):
        if not hasattr(namespace, name):
            op = torch.library.custom_op(qualname, launcher, mutates_args=mutates_args, tags=tags or None,
                                         schema=schema or _schema_without_defaults(launcher, mutates_args))
            op.register_fake(fake if fake is not None else _outputs_like(launcher, like))
        run = eager or launcher
        is_compiling = torch.compiler.is_compiling
        plain = _PLAIN_TENSORS

        def call(*args):
            first = args[0]
            kind = type(first)
            if is_compiling() or (first.is_meta if kind in plain else isinstance(first, torch.Tensor)):
                return getattr(namespace, name)(*args)
            if counted_as is not None:
                count_call(counted_as)
            return run(*args)

        call.__name__ = call.__qualname__ = f"fused_op({launcher.__name__})"
        return call

    return decorate


def _schema_without_defaults(launcher, mutates_args):
    """The op's schema read off the launcher's annotations, its defaults left out: callers pass every
    argument, and a traced call would otherwise drop the ones equal to a default before its fake."""
    schema = torch.library.infer_schema(launcher, mutates_args=mutates_args)
    return re.sub(r'=("[^"]*"|[^,)]*)', "", schema)


def _outputs_like(launcher, like):
    """The fake for outputs shaped and typed like the arguments named in `like`."""
    signature = inspect.signature(launcher)
    names = (like,) if isinstance(like, str) else tuple(like)
    unknown = [n for n in names if n not in signature.parameters]
    if unknown:
        raise TypeError(f"fused_op: {launcher.__name__} has no argument {unknown[0]!r} to shape outputs like")

    def fake(*args, **kwargs):
        arguments = signature.bind(*args, **kwargs).arguments
        outputs = tuple(arguments[n].new_empty(arguments[n].shape) for n in names)
        return outputs[0] if isinstance(like, str) else outputs

    return fake
