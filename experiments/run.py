"""Train with GSIL, SPIN or SFT, round after round: ``python -m experiments.run --help``.

Writes ``runs/<name>/``: ``config.json`` (the full resolved config), ``metrics.jsonl`` (one row
per optimizer step), ``round_<t>/`` (generated set, reference log-probs, model) and
``summary.json``. Runs under ``accelerate launch`` unchanged.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from experiments.config import (
    ConfigError,
    HelpFormatter,
    add_config_arguments,
    flag_overrides,
    is_pipeline_preset,
    load_pipeline,
    recipe_departures,
    resolve_config,
)
from experiments.training import execute


def build_parser(prog: str = "python -m experiments.run") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Fine-tune a causal LM on demonstrations with GSIL (or SPIN / SFT), "
        "for one or more self-imitation rounds.",
        formatter_class=HelpFormatter,
    )
    parser.add_argument(
        "--preset",
        "--config",
        dest="preset",
        help="a recipe: a preset name "
        "under experiments/presets/ (quick, default, ...) or a .json/.yaml "
        "file; flags override it",
    )
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="print the resolved plan (runs, "
        "data sizes, steps, tokens, estimated time) without loading weights or "
        "data, and exit",
    )
    pipeline = parser.add_argument_group("pipeline presets (e.g. default): the evaluation")
    pipeline.add_argument("--eval-limit", type=int, help="held-out items per reasoning task")
    pipeline.add_argument("--eval-humaneval-limit", type=int, help="HumanEval problems")
    pipeline.add_argument("--eval-benchmarks", help="comma-separated, e.g. reasoning,humaneval")
    add_config_arguments(parser)
    return parser


def check_pipeline(args: argparse.Namespace) -> None:
    """A pipeline recipe's benchmark names, checked before any stage trains (the stages'
    configurations are checked when the recipe is loaded).

    Raises:
        ConfigError: naming the recipe key or flag and the unknown benchmark.
    """
    from gsil.evaluation.runner import parse_benchmarks

    pipeline = load_pipeline(args.preset, flag_overrides(args))
    where, names = "--eval-benchmarks", args.eval_benchmarks  # the flag replaces the recipe's
    if names is None and pipeline.evaluate is not None:
        where, names = f"{args.preset}: evaluate.benchmarks", pipeline.evaluate.benchmarks
    if names is not None:
        try:
            parse_benchmarks(names)
        except ValueError as err:
            raise ConfigError(f"{where}: {err}") from None


def draw_experiment_figures(root: Path) -> list[str]:
    """The experiment's figures under ``root/figures`` (the command draws them: the pipeline
    itself writes results and the report, and never imports the figures)."""
    from paper_figs.fig_experiments import draw

    paths = [str(p) for p in draw(root / "figures", runs_dir=root)]
    for path in paths:
        print(f"  {path}")
    return paths


def main(argv: list[str] | None = None, prog: str = "python -m experiments.run") -> dict:
    """Train (or plan, ``--dry-run``) a run or a pipeline recipe; returns its summary.

    Raises:
        SystemExit: a bad configuration, with the message (argparse's own errors exit with
            status 2). In-process callers see the exception; ``python -m experiments.run`` and
            ``gsil train`` turn every user error into ``error: ...`` and status 2
            (:func:`experiments.cli.run_command`).
    """
    args = build_parser(prog).parse_args(argv)
    try:
        if args.preset and is_pipeline_preset(args.preset):  # several stages
            from experiments.pipeline import main_pipeline

            check_pipeline(args)
            outcome = main_pipeline(args)
            if not outcome.get("dry_run"):
                outcome["figures"] = draw_experiment_figures(Path(outcome["directory"]))
            return outcome
        config = resolve_config(args, args.preset)
        departures = recipe_departures(args.preset) if args.preset else []
    except ConfigError as err:
        raise SystemExit(f"error: {err}") from None
    if args.dry_run:
        from experiments.planning import format_plan, plan_run

        plan = plan_run(config)
        if departures:
            plan["departures_from_the_authors"] = departures
        print(format_plan(plan))
        return {"dry_run": True}
    return execute(config)


if __name__ == "__main__":
    from experiments.errors import run_command

    sys.exit(run_command(main))
