"""``python -m paper_figs [--only NAME ...] [--out DIR] [--list]``: draw the paper figures."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

from paper_figs import DEFAULT_OUT, figure_names, get_drawer  # noqa: E402


def main(argv: list[str] | None = None, prog: str = "python -m paper_figs") -> int:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__)
    parser.add_argument("--only", action="append", metavar="NAME", help="draw only this figure")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output directory")
    parser.add_argument("--list", action="store_true", help="list the figure names and exit")
    args = parser.parse_args(argv)
    if args.list:
        print("\n".join(figure_names()))
        return 0
    names = args.only or figure_names()
    try:
        drawers = [(name, get_drawer(name)) for name in names]
    except ValueError as err:
        parser.error(str(err))
    args.out.mkdir(parents=True, exist_ok=True)
    for name, draw in drawers:
        start = time.perf_counter()
        paths = draw(args.out)
        print(f"{name}: {', '.join(p.name for p in paths)} ({time.perf_counter() - start:.1f} s)")
    return 0


if __name__ == "__main__":
    from experiments.errors import run_command

    sys.exit(run_command(main))
