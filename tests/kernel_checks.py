"""The one way every kernel test compares a fused op with the PyTorch code it replaces, and the
one way to check that kernels run by the interpreter also compile for the GPU.

The rule itself lives in fusion_advisor.kernels.numerics, shared with `fusion-advisor bench`: a
kernel that passes here passes the bench's numerics check on the same shapes.
"""
from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys

import torch

from fusion_advisor.kernels.numerics import compare_pattern
from fusion_advisor.kernels.registry import FusionPattern


def check_against_reference(pattern: FusionPattern, params: dict, device: torch.device, seed: int = 0,
                            backward: bool = True, reduced_grads: tuple[int, ...] | None = None) -> None:
    """Forward outputs and every input gradient of `pattern.fused` equal `pattern.reference`'s,
    within the dtype's tolerance. `reduced_grads`: positions of grads summed over the rows of
    input 0, compared with the table's atol scaled by sqrt(rows); None infers them (every input
    smaller than input 0), as the bench does."""
    result = compare_pattern(pattern, params, device, seed=seed, backward=backward, reduced_grads=reduced_grads)
    assert result.ok, result.detail


def round_like_kernel(values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """fp32 `values` rounded to `dtype` as a Triton kernel's `.to(dtype)` rounds them: to nearest
    even, as PyTorch does (tests/conftest.py makes the interpreter round the same way)."""
    return values.float().to(dtype)


@contextlib.contextmanager
def recorded_launches():
    """Record every Triton launch the interpreter runs inside the block: the kernel, each
    argument's type as Triton's JIT would specialise it on a GPU, and the constexpr values.
    Yields the list the records are appended to (for `hopper_compile_errors`)."""
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend
    from triton.runtime.interpreter import InterpretedFunction

    launches: list[dict] = []
    original = InterpretedFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        options = {k: kwargs[k] for k in ("num_warps",) if k in kwargs}
        bound = dict(zip(self.arg_names, args))
        bound.update({k: v for k, v in kwargs.items() if k in self.arg_names})
        spec = {}
        for name, value in bound.items():
            kind = native_specialize_impl(BaseBackend, value, False, True, True)[0]
            plain = value if isinstance(value, (bool, int, float, str)) or value is None else None
            spec[name] = [kind, plain]
        record = {"module": self.fn.__module__, "name": self.fn.__name__, "args": spec, **options}
        module = sys.modules.get(self.fn.__module__)
        if self.fn.__module__.startswith("fusion_advisor_generated_") and module is not None:
            record["path"] = module.__file__    # a generated module: imported from its file
        if record not in launches:
            launches.append(record)
        return original(self, *args, grid=grid, warmup=warmup, **kwargs)

    InterpretedFunction.run = run
    try:
        yield launches
    finally:
        InterpretedFunction.run = original


_COMPILE_TO_TTIR = r"""
import json, sys, importlib, importlib.util
from triton._C.libtriton import ir
from triton.backends.compiler import GPUTarget
from triton.compiler.compiler import ASTSource, make_backend

target = GPUTarget("cuda", 90, 32)  # H100 / H200
backend = make_backend(target)
errors = []
def load(launch):
    if "path" not in launch:
        return importlib.import_module(launch["module"])
    if launch["module"] not in sys.modules:
        spec = importlib.util.spec_from_file_location(launch["module"], launch["path"])
        module = importlib.util.module_from_spec(spec)
        sys.modules[launch["module"]] = module
        spec.loader.exec_module(module)
    return sys.modules[launch["module"]]


for launch in json.load(sys.stdin):
    fn = getattr(load(launch), launch["name"])
    signature, constexprs = {}, {}
    for param in fn.params:
        kind, value = launch["args"][param.name]
        if param.is_constexpr or kind == "constexpr":
            signature[param.name] = "constexpr"
            constexprs[param.name] = value
        else:
            signature[param.name] = kind
    options = backend.parse_options({"num_warps": launch.get("num_warps", 4)})
    context = ir.context()
    ir.load_dialects(context)
    backend.load_dialects(context)
    try:
        ASTSource(fn, signature, constexprs).make_ir(target, options, backend.get_codegen_implementation(options),
                                                     backend.get_module_map(), context)
    except Exception as e:
        errors.append(f"{launch['name']} {constexprs}: {e}")
json.dump(errors, sys.stdout)
"""


def hopper_compile_errors(launches: list[dict], triton_path: str | None = None) -> list[str]:
    """Generate each recorded launch's Triton IR for sm_90, outside the interpreter (in a
    subprocess: the interpreter is chosen at import). This is the compiler's front end, where a
    kernel that runs as plain Python can still fail (a name defined inside a loop and used after
    it, an op the compiler lacks). One error string per failing launch. `triton_path`: a folder
    holding another Triton, imported in place of this one (the GPU machines' version)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if triton_path:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (triton_path, env.get("PYTHONPATH")) if p)
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    done = subprocess.run([sys.executable, "-c", _COMPILE_TO_TTIR], input=json.dumps(launches), env=env,
                          capture_output=True, text=True, timeout=300)
    if done.returncode:
        return [f"the compile subprocess failed: {done.stderr[-3000:]}"]
    return json.loads(done.stdout)


# Registers and stack (spills) of a kernel as ptxas, bundled with Triton, builds it for sm_90, read
# back with cuobjdump: the occupancy a tile choice counts on, checked without a GPU. The kernels
# are named by module and function and built outside the interpreter (in a subprocess).
_SM90_RESOURCES = r"""
import importlib, json, os, re, subprocess, sys, tempfile
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler.compiler import ASTSource

cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
out = []
for case in json.load(sys.stdin):
    fn = getattr(importlib.import_module(case["module"]), case["kernel"])
    consts = case["constexprs"]
    sig = {p.name: "constexpr" if p.name in consts else case["types"].get(p.name, "i32") for p in fn.params}
    aligned = {(i,): [["tt.divisibility", 16]] for i, p in enumerate(fn.params)
               if p.name not in consts and p.name not in case["unaligned"]}
    kernel = triton.compile(ASTSource(fn, sig, consts, aligned), target=GPUTarget("cuda", 90, 32),
                            options={"num_warps": case["num_warps"]})
    with tempfile.NamedTemporaryFile(suffix=".cubin") as fh:
        fh.write(kernel.asm["cubin"])
        fh.flush()
        usage = subprocess.run([cuobjdump, "-res-usage", fh.name], capture_output=True, text=True).stdout
    regs, stack = re.search(r"REG:(\d+).*?STACK:(\d+)", usage).groups()
    accesses = {}
    for op in re.findall(r"\b(ld\.global[\w.]*|st\.global[\w.]*|griddepcontrol\.\w+)", kernel.asm["ptx"]):
        accesses[op] = accesses.get(op, 0) + 1
    out.append([int(regs), int(stack), accesses])
json.dump(out, sys.stdout)
"""


def sm90_resources(cases: list[dict]) -> list[tuple[int, int]]:
    """(registers a thread, stack bytes a thread) for each case: {"module", "kernel", "types" (pointer
    and scalar types by parameter name, "i32" for the rest), "constexprs", "num_warps",
    "unaligned" (parameters the JIT would not see as 16-divisible)}. Skips the test where this
    Triton ships no ptxas or cuobjdump."""
    return [(regs, stack) for regs, stack, _ in _sm90_build(cases)]


def sm90_global_accesses(cases: list[dict]) -> list[dict[str, int]]:
    """For each case (as sm90_resources'), how many of each global load and store instruction its
    sm_90 PTX holds, e.g. {"ld.global.v4.b32": 2, "st.global.v4.b32": 2}: whether Triton proved the
    alignment for 16-byte accesses or fell back to one element at a time; and of each grid
    dependency control instruction ("griddepcontrol.wait", "griddepcontrol.launch_dependents")."""
    return [accesses for _, _, accesses in _sm90_build(cases)]


def _sm90_build(cases: list[dict]) -> list[tuple[int, int, dict]]:
    import pytest
    import triton
    bin_dir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    if not all(os.path.exists(os.path.join(bin_dir, tool)) for tool in ("ptxas", "cuobjdump")):
        pytest.skip("this Triton ships no ptxas / cuobjdump")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    cases = [{"unaligned": [], **case} for case in cases]
    done = subprocess.run([sys.executable, "-c", _SM90_RESOURCES], input=json.dumps(cases), env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return [tuple(r) for r in json.loads(done.stdout)]
