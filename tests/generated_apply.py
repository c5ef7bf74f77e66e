"""A generated kernel applied to a user file in a test folder, as `fusion-advisor apply` writes it,
and the patched file loaded beside the original to compare them."""
import contextlib
import importlib.util
import sys

from fusion_advisor import apply as apply_mod
from fusion_advisor.core.result import AdvisorResult, Cluster, Estimate, Recommendation


def load(path, name):
    """The module at `path`, imported under `name` (and not put in sys.modules)."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def estimate_plan(path, found, source, cluster_id, module_class, occurrences, title):
    """apply's plan for the one generic cluster `found` (codegen.candidate_for) at `source` in `path`:
    an estimate, as a CPU-built result holds it, so planned with include_estimates. Returns the plan,
    its diff and the generated kernel's stem (the `fused_<stem>` the rewritten line calls)."""
    cluster = Cluster(id=cluster_id, direction="forward", pattern=found.pattern.name, pattern_params=found.params,
                      module_class=module_class, source=source, occurrences_per_step=occurrences,
                      estimate=Estimate(saving_us=3.0))
    result = AdvisorResult(run={"script": str(path), "cwd": str(path.parent)}, clusters=[cluster],
                           recommendations=[Recommendation(1, cluster.id, cluster.pattern, title, None, 3.0,
                                                           "estimate")])
    plan = apply_mod.plan(result, include_estimates=True)
    return plan, plan.diff(str(path.parent)), "g_" + found.pattern.name.split(":", 1)[1]


@contextlib.contextmanager
def kernels_importable(root):
    """`root` first on sys.path while the block runs (a patched file imports fusion_kernels.<stem>
    from beside it); then the generated modules are forgotten, so the next test imports its own."""
    sys.path.insert(0, str(root))
    try:
        yield
    finally:
        sys.path.remove(str(root))
        for name in [m for m in sys.modules if m.startswith("fusion_kernels")]:
            del sys.modules[name]
