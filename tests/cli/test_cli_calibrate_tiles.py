"""calibrate --kernel-tiles: the norm kernels' tile search, its progress and the file it reports."""
from rich.progress import Progress

from fusion_advisor import cli
from fusion_advisor.kernels import norm_tune


def test_kernel_tiles_search_every_row_length_in_both_dtypes_and_families(monkeypatch, tmp_path):
    calls = {}

    def fake_tune(n_values, dtypes, device, log=print, verbose=False, jobs=1, families=norm_tune.FAMILIES):
        calls.update(n=list(n_values), dtypes=[str(d) for d in dtypes], jobs=jobs, families=families)
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
    assert 1 <= calls["jobs"] <= 2 and tuple(calls["families"]) == norm_tune.FAMILIES
    task = progress.tasks[0]
    assert task.completed == 2 and task.total == len(norm_tune.ROW_LENGTHS) * 2 * 2 * 2
