"""Keep Kineto's own log lines out of what `profile` prints.

libkineto writes lines such as
`USDT:2026-12-06 13:19:19 21674:21674 SyncActivityProfilerHandler.cpp:52] profiler_start` straight to file descriptor 2 from C++,
around every profiler start and stop; Python's sys.stderr never sees them. While the profiled script
runs, fd 2 goes through a pipe and a thread passes everything on except those lines. The script's
own stderr (its prints, warnings, tracebacks, progress bars) passes unchanged and at once: a
partial line goes through as soon as it cannot be the start of a dropped line.
"""
from __future__ import annotations

import contextlib
import os
import re
import sys
import threading

# Kineto's start/stop markers; its "STAGE:" lines come from the same logger on some builds.
DROPPED = re.compile(rb"^(USDT:.*\] profiler_(start|stop)|STAGE:\d{4}-\d\d-\d\d .*ActivityProfilerController).*$")
_PREFIXES = (b"USDT:", b"STAGE:")


@contextlib.contextmanager
def without_kineto_lines(enabled: bool = True):
    """Within the block, fd 2 drops Kineto's log lines (see the module docstring). A no-op where fd 2
    cannot be redirected (no fileno, e.g. under a test runner that captured sys.stderr)."""
    try:
        fd = sys.stderr.fileno() if enabled else -1
    except (AttributeError, OSError, ValueError):
        fd = -1
    if fd != 2:
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    read_end, write_end = os.pipe()
    os.dup2(write_end, 2)
    os.close(write_end)
    thread = threading.Thread(target=_pump, args=(read_end, saved), name="fusion-advisor-stderr", daemon=True)
    thread.start()
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)      # the pipe's last writer goes: the pump reads EOF and ends
        thread.join(timeout=5)
        os.close(saved)


def _pump(read_end: int, out: int) -> None:
    pending = b""
    try:
        while True:
            chunk = os.read(read_end, 65536)
            if not chunk:
                break
            pending += chunk
            *lines, pending = pending.split(b"\n")
            kept = [_kept(ln) for ln in lines]
            # A partial line (a progress bar's "\r" update) goes on at once, unless its last
            # segment may yet become a dropped line.
            head, sep, tail = pending.rpartition(b"\r")
            kept.append(head + sep)
            pending = tail if _could_be_dropped(tail) else b""
            if not pending:
                kept.append(tail)
            data = b"".join(kept)
            if data:
                _write_all(out, data)
        if pending:   # the last, unfinished line
            head, sep, tail = pending.rpartition(b"\r")
            _write_all(out, head + sep + (b"" if DROPPED.match(tail) else tail))
    finally:
        os.close(read_end)


def _kept(line: bytes) -> bytes:
    """The line with its newline, or without its last "\r" segment when that is Kineto's."""
    head, sep, tail = line.rpartition(b"\r")
    return head + sep if DROPPED.match(tail) else line + b"\n"


def _could_be_dropped(partial: bytes) -> bool:
    return bool(partial) and any(p.startswith(partial[:len(p)]) for p in _PREFIXES)


def _write_all(fd: int, data: bytes) -> None:
    while data:
        data = data[os.write(fd, data):]
