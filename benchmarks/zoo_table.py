"""The zoo's table for the README: the newest measured row of each (model, mode) at the zoo's current
sizes, across the CSVs of several GPU runs (a 10-minute window runs a few models; each run writes
its own CSV), with issue 13's bar under it.

    python benchmarks/zoo_table.py benchmarks/results/zoo-h100-*.csv

Rows are taken in the order given, a later file's row replacing an earlier one of the same model and
mode; a row whose `config` is not the zoo's current one for that model (an older size) is left out,
and so is a row without eager and applied times. Each row names its CSV. The bar: the advisor's
configuration never slower than eager (>= 0.98x), >= 90 % of whole-model compile's gain in the
median, ahead of whole-model compile on at least a third of the models.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import zoo  # noqa: E402  (the sibling script: its models, CSV reader and summary)


def current_rows(paths: list[Path]) -> tuple[list[dict], list[str]]:
    """(newest row of each (model, mode) at the current sizes, each with its `csv`; the models and
    modes of the zoo without one)."""
    configs = {spec.name: zoo.config_text(spec) for spec in zoo.MODELS}
    latest: dict[tuple[str, str], dict] = {}
    for path in paths:
        for row in zoo.read_csv(path):
            key = (row.get("model", ""), row.get("mode", ""))
            if configs.get(key[0]) != row.get("config") or not (row.get("eager_ms") and row.get("applied_ms")):
                continue
            latest[key] = {**row, "csv": path.name}
    order = [(spec.name, mode) for spec in zoo.MODELS for mode in spec.modes]
    rows = [latest[k] for k in order if k in latest]
    missing = [f"{m}/{mode}" for m, mode in order if (m, mode) not in latest]
    return rows, missing


def _x(row: dict, ms_key: str) -> str:
    eager, ms = zoo._num(row.get("eager_ms")), zoo._num(row.get(ms_key))
    return f"{ms:.2f} ms ({eager / ms:.2f}×)" if eager and ms else "—"


def markdown(rows: list[dict], missing: list[str]) -> str:
    lines = ["| model | mode | eager | whole-model compile | advisor's configuration | share of compile's gain "
             "| replacements a step | run |",
             "|---|---|---:|---:|---|---:|---|---|"]
    for r in rows:
        share = zoo._num(r.get("share_of_compile_gain"))
        share_text = f"{share:.0%}" if share is not None else "— (compile slower than eager)"
        ahead = " **ahead of compile**" if zoo.ahead_of_compile(r) else ""
        lines.append(f"| {r['model']} | {r['mode']} | {zoo._num(r['eager_ms']):.2f} ms | {_x(r, 'compile_ms')} "
                     f"| {r.get('advisor_config') or '—'}: {_x(r, 'applied_ms')}{ahead} | {share_text} "
                     f"| {r.get('replacements') or '—'} | `{r['csv']}` |")
    s = zoo.summary(rows)
    share = s["median_share_of_compile_gain"]
    lines.append("")
    lines.append(f"{s['timed']} of {len(rows) + len(missing)} (model, mode) runs measured at the current sizes; "
                 f"median share of compile's gain {share:.0%}; " if share is not None else "median share —; ")
    lines[-1] += (f"ahead of whole-model compile on {s['beating_compile']}; slower than eager (< {zoo.NOT_SLOWER}×) "
                  f"on {s['slower_than_eager']}{' (' + ', '.join(s['slower_than_eager_models']) + ')' if s['slower_than_eager'] else ''}.")
    if missing:
        lines.append(f"Not measured at these sizes yet: {', '.join(missing)}.")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("csv", nargs="+", type=Path, help="zoo CSVs, oldest first")
    args = ap.parse_args(argv)
    absent = [p for p in args.csv if not p.exists()]
    if absent:
        print(f"zoo_table.py: no such file: {absent[0]}", file=sys.stderr)
        return 2
    rows, missing = current_rows(args.csv)
    print(markdown(rows, missing))
    return 0


if __name__ == "__main__":
    sys.exit(main())
