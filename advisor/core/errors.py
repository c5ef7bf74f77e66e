"""Errors a user can act on. Each carries a one-line message and the exit code the CLI returns.

Exit codes (also in `fusion-advisor --help`):
  0  success
  1  the profiled script raised or exited non-zero (its traceback is shown; what was traced is kept)
  2  bad input: usage, a missing or unreadable file, a trace that is empty, truncated or not a trace
  3  the environment cannot do it: no CUDA GPU where one is required, a missing dependency
  4  an output could not be written (nothing was half-written)
  5  `apply --verify` could not prove the patch: a planned replacement never ran, or losses differ
"""
from __future__ import annotations

EXIT_OK = 0
EXIT_SCRIPT_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_ENVIRONMENT = 3
EXIT_CANNOT_WRITE = 4
EXIT_NOT_VERIFIED = 5


class AdvisorError(Exception):
    """Base class: a message for the user and an exit code."""

    exit_code = EXIT_BAD_INPUT

    def __init__(self, message: str, exit_code: int | None = None):
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code


class TraceError(AdvisorError):
    """The trace cannot be read or holds nothing to analyse."""


class ScriptError(AdvisorError):
    """The user's script failed."""

    exit_code = EXIT_SCRIPT_FAILED


class EnvironmentProblem(AdvisorError):
    """The machine lacks what the command needs (a GPU, a package)."""

    exit_code = EXIT_ENVIRONMENT


class OutputError(AdvisorError):
    """An output path cannot be written."""

    exit_code = EXIT_CANNOT_WRITE
