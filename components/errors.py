"""Every error cnnflow reports as one line instead of a traceback, by who has to act.

`UserError` is what the user must fix; its subclasses say where the fix is, and each carries the exit
code the command line ends with. Anything else is a defect of cnnflow (or a plugin) and keeps its
traceback. This module sits in components/ because components raise these; flows map them to exit
codes through `exit_code`, the one place that does.
"""

from __future__ import annotations

import re

EXIT_INTERRUPTED = 130  # 128 + SIGINT, what shells report for Ctrl-C
EXIT_TERMINATED = 143  # 128 + SIGTERM, what workers, Docker and Kubernetes send


class UserError(Exception):
    """Something the user must fix: shown as its one-line message, never as a traceback."""

    exit_code = 1
    retryable = False  # whether the same call may pass a moment later (a network blip)


class SettingsError(UserError, ValueError):
    """A setting that is mistyped, out of range or unknown; the message names the key, the value and
    what is accepted. Raised before any server, run or folder is created."""

    exit_code = 2


class DataError(UserError, ValueError):
    """Data that cannot be found, read or split as configured; the message names the file."""

    exit_code = 3


class RunError(UserError):
    """A run that does not exist, cannot be continued or resumed, is busy elsewhere, or diverged."""

    exit_code = 4


class InfrastructureError(UserError):
    """The tracking store, the Prefect server, the disk or the network: names the URI or path and the fix."""

    exit_code = 5


class ServerOutage(InfrastructureError):
    """A server a training needs (the MLflow store, the Prefect server) failed for longer than
    train.outage_timeout; the training stops resumable, its run never marked FAILED for it."""


class StoppedByOutage(BaseException):
    """A ServerOutage of a job that its pool resubmits after a crash (flows/orchestration/healing.py): raised past
    the flow as a BaseException, which Prefect records as Crashed (an Exception would be Failed), so
    the job is scheduled again and resumes once the servers answer."""


class TransientError(InfrastructureError):
    """A failure that may pass by itself (connection reset, timeout, HTTP 5xx): tasks retry it."""

    retryable = True


class Interrupted(KeyboardInterrupt):
    """SIGTERM turned into the same clean stop as Ctrl-C (a KeyboardInterrupt, so every handler of
    Ctrl-C handles it too), ending with exit code 143 instead of 130."""

    exit_code = EXIT_TERMINATED


def exit_code(error: BaseException) -> int:
    """The command's exit code for an error that ends it."""
    if isinstance(error, (UserError, Interrupted)):
        return error.exit_code
    if isinstance(error, KeyboardInterrupt):
        return EXIT_INTERRUPTED
    signal_number = getattr(error, "signal", None)  # Prefect's TerminationSignal (SIGTERM inside a flow)
    return 128 + signal_number if isinstance(signal_number, int) else 1


def first_line(error: BaseException) -> str:
    """The first line of an error's message (at most 200 characters), for a one-line report."""
    lines = str(error).strip().splitlines()
    return lines[0][:200] if lines else type(error).__name__


def described(error: BaseException) -> str:
    """`TypeError: unexpected keyword 'x'`: an error's type and first line, what a warning about an
    error it does not raise says (docs/development.md, "Errors")."""
    return f"{type(error).__name__}: {first_line(error)}"


# Errors of cnnflow's own code (or a library's changed API), never of a server or the network: a
# handler that rides out outages raises these instead of retrying them as one.
DEFECTS = (TypeError, AttributeError, NameError, AssertionError, ImportError, SyntaxError)


def is_defect(error: BaseException) -> bool:
    return isinstance(error, DEFECTS)


def printable(text: str) -> str:
    """`text` with each character that is not printable (line breaks, NEL, other controls) written
    as its escape, so a message that quotes a user's value stays one line on a terminal."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def counted(number: int, noun: str) -> str:
    """`1 trial`, `3 trials`, `12,000 images`: a count as a sentence says it."""
    return f"{number:,} {noun}{'' if number == 1 else 's'}"


def is_transient(error: BaseException) -> bool:
    """A failure that may pass by itself: connection reset or refused, timeout, HTTP 5xx, anywhere in
    the chain of causes (TFDS wraps the network's errors in its own)."""
    while error is not None:
        if isinstance(error, (ConnectionError, TimeoutError)) or type(error).__name__ in (
                "ConnectionError", "Timeout", "ReadTimeout", "ConnectTimeout", "ChunkedEncodingError"):
            return True
        status = getattr(getattr(error, "response", None), "status_code", None) or getattr(error, "code", None)
        if isinstance(status, int) and 500 <= status < 600 or re.search(r"\b(HTTP|status)\D{0,10}5\d\d\b", str(error)):
            return True
        error = error.__cause__ or error.__context__
    return False
