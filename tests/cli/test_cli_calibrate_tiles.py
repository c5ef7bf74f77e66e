"""calibrate --kernel-tiles: the norm kernels' tile search, its progress and the file it reports."""
from rich.progress import Progress

from fusion_advisor import cli
from fusion_advisor.kernels import norm_tune


def test_kernel_tiles_search_every_row_length_in_both_dtypes_and_families(monkeypatch, tmp_path):
    calls, searches = {}, []

    def fake_tune(n_values, dtypes, device, log=print, verbose=False, jobs=1, families=norm_tune.FAMILIES,
                  small=False):
        calls.update(n=list(n_values), dtypes=[str(d) for d in dtypes], families=families)
        searches.append(("small" if small else "large", jobs))
        log("  compiled the candidates in 4 processes in 9 s")     # not a searched row length
        log("  fwd add N=64 bfloat16: (64, 64, 8, 1, True, 1) 96.5 us (of 14; slowest 129.0 us)")
        log("  bwd plain N=64 bfloat16: (64, 64, 8, 2, True, 1) 148.9 us (of 30; slowest 385.2 us)")
        return str(tmp_path / "tiles.json")

    monkeypatch.setattr(norm_tune, "tune", fake_tune)
    import torch
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda *a: (5 << 30, 80 << 30))   # room for 2 compile processes
    progress = Progress()
    assert cli._search_kernel_tiles(progress) == str(tmp_path / "tiles.json")
    assert calls["n"] == list(norm_tune.ROW_LENGTHS) and calls["dtypes"] == ["torch.bfloat16", "torch.float32"]
    assert tuple(calls["families"]) == norm_tune.FAMILIES
    # large launches first, compiling in parallel (the small search reuses those kernels), then small ones
    assert [s for s, _ in searches] == ["large", "small"] and 1 <= searches[0][1] <= 2
    task = progress.tasks[0]
    assert task.completed == 4 and task.total == len(norm_tune.ROW_LENGTHS) * 2 * 2 * 2 * 2
