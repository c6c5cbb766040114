"""Ablations as flags: the product of swept values, one run directory each.

    python -m experiments.sweep --preset quick \\
        --sweep loss=logistic,brier,hinge beta=0.1,1.0 seed=0,1,2 [other run flags]

runs the 18 combinations one after another under ``OUTPUT_DIR/sweep-<base>/``, each named by
its swept values (``loss-brier_beta-1.0_seed-2``). A run that finished earlier (its
``summary.json`` exists and its configuration is the same) is skipped and an interrupted one
continues from its checkpoint, so re-running an interrupted sweep does only what is missing.
``--max-runs N`` stops after N newly trained runs; ``--dry-run`` lists the runs and their status.
Then ``python -m experiments.report OUTPUT_DIR/sweep-<base>`` tabulates them.
"""

from __future__ import annotations

import argparse
import itertools
import logging
import re
import sys
from typing import Any

from experiments.config import (
    FLAGS,
    ConfigError,
    RunConfig,
    add_config_arguments,
    parse_type,
    resolve_config,
)
from experiments.training import ensure_run, run_status
from gsil.io import write_json

logger = logging.getLogger("experiments.sweep")


def parse_sweep(items: list[str]) -> dict[str, list[Any]]:
    """``["loss=logistic,brier", "beta=0.1,1"]`` -> ``{"loss": [...], "beta": [0.1, 1.0]}``.

    Keys are configuration fields by flag name (``loss``, ``lr``, ``gen-batch-size``) or dotted
    path (``optim.learning_rate``); values are converted to the field's type.

    Raises:
        SystemExit: unknown field, a missing ``=``, an empty or unconvertible value.
    """
    sweep: dict[str, list[Any]] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not raw.strip():
            raise SystemExit(f"--sweep {item!r}: write FIELD=value1,value2,...")
        leaf = FLAGS.get(key)
        if leaf is None:
            valid = sorted({leaf.flag for leaf in FLAGS.values()})
            raise SystemExit(f"--sweep {item!r}: unknown field {key!r}; valid: {valid}")
        if leaf.path in (("name",), ("output_dir",), ("resume",)):
            raise SystemExit(f"--sweep: {key} cannot be swept")
        sweep[key] = [_convert(item, leaf.annotation, value.strip()) for value in raw.split(",")]
        bad = [value for value in sweep[key] if leaf.choices and value not in leaf.choices]
        if bad:
            raise SystemExit(f"--sweep {item!r}: {bad} not among {list(leaf.choices)}")
    return sweep


def _convert(item: str, annotation: Any, value: str) -> Any:
    try:
        return parse_type(annotation)(value)
    except ValueError:
        raise SystemExit(f"--sweep {item!r}: cannot read {value!r} as {annotation}") from None


def combo_name(combo: dict[str, Any]) -> str:
    """A directory name from swept values: ``loss-brier_beta-1.0_seed-2``."""
    parts = [f"{key}-{value}" for key, value in combo.items()]
    return re.sub(r"[^A-Za-z0-9._=-]+", "-", "_".join(parts))


def build_parser(prog: str = "python -m experiments.sweep") -> argparse.ArgumentParser:
    """The command line: ``--sweep``, ``--preset``, sweep controls and every run flag."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Run the product of swept run settings, one run directory each; finished "
        "runs are skipped, so an interrupted sweep continues where it stopped.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--sweep", nargs="+", required=True, metavar="FIELD=V1,V2",
                        help="run fields and their values, e.g. loss=logistic,brier seed=0,1")  # fmt: skip
    parser.add_argument("--preset", "--config", dest="preset",
                        help="a single-run recipe: a preset name (quick, ...) or a JSON/YAML file")  # fmt: skip
    parser.add_argument("--max-runs", type=int, help="stop after training this many runs")
    parser.add_argument("--dry-run", action="store_true", help="list the runs and exit")
    add_config_arguments(parser)
    return parser


def plan_sweep(args: argparse.Namespace) -> list[RunConfig]:
    """Every combination's resolved configuration (validated before anything runs)."""
    sweep = parse_sweep(args.sweep)
    try:
        base = resolve_config(args, args.preset)
        output_dir = f"{base.output_dir}/sweep-{base.name or 'sweep'}"
        return [
            base.replace(
                **dict(zip(sweep, values, strict=True)),
                name=combo_name(dict(zip(sweep, values, strict=True))),
                output_dir=output_dir,
            )  # fmt: skip
            for values in itertools.product(*sweep.values())
        ]
    except ConfigError as err:
        raise SystemExit(f"error: {err}") from None


def main(argv: list[str] | None = None, prog: str = "python -m experiments.sweep") -> list[dict]:
    """Run the sweep; returns one ``{run_dir, status}`` per combination."""
    args = build_parser(prog).parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    configs = plan_sweep(args)
    if args.dry_run:
        for config in configs:
            print(f"{run_status(config):<9} {config.run_dir()}")
        return [{"run_dir": str(c.run_dir()), "status": run_status(c)} for c in configs]
    done: list[dict] = []
    trained = 0
    for index, config in enumerate(configs, start=1):
        if args.max_runs is not None and trained >= args.max_runs and run_status(config) != "done":
            logger.info("--max-runs %d reached; rerun the same command to continue", trained)
            break
        logger.info("sweep run %d/%d: %s", index, len(configs), config.run_dir())
        what, summary = ensure_run(config)
        trained += what != "skipped"
        done.append({"run_dir": str(config.run_dir()), "status": what,
                     "wall_seconds": summary.get("wall_seconds")})  # fmt: skip
    if configs:
        write_json(configs[0].run_dir().parent / "sweep.json",
                   {"argv": argv if argv is not None else sys.argv[1:], "runs": done})  # fmt: skip
    print(f"sweep: {sum(d['status'] != 'skipped' for d in done)} trained, "
          f"{sum(d['status'] == 'skipped' for d in done)} skipped, "
          f"{len(configs) - len(done)} left")  # fmt: skip
    return done


if __name__ == "__main__":
    main()
    sys.exit(0)
