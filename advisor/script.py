"""Run a user's script in this process as `__main__`, the way `python script.py ARGS` would,
and turn how it ended into one value: None (it finished, or `stop` was raised to end it early) or
the error to show the user (its own traceback, without our frames)."""
from __future__ import annotations

import os
import runpy
import sys
import traceback
import types


def run_as_main(script: str, args: list[str], stop: type[BaseException], source: str | None = None) -> str | None:
    """`source`: the text to run instead of the file's (apply's patched script); sys.argv and
    sys.path are restored afterwards."""
    path = os.path.abspath(script)
    saved_argv, saved_path = sys.argv[:], sys.path[:]
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
        if exc.code not in (None, 0):
            return f"the script exited with status {exc.code}"
    except KeyboardInterrupt:
        return "interrupted (Ctrl-C)"
    except BaseException as exc:  # the user's script raised
        return format_user_traceback(exc, path)
    finally:
        sys.argv, sys.path[:] = saved_argv, saved_path
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
