"""The ``gsil`` command: one entry point for training, evaluation, reports, figures and sweeps.

    gsil train --config recipes/default.yaml        a run or a whole experiment (a recipe)
    gsil train --method gsil --loss brier --lr 1e-5  flags override the recipe (or the defaults)
    gsil evaluate --model runs/x/round_1/model --benchmarks reasoning,gsm8k
    gsil report runs/default
    gsil figures [--only NAME]
    gsil sweep --config quick --sweep loss=logistic,brier seed=0,1,2

Each subcommand is the module it names (``python -m experiments.run`` is ``gsil train``, and
so on); ``gsil <command> --help`` lists its flags.
"""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "train": ("experiments.run", "train with GSIL, SPIN or SFT (a run, or an experiment recipe)"),
    "evaluate": ("experiments.evaluate", "evaluate a model on benchmarks"),
    "report": ("experiments.report", "tables of trained and evaluated runs"),
    "figures": ("paper_figs.__main__", "draw the analysis figures"),
    "sweep": ("experiments.sweep", "the product of swept settings, one run each"),
}


def usage() -> str:
    lines = ["usage: gsil <command> [options]", "", "commands:"]
    lines += [f"  {name:<10} {text}" for name, (_, text) in COMMANDS.items()]
    lines += ["", "gsil <command> --help shows a command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Dispatch ``gsil <command> ...`` to the command's module; returns the exit status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"gsil: unknown command {command!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[command][0])
    result = module.main(rest, prog=f"gsil {command}")
    if isinstance(result, int):  # an exit status
        return result
    return 0 if result else 1  # train and sweep return their summaries


if __name__ == "__main__":
    sys.exit(main())
