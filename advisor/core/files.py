"""Writing a user-visible file so that it is always either its old self or its new self.

Every output of fusion-advisor (traces, results, reports, patched sources, calibration profiles)
goes through `atomic_output`: a temporary file beside the destination (`.NAME` + 8 random
characters + `.tmp`), flushed to disk, given the destination's permissions, then renamed over it,
and the folder's entry flushed too. An interrupted or failing write leaves the old file whole and
no temporary file behind; a process killed mid-write (SIGKILL) leaves at most that temporary file,
which `clean_leftovers` recognises. A read-only destination is refused, as open() would refuse it.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import secrets
from pathlib import Path

from fusion_advisor.core.errors import OutputError


@contextlib.contextmanager
def atomic_output(dest: Path, binary: bool = False):
    """Yield a file object whose contents replace `dest` when the block exits without error."""
    dest = Path(dest)
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        if dest.exists() and is_read_only(dest):
            raise OutputError(f"cannot write {dest}: it is read-only")
        # An existing file keeps its permissions; a new one gets what open() would give it
        # (0o666 less the umask, applied by the kernel: the process umask is never changed).
        mode = dest.stat().st_mode & 0o777 if dest.exists() else None
        fd, tmp = _create_temp(dest)
    except OSError as exc:
        raise OutputError(f"cannot write {dest}: {exc.strerror or exc}") from None
    try:
        with os.fdopen(fd, "wb" if binary else "w", **({} if binary else {"encoding": "utf-8"})) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, dest)
        _fsync_folder(dest.parent)   # the rename itself survives a power loss
    except BaseException as exc:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(exc, OSError):
            raise OutputError(f"cannot write {dest}: {exc.strerror or exc}") from None
        raise


def write_text_atomic(dest: Path, text: str) -> None:
    with atomic_output(dest) as fh:
        fh.write(text)


def is_read_only(path: Path) -> bool:
    """No write permission for us, or (as root, whom the kernel lets write anything) for anyone:
    a file made read-only is not replaced behind its owner's back by a rename."""
    return not os.access(path, os.W_OK) or not (os.stat(path).st_mode & 0o222)


def _create_temp(dest: Path) -> tuple[int, str]:
    for _ in range(100):
        tmp = str(dest.parent / f".{dest.name}{secrets.token_hex(4)}.tmp")
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666), tmp
        except FileExistsError:
            continue
    raise OSError(errno.EEXIST, "no free temporary file name")


def _fsync_folder(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return   # a platform or filesystem without directory handles: the rename is all there is
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def leftover_temps(path: str | Path) -> list[Path]:
    """Temporary files of writes to `path` that a killed process left beside it."""
    path = Path(path)
    pattern = re.compile(r"^\." + re.escape(path.name) + r"[a-z0-9_]{8}\.tmp$")
    try:
        return sorted(p for p in path.parent.iterdir() if pattern.match(p.name) and p.is_file())
    except OSError:
        return []


def clean_leftovers(paths) -> list[str]:
    """Remove what killed writes of these paths left (see `leftover_temps`); one message per file.
    Call it only while holding the lock of whatever writes these paths."""
    messages = []
    for path in paths:
        for tmp in leftover_temps(path):
            try:
                tmp.unlink()
                messages.append(f"removed {tmp}, left by an interrupted write of {Path(path).name}")
            except OSError as exc:
                messages.append(f"cannot remove {tmp}, left by an interrupted write: {exc.strerror or exc}")
    return messages


@contextlib.contextmanager
def folder_lock(lock_path: Path, what: str):
    """An exclusive lock on `lock_path` (created if needed) for the block; the kernel releases it
    when the process dies, so a killed holder never blocks the next one. OutputError when held."""
    lock_path = Path(lock_path)
    try:
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as exc:
        raise OutputError(f"cannot create the lock {lock_path}: {exc.strerror or exc}") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise OutputError(f"another {what} is running here (it holds {lock_path}); nothing was written") from None
        yield
    finally:
        os.close(fd)   # closing releases the lock
