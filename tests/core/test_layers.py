"""Imports run one way: core <- trace/analyzers, cost_model <- kernels <- bench/recommend <- apply/report <- cli.

Every module of the package is read as source (ast), imports inside functions included, and no
module may import one of a higher layer. A lazy import is still an import: it only moves the
moment the upper layer loads, not the dependency.
"""
import ast
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
# folder -> the package it installs as (pyproject.toml's package-dir)
FOLDERS = {"advisor": "fusion_advisor", "analyzers": "fusion_advisor.analyzers",
           "cost_model": "fusion_advisor.cost_model", "kernels": "fusion_advisor.kernels"}

CORE, ANALYSIS, KERNELS, BENCH, APPLY, CLI = range(6)
LAYER_NAMES = ["core", "trace/analyzers/cost_model", "kernels", "bench/recommend", "apply/report", "cli"]

# The layer of every module: the longest matching prefix wins. A module missing here fails
# test_every_module_has_a_layer, so a new file is placed on purpose.
LAYERS = {
    "fusion_advisor.core": CORE,
    # The package itself loads only `api` (the facade a training script imports must stay light);
    # its lazy `patch`/`patched` attribute is the one upward import (ALLOWED below).
    "fusion_advisor": CORE,
    "fusion_advisor.api": CORE,          # step()/region() markers: import nothing of ours
    "fusion_advisor.calls": CORE,        # the call counters every replacement bumps: import nothing of ours

    "fusion_advisor.analyzers": ANALYSIS,
    "fusion_advisor.cost_model": ANALYSIS,
    "fusion_advisor.capture": ANALYSIS,        # writes the trace the analyzers read
    "fusion_advisor.script": ANALYSIS,         # runs the user's script for capture (and verify)
    "fusion_advisor.stderr_filter": ANALYSIS,  # quiets Kineto's lines during capture

    "fusion_advisor.kernels": KERNELS,

    "fusion_advisor.bench": BENCH,
    "fusion_advisor.measure": BENCH,
    "fusion_advisor.recommend": BENCH,
    "fusion_advisor.cluster_names": BENCH,     # how recommend and the reports name a cluster

    "fusion_advisor.apply": APPLY,
    "fusion_advisor.source_patch": APPLY,
    "fusion_advisor.patching": APPLY,
    "fusion_advisor.module_forms": APPLY,      # which modules patching may swap, checked numerically
    "fusion_advisor.equivalence": APPLY,       # the numerics checks patching runs before each swap
    "fusion_advisor.provider_choice": APPLY,   # which measured provider apply/patch take
    "fusion_advisor.regional_compile": APPLY,
    "fusion_advisor.verify": APPLY,
    "fusion_advisor.gpu_time": APPLY,          # verify's GPU-busy window, and why a patch was slower
    "fusion_advisor.compile_reference": APPLY,
    "fusion_advisor.report": APPLY,
    # pipeline wires the stages below it (capture -> analyze -> bench -> recommend -> save);
    # distributed runs it per rank. Both sit under the CLI, beside apply and report.
    "fusion_advisor.pipeline": APPLY,
    "fusion_advisor.distributed": APPLY,

    "fusion_advisor.cli": CLI,
}

# (importer, imported): upward imports that are part of a public facade, with the reason.
ALLOWED = {
    # `fusion_advisor.patch(model, result)`: resolved in the package's __getattr__ on first use.
    ("fusion_advisor", "fusion_advisor.patching"),
}


def _modules() -> dict[str, pathlib.Path]:
    found = {}
    for folder, package in FOLDERS.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = list(path.relative_to(ROOT / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join([package] + parts)] = path
    return found


MODULES = _modules()


def layer_of(module: str) -> int | None:
    best = None
    for prefix in LAYERS:
        if (module == prefix or module.startswith(prefix + ".")) and (best is None or len(prefix) > len(best)):
            best = prefix
    return None if best is None else LAYERS[best]


def _imports(module: str, path: pathlib.Path) -> set[str]:
    """The fusion_advisor modules `module` imports, anywhere in its source."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    is_package = path.name == "__init__.py"
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = module.split(".")
                anchor = anchor[:len(anchor) - node.level + (1 if is_package else 0)]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                out.add(sub if sub in MODULES else base)
    return {m for m in out if m == "fusion_advisor" or m.startswith("fusion_advisor.")}


def test_every_module_has_a_layer():
    assert len(MODULES) > 50, "the walk found too few modules: is FOLDERS right?"
    assert [m for m in MODULES if layer_of(m) is None] == []


def test_imports_run_one_way():
    upward = []
    for module, path in MODULES.items():
        mine = layer_of(module)
        for imported in sorted(_imports(module, path)):
            theirs = layer_of(imported)
            if theirs is not None and theirs > mine and (module, imported) not in ALLOWED:
                upward.append(f"{module} ({LAYER_NAMES[mine]}) imports {imported} ({LAYER_NAMES[theirs]})")
    assert upward == [], "\n".join(upward)


def test_the_walk_sees_lazy_imports():
    """The checker itself: an import inside a function counts, and relative imports resolve."""
    imports = _imports("fusion_advisor", ROOT / "advisor" / "__init__.py")
    assert "fusion_advisor.patching" in imports and "fusion_advisor.api" in imports


def test_core_imports_nothing_of_ours_outside_core():
    for module, path in MODULES.items():
        if layer_of(module) == CORE and module.startswith("fusion_advisor.core"):
            assert {m for m in _imports(module, path) if not m.startswith("fusion_advisor.core")} == set(), module


@pytest.mark.parametrize("statement", [
    "import fusion_advisor",
    "import fusion_advisor.core.result, fusion_advisor.core.records, fusion_advisor.core.dtypes, "
    "fusion_advisor.core.files, fusion_advisor.core.errors",
])
def test_light_imports_load_no_torch(statement):
    code = f"import sys; {statement}; print(sorted(m for m in ('torch', 'triton') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT / "tests",
                         check=True).stdout.strip()
    assert out == "[]"
