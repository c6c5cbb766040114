"""User mistakes against bugs: every command line (``gsil <command>`` and each module's
``python -m``) runs through :func:`run_command`.

A user's mistake -- bad data, a bad flag or recipe value, a missing or unreadable file, a model
that cannot be loaded, a full disk, an unreachable judge -- prints ``error: <message>`` (naming
the file, line or field and the fix) on stderr and exits with status 2, without a traceback;
anything else is a bug and propagates with its traceback. The modules' ``main(argv)``
functions keep raising (``SystemExit`` with a message for a bad configuration), so in-process
callers and tests see the exception; the translation to status 2 happens here only.
``GSIL_TRACEBACK=1`` prints the traceback of a user error too.
"""

from __future__ import annotations

import errno
import sys
import traceback
from collections.abc import Callable
from typing import Any

from gsil import env

EXIT_USER_ERROR = 2  # argparse's status for a bad flag; ours for every user mistake


DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


NOT_WRITABLE = (errno.EACCES, errno.EPERM, errno.EROFS)


def user_error_message(
    error: BaseException, also: tuple[type[BaseException], ...] = ()
) -> str | None:
    """The one-line message for a user's mistake, or None when ``error`` is a bug.

    User mistakes: :class:`experiments.config.ConfigError`, :class:`gsil.data.DataError`,
    :class:`gsil.models.ModelLoadError`, :class:`gsil.integrity.CorruptFileError` and
    ``NonFiniteError`` (a damaged file, a diverged step), a missing file or directory, a
    file where a directory is expected (or the reverse), a directory that is not writable, a
    full disk, a ``SystemExit`` whose code is a message (raised by our code), an MT-Bench judge
    that never answered, and the types in ``also`` (a command's own, e.g. ``gsil evaluate``'s
    ``ValueError``).
    """
    from experiments.config import ConfigError
    from gsil.data import DataError
    from gsil.integrity import CorruptFileError
    from gsil.models import ModelLoadError
    from gsil.nonfinite import NonFiniteError

    known = (ConfigError, DataError, ModelLoadError, CorruptFileError, NonFiniteError)
    if isinstance(error, SystemExit):
        return None if error.code is None or isinstance(error.code, int) else str(error.code)
    if isinstance(error, OSError) and error.errno in DISK_FULL:
        return (
            f"the disk is full ({error.strerror}) writing {error.filename or 'a file'}: "
            "free some space (or choose another --output-dir), then run the same command "
            "again (a training run: add --resume; everything finished, and the last "
            "checkpoint, is intact)"
        )
    if isinstance(error, OSError) and error.errno in NOT_WRITABLE and error.filename:
        return (
            f"{error.filename}: {error.strerror}: choose a writable --output-dir (or "
            "--out), or fix that directory's permissions"
        )
    if isinstance(error, FileNotFoundError | IsADirectoryError | NotADirectoryError):
        if error.filename is None:  # our own messages name the file and the fix
            return str(error)
        return f"{error.filename}: {error.strerror}"
    if isinstance(error, RuntimeError) and str(error).startswith("every call to judge"):
        # gsil.evaluation.mtbench.grade: not one judge request succeeded
        return (
            f"{error}. Check that the judge endpoint "
            f"({env.judge_variables().get('GSIL_JUDGE_BASE_URL', 'GSIL_JUDGE_BASE_URL')}) "
            "is up and serves OpenAI chat completions for GSIL_JUDGE_MODEL, or pass "
            "--judge-model SPEC for a local judge"
        )
    if isinstance(error, known + also):
        return str(error)
    return None


def exit_status(result: Any) -> int:
    """A command's return value as an exit status: an int is one; train and sweep return their
    summaries (an empty one is a failure)."""
    if isinstance(result, bool) or not isinstance(result, int):
        return 0 if result else 1
    return result


def run_command(
    main: Callable[..., Any],
    argv: list[str] | None = None,
    prog: str | None = None,
    also: tuple[type[BaseException], ...] = (),
) -> int:
    """Run a command's ``main(argv[, prog=...])``; returns the exit status.

    A user's mistake (:func:`user_error_message`) prints ``error: <message>`` on stderr and
    gives :data:`EXIT_USER_ERROR` (2), without a traceback (unless ``GSIL_TRACEBACK=1``); a bug
    propagates. ``SystemExit`` with a status (``--help``, argparse's own errors) passes through.
    """
    try:
        result = main(argv) if prog is None else main(argv, prog=prog)
    except (Exception, SystemExit) as error:
        message = user_error_message(error, also)
        if message is None:
            raise
        if env.traceback_wanted():
            traceback.print_exc()
        message = message.removeprefix("error: ")
        print(f"error: {message}", file=sys.stderr)
        return EXIT_USER_ERROR
    return exit_status(result)
