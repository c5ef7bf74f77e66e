"""Writing a user-visible file so that it is always either its old self or its new self.

Every output of fusion-advisor (traces, results, reports, patched sources, calibration profiles)
goes through `atomic_output`: a temporary file beside the destination, flushed to disk, given the
destination's permissions, then renamed over it. An interrupted or failing write leaves the old
file whole and no temporary file behind.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

from fusion_advisor.errors import OutputError


@contextlib.contextmanager
def atomic_output(dest: Path, binary: bool = False):
    """Yield a file object whose contents replace `dest` when the block exits without error."""
    dest = Path(dest)
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        # An existing file keeps its permissions; a new one gets what open() would give it.
        mode = dest.stat().st_mode & 0o777 if dest.exists() else _default_mode()
        fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix="." + dest.name, suffix=".tmp")
    except OSError as exc:
        raise OutputError(f"cannot write {dest}: {exc.strerror or exc}") from None
    try:
        with os.fdopen(fd, "wb" if binary else "w", **({} if binary else {"encoding": "utf-8"})) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, dest)
    except BaseException as exc:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(exc, OSError):
            raise OutputError(f"cannot write {dest}: {exc.strerror or exc}") from None
        raise


def write_text_atomic(dest: Path, text: str) -> None:
    with atomic_output(dest) as fh:
        fh.write(text)


def _default_mode() -> int:
    """0o666 less the umask: what open() would have given (mkstemp gives 0o600)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask
