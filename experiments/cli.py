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

Errors: every command runs through :func:`experiments.errors.run_command` (a user's mistake
prints ``error: ...`` and exits 2; a bug keeps its traceback).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

from experiments.errors import EXIT_USER_ERROR, run_command  # noqa: F401 (re-exported)

# Each command's main is imported when the command runs (importing torch and transformers for
# every `gsil --help` would take seconds); the imports below are the whole table.


def train(argv: list[str], prog: str) -> Any:
    """Train with GSIL, SPIN, SFT or DFT (a run, or an experiment recipe)."""
    from experiments.run import main

    return main(argv, prog=prog)


def evaluate(argv: list[str], prog: str) -> Any:
    """Evaluate a model on benchmarks."""
    from experiments.evaluate import main

    return main(argv, prog=prog)


def report(argv: list[str], prog: str) -> Any:
    """Tables of trained and evaluated runs."""
    from experiments.report import main

    return main(argv, prog=prog)


def figures(argv: list[str], prog: str) -> Any:
    """Draw the analysis figures."""
    from paper_figs.__main__ import main

    return main(argv, prog=prog)


def testbed(argv: list[str], prog: str) -> Any:
    """Every method against a known distribution, by exact KL."""
    from experiments.testbed import main

    return main(argv, prog=prog)


def sweep(argv: list[str], prog: str) -> Any:
    """The product of swept settings, one run each."""
    from experiments.sweep import main

    return main(argv, prog=prog)


COMMANDS: dict[str, Callable[[list[str], str], Any]] = {
    "train": train,
    "evaluate": evaluate,
    "report": report,
    "figures": figures,
    "sweep": sweep,
    "testbed": testbed,
}


def usage() -> str:
    lines = ["usage: gsil <command> [options]", "", "commands:"]
    lines += [f"  {name:<10} {command.__doc__.rstrip('.')}" for name, command in COMMANDS.items()]
    lines += ["", "gsil <command> --help shows a command's options."]
    return "\n".join(lines)


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
    return run_command(COMMANDS[command], rest, prog=f"gsil {command}")


if __name__ == "__main__":
    sys.exit(main())
