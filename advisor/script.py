"""Run a user's script in this process as `__main__`, the way `python script.py ARGS` would,
and turn how it ended into one value: None (it finished, or `stop` was raised to end it early) or
the error to show the user (its own traceback, without our frames)."""
from __future__ import annotations

import contextlib
import os
import runpy
import signal
import sys
import threading
import traceback
import types
from typing import Callable


class Terminated(KeyboardInterrupt):
    """SIGTERM (what batch schedulers send before they kill), raised where Ctrl-C would be."""


@contextlib.contextmanager
def sigterm_as_interrupt():
    """Within the block, SIGTERM stops the script the way Ctrl-C does (Terminated), so what was
    recorded is kept and temporary files are cleaned; the previous handler comes back after."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_sigterm(signum, frame):
        if _deferring:
            _pending.append(signum)
            return
        raise Terminated()
    previous = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
        _pending.clear()


# A SIGTERM that lands inside torch.profiler's own Python code (its step() or stop()) leaves it
# half-switched: stop() then fails, no trace is written, and the process segfaulted at exit
# (PythonTracer never stopped; seen in CI as status -11). Inside `sigterm_deferred` the signal waits
# until the block ends, then stops the script as usual.
_deferring = False
_pending: list[int] = []


@contextlib.contextmanager
def sigterm_deferred():
    global _deferring
    if _deferring:
        yield
        return
    _deferring = True
    try:
        yield
    finally:
        _deferring = False
    if _pending:
        _pending.clear()
        raise Terminated()


def run_as_main(script: str, args: list[str], stop: type[BaseException], source: str | None = None,
                on_exit: Callable[[object], None] | None = None) -> str | None:
    """`source`: the text to run instead of the file's (apply's patched script); sys.argv, sys.path
    and the working directory (a script may chdir) are restored afterwards. `on_exit(code)` hears
    of a sys.exit(code), whatever the code."""
    path = os.path.abspath(script)
    saved_argv, saved_path, saved_cwd = sys.argv[:], sys.path[:], os.getcwd()
    sys.argv = [script, *args]
    sys.path.insert(0, os.path.dirname(path))
    try:
        if source is None:
            runpy.run_path(path, run_name="__main__")
        else:
            _run_text(path, source)
    except stop:
        pass
    except SystemExit as exc:
        if on_exit is not None:
            on_exit(exc.code)
        if exc.code not in (None, 0):
            return f"the script exited with status {exc.code}"
    except Terminated:
        return "terminated (SIGTERM)"
    except KeyboardInterrupt:
        return "interrupted (Ctrl-C)"
    except BaseException as exc:  # the user's script raised
        return format_user_traceback(exc, path)
    finally:
        sys.argv, sys.path[:] = saved_argv, saved_path
        with contextlib.suppress(OSError):
            os.chdir(saved_cwd)
    return None


def _run_text(path: str, text: str) -> None:
    module = types.ModuleType("__main__")
    module.__file__ = path
    saved = sys.modules.get("__main__")
    sys.modules["__main__"] = module
    try:
        exec(compile(text, path, "exec"), module.__dict__)
    finally:
        if saved is not None:
            sys.modules["__main__"] = saved


def format_user_traceback(exc: BaseException, script: str) -> str:
    """The traceback from the user's script down, without our runpy frames."""
    tb = exc.__traceback__
    while tb is not None and os.path.abspath(tb.tb_frame.f_code.co_filename) != script:
        tb = tb.tb_next
    return "".join(traceback.format_exception(type(exc), exc, tb or exc.__traceback__))
