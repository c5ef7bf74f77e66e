"""The Trace: one torch.profiler (Kineto) trace as linked pandas frames.

Parse once, link once; every analyzer reads these frames and nothing else.

Frames and their columns (times in µs, as Kineto writes them; row labels are 0..n-1 and the
`*_row` columns below are such labels, -1 where there is none):

ops        one row per aten / autograd CPU op (`cpu_op` events)
           ext_id, name, ts, dur, end, tid, seq (autograd sequence number, -1 if none),
           input_dims, input_types, input_strides, concrete (scalar args as strings),
           parent_row (enclosing op on the same thread), top_row (outermost enclosing op),
           depth (0 = top-level op), backward (runs under an autograd `evaluate_function` op or is
           a *Backward op),
           fwd_row (for backward ops: the forward op with the same sequence number),
           module_row (innermost nn.Module call, in `modules`; a backward op takes its forward
           op's), source (innermost frame of model code, "file.py:line"), step (-1 outside steps),
           annotation (innermost record_function range around the op on its thread, e.g.
           "Optimizer.step#AdamW.step"; None outside every range; ProfilerStep spans excluded)
kernels    one row per GPU activity: kind is "kernel", "memcpy" or "memset"
           name, kind, ts, dur, end, device, stream, correlation, ext_id, grid, block, registers,
           shared_mem, occupancy, bytes (memcpy/memset only), launch_row, op_row (the leaf op
           that launched it), top_row (that op's top-level op), step
launches   one row per CUDA runtime/driver call: name, ts, dur, tid, correlation, ext_id, op_row
python     one row per Python frame (`with_stack=True`): py_id, parent_id, name, ts, dur, end, tid,
           module_id
modules    one row per nn.Module forward call (`with_modules=True`): py_row, name ("Linear_3"),
           cls ("Linear"), path ("LlamaModel_0/LlamaDecoderLayer_1/Linear_3"), class_path
           ("LlamaModel/LlamaDecoderLayer/Linear": equal across repeated layers), depth, ts, dur
steps      one row per `ProfilerStep#N`: step, ts, dur, end (CPU span that launched the step)
annotations record_function / NVTX-like ranges: name, ts, dur, end, tid, gpu
"""
from __future__ import annotations

import re
from functools import cached_property
from pathlib import Path

import numpy as np
import pandas as pd

from fusion_advisor.analyzers import kineto
from fusion_advisor.core.errors import TraceError

_STEP_RE = re.compile(r"^ProfilerStep#(\d+)$")
_FRAME_RE = re.compile(r"^(?P<file>.+?)\((?P<line>\d+)\): (?P<func>.*)$")
_MODULE_PREFIX = "nn.Module: "
# Frames that are the framework, not the user's model: skipped when choosing an op's `source`.
_LIBRARY_PREFIXES = ("torch/", "<", "fusion_advisor/", "typer/", "click/", "runpy.py", "threading.py",
                     "contextlib.py", "functools.py", "advisor/", "triton/", "typing.py", "abc.py")


def _frame_source(name: str) -> str | None:
    """'models/llama.py(62): forward' -> 'models/llama.py:62' for model code, None for library code."""
    if name.startswith(_MODULE_PREFIX) or name.startswith("<built-in"):
        return None
    m = _FRAME_RE.match(name)
    if not m:
        return None
    file = m.group("file")
    if file.startswith(_LIBRARY_PREFIXES) or "/site-packages/torch/" in file or "/fusion_advisor/" in file:
        return None
    return f"{file}:{m.group('line')}"


def resolve_source_file(source_file: str, run: dict) -> Path | None:
    """A traced file name (Kineto shortens it, relative to a sys.path entry) on this disk: beside
    the profiled script, under the directory it ran in, or as an absolute path."""
    script = run.get("script")
    roots = [Path(script).parent] if script else []
    if run.get("cwd"):
        roots.append(Path(run["cwd"]))
    for root in roots:
        p = root / source_file
        if p.is_file():
            return p.resolve()
    p = Path(source_file)
    return p.resolve() if p.is_absolute() and p.is_file() else None


