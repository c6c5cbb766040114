"""``gsil testbed``: every method against a known data distribution, scored by exact KL.

    gsil testbed --quick                  the small grid (about 2 minutes on 2 CPU cores)
    gsil testbed                          the default grid (analysis/testbed/grid.py)
    gsil testbed --dry-run                the plan and its estimated time, nothing trained
    gsil testbed --seeds 0,1,2 --ns 32,128 --batch-size 16 ...   grid and run flags

Writes under ``OUTPUT_DIR/NAME`` (the recipe: ``runs-testbed/testbed``):

    bases/seed<s>.json                      the base model's measures (round 0)
    data/seed<s>-n<N>-round<t>.jsonl        each round's training rows (the same for every method)
    select/...                              the selection runs; selection.json (lr, beta chosen)
    runs/seed<s>/n<N>/<method>/<setting>/round<t>/   one run directory per round (the LLM
                                            path's layout, written by ``run_rounds``), with
                                            testbed_measures.json beside its summary.json
    report.json, report.md, timings.json

Every round is an ordinary run (``experiments.training.ensure_run``: ``run_rounds``, the
objectives, HF generation by sampling at temperature 1): its model is the previous round's
final model (the seed's pretrained base for round 1), its data a JSONL file of that round's
rows. A finished round is skipped and an interrupted one resumed, so rerunning an interrupted
grid does only what is missing. Each round is a run of its own, not a round of one multi-round
run, because round t trains on its own slice of rows (:func:`analysis.testbed.grid.round_rows`);
the reference of round t is the model of round t - 1 either way.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import logging
import multiprocessing
import sys
import time
import typing
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from analysis.testbed.grid import (
    NEGATIVE,
    ROUND_METHODS,
    SFT_KIND,
    Chain,
    GridSpec,
    build_report,
    format_report,
    has_beta,
    objective_values,
    plan_chains,
    round_rows,
    selection_keys,
)
from experiments.config import (
    ConfigError,
    add_config_arguments,
    flag_overrides,
    from_dict,
    merge,
    nest,
    parse_type,
    read_recipe,
)
from gsil.io import atomic_file, read_json, write_json

logger = logging.getLogger("experiments.testbed")

PRESET, QUICK_PRESET = "testbed", "testbed-quick"
# run fields the testbed sets for every round: a flag for one of them is an error
PER_RUN = {
    "seed": "use --seeds",
    "resume": "a rerun resumes by itself",
    "model.name_or_path": "round 1 starts from the seed's pretrained base (recipe: model_spec)",
    "data.source": "the rows are drawn from the known distribution",
    "data.num_demos": "use --ns",
    "objective.method": "use --methods",
    "objective.loss": "use --losses",
    "objective.beta": "beta is selected on validation (--beta-grid)",
    "objective.shift": "shift is 0 (the negative control: --negative-shift)",
    "optim.learning_rate": "the learning rate is selected on validation (--lr-grid)",
}
# Seconds of the default grid on a quiet 2-core AVX-512 machine (its timings.json, 2026-12-03;
# the dry run's fallback when no earlier grid left one): one round of each kind, and a base.
# A round costs ``overhead + steps x step`` (load, generation, reference pass, save, measures;
# then the optimizer steps); a base ``pretrain steps x base_step``.
MEASURED_SECONDS = {
    "sft": {"step": 0.0282, "overhead": 0.908},
    "sampled": {"step": 0.0531, "overhead": 1.602},
    "base_step": 0.074,
    "worker_start": 10.0,
}


# --------------------------------------------------------------------------- the command line


def build_parser(prog: str = "python -m experiments.testbed") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Train every method on demonstrations from a known distribution and "
        "compare them by exact KL to it (issue 21). Finished rounds are skipped: rerun the "
        "same command to continue an interrupted grid.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--preset",
        "--config",
        dest="preset",
        default=None,
        help=f"a testbed recipe (default: {PRESET}; --quick: {QUICK_PRESET})",
    )
    parser.add_argument("--quick", action="store_true", help=f"the small grid ({QUICK_PRESET})")
    parser.add_argument(
        "--dry-run", action="store_true", help="print the plan and its estimated time and exit"
    )
    grid = parser.add_argument_group("the grid (recipe section 'grid')")
    hints = typing.get_type_hints(GridSpec)
    for spec in dataclasses.fields(GridSpec):
        annotation = hints[spec.name]
        grid.add_argument(
            "--" + spec.name.replace("_", "-"),
            dest="grid__" + spec.name,
            metavar=spec.name.upper(),
            default=None,
            type=str if typing.get_origin(annotation) is tuple else parse_type(annotation),
            help=f"{spec.metadata['help']} (default: {spec.default})",
        )
    add_config_arguments(parser)
    return parser


def grid_values(args: argparse.Namespace) -> dict[str, Any]:
    """The grid flags typed on the command line (``--ns 32,128`` -> ``(32, 128)``)."""
    hints = typing.get_type_hints(GridSpec)
    values = {}
    for spec in dataclasses.fields(GridSpec):
        text = getattr(args, "grid__" + spec.name)
        if text is None:
            continue
        annotation = hints[spec.name]
        if typing.get_origin(annotation) is tuple:
            item = typing.get_args(annotation)[0]
            try:
                text = tuple(item(part.strip()) for part in text.split(",") if part.strip())
            except ValueError:
                raise ConfigError(
                    f"--{spec.name.replace('_', '-')}: cannot read {text!r} as "
                    f"comma-separated {item.__name__} values"
                ) from None
        values[spec.name] = text
    return values


@dataclass(frozen=True)
class Testbed:
    """A resolved testbed: its grid, the run settings every round shares (nested), the model
    and pretraining of the bases, and where it writes."""

    grid: GridSpec
    run: dict[str, Any]
    model_spec: dict[str, Any]
    pretrain: dict[str, Any]
    root: Path

    @property
    def rounds(self) -> int:
        return self.run.get("rounds", 1)

    @property
    def rows_per_round(self) -> int:
        optim = self.run.get("optim", {})
        return self.grid.steps_per_round * optim.get("batch_size", 8) * optim.get("grad_accum", 1)


RECIPE_KEYS = ("grid", "run", "model_spec", "pretrain")


def resolve(args: argparse.Namespace) -> Testbed:
    """The recipe, then the flags; every value checked (errors name the flag or key)."""
    from analysis.testbed.model import ModelSpec, PretrainSpec

    preset = args.preset or (QUICK_PRESET if args.quick else PRESET)
    path, recipe = read_recipe(preset)
    unknown = sorted(set(recipe) - set(RECIPE_KEYS) - {k for k in recipe if k.startswith("_")})
    if unknown:
        raise ConfigError(f"{path}: unknown key(s) {unknown}; a testbed recipe has {RECIPE_KEYS}")
    overrides = flag_overrides(args)
    for dotted, fix in PER_RUN.items():
        section, _, leaf = dotted.rpartition(".")
        typed = overrides.get(section, {}) if section else overrides
        if leaf in typed:
            flag = "--" + {"name_or_path": "model", "source": "data", "learning_rate": "lr"}.get(
                leaf, leaf
            ).replace("_", "-")
            raise ConfigError(f"{flag}: the testbed sets it for every round ({fix})")
    run = merge(nest(dict(recipe.get("run", {})), f"{path}: run"), overrides)
    from_dict(run, f"{path}: run")  # types and cross-field checks of the run settings
    try:
        grid_fields = {**recipe.get("grid", {}), **grid_values(args)}
        grid_fields = {k: tuple(v) if isinstance(v, list) else v for k, v in grid_fields.items()}
        grid = GridSpec(**grid_fields)
        grid.validate(run.get("rounds", 1))
        ModelSpec(**recipe.get("model_spec", {}))
        PretrainSpec(**recipe.get("pretrain", {}))
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{path}: {err}") from None
    output_dir = run.pop("output_dir", "runs-testbed")
    name = run.pop("name", None) or Path(preset).stem
    testbed = Testbed(
        grid, run, recipe.get("model_spec", {}), recipe.get("pretrain", {}), Path(output_dir) / name
    )
    if max((*grid.ns, grid.loss_n)) > grid.pool:
        raise ConfigError(f"N larger than the pool of {grid.pool}")
    return testbed


# --------------------------------------------------------------------------- the work units


@dataclass(frozen=True)
class ChainTask:
    """One chain to train and measure: its rounds, settings and where its inputs are."""

    testbed: Testbed
    chain: Chain
    setting: dict[str, float]
    rounds: int
    folder: str  # "runs" or "select"
    frontier: bool = False
    validation: bool = False  # score the last round on validation (selection runs)


def setting_name(setting: dict[str, float]) -> str:
    return "-".join(f"{k}{v:g}" for k, v in setting.items())


def base_dir(testbed: Testbed, seed: int) -> Path:
    """The pretrained base of grid seed ``seed``: the one base of ``grid.base_seed`` (or the
    seed's own when that is None), built and cached on first use under ``OUTPUT_DIR/bases``,
    shared by every grid with the same model and pretraining."""
    from analysis.testbed.model import ModelSpec, PretrainSpec, pretrained_base_dir

    cache = testbed.root.parent / "bases"
    base_seed = seed if testbed.grid.base_seed is None else testbed.grid.base_seed
    return pretrained_base_dir(
        PretrainSpec(**testbed.pretrain), ModelSpec(**testbed.model_spec), base_seed, cache
    )


def rows_file(testbed: Testbed, chain: Chain, round_index: int) -> Path:
    """Round ``round_index``'s rows (JSONL, written once, atomically)."""
    from analysis.testbed.round_measures import train_pool

    path = testbed.root / "data" / f"seed{chain.seed}-n{chain.n}-round{round_index}.jsonl"
    if not path.exists():
        demos = train_pool(chain.seed, testbed.grid.pool)[: chain.n]
        rows = round_rows(demos, testbed.rows_per_round, round_index - 1)
        with atomic_file(path) as handle:
            for row in rows:
                handle.write(
                    json.dumps({"prompt": row.prompt, "response": row.response, "id": row.id})
                    + "\n"
                )
    return path


def link_config(task: ChainTask, round_index: int, model_dir: Path):
    """The run configuration of one round of a chain (``round_index`` from 1)."""
    chain, testbed = task.chain, task.testbed
    values = objective_values(chain.name, task.setting, testbed.grid.negative_shift)
    values.update(
        {
            "name": f"{chain.name}/{setting_name(task.setting)}/round{round_index}",
            "output_dir": str(testbed.root / task.folder / f"seed{chain.seed}" / f"n{chain.n}"),
            "seed": 1000 * chain.seed + round_index,
            "rounds": 1,
            "model": str(model_dir),
            "data": str(rows_file(testbed, chain, round_index)),
            "num_demos": None,
        }
    )
    return from_dict(merge(testbed.run, nest(values)), "testbed")


def measure_plan(
    testbed: Testbed, seed: int, frontier: bool, samples: bool = True, demonstrations: bool = True
):
    """What to measure of a round: forward KL always; the policy's samples at the last round
    and at ``loss_n``; the training demonstrations' log-probs (the per-round claims, the
    implicit classifier) at ``loss_n``, the only N the report reads them at."""
    from analysis.testbed.round_measures import MeasurePlan

    grid = testbed.grid
    return MeasurePlan(
        grid.test_size,
        grid.policy_samples,
        from_dict(testbed.run).generation.max_new_tokens,
        sample_seed=seed,
        temperatures=grid.temperatures if frontier else (),
        samples=samples,
        demonstrations=demonstrations,
    )


def run_base(testbed: Testbed, seed: int) -> dict:
    """Build (or reuse) the seed's base and measure it: round 0 of every chain.

    With one shared base (``grid.base_seed``) its sample-based measures are those of the
    first seed's file (the same model, test set and sampling seed); each seed adds its own
    training demonstrations' log-probabilities.
    """
    from analysis.testbed.round_measures import measure_model, train_pool
    from gsil.models import load_model

    path = testbed.root / "bases" / f"seed{seed}.json"
    if path.exists():
        return read_json(path)
    grid = testbed.grid
    first = testbed.root / "bases" / f"seed{min(grid.seeds)}.json"
    shared = grid.base_seed is not None and seed != min(grid.seeds) and first.exists()
    started = time.perf_counter()
    model, tokenizer = load_model(base_dir(testbed, seed), dtype="float32", device="cpu")
    largest = max((*grid.ns, grid.loss_n))
    train = train_pool(seed, grid.pool)[:largest]
    sample_seed = seed if grid.base_seed is None else grid.base_seed
    plan = measure_plan(testbed, sample_seed, False, samples=not shared)
    measures = measure_model(model, tokenizer, train, plan)
    if shared:
        measures = {**read_json(first), **measures}
    measures["seconds"] = round(time.perf_counter() - started, 2)
    write_json(path, measures)
    return measures


def run_chain(task: ChainTask) -> dict:
    """Train and measure every round of one chain; returns ``{"rounds": [...], "seconds"}``.

    Round t starts from round t - 1's model; its measures are written beside its run
    (``testbed_measures.json``) and reused when present.
    """
    from analysis.testbed.round_measures import (
        forward_kl_on,
        held_out,
        implicit_classifier,
        measure_model,
        train_pool,
    )
    from experiments.training import ensure_run
    from gsil.layout import RunLayout
    from gsil.models import load_model

    chain, testbed = task.chain, task.testbed
    started = time.perf_counter()
    model_dir = base_dir(testbed, chain.seed)
    train = train_pool(chain.seed, testbed.grid.pool)[: chain.n]
    ref_logps = None
    if not task.validation:
        ref_logps = run_base(testbed, chain.seed)["demo_logps"][: chain.n]
    rounds, statuses, timings = [], [], []
    for round_index in range(1, task.rounds + 1):
        round_started = time.perf_counter()
        config = link_config(task, round_index, model_dir)
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            status, summary = ensure_run(config)  # quiet: the progress bars of ~1000 short runs
        statuses.append(status)
        model_dir = RunLayout(config.run_dir()).model(0)
        path = config.run_dir() / (
            "validation.json" if task.validation else "testbed_measures.json"
        )
        if path.exists():
            measures = read_json(path)
        else:
            model, tokenizer = load_model(model_dir, dtype="float32", device="cpu")
            if task.validation:
                measures = {
                    "forward_kl": forward_kl_on(
                        model, tokenizer, held_out("validation", testbed.grid.validation_size)
                    )
                }
            else:
                last = round_index == task.rounds
                at_loss_n = chain.n == testbed.grid.loss_n
                plan = measure_plan(
                    testbed,
                    config.seed,
                    task.frontier and last,
                    samples=last or at_loss_n,
                    demonstrations=at_loss_n,
                )
                measures = measure_model(model, tokenizer, train, plan)
                if config.objective.method == "gsil" and at_loss_n:
                    measures["classifier"] = implicit_classifier(
                        train,
                        measures["demo_logps"],
                        ref_logps,
                        {
                            "beta": config.objective.beta,
                            "shift": config.objective.shift,
                            "loss": config.objective.loss,
                        },
                    )
            measures["round"] = round_index
            write_json(path, measures)
        ref_logps = measures.get("demo_logps")
        rounds.append(measures)
        if status == "ran":
            timings.append(
                {
                    "kind": "sft" if config.objective.method == "sft" else "sampled",
                    "steps": summary["rounds"][0]["global_step"],
                    "training_seconds": summary["rounds"][0]["training_seconds"],
                    "seconds": time.perf_counter() - round_started,
                }
            )
    return {
        "chain": dataclasses.asdict(chain),
        "setting": task.setting,
        "statuses": statuses,
        "rounds": rounds,
        "timings": timings,
        "seconds": round(time.perf_counter() - started, 2),
    }


# --------------------------------------------------------------------------- running units


def _init_worker() -> None:
    """One torch thread (the models are tiny: more threads only synchronise), quiet logs, and
    the imported modules' objects moved out of the garbage collector's sight: every round calls
    ``gc.collect`` twice (``accelerator.free_memory``), which otherwise walks every object of
    torch and transformers (measured: 1 s a call under load, most of a round's overhead)."""
    import gc

    import torch
    import transformers

    import experiments.training  # noqa: F401  (its imports are what gc.freeze spares)

    torch.set_num_threads(1)
    transformers.utils.logging.disable_progress_bar()
    logging.basicConfig(level=logging.WARNING)
    for name in ("experiments", "gsil", "transformers", "accelerate"):
        logging.getLogger(name).setLevel(logging.WARNING)
    gc.collect()
    gc.freeze()


def _call(unit: tuple) -> Any:
    function, argument = unit
    return function(argument)


def _base_unit(item: tuple[Testbed, int]) -> dict:
    return run_base(*item)


def run_units(units: list[tuple], workers: int, describe) -> list[Any]:
    """Run ``(function, argument)`` units, in ``workers`` spawned processes (one torch thread
    each) or here when ``workers == 1``; prints one line per finished unit."""
    results: list[Any] = [None] * len(units)
    if workers == 1 or len(units) <= 1:
        _init_worker()
        for index, unit in enumerate(units):
            results[index] = _call(unit)
            print(describe(index, len(units), results[index]), flush=True)
        return results
    context = multiprocessing.get_context("spawn")
    pool = ProcessPoolExecutor(min(workers, len(units)), context, initializer=_init_worker)
    try:
        futures = {pool.submit(_call, unit): index for index, unit in enumerate(units)}
        for count, future in enumerate(as_completed(futures)):
            results[futures[future]] = future.result()
            print(describe(count, len(units), results[futures[future]]), flush=True)
    except BrokenProcessPool:
        raise SystemExit(
            "a testbed worker process died (killed, or out of memory); everything it finished "
            "is kept: run the same command again to continue"
        ) from None
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    return results


# --------------------------------------------------------------------------- selection


def selection_settings(grid: GridSpec, key: str, beta: float | None) -> list[dict[str, float]]:
    """The settings tried for ``key``: the lr grid, times the beta grid where it is selected
    (else the logistic loss's chosen ``beta`` for the other GSIL losses)."""
    if has_beta(key):
        return [{"lr": lr, "beta": b} for lr in grid.lr_grid for b in grid.beta_grid]
    if key.startswith("gsil-") or key == NEGATIVE:
        return [{"lr": lr, "beta": beta} for lr in grid.lr_grid]
    return [{"lr": lr} for lr in grid.lr_grid]


def choose(testbed: Testbed, keys: list[str], beta: float | None, workers: int) -> dict:
    """Train every (key, setting, selection seed) for ``select_rounds`` rounds at ``loss_n``
    and choose, per key, the setting with the lowest mean validation forward KL.

    The choice reuses ``experiments.sweep.select_settings`` (the best mean score over seeds,
    ties to the first setting), scoring each run by minus its validation forward KL.
    """
    from experiments.sweep import select_settings

    grid = testbed.grid
    units, index = [], []
    for key in keys:
        for setting in selection_settings(grid, key, beta):
            for seed in grid.select_seeds:
                chain = Chain(key, grid.loss_n, seed)
                task = ChainTask(
                    testbed, chain, setting, grid.select_rounds, "select", validation=True
                )
                units.append((run_chain, task))
                index.append((key, setting, seed))
    results = run_units(units, workers, _describe_chain)
    chosen = {}
    for key in keys:
        done = [
            {"validation": {"score": -result["rounds"][-1]["forward_kl"]["mean"]}}
            for (k, _, _), result in zip(index, results, strict=True)
            if k == key
        ]
        settings = selection_settings(grid, key, beta)
        sweep = {name: list(dict.fromkeys(s[name] for s in settings)) for name in settings[0]}
        sweep["seed"] = list(grid.select_seeds)
        choice = select_settings(done, done, sweep)["methods"]["all"]
        chosen[key] = {**choice, "validation_forward_kl": -choice["validation_mean"]}
    return chosen


def select(testbed: Testbed) -> dict[str, dict[str, float]]:
    """The settings of every method, chosen on validation (cached in ``selection.json``)."""
    path = testbed.root / "selection.json"
    grid = testbed.grid
    # what the choice depends on (not the grid's seeds, Ns or measures: a grid with fewer seeds
    # reuses it)
    request = {
        "keys": selection_keys(grid),
        "select": [grid.select_seeds, grid.lr_grid, grid.beta_grid, grid.select_rounds],
        "data": [grid.loss_n, grid.pool, grid.steps_per_round, grid.validation_size],
        "bases": [grid.base_seed, testbed.model_spec, testbed.pretrain],
        "run": testbed.run,
    }
    if path.exists():
        saved = read_json(path)
        if saved.get("request") == json.loads(json.dumps(request)):
            return {key: value["setting"] for key, value in saved["methods"].items()}
    keys = selection_keys(testbed.grid)
    first = [k for k in keys if k == "gsil-logistic" or not k.startswith("gsil-")]
    chosen = choose(testbed, first, None, testbed.grid.workers)
    beta = chosen.get("gsil-logistic", {}).get("setting", {}).get("beta")
    if beta is None:
        beta = testbed.run.get("objective", {}).get("beta", 0.1)
    rest = [k for k in keys if k not in first]
    if rest:
        chosen.update(choose(testbed, rest, beta, testbed.grid.workers))
    write_json(
        path,
        {
            "request": request,
            "split": "validation",
            "score": "minus the forward KL on the validation demonstrations (higher is better)",
            "n": testbed.grid.loss_n,
            "seeds": list(testbed.grid.select_seeds),
            "rounds": testbed.grid.select_rounds,
            "methods": chosen,
        },
    )
    for key, value in chosen.items():
        print(
            f"selected {key:<22} {value['setting']}  validation forward KL {value['validation_forward_kl']:.3f}"
        )
    return {key: value["setting"] for key, value in chosen.items()}


# --------------------------------------------------------------------------- the grid


def _describe_chain(index: int, total: int, result: dict) -> str:
    chain = result["chain"]
    last = result["rounds"][-1]["forward_kl"]["mean"]
    what = "skipped" if all(s == "skipped" for s in result["statuses"]) else "trained"
    return (
        f"[{index + 1}/{total}] seed {chain['seed']} N={chain['n']} {chain['name']} "
        f"{setting_name(result['setting'])}: forward KL {last:.3f} ({what}, {result['seconds']:.1f} s)"
    )


def _describe_base(index: int, total: int, result: dict) -> str:
    return f"[{index + 1}/{total}] base: forward KL {result['forward_kl']['mean']:.3f}"


def collect(testbed: Testbed, results: list[dict], bases: dict[int, dict]) -> dict:
    """``results[chain][n][seed] = [base measures, round 1, ...]`` for the report."""
    table: dict[str, dict[int, dict[int, list]]] = {}
    for result in results:
        chain = result["chain"]
        base = dict(bases[chain["seed"]])
        base["demo_logp"] = sum(base["demo_logps"][: chain["n"]]) / chain["n"]
        rounds = [base, *result["rounds"]]
        table.setdefault(chain["name"], {}).setdefault(chain["n"], {})[chain["seed"]] = rounds
    return table


def classifier_example(testbed: Testbed, table: dict, settings: dict) -> dict | None:
    """GSIL-logistic's implicit classifier after round 1 at ``loss_n`` for the first seed, per
    training demonstration, with its exact targets (the classifier figure's scatter)."""
    from analysis.testbed.grid import empirical_log_probs
    from analysis.testbed.round_measures import train_pool

    grid = testbed.grid
    by_seed = table.get("gsil-logistic", {}).get(grid.loss_n)
    if not by_seed:
        return None
    seed = min(by_seed)
    base, first = by_seed[seed][0], by_seed[seed][1]
    train = train_pool(seed, grid.pool)[: grid.loss_n]
    ref = base["demo_logps"][: grid.loss_n]
    beta = settings["gsil-logistic"]["beta"]
    return {
        "seed": seed,
        "beta": beta,
        "f": [beta * (p - r) for p, r in zip(first["demo_logps"], ref, strict=True)],
        "data": [d.meta["data_logp"] - r for d, r in zip(train, ref, strict=True)],
        "empirical": [e - r for e, r in zip(empirical_log_probs(train), ref, strict=True)],
    }


def slim(measures: dict) -> dict:
    """A round's measures without the per-demonstration log-probabilities (for report.json)."""
    return {k: v for k, v in measures.items() if k != "demo_logps"}


def plan_units(testbed: Testbed, settings: dict[str, dict]) -> list[tuple]:
    grid = testbed.grid
    units = []
    for chain in plan_chains(grid):
        frontier = chain.n == grid.loss_n and chain.name in ROUND_METHODS
        task = ChainTask(testbed, chain, settings[chain.key], testbed.rounds, "runs", frontier)
        units.append((run_chain, task))
    return units


def estimate(testbed: Testbed) -> dict:
    """The plan's size and its time from measured per-step and per-round costs
    (``timings.json`` of an earlier grid in the same directory, else
    :data:`MEASURED_SECONDS`)."""
    from analysis.testbed.model import PretrainSpec

    grid = testbed.grid
    timings_path = testbed.root / "timings.json"
    costs = dict(MEASURED_SECONDS)
    source = "MEASURED_SECONDS (experiments/testbed.py, measured on a quiet 2-core machine)"
    if timings_path.exists():
        costs.update(read_json(timings_path)["costs"])
        source = str(timings_path)
    chains = plan_chains(grid)
    sft_rounds = sum(testbed.rounds for c in chains if c.name in SFT_KIND)
    sampled_rounds = sum(testbed.rounds for c in chains if c.name not in SFT_KIND)
    keys = selection_keys(grid)
    selection = sum(
        len(selection_settings(grid, key, 1.0)) * len(grid.select_seeds) * grid.select_rounds
        for key in keys
    )
    select_sft = (
        len(grid.lr_grid)
        * len(grid.select_seeds)
        * grid.select_rounds
        * sum(key in SFT_KIND for key in keys)
    )
    bases = 1 if grid.base_seed is not None else len(grid.seeds) + len(grid.select_seeds)
    steps = grid.steps_per_round

    def per_round(kind: str) -> float:
        return costs[kind]["overhead"] + steps * costs[kind]["step"]

    pretrain_steps = PretrainSpec(**testbed.pretrain).steps
    total = (
        (
            (sft_rounds + select_sft) * per_round("sft")
            + (sampled_rounds + selection - select_sft) * per_round("sampled")
        )
        / grid.workers
        + costs["worker_start"]
        + bases * pretrain_steps * costs["base_step"] / min(bases, grid.workers)
    )
    return {
        "chains": len(chains),
        "rounds_trained": sft_rounds + sampled_rounds,
        "selection_rounds": selection,
        "bases": bases,
        "rows_per_round": testbed.rows_per_round,
        "steps_per_round": grid.steps_per_round,
        "workers": grid.workers,
        "estimated_seconds": round(total),
        "costs": costs,
        "costs_from": source,
    }


def measured_costs(timings: list[dict]) -> dict:
    """Per kind of round (``sft``, ``sampled``): seconds per optimizer step (its training time
    over its steps) and the rest of a round (``overhead``), from the rounds trained here."""
    costs = {}
    for kind in ("sft", "sampled"):
        rows = [t for t in timings if t["kind"] == kind and t["steps"]]
        if rows:
            step = sum(t["training_seconds"] for t in rows) / sum(t["steps"] for t in rows)
            overhead = sum(t["seconds"] - t["training_seconds"] for t in rows) / len(rows)
            costs[kind] = {"step": round(step, 4), "overhead": round(overhead, 3)}
    return costs


def main(argv: list[str] | None = None, prog: str = "python -m experiments.testbed") -> dict:
    """Run (or plan) the testbed grid; returns the report (or the plan with ``--dry-run``)."""
    args = build_parser(prog).parse_args(argv)
    testbed = resolve(args)
    plan = estimate(testbed)
    if args.dry_run:
        print("dry run: nothing is trained\n" + json.dumps(plan, indent=1))
        return {"dry_run": True, **plan}
    print(
        f"testbed: {plan['chains']} chains, {plan['rounds_trained']} rounds + "
        f"{plan['selection_rounds']} selection rounds on {plan['workers']} worker(s), about "
        f"{plan['estimated_seconds']} s -> {testbed.root}",
        flush=True,
    )
    started = time.perf_counter()
    seeds = sorted(set(testbed.grid.seeds) | set(testbed.grid.select_seeds))
    if testbed.grid.base_seed is not None:
        # the one shared base, built before workers could race for it (on one thread: a tiny
        # model), and its sampled measures, once
        _init_worker()
        run_base(testbed, min(testbed.grid.seeds))
    base_results = run_units(
        [(_base_unit, (testbed, seed)) for seed in seeds], testbed.grid.workers, _describe_base
    )
    bases = dict(zip(seeds, base_results, strict=True))
    base_seconds = time.perf_counter() - started
    settings = select(testbed)
    selected = time.perf_counter()
    units = plan_units(testbed, settings)
    results = run_units(units, testbed.grid.workers, _describe_chain)
    table = collect(testbed, results, bases)
    report = build_report(
        table, testbed.grid, testbed.rounds, testbed.rounds * testbed.rows_per_round
    )
    wall = time.perf_counter() - started
    report.update(
        {
            "selection": read_json(testbed.root / "selection.json")["methods"],
            "run": testbed.run,
            "model_spec": testbed.model_spec,
            "pretrain": testbed.pretrain,
            "wall_seconds": round(wall, 1),
            "classifier_example": classifier_example(testbed, table, settings),
            "results": {
                name: {
                    n: {s: [slim(m) for m in r] for s, r in by_seed.items()}
                    for n, by_seed in by_n.items()
                }
                for name, by_n in table.items()
            },
        }
    )
    write_json(testbed.root / "report.json", report)
    text = format_report(report) + f"\nWall time: {wall:.0f} s (workers: {testbed.grid.workers}).\n"
    with atomic_file(testbed.root / "report.md") as handle:
        handle.write(text)
    costs = measured_costs([t for r in results for t in r.get("timings", [])])
    if costs:
        write_json(
            testbed.root / "timings.json",
            {
                "costs": costs,
                "bases_seconds": round(base_seconds, 1),
                "selection_seconds": round(selected - started - base_seconds, 1),
                "grid_seconds": round(time.perf_counter() - selected, 1),
                "wall_seconds": round(wall, 1),
            },
        )
    print(text)
    print(f"report: {testbed.root / 'report.md'}")
    return report


if __name__ == "__main__":
    from experiments.errors import run_command

    sys.exit(run_command(main))
