"""Where the suite's memory goes: `FUSION_ADVISOR_TEST_RSS=rss.jsonl python -m pytest -q` writes one
line per test (its wall and CPU time, its subprocesses' included; the pytest process's RSS after it;
the peak RSS of the subprocesses it ran)
and a summary line (the peak of the pytest process plus its live subprocesses together).

Subprocesses are sampled every 0.1 s from /proc (Linux): the CLI runs, torchrun and its ranks are
most of the suite's peak, not the pytest process. Loaded by tests/conftest.py only when asked."""
import json
import os
import pathlib
import threading
import time

_PAGE = os.sysconf("SC_PAGE_SIZE")
_MB = 1 << 20


def _rss(pid: int) -> int:
    try:
        return int(pathlib.Path(f"/proc/{pid}/statm").read_text().split()[1]) * _PAGE
    except (OSError, IndexError, ValueError):
        return 0


def _cpu_seconds() -> float:
    t = os.times()   # children: the subprocesses waited for so far
    return t.user + t.system + t.children_user + t.children_system


def _descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for stat in pathlib.Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [root]
    while todo:
        kids = children.get(todo.pop(), [])
        found += kids
        todo += kids
    return found


class RSSReport:
    def __init__(self, path: str):
        self.out = open(path, "w")
        self.pid = os.getpid()
        self.lock = threading.Lock()
        self.peak_total = self.peak_children = self.test_children = 0
        self.test_start, self.test_cpu = time.perf_counter(), _cpu_seconds()
        threading.Thread(target=self._sample, daemon=True).start()

    def _sample(self) -> None:
        while True:
            parent = _rss(self.pid)
            children = sum(_rss(p) for p in _descendants(self.pid))
            with self.lock:
                self.peak_total = max(self.peak_total, parent + children)
                self.peak_children = max(self.peak_children, children)
                self.test_children = max(self.test_children, children)
            time.sleep(0.1)

    def _write(self, record: dict) -> None:
        self.out.write(json.dumps(record) + "\n")
        self.out.flush()

    def pytest_runtest_logstart(self, nodeid, location):
        with self.lock:
            self.test_children = 0
        self.test_start, self.test_cpu = time.perf_counter(), _cpu_seconds()

    def pytest_runtest_logfinish(self, nodeid, location):
        with self.lock:
            children = self.test_children
        self._write({"test": nodeid, "seconds": round(time.perf_counter() - self.test_start, 2),
                     "cpu_s": round(_cpu_seconds() - self.test_cpu, 2),
                     "rss_mb": _rss(self.pid) // _MB, "children_peak_mb": children // _MB})

    def pytest_sessionfinish(self, session, exitstatus):
        status = pathlib.Path("/proc/self/status").read_text()
        hwm = next((line.split()[1] for line in status.splitlines() if line.startswith("VmHWM")), "0")
        with self.lock:
            self._write({"summary": {"peak_total_mb": self.peak_total // _MB,
                                     "peak_children_mb": self.peak_children // _MB,
                                     "pytest_hwm_mb": int(hwm) // 1024}})
        self.out.close()