class Trace:
    """A parsed, linked Kineto trace. Build with `Trace.load(path)`."""

    def __init__(self, raw: kineto.RawColumns, path: str = ""):
        self.path = path
        self.meta: dict = raw.top
        self.n_events = raw.n_events
        self.bad_spans: dict = dict(raw.bad_spans)  # category -> events dropped (corrupt ts/dur)
        self.cut_frame_cycles = 0                  # Python frames found to be their own ancestor
        self.ops = _frame(raw.ops)
        self.kernels = _frame(raw.kernels)
        self.launches = _frame(raw.launches)
        self.python = _frame(raw.python)
        self.annotations = _frame(raw.annotations)
        self.steps = self._build_steps()
        self.modules = pd.DataFrame()
        self._kernel_ops: pd.DataFrame | None = None
        self._link()

    @classmethod
    def load(cls, path: str, require_kernels: bool = False) -> "Trace":
        raw = kineto.parse(str(path))
        if not raw.ops["name"] and not raw.kernels["name"]:
            raise TraceError(f"{path} holds no CPU ops and no GPU kernels: nothing to analyse")
        trace = cls(raw, str(path))
        if require_kernels and trace.kernels.empty:
            raise TraceError(f"{path} holds no GPU kernels (was it recorded on a machine with a GPU?)")
        return trace

    @property
    def notes(self) -> list[str]:
        """What was wrong with the trace and left out, for the result's notes."""
        out = []
        if self.bad_spans:
            what = ", ".join(f"{n:,} {cat}" for cat, n in sorted(self.bad_spans.items()))
            out.append(f"dropped {sum(self.bad_spans.values()):,} events with a missing, NaN, negative or huge "
                       f"ts/dur ({what})")
        if self.cut_frame_cycles:
            out.append(f"{self.cut_frame_cycles:,} Python frame(s) were their own ancestor (missing or corrupt "
                       f"'Python id'/'Python parent id'): treated as top-level frames")
        return out

    # -- facts about the run -------------------------------------------------------------------
    @property
    def device_name(self) -> str | None:
        props = self.meta.get("deviceProperties") or []
        if props:
            return props[0].get("name")
        return (self.meta.get("fusion_advisor") or {}).get("gpu_name")

    @property
    def run_info(self) -> dict:
        """What `fusion-advisor profile` stored in the trace (versions, argv, steps), if anything."""
        return self.meta.get("fusion_advisor") or {}

    @property
    def has_gpu(self) -> bool:
        return not self.kernels.empty

    @cached_property
    def step_ids(self) -> list[int]:
        return [int(s) for s in self.steps["step"]]

    # -- building ------------------------------------------------------------------------------
    def _build_steps(self) -> pd.DataFrame:
        an = self.annotations
        if not an.empty:
            an["end"] = an["ts"] + an["dur"]
        cols = {"step": [], "ts": [], "dur": []}
        if not an.empty:
            for name, ts, dur, gpu in zip(an["name"], an["ts"], an["dur"], an["gpu"]):
                m = _STEP_RE.match(name)
                if m and not gpu:
                    cols["step"].append(int(m.group(1)))
                    cols["ts"].append(float(ts))
                    cols["dur"].append(float(dur))
        steps = pd.DataFrame(cols).sort_values("ts", ignore_index=True)
        steps["end"] = steps["ts"] + steps["dur"]
        return steps

    def _step_of(self, ts: np.ndarray) -> np.ndarray:
        """Step number for each CPU timestamp, -1 outside every ProfilerStep span."""
        if self.steps.empty or len(ts) == 0:
            return np.full(len(ts), -1, dtype=np.int64)
        starts = self.steps["ts"].to_numpy()
        ends = self.steps["end"].to_numpy()
        idx = np.searchsorted(starts, ts, side="right") - 1
        ok = (idx >= 0) & (ts <= ends[np.clip(idx, 0, None)])
        return np.where(ok, self.steps["step"].to_numpy()[np.clip(idx, 0, None)], -1)

    def _link(self) -> None:
        ops, py = self.ops, self.python
        for df in (ops, py, self.kernels, self.launches):
            if not df.empty:
                df["end"] = df["ts"] + df["dur"]
        self.modules = self._build_modules()
        self._nest_ops()
        self._link_backward()
        ops["step"] = self._step_of(ops["ts"].to_numpy(dtype=float)) if not ops.empty else []
        ops["annotation"] = self._annotation_of_ops()
        self._link_kernels()

    def _annotation_of_ops(self) -> np.ndarray:
        """Innermost CPU record_function range (not a ProfilerStep) around each op, same thread."""
        ops, an = self.ops, self.annotations
        out = np.full(len(ops), None, dtype=object)
        if ops.empty or an.empty:
            return out
        ranges = an[~an["gpu"].astype(bool) & ~an["name"].str.match(_STEP_RE.pattern)]
        # Widest first, so that a nested (narrower) range overwrites its parent.
        ranges = ranges.sort_values("dur", ascending=False, kind="stable")
        by_tid = {tid: (idx.to_numpy(), ops["ts"].to_numpy()[idx.to_numpy()])
                  for tid, idx in ops.groupby("tid").groups.items()}
        for name, ts, end, tid in zip(ranges["name"], ranges["ts"], ranges["end"], ranges["tid"]):
            if tid not in by_tid:
                continue
            rows, starts = by_tid[tid]  # ops are sorted by ts, so each thread's starts are too
            lo, hi = np.searchsorted(starts, [ts, end + 0.01], side="left")
            out[rows[lo:hi]] = name
        return out

    def _build_modules(self) -> pd.DataFrame:
        py = self.python
        cols = ["py_row", "name", "cls", "path", "class_path", "depth", "ts", "dur"]
        if py.empty:
            return pd.DataFrame(columns=cols)
        names = py["name"].tolist()
        is_mod = [n.startswith(_MODULE_PREFIX) for n in names]
        row_of_id = dict(zip(py["py_id"].tolist(), range(len(py))))
        parents = py["parent_id"].tolist()
        path_of: dict[int, tuple[str, ...]] = {}

        def module_path(row: int) -> tuple[str, ...]:
            # Walk up to the nearest enclosing module call (iteratively: stacks can be deep). A
            # malformed trace can make a frame its own ancestor (ids missing: -1 is its own parent):
            # the walk stops where it would revisit a frame, and that frame counts as a root.
            chain = []
            on_chain = set()
            r = row
            while r is not None and r not in path_of:
                if r in on_chain:
                    self.cut_frame_cycles += 1
                    r = None
                    break
                chain.append(r)
                on_chain.add(r)
                r = row_of_id.get(parents[r])
            base = path_of[r] if r is not None else ()
            for c in reversed(chain):
                base = base + (names[c][len(_MODULE_PREFIX):],) if is_mod[c] else base
                path_of[c] = base
            return path_of[row]

        rows = [r for r in range(len(py)) if is_mod[r]]
        out = {c: [] for c in cols}
        ts, dur = py["ts"].tolist(), py["dur"].tolist()
        for r in rows:
            path = module_path(r)
            out["py_row"].append(r)
            out["name"].append(path[-1])
            out["cls"].append(path[-1].rsplit("_", 1)[0])
            out["path"].append("/".join(path))
            out["class_path"].append("/".join(p.rsplit("_", 1)[0] for p in path))
            out["depth"].append(len(path) - 1)
            out["ts"].append(ts[r])
            out["dur"].append(dur[r])
        return pd.DataFrame(out)

    def _nest_ops(self) -> None:
        """One sweep per thread over Python frames and ops sorted by start: parent op, module and
        source of every op. Events end-tolerance 0.01 µs: Kineto rounds to ns."""
        ops, py = self.ops, self.python
        n = len(ops)
        parent = np.full(n, -1, dtype=np.int64)
        top = np.arange(n, dtype=np.int64)
        depth = np.zeros(n, dtype=np.int64)
        module_row = np.full(n, -1, dtype=np.int64)
        source = [None] * n
        if n:
            mod_of_py = dict(zip(self.modules["py_row"].tolist(), range(len(self.modules))))
            py_src = [_frame_source(x) for x in py["name"].tolist()] if not py.empty else []
            # (ts, -dur, kind, row): kind 0 = python frame, 1 = op; frames first on ties.
            events = []
            if not py.empty:
                events.append(pd.DataFrame({"tid": py["tid"], "ts": py["ts"], "end": py["end"],
                                            "kind": 0, "row": np.arange(len(py))}))
            events.append(pd.DataFrame({"tid": ops["tid"], "ts": ops["ts"], "end": ops["end"],
                                        "kind": 1, "row": np.arange(n)}))
            ev = pd.concat(events, ignore_index=True)
            ev["neg_end"] = -ev["end"]
            ev = ev.sort_values(["tid", "ts", "neg_end", "kind"], kind="stable")
            cur_tid = None
            stack: list[tuple[float, int, int, str | None, int]] = []  # end, op, module, source, depth
            for tid, ts, end, kind, row in zip(ev["tid"].tolist(), ev["ts"].tolist(), ev["end"].tolist(),
                                                ev["kind"].tolist(), ev["row"].tolist()):
                if tid != cur_tid:
                    cur_tid, stack = tid, []
                while stack and stack[-1][0] <= ts + 0.01:
                    stack.pop()
                op_in, mod_in, src_in, d_in = stack[-1][1:] if stack else (-1, -1, None, 0)
                if kind == 1:
                    parent[row] = op_in
                    depth[row] = d_in
                    top[row] = top[op_in] if op_in >= 0 else row
                    module_row[row] = mod_in
                    source[row] = src_in
                    stack.append((end, row, mod_in, src_in, d_in + 1))
                else:
                    m = mod_of_py.get(row, mod_in)
                    s = py_src[row] or src_in
                    stack.append((end, op_in, m, s, d_in))
        ops["parent_row"] = parent
        ops["top_row"] = top
        ops["depth"] = depth
        ops["module_row"] = module_row
        ops["source"] = source

    def _link_backward(self) -> None:
        """Backward ops take module and source from the forward op with their sequence number."""
        ops = self.ops
        n = len(ops)
        if not n:
            ops["backward"] = []
            ops["fwd_row"] = []
            return
        names = ops["name"]
        # The autograd engine runs each node under an `evaluate_function` op: on its own thread
        # for CUDA, on the caller's thread on a CPU-only run (so a thread is not a direction).
        evaluates = names.str.startswith("autograd::engine::evaluate_function").to_numpy()
        backward = evaluates[ops["top_row"].to_numpy()] | names.str.contains("Backward", regex=False).to_numpy()
        ops["backward"] = backward
        fwd_row = np.full(n, -1, dtype=np.int64)
        seq = ops["seq"].to_numpy()
        parent = ops["parent_row"].to_numpy()
        parent_seq = np.where(parent >= 0, seq[np.clip(parent, 0, None)], -2)
        # Ops that create no autograd node (item, int slices) report the next sequence number too;
        # the node's own op is the outermost op of the *last* nest with that number.
        fwd = (~backward) & (seq >= 0) & (parent_seq != seq)
        first_fwd = (pd.Series(np.flatnonzero(fwd), index=seq[fwd]).groupby(level=0).max())
        bwd_rows = np.flatnonzero(backward & (seq >= 0))
        if len(bwd_rows):
            fwd_row[bwd_rows] = first_fwd.reindex(seq[bwd_rows]).fillna(-1).to_numpy(dtype=np.int64)
        # A backward op without its own sequence number inherits its top-level op's.
        top = ops["top_row"].to_numpy()
        missing = backward & (fwd_row < 0)
        fwd_row[missing] = fwd_row[top[missing]]
        ops["fwd_row"] = fwd_row
        has = fwd_row >= 0
        mod = ops["module_row"].to_numpy().copy()
        mod[has & (mod < 0)] = mod[fwd_row[has & (mod < 0)]]
        ops["module_row"] = mod
        src = ops["source"].to_numpy(dtype=object).copy()  # pandas 3 hands out read-only views
        fill = np.flatnonzero(has & pd.isna(src))
        src[fill] = src[fwd_row[fill]]
        ops["source"] = src

    def _link_kernels(self) -> None:
        k, la, ops = self.kernels, self.launches, self.ops
        op_of_ext = pd.Series(np.arange(len(ops)), index=ops["ext_id"]) if not ops.empty else pd.Series(dtype=int)
        op_of_ext = op_of_ext[~op_of_ext.index.duplicated()]
        if not la.empty:
            la["op_row"] = op_of_ext.reindex(la["ext_id"]).fillna(-1).to_numpy(dtype=np.int64)
        else:
            la["op_row"] = np.array([], dtype=np.int64)
        if k.empty:
            for c in ("launch_row", "op_row", "top_row", "step"):
                k[c] = np.array([], dtype=np.int64)
            return
        launch_of_corr = pd.Series(np.arange(len(la)), index=la["correlation"]) if not la.empty else pd.Series(dtype=int)
        launch_of_corr = launch_of_corr[~launch_of_corr.index.duplicated()]
        launch_row = launch_of_corr.reindex(k["correlation"]).fillna(-1).to_numpy(dtype=np.int64)
        k["launch_row"] = launch_row
        # op through the launch (correlation id); the kernel's own External id where no launch.
        via_launch = np.where(launch_row >= 0, la["op_row"].to_numpy()[np.clip(launch_row, 0, None)]
                              if len(la) else -1, -1)
        direct = op_of_ext.reindex(k["ext_id"]).fillna(-1).to_numpy(dtype=np.int64)
        op_row = np.where(via_launch >= 0, via_launch, direct)
        k["op_row"] = op_row
        k["top_row"] = np.where(op_row >= 0, ops["top_row"].to_numpy()[np.clip(op_row, 0, None)]
                                if len(ops) else -1, -1)
        # A kernel belongs to the step whose CPU span launched it.
        launch_ts = np.where(launch_row >= 0, la["ts"].to_numpy()[np.clip(launch_row, 0, None)]
                             if len(la) else np.nan, np.nan)
        op_ts = np.where(op_row >= 0, ops["ts"].to_numpy()[np.clip(op_row, 0, None)] if len(ops) else np.nan, np.nan)
        cpu_ts = np.where(np.isnan(launch_ts), op_ts, launch_ts)
        step = self._step_of(np.nan_to_num(cpu_ts, nan=-1.0))
        k["step"] = np.where(np.isnan(cpu_ts), -1, step)

    # -- convenience views ---------------------------------------------------------------------
    def kernel_ops(self) -> pd.DataFrame:
        """Kernels joined with the top-level op that launched them, its module and source.
        Built once and shared by every analyzer (summary, clusters, launch-bound): filter it or
        `.assign` to it, never modify it in place."""
        if self._kernel_ops is None:
            self._kernel_ops = self._join_kernel_ops()
        return self._kernel_ops

    def _join_kernel_ops(self) -> pd.DataFrame:
        k = self.kernels
        ops = self.ops
        out = k.copy()
        if k.empty:
            for col in ("op_name", "module_row", "source", "backward", "module", "module_class"):
                out[col] = pd.Series(dtype=object)
            return out
        top = k["top_row"].to_numpy()
        has = top >= 0
        for col in ("name", "module_row", "source", "backward"):
            vals = np.full(len(k), None, dtype=object)
            if len(ops):
                vals[has] = ops[col].to_numpy(dtype=object)[top[has]]
            out["op_" + col if col == "name" else col] = vals
        mods = self.modules
        mrow = out["module_row"].to_numpy(dtype=object)
        path = np.full(len(k), None, dtype=object)
        cpath = np.full(len(k), None, dtype=object)
        okm = np.array([m is not None and m >= 0 for m in mrow], dtype=bool)
        if okm.any() and len(mods):
            idx = mrow[okm].astype(np.int64)
            path[okm] = mods["path"].to_numpy(dtype=object)[idx]
            cpath[okm] = mods["class_path"].to_numpy(dtype=object)[idx]
        out["module"] = path
        out["module_class"] = cpath
        return out


def _frame(cols: dict) -> pd.DataFrame:
    df = pd.DataFrame(cols)
    if "ts" in df and len(df):
        df["ts"] = df["ts"].astype(float)
        df["dur"] = df["dur"].astype(float)
        df = df.sort_values("ts", kind="stable", ignore_index=True)
    return df
