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
    HelpFormatter,
    RunConfig,
    add_config_arguments,
    parse_type,
    resolve_config,
)
from experiments.training import ensure_run, run_status
from gsil.faults import kill_point
from gsil.io import read_json, write_json
from gsil.layout import EVAL_REQUEST, RunLayout

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


# swept fields that name the method itself: settings are chosen within each method
METHOD_FIELDS = ("method", "loss", "objective.method", "objective.loss")
SEED_FIELDS = ("seed",)


def validation_score(config: RunConfig, limit: int, tasks: str | None) -> dict[str, Any]:
    """Reasoning accuracy of a run's final model on the validation split (cached beside it).

    Validation items come from their own item seeds (``gsil.reasoning_tasks.split_seed``):
    choosing on them never looks at a test item.
    """
    from gsil.evaluation.runner import EvalOptions, EvalRequest, evaluate_model

    layout = RunLayout(config.run_dir())
    last = config.rounds - 1
    names = tasks.split(",") if tasks else None
    if names is None:
        source = config.data.source
        names = source.removeprefix("rg:").split(",") if source.startswith("rg:") else None
    options = EvalOptions(
        tasks=tuple(names) if names else None, split="validation", backend=config.generation.backend
    )
    out_dir = layout.eval_dir(last, split="validation")
    request = {"limit": limit, "tasks": list(options.tasks or ()), "seed": 0}
    request_path = out_dir / EVAL_REQUEST
    result_path = out_dir / "reasoning.json"
    if not (result_path.exists() and request_path.exists() and read_json(request_path) == request):
        evaluate_model(
            str(layout.model(last)), ["reasoning"], out_dir, EvalRequest(options, limit, seed=0)
        )
        write_json(request_path, request)
    result = read_json(result_path)
    return {"score": result["score"], "n": result["n"], "interval": result.get("interval")}


def select_settings(
    configs: list[RunConfig], done: list[dict], sweep: dict[str, list[Any]]
) -> dict[str, Any]:
    """Per method, the swept setting with the best mean validation score over seeds.

    A *method* is the swept method fields' values (``method``, ``loss``); a *setting* is the
    other swept fields' values except ``seed``, whose runs are averaged. Ties go to the
    setting listed first in the sweep (its order is the command line's).
    """
    tuned = [key for key in sweep if key not in METHOD_FIELDS + SEED_FIELDS]
    methods = [key for key in sweep if key in METHOD_FIELDS]
    table: dict[str, dict[str, list[float]]] = {}
    settings_of: dict[str, dict[str, Any]] = {}
    for values, entry in zip(itertools.product(*sweep.values()), done, strict=False):
        combo = dict(zip(sweep, values, strict=True))
        method = combo_name({k: combo[k] for k in methods}) or "all"
        setting = combo_name({k: combo[k] for k in tuned}) or "base"
        settings_of[setting] = {k: combo[k] for k in tuned}
        table.setdefault(method, {}).setdefault(setting, []).append(entry["validation"]["score"])
    chosen = {}
    for method, scores in table.items():
        means = {setting: sum(v) / len(v) for setting, v in scores.items()}
        best = max(means, key=means.get)  # max keeps the first of equal values
        chosen[method] = {
            "setting": settings_of[best],
            "validation_mean": means[best],
            "per_setting": means,
            "seeds": len(scores[best]),
        }
    return {"split": "validation", "tuned": tuned, "methods": chosen, "runs": len(configs)}


def format_selection(selection: dict[str, Any]) -> str:
    """A short table: per method, each setting's mean validation score, the chosen one marked."""
    lines = [f"settings chosen on the validation split (tuned: {', '.join(selection['tuned'])})"]
    for method, choice in selection["methods"].items():
        for setting, mean in choice["per_setting"].items():
            mark = (
                " <- chosen"
                if mean == choice["validation_mean"] and setting == combo_name(choice["setting"])
                else ""
            )
            lines.append(f"  {method:<24} {setting:<32} {mean:6.3f}{mark}")
    return "\n".join(lines)


def build_parser(prog: str = "python -m experiments.sweep") -> argparse.ArgumentParser:
    """The command line: ``--sweep``, ``--preset``, sweep controls and every run flag."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Run the product of swept run settings, one run directory each; finished "
        "runs are skipped, so an interrupted sweep continues where it stopped.",
        formatter_class=HelpFormatter,
    )
    parser.add_argument(
        "--sweep",
        nargs="+",
        required=True,
        metavar="FIELD=V1,V2",
        help="run fields and their values, e.g. loss=logistic,brier seed=0,1",
    )
    parser.add_argument(
        "--preset",
        "--config",
        dest="preset",
        help="a single-run recipe: a preset name (quick, ...) or a JSON/YAML file",
    )
    parser.add_argument("--max-runs", type=int, help="stop after training this many runs")
    select = parser.add_argument_group("choosing settings fairly (on validation items, never test)")
    select.add_argument(
        "--select-on",
        choices=("none", "validation"),
        default="none",
        help="evaluate each run's final model on the validation split of the "
        "reasoning tasks and pick, per method, the setting with the best mean "
        "score over seeds (writes selection.json)",
    )
    select.add_argument(
        "--select-limit", type=int, default=100, help="validation items per reasoning task"
    )
    select.add_argument(
        "--select-tasks",
        help="reasoning tasks to select on (default: those of an rg: training source)",
    )
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
            )
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
        kill_point("sweep")  # test hook (gsil.faults): a run finished, sweep.json not written
        trained += what != "skipped"
        done.append(
            {
                "run_dir": str(config.run_dir()),
                "status": what,
                "wall_seconds": summary.get("wall_seconds"),
            }
        )
        if args.select_on == "validation":
            done[-1]["validation"] = validation_score(config, args.select_limit, args.select_tasks)
    if configs:
        root = configs[0].run_dir().parent
        write_json(
            root / "sweep.json", {"argv": argv if argv is not None else sys.argv[1:], "runs": done}
        )
        if args.select_on == "validation" and len(done) == len(configs):
            selection = select_settings(configs, done, parse_sweep(args.sweep))
            write_json(root / "selection.json", selection)
            print(format_selection(selection))
    print(
        f"sweep: {sum(d['status'] != 'skipped' for d in done)} trained, "
        f"{sum(d['status'] == 'skipped' for d in done)} skipped, "
        f"{len(configs) - len(done)} left"
    )
    return done


if __name__ == "__main__":
    from experiments.errors import run_command

    sys.exit(run_command(main))
