"""Generic fusion from a real trace of examples/conv_pointwise.py, and the generated module alone."""
import importlib.util
import os
import pathlib
import subprocess
import sys
import textwrap

import pytest
import torch

from fusion_advisor.analyzers.trace import Trace
from fusion_advisor.kernels.codegen import (build_pattern, generated, pattern_source, records_from_frame,
                                            split_supported)
from fusion_advisor.kernels.tolerances import tolerance
from test_codegen import check_chain

EXAMPLE = pathlib.Path(__file__).parents[2] / "examples" / "conv_pointwise.py"
FIXTURE = "conv-pointwise-cpu.json.gz"   # README.md says how it was recorded


def _example_module():
    spec = importlib.util.spec_from_file_location("conv_pointwise_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def trace() -> Trace:
    return Trace.load(pathlib.Path(__file__).parents[1] / "data" / FIXTURE)


def _forward_top_level(trace: Trace):
    """The first step's top-level ops up to the backward pass (on CPU the autograd engine runs on
    the main thread, so the `backward` column cannot tell them apart)."""
    ops = trace.ops[trace.ops["depth"] == 0]
    first_backward = ops.index[ops["name"].str.startswith("autograd::engine")][0]
    ops = ops.loc[:first_backward - 1]
    paths = [trace.modules["class_path"].iloc[m] if m >= 0 else None for m in ops["module_row"]]
    return ops, records_from_frame(ops, paths)


def test_traced_forward_splits_into_the_two_pointwise_tails(trace):
    ops, records = _forward_top_level(trace)
    segments = split_supported(records)
    tail = ["add", "mul", "clamp", "mul", "sigmoid", "mul", "clamp_max"]
    shorts = [[o.short for o in seg] for seg, _ in segments]
    # One per ConvBlock; the last one also takes ConvNet's global average pool, mean over (H, W).
    assert shorts[:2] == [tail, tail + ["mean"]]
    reasons = {why for _, why in segments}
    assert any(why and "conv2d is not a supported" in why for why in reasons)
    assert all(o.module == "ConvNet/Sequential/ConvBlock" for o in segments[0][0])


def test_tail_and_global_average_pool_as_one_kernel(trace, device):
    _, records = _forward_top_level(trace)
    pooled = split_supported(records)[1][0]
    pattern = build_pattern(pooled, bind={(5, 0): "v2"})
    assert generated(pattern).graph.reduced_block == (2, 3)
    check_chain(pattern, device)


def test_traced_tail_gives_a_working_kernel(trace, device):
    ops, records = _forward_top_level(trace)
    tail = split_supported(records)[0][0]
    source = ops["source"].iloc[1]
    pattern = build_pattern(tail, source=source)
    assert pattern.example_params["inputs"][:2] == [{"shape": [8, 16, 32, 32], "dtype": "float32"},
                                                     {"shape": [16, 1, 1], "dtype": "float32"}]
    assert "Source: conv_pointwise.py:17 · module ConvNet/Sequential/ConvBlock" in pattern_source(pattern)
    check_chain(pattern, device)


def test_traced_tail_bound_is_the_examples_own_function(trace, device):
    """With y bound to its producer (bind), the kernel built from trace records computes exactly
    examples/conv_pointwise.py's pointwise_tail, forward and backward."""
    _, records = _forward_top_level(trace)
    pattern = build_pattern(split_supported(records)[0][0], bind={(5, 0): "v2"})
    example = _example_module()
    torch.manual_seed(0)
    y = (3 * torch.randn(2, 16, 5, 7, device=device)).requires_grad_()     # other sizes, same structure
    bias = torch.randn(16, 1, 1, device=device, requires_grad=True)
    got = pattern.fused(y, bias, s0=1.5, s1=1.702)
    want = example.pointwise_tail(y, bias, 1.5)
    torch.testing.assert_close(got, want, **tolerance(torch.float32))
    g = torch.randn_like(want)
    for a, b, rows in zip(torch.autograd.grad(got, (y, bias), g), torch.autograd.grad(want, (y, bias), g), (1, 70)):
        torch.testing.assert_close(a, b, **tolerance(torch.float32, rows))


def test_generated_module_runs_standalone(tmp_path, trace):
    """pattern_source is a module a user drops into fusion_kernels/: it imports and runs with
    torch and triton alone (fusion_advisor is made unimportable in the child process)."""
    _, records = _forward_top_level(trace)
    pattern = build_pattern(split_supported(records)[0][0], bind={(5, 0): "v2"})
    package = tmp_path / "fusion_kernels"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "conv_tail.py").write_text(pattern_source(pattern))
    script = textwrap.dedent("""
        import sys
        sys.modules["fusion_advisor"] = None          # any import of it fails
        import torch
        from fusion_kernels.conv_tail import fused, reference
        dev = "cuda" if torch.cuda.is_available() else "cpu"
        y = torch.randn(2, 16, 5, 7, device=dev, requires_grad=True)
        b = torch.randn(16, 1, 1, device=dev, requires_grad=True)
        out = fused(y, b, s0=1.5, s1=1.702)
        ref = reference(y, b, s0=1.5, s1=1.702)
        torch.testing.assert_close(out, ref)
        gy, gb = torch.autograd.grad(out.sum(), (y, b))
        ry, rb = torch.autograd.grad(ref.sum(), (y, b))
        torch.testing.assert_close(gy, ry)
        torch.testing.assert_close(gb, rb, atol=1e-4, rtol=1e-4)
        print("standalone ok")
    """)
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    if not torch.cuda.is_available():  # on a GPU the kernels compile for it instead
        env["TRITON_INTERPRET"] = "1"
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "standalone ok" in done.stdout
