"""The ``gsil`` command: one entry point for training, evaluation, reports, figures and sweeps.

    gsil train --config recipes/default.yaml        a run or a whole experiment (a recipe)
    gsil train --method gsil --loss brier --lr 1e-5  flags override the recipe (or the defaults)
    gsil evaluate --model runs/x/round_1/model --benchmarks reasoning,gsm8k
    gsil report runs/default
    gsil figures [--only NAME]
    gsil sweep --config quick --sweep loss=logistic,brier seed=0,1,2
    gsil testbed [--quick]                            every method scored by exact KL

Each subcommand is the module it names (``python -m experiments.run`` is ``gsil train``, and
so on); ``gsil <command> --help`` lists its flags.

Errors. Every command line (``gsil <command>`` and each module's ``python -m``) runs through
:func:`run_command`: a user's mistake -- bad data, a bad flag or recipe value, a missing or
unreadable file, a model that cannot be loaded, a full disk, an unreachable judge -- prints
``error: <message>`` (naming the file, line or field and the fix) on stderr and exits with
status 2, without a traceback; anything else is a bug and propagates with its traceback. The
modules' ``main(argv)`` functions keep raising (``SystemExit`` with a message for a bad
configuration), so in-process callers and tests see the exception; the translation to status
2 happens here only. ``GSIL_TRACEBACK=1`` prints the traceback of a user error too.
"""

from __future__ import annotations

import errno
import importlib
import os
import sys
import traceback
from collections.abc import Callable
from typing import Any

COMMANDS = {
    "train": ("experiments.run", "train with GSIL, SPIN or SFT (a run, or an experiment recipe)"),
    "evaluate": ("experiments.evaluate", "evaluate a model on benchmarks"),
    "report": ("experiments.report", "tables of trained and evaluated runs"),
    "figures": ("paper_figs.__main__", "draw the analysis figures"),
    "sweep": ("experiments.sweep", "the product of swept settings, one run each"),
    "testbed": ("experiments.testbed", "every method against a known distribution, by exact KL"),
}


def usage() -> str:
    lines = ["usage: gsil <command> [options]", "", "commands:"]
    lines += [f"  {name:<10} {text}" for name, (_, text) in COMMANDS.items()]
    lines += ["", "gsil <command> --help shows a command's options."]
    return "\n".join(lines)


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
    from gsil.integrity import CorruptFileError, NonFiniteError
    from gsil.models import ModelLoadError

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
            f"{error}. Check that the judge endpoint ({os.environ.get('GSIL_JUDGE_BASE_URL', 'GSIL_JUDGE_BASE_URL')}) "
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
        if os.environ.get("GSIL_TRACEBACK") == "1":
            traceback.print_exc()
        message = message.removeprefix("error: ")
        print(f"error: {message}", file=sys.stderr)
        return EXIT_USER_ERROR
    return exit_status(result)


def main(argv: list[str] | None = None) -> int:
    """Dispatch ``gsil <command> ...`` to the command's module; returns the exit status (2 for
    a user's mistake, see :func:`run_command`)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"gsil: unknown command {command!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[command][0])
    return run_command(module.main, rest, prog=f"gsil {command}")


if __name__ == "__main__":
    sys.exit(main())
