"""Train with GSIL, SPIN or SFT, round after round: ``python -m experiments.run --help``.

Writes ``runs/<name>/``: ``config.json`` (the full resolved config), ``metrics.jsonl`` (one row
per optimizer step), ``round_<t>/`` (generated set, reference log-probs, model) and
``summary.json``. Runs under ``accelerate launch`` unchanged.
"""

from __future__ import annotations

import argparse
import sys

from experiments.config import ConfigError, add_config_arguments, is_pipeline_preset, resolve_config
from experiments.training import execute


def build_parser(prog: str = "python -m experiments.run") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Fine-tune a causal LM on demonstrations with GSIL (or SPIN / SFT), "
        "for one or more self-imitation rounds.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--preset", "--config", dest="preset", help="a recipe: a preset name "
                        "under experiments/presets/ (quick, default, ...) or a .json/.yaml "
                        "file; flags override it")  # fmt: skip
    parser.add_argument("--dry-run", action="store_true", help="print the resolved plan (runs, "
                        "data sizes, steps, tokens, estimated time) without loading weights or "
                        "data, and exit")  # fmt: skip
    pipeline = parser.add_argument_group("pipeline presets (e.g. default): the evaluation")
    pipeline.add_argument("--eval-limit", type=int, help="held-out items per reasoning task")
    pipeline.add_argument("--eval-humaneval-limit", type=int, help="HumanEval problems")
    pipeline.add_argument("--eval-benchmarks", help="comma-separated, e.g. reasoning,humaneval")
    add_config_arguments(parser)
    return parser


def main(argv: list[str] | None = None, prog: str = "python -m experiments.run") -> dict:
    args = build_parser(prog).parse_args(argv)
    try:
        if args.preset and is_pipeline_preset(args.preset):  # several stages
            from experiments.pipeline import main_pipeline

            return main_pipeline(args)
        config = resolve_config(args, args.preset)
    except ConfigError as err:
        raise SystemExit(f"error: {err}") from None
    if args.dry_run:
        from experiments.planning import format_plan, plan_run

        print(format_plan(plan_run(config)))
        return {"dry_run": True}
    return execute(config)


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
