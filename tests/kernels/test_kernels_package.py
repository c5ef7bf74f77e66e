"""The repository's kernels/ folder is fusion_advisor.kernels only: a script started at the
repository root (the working directory first on sys.path) that imports a top-level `kernels` gets
the installed one (Hugging Face's, which transformers imports), never this folder."""
import importlib.util
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _run_at_root(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_top_level_kernels_is_not_this_folder():
    done = _run_at_root("import kernels, sys; print(getattr(kernels, '__file__', None)); "
                        "print(sys.modules['kernels'] is kernels)")
    assert done.returncode == 0, done.stderr
    file, same = done.stdout.split()
    assert same == "True"
    assert file == "None" or not pathlib.Path(file).resolve().is_relative_to(ROOT / "kernels")
    nothing = _run_at_root("import kernels.registry")
    assert nothing.returncode != 0 and "No module named 'kernels.registry'" in nothing.stderr


@pytest.mark.skipif(importlib.util.find_spec("transformers") is None, reason="needs transformers")
def test_transformers_imports_at_the_repository_root():
    done = _run_at_root("import transformers.models.t5.modeling_t5, fusion_advisor.kernels.registry as r; "
                        "print(len(r.all_patterns()))")
    assert done.returncode == 0, done.stderr
    assert int(done.stdout.split()[-1]) >= 15
