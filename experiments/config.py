"""The run configuration: one typed tree, resolved once and saved with the run.

    RunConfig                      name, output_dir, seed, rounds, resume
    ├── model: ModelSettings       (gsil.models) what to start from, LoRA, precision
    ├── data: DataSettings         (gsil.data) demonstrations and their lengths
    ├── objective: ObjectiveSettings  (gsil.methods) the method and its hyper-parameters
    ├── optim: OptimSettings       (gsil.optimization) how each round is optimised
    ├── generation: GenerationSettings  (gsil.generation) how each round generates
    └── logging: LoggingConfig     experiment trackers

It is built from defaults, then a recipe (a YAML preset under ``experiments/presets``, also
reachable as ``recipes/``, or any YAML/JSON file), then command-line
flags, validated against the annotations (an unknown key or a wrong type is an error naming
the key), and handed to modules as plain values (``config.optim`` is what ``train_round``
takes). Each leaf field has one flag, ``--<field>`` unless its metadata names another
(``optim.batch_size`` is ``--batch-size``, ``generation.batch_size`` is ``--gen-batch-size``);
``help`` metadata is the flag's documentation, so the CLI, recipes and this file cannot drift
apart.

Recipes may nest sections (``{"optim": {"learning_rate": 1e-5}}``) or use the flags' names flat,
as TRL's and alignment-handbook's recipes do (``{"lr": 1e-5}`` or ``{"learning_rate": 1e-5}``);
both resolve to the same tree, and ``config.json`` is always written nested.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gsil.data import DataSettings
from gsil.evaluation.runner import DEFAULT_REASONING_TASKS, EvalOptions
from gsil.generation import GenerationSettings
from gsil.methods import METHODS, ObjectiveSettings
from gsil.models import ModelSettings
from gsil.optimization import OptimSettings
from gsil.tracking import NONE, TRACKERS, resolve_report_to

PRESETS_DIR = Path(__file__).parent / "presets"
RECIPE_SUFFIXES = (".json", ".yaml", ".yml")


class ConfigError(ValueError):
    """A recipe or flag that does not fit the configuration; the message names the key."""


def _f(default: Any, help: str, **metadata: Any) -> Any:
    if default is list or getattr(default, "__name__", "") == "<lambda>":  # a mutable default
        return field(default_factory=default, metadata={"help": help, **metadata})
    return field(default=default, metadata={"help": help, **metadata})


@dataclass
class LoggingConfig:
    report_to: list[str] = _f(
        list,
        "experiment trackers through accelerate, comma-separated: "
        f"{', '.join([NONE, *TRACKERS])} (offline by default)",
    )


@dataclass
class RunConfig:
    name: str | None = _f(
        None,
        "run name; results go to OUTPUT_DIR/NAME (default: derived from the method, loss and seed)",
    )
    output_dir: str = _f("runs", "parent directory of run directories")
    seed: int = _f(0, "the one seed: data sampling, generation and training")
    rounds: int = _f(
        1,
        "self-imitation rounds (each regenerates responses and resets the "
        "reference to the current policy)",
    )
    resume: bool = _f(False, "continue an interrupted run in the same directory")
    mix_previous_generations: bool = _f(
        False,
        "round t trains on its own generated set and the one before it together (SPIN's "
        "recipe, its config_iter1.yaml); before round 0, the last set of the run whose model "
        "--model names (a pipeline's init_from), if any",
    )
    model: ModelSettings = field(default_factory=ModelSettings)
    data: DataSettings = field(default_factory=DataSettings)
    objective: ObjectiveSettings = field(default_factory=ObjectiveSettings)
    optim: OptimSettings = field(default_factory=OptimSettings)
    generation: GenerationSettings = field(default_factory=GenerationSettings)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def run_name(self) -> str:
        if self.name:
            return self.name
        goal = self.objective
        method = goal.dft_variant if goal.method == "dft" else goal.method
        if goal.token_weighting == "prob":
            method = "dynamic-ft"
        loss = f"-{goal.loss}" if goal.method == "gsil" else ""
        return f"{method}{loss}-seed{self.seed}"

    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.run_name()

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **values: Any) -> RunConfig:
        """A copy with leaf fields changed, by flag name or dotted path (``optim.batch_size``)."""
        return from_dict(merge(self.to_dict(), nest(values)))


# --------------------------------------------------------------------------- the tree's fields


@dataclass(frozen=True)
class Leaf:
    """One leaf field: where it lives, its flag name, its type, its default and its help."""

    path: tuple[str, ...]  # ("optim", "batch_size")
    flag: str  # "batch_size" -> --batch-size
    aliases: tuple[str, ...]
    annotation: Any
    default: Any
    help: str
    choices: tuple[str, ...] | None
    parse: Any = None  # how a flag's text becomes the value (default: from the annotation)

    def value_in(self, tree: dict[str, Any]) -> Any:
        """This leaf's value in a nested dict (``config.to_dict()``)."""
        for part in self.path:
            tree = tree[part]
        return tree


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _is_section(annotation: Any) -> bool:
    return dataclasses.is_dataclass(annotation)


def _default(spec: dataclasses.Field) -> Any:
    if spec.default_factory is not dataclasses.MISSING:
        return spec.default_factory()
    return spec.default


def leaves(cls: type = RunConfig, prefix: tuple[str, ...] = ()) -> list[Leaf]:
    """Every leaf of the tree, in declaration order."""
    hints = _hints(cls)
    found = []
    for spec in dataclasses.fields(cls):
        annotation = hints[spec.name]
        if _is_section(annotation):
            found += leaves(annotation, prefix + (spec.name,))
            continue
        meta = spec.metadata
        found.append(
            Leaf(
                prefix + (spec.name,),
                meta.get("flag", spec.name),
                tuple(meta.get("aliases", ())),
                annotation,
                _default(spec),
                meta.get("help", ""),
                meta.get("choices"),
                meta.get("parse"),
            )
        )
    return found


def _flag_index() -> dict[str, Leaf]:
    index: dict[str, Leaf] = {}
    for leaf in leaves():
        for name in (leaf.flag, *leaf.aliases, ".".join(leaf.path)):
            if name in index and index[name] is not leaf:
                raise AssertionError(f"two configuration fields answer to {name!r}")
            index[name] = leaf
    return index


FLAGS = _flag_index()
SECTIONS = {
    spec.name for spec in dataclasses.fields(RunConfig) if _is_section(_hints(RunConfig)[spec.name])
}


# --------------------------------------------------------------------------- building the tree


def nest(values: dict[str, Any], where: str = "configuration") -> dict[str, Any]:
    """Flat keys (flag names, aliases, dotted paths) and nested sections -> one nested dict.

    ``{"lr": 1e-5, "optim": {"epochs": 2}, "model": "x"}`` ->
    ``{"optim": {"learning_rate": 1e-5, "epochs": 2}, "model": {"name_or_path": "x"}}``.
    """
    nested: dict[str, Any] = {}
    for key, value in values.items():
        if key.startswith("_"):  # "_comment" and the like
            continue
        if key in SECTIONS and not isinstance(value, dict) and key not in FLAGS:
            raise ConfigError(f"{where}: {key!r} is a section and takes a mapping, got {value!r}")
        if key in SECTIONS and isinstance(value, dict):
            section = nested.setdefault(key, {})
            for inner, inner_value in value.items():
                if inner.startswith("_"):
                    continue
                section[inner] = inner_value  # unknown names are caught by from_dict
            continue
        leaf = FLAGS.get(key.replace("-", "_"))
        if leaf is None:
            raise ConfigError(f"{where}: unknown key {key!r}{_suggest(key, list(FLAGS))}")
        target = nested
        for part in leaf.path[:-1]:
            target = target.setdefault(part, {})
        target[leaf.path[-1]] = value
    return nested


def merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Nested dicts merged key by key (``override`` wins)."""
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def from_dict(values: dict[str, Any], where: str = "configuration") -> RunConfig:
    """A validated :class:`RunConfig` from a (flat or nested) dict: unknown keys and values of
    the wrong type are errors naming the key."""
    config = _build(RunConfig, nest(values, where), where, ())
    validate(config)
    return config


def _build(cls: type, values: dict[str, Any], where: str, prefix: tuple[str, ...]) -> Any:
    hints = _hints(cls)
    names = [spec.name for spec in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in values.items():
        dotted = ".".join(prefix + (key,))
        if key not in names:
            raise ConfigError(f"{where}: unknown key {dotted!r}{_suggest(key, names)}")
        annotation = hints[key]
        if _is_section(annotation):
            if not isinstance(value, dict):
                raise ConfigError(
                    f"{where}: {dotted!r} is a section and takes a mapping, got {value!r}"
                )
            kwargs[key] = _build(annotation, value, where, prefix + (key,))
        else:
            kwargs[key] = _check(value, annotation, f"{where}: {dotted!r}")
    try:
        return cls(**kwargs)
    except ValueError as err:  # a section's own check (e.g. GenerationSettings.__post_init__)
        raise ConfigError(f"{where}: {err}") from None


def _check(value: Any, annotation: Any, what: str) -> Any:
    """``value`` as ``annotation`` (an int is a float; a comma string is a list of strings)."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(annotation)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _check(value, option, what)
            except ConfigError as err:
                errors.append(err)
        raise errors[0]
    if origin is dict:
        _, item = typing.get_args(annotation)
        if not isinstance(value, dict):
            raise ConfigError(f"{what} must be a mapping, got {value!r}")
        return {str(k): _check(v, item, f"{what}[{k!r}]") for k, v in value.items()}
    if origin in (list, tuple):
        item = typing.get_args(annotation)[0]
        if isinstance(value, str):
            value = [part.strip() for part in value.split(",") if part.strip()]
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{what} must be a list, got {value!r}")
        return origin(_check(v, item, what) for v in value)
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if annotation is bool and not isinstance(value, bool):
        raise ConfigError(f"{what} must be true or false, got {value!r}")
    if annotation is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ConfigError(f"{what} must be an integer, got {value!r}")
    if annotation in (float, str) and not isinstance(value, annotation):
        raise ConfigError(f"{what} must be a {annotation.__name__}, got {value!r}")
    return value


def _suggest(key: str, names: list[str]) -> str:
    close = difflib.get_close_matches(key, names, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


# --------------------------------------------------------------------------- recipes


def preset_path(name_or_path: str) -> Path:
    """A recipe file: a path (.json, .yaml, .yml) or a preset name under ``experiments/presets``."""
    path = Path(name_or_path)
    if path.exists():
        if path.suffix not in RECIPE_SUFFIXES:
            raise ConfigError(f"{path}: a recipe is a .json, .yaml or .yml file")
        return path
    for suffix in RECIPE_SUFFIXES:
        candidate = PRESETS_DIR / f"{name_or_path}{suffix}"
        if candidate.exists():
            return candidate
    available = ", ".join(
        sorted({p.stem for p in PRESETS_DIR.iterdir() if p.suffix in RECIPE_SUFFIXES})
    )
    raise ConfigError(f"unknown preset or recipe file {name_or_path!r}; presets: {available}")


def read_recipe(name_or_path: str) -> tuple[Path, dict[str, Any]]:
    """A recipe's path and its mapping (JSON or YAML), with a clear error for bad syntax."""
    path = preset_path(name_or_path)
    text = path.read_text()
    try:
        if path.suffix == ".json":
            values = json.loads(text)
        else:
            import yaml

            values = yaml.safe_load(text)
    except (json.JSONDecodeError, Exception) as err:  # yaml.YAMLError has no common base here
        raise ConfigError(f"{path}: not valid {path.suffix[1:].upper()}: {err}") from err
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: a recipe is a mapping of keys to values")
    return path, values


def recipe_departures(name_or_path: str) -> list[str]:
    """A recipe's ``_departures``: the sentences saying where it still differs from the
    authors' recipe it follows, and why (``--dry-run`` prints them; none: an empty list)."""
    path, values = read_recipe(name_or_path)
    found = values.get("_departures", [])
    if not isinstance(found, list) or not all(isinstance(s, str) and s.strip() for s in found):
        raise ConfigError(f"{path}: '_departures' must be a list of sentences, got {found!r}")
    return found


def is_pipeline_preset(name_or_path: str) -> bool:
    """Whether a recipe describes several stages (``experiments.pipeline``), not one run."""
    return "pipeline" in read_recipe(name_or_path)[1]


def load_preset(name_or_path: str) -> dict[str, Any]:
    """A single-run recipe's values, nested and checked (not yet merged with flags)."""
    path, values = read_recipe(name_or_path)
    nested = nest(values, str(path))
    _build(RunConfig, nested, str(path), ())  # unknown keys and wrong types fail here
    return nested


def load_saved_config(path: str | Path) -> RunConfig:
    """A run's saved ``config.json`` (nested, or the flat layout of earlier versions)."""
    path = Path(path)
    return from_dict(json.loads(path.read_text()), str(path))


# --------------------------------------------------------------------------- command line


def add_config_arguments(
    parser: argparse.ArgumentParser, cls: type = RunConfig, exclude: tuple[str, ...] = ()
) -> None:
    """One flag per leaf of ``cls`` (``--max-new-tokens``), grouped by section; defaults are
    left unset (None) so that only flags the user typed override the recipe. ``exclude``:
    leaves (dotted paths) that get no flag."""
    groups: dict[str, Any] = {}
    for leaf in leaves(cls):
        if ".".join(leaf.path) in exclude:
            continue
        section = leaf.path[0] if len(leaf.path) > 1 else None
        if section is None:
            group = parser
        elif section in groups:
            group = groups[section]
        else:
            group = groups[section] = parser.add_argument_group(f"{section} (recipe section)")
        names = ["--" + name.replace("_", "-") for name in (leaf.flag, *leaf.aliases)]
        default = leaf.default if leaf.default != [] else "none"
        key = f"recipe key {'.'.join(leaf.path)}"
        if "(default:" in leaf.help:  # the help says what the default means
            help_text = f"{leaf.help} ({key})"
        else:
            help_text = f"{leaf.help} (default: {default}; {key})"
        dest = "cfg__" + "__".join(leaf.path)
        if leaf.annotation is bool:
            group.add_argument(
                *names,
                dest=dest,
                action=argparse.BooleanOptionalAction,
                default=None,
                help=help_text,
            )
            continue
        parse = leaf.parse or parse_type(leaf.annotation)
        group.add_argument(
            *names,
            dest=dest,
            type=parse,
            default=None,
            choices=leaf.choices,
            help=help_text,
            metavar=None if leaf.choices else leaf.flag.upper(),
        )


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """argparse's defaults in the help, once: a help text that states its default already
    (every configuration flag's does) gets none added."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if "(default:" in (action.help or ""):
            return action.help or ""
        return super()._get_help_string(action)


def parse_type(annotation: Any):
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        # a mapping has no flag form (per-benchmark budgets are written in recipes)
        options = [
            a
            for a in typing.get_args(annotation)
            if a is not type(None) and typing.get_origin(a) is not dict
        ]
        inner = parse_type(options[0])
        return lambda text: None if text.lower() in ("none", "null") else inner(text)
    if typing.get_origin(annotation) in (list, tuple):
        return str  # "a,b" is split by _check
    if annotation is bool:
        return _parse_bool
    return annotation


def _parse_bool(text: str) -> bool:
    words = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}
    if text.lower() not in words:
        raise ValueError(f"not a boolean: {text!r}")
    return words[text.lower()]


def flag_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The configuration values typed on the command line, nested."""
    nested: dict[str, Any] = {}
    for key, value in vars(args).items():
        if not key.startswith("cfg__") or value is None:
            continue
        *sections, name = key.removeprefix("cfg__").split("__")
        target = nested
        for part in sections:
            target = target.setdefault(part, {})
        target[name] = value
    return nested


def resolve_config(args: argparse.Namespace, preset: str | None) -> RunConfig:
    """Defaults, then the recipe, then the flags typed on the command line."""
    values = load_preset(preset) if preset else {}
    return from_dict(merge(values, flag_overrides(args)), preset or "command line")


def validate(config: RunConfig) -> None:
    """Checks across fields (types are checked when the tree is built)."""
    problems = []
    if config.data.num_demos is not None and config.data.num_demos < 1:
        problems.append("--num-demos must be >= 1")
    if config.rounds < 1 or config.optim.epochs < 1:
        problems.append("--rounds and --epochs must be >= 1")
    if config.optim.batch_size < 1 or config.optim.grad_accum < 1:
        problems.append("--batch-size and --grad-accum must be >= 1")
    if config.optim.checkpoint_layers_every < 1:
        problems.append("--checkpoint-layers-every must be >= 1 (1: every decoder layer)")
    if config.data.max_prompt_length >= config.data.max_length:
        problems.append("--max-prompt-length must be smaller than --max-length")
    if config.objective.gamma is not None and config.objective.gamma <= 0:
        problems.append("--gamma must be > 0 for the power estimator")
    if not 0.0 <= config.optim.warmup_ratio < 1.0:
        problems.append(f"optim.warmup_ratio must be in [0, 1), got {config.optim.warmup_ratio}")
    if config.objective.sft_token_mean == "step" and config.optim.average_logps:
        problems.append(
            "objective.sft_token_mean=step divides the step's summed token log-probs by its "
            "token count, but optim.average_logps hands SFT per-sequence means: use one"
        )
    if config.objective.dft_keep_normalizer and config.mix_previous_generations:
        problems.append(
            "objective.dft_keep_normalizer keeps one u per demonstration, but "
            "mix_previous_generations trains on each demonstration twice a round: use one"
        )
    samples, per_epoch = config.generation.num_samples, config.optim.samples_per_epoch
    if not 0 <= per_epoch <= samples:
        problems.append(
            f"optim.samples_per_epoch (--samples-per-epoch) = {per_epoch} asks for more of each "
            f"prompt's own samples than generation.num_samples (--num-samples) = {samples} "
            "makes (or is negative): lower it, or raise --num-samples"
        )
    if config.optim.learning_rate <= 0:
        problems.append("--lr must be > 0")
    if config.objective.beta <= 0:
        problems.append("--beta must be > 0 (the scale of the log-ratio)")
    if config.objective.method not in METHODS:
        problems.append(
            f"objective.method must be one of {list(METHODS)} (gsil.methods.register adds one), "
            f"got {config.objective.method!r}"
        )
    for method in METHODS.values():  # each method checks its own settings (DFT's tau, gamma)
        try:
            method.from_settings(config.objective)
        except ValueError as err:
            problems.append(str(err))
    if config.objective.method == "dft" and not config.generation.do_sample:
        problems.append(
            "objective.method=dft with generation.do_sample=false: DFT estimates its normaliser "
            "from sampled negatives, and one greedy response per prompt "
            f"(generation.num_samples={config.generation.num_samples}) is a single "
            "deterministic negative; add --do-sample (the authors sample several negatives per "
            "prompt: --num-samples k --temperature 0.7 --top-k 50)"
        )
    tree = config.to_dict()
    for leaf in leaves():
        value = leaf.value_in(tree)
        if leaf.choices and value not in leaf.choices:
            problems.append(
                f"{'.'.join(leaf.path)} must be one of {list(leaf.choices)}, got {value!r}"
            )
    try:
        resolve_report_to(config.logging.report_to, check_installed=False)
    except ValueError as err:  # an unknown name (make_accelerator checks the packages)
        problems.append(f"--report-to: {err}")
    if problems:
        raise ConfigError("invalid configuration: " + "; ".join(problems))


# --------------------------------------------------------------------------- experiments (pipelines)


@dataclass(frozen=True)
class EvaluationConfig(EvalOptions):
    """An evaluation: what to run, on how many items, in which precision, and the benchmark
    options (:class:`gsil.evaluation.runner.EvalOptions`, whose defaults are the only ones).

    ``experiments.evaluate`` (``gsil evaluate``) takes its flags from here; an experiment
    recipe's ``evaluate`` section also names the runs and the baseline.
    """

    benchmarks: list[str] = _f(lambda: ["reasoning", "humaneval"], "benchmarks, comma-separated")
    limit: int | None = _f(
        None,
        "at most N items per benchmark (per task for reasoning; "
        "default: all, 200 per reasoning task)",
    )
    humaneval_limit: int | None = _f(
        None, "HumanEval problems in an experiment (None: all 164; gsil evaluate uses --limit)"
    )
    dtype: str | None = _f(
        "auto", "weights' dtype: auto (bf16 where native, else fp32), float32, bfloat16"
    )
    seed: int = _f(0, "seed of the held-out items and sampling (the same items for every run)")
    runs: list[str] | None = _f(None, "an experiment's stages to evaluate (default: every stage)")
    baseline: str | None = _f(None, "the stage every other is compared with, item by item")

    def reasoning_tasks(self, data_source: str) -> list[str]:
        """The tasks to evaluate: given ones, else those of an ``rg:`` training source."""
        if self.tasks:
            return list(self.tasks)
        if data_source.startswith("rg:"):
            return data_source.removeprefix("rg:").split(",")
        return list(DEFAULT_REASONING_TASKS)

    def options(self, **changes: Any) -> EvalOptions:
        """The benchmark options alone, as ``evaluate_model`` takes them."""
        values = {spec.name: getattr(self, spec.name) for spec in dataclasses.fields(EvalOptions)}
        return EvalOptions(**{**values, **changes})


# in a stage: keys that describe the stage itself, not its run configuration
STAGE_KEYS = ("name", "init_from", "share_round0_generations", "seeds")
PIPELINE_KEYS = ("pipeline", "base", "stages", "evaluate", "output_dir", "seeds", "power")


@dataclass
class Stage:
    """One run of a pipeline: its resolved configuration and the run it starts from.

    A recipe stage repeated over seeds is one run per seed, ``<group>-seed<s>`` (``repeated``),
    each with ``config.seed = s``; ``group`` is the recipe's stage name (that of an unrepeated
    stage is its own name). ``init_from`` and ``share_round0_generations`` name runs.
    """

    name: str
    config: RunConfig
    init_from: str | None = None
    share_round0_generations: str | None = None  # a run starting from the same model
    group: str = ""
    repeated: bool = False

    def __post_init__(self) -> None:
        self.group = self.group or self.name


@dataclass(frozen=True)
class PowerAssumptions:
    """What the dry-run plan assumes for its minimal detectable differences (recipe key
    ``power``), used until the evaluation's own results exist."""

    baseline_accuracy: float | dict[str, float] | None = _f(
        None,
        "the baseline's expected score per benchmark (or one for all); default 0.5, the worst case",
    )
    discordance: float | dict[str, float] | None = _f(
        None,
        "expected share of items on which a method and the baseline disagree; default "
        "2p(1-p) at the baseline accuracy p (independent errors, an upper bound for models "
        "trained from one parent)",
    )

    def for_benchmark(self, benchmark: str) -> tuple[float | None, float | None]:
        """``(baseline_accuracy, discordance)`` stated for ``benchmark`` (None: not stated)."""

        def pick(value: float | dict[str, float] | None) -> float | None:
            return value.get(benchmark) if isinstance(value, dict) else value

        return pick(self.baseline_accuracy), pick(self.discordance)


@dataclass
class Pipeline:
    """A resolved pipeline recipe: where it writes, its stages and its evaluation.

    A pipeline recipe (``recipes/default.yaml``) is a mapping::

        pipeline: <name>            the experiment directory: OUTPUT_DIR/<name>/ (--name overrides)
        base: {run configuration}   shared by every stage
        seeds: [0, 1, 2]            (optional) repeat every stage once per seed
        stages: [{name, init_from, share_round0_generations, seeds, run configuration...}, ...]
        evaluate: {EvaluationConfig fields}   (optional)
        power: {PowerAssumptions fields}      (optional) the dry-run plan's premises

    ``seeds`` (top level, or per stage, where ``null`` opts a stage out) makes one run per seed
    of a stage, ``<stage>-seed<s>`` with ``seed: s`` (the demonstration sample, data order,
    generation and training). A repeated stage starts from the run of its ``init_from`` stage
    with the same seed (or from that stage's one run when it is not repeated) and shares the
    round-0 generations of the same seed's run. ``evaluate.runs`` and ``baseline`` name stages:
    every seed's run is evaluated, and the report groups them.
    """

    name: str
    root: Path
    stages: list[Stage]
    evaluate: EvaluationConfig | None = None
    comment: str = ""
    power: PowerAssumptions = field(default_factory=PowerAssumptions)
    departures: list[str] = field(default_factory=list)  # the recipe's ``_departures``

    def stage(self, name: str) -> Stage:
        """The run named ``name`` (a repeated stage's runs are ``<stage>-seed<s>``)."""
        for stage in self.stages:
            if stage.name == name:
                return stage
        raise ConfigError(f"pipeline {self.name}: no stage {name!r}")

    def runs_of(self, name: str) -> list[Stage]:
        """The runs of a recipe stage (one per seed when repeated), or the one run so named."""
        found = [s for s in self.stages if s.group == name] or [
            s for s in self.stages if s.name == name
        ]
        if not found:
            raise ConfigError(f"pipeline {self.name}: no stage {name!r}")
        return found

    def reasoning_tasks(self) -> list[str]:
        evaluation = self.evaluate or EvaluationConfig()
        return evaluation.reasoning_tasks(self.stages[0].config.data.source)


def final_model_dir(config: RunConfig) -> Path:
    """The model a run ends with: ``<run>/round_<last>/model``."""
    from gsil.layout import RunLayout

    return RunLayout(config.run_dir()).model(config.rounds - 1)


def evaluation_from_dict(
    values: dict[str, Any], where: str, prefix: tuple[str, ...] = ("evaluate",)
) -> EvaluationConfig:
    """A checked :class:`EvaluationConfig` (unknown keys and wrong types name the key)."""
    return _build(EvaluationConfig, values, where, prefix)


def _seed_list(value: Any, where: str) -> list[int] | None:
    """A recipe's ``seeds``: distinct integers in [0, 2**30), or None (not repeated)."""
    if value is None:
        return None
    seeds = _check(value, list[int], f"{where}: 'seeds'")
    if not seeds or len(set(seeds)) != len(seeds) or not all(0 <= s < 2**30 for s in seeds):
        raise ConfigError(
            f"{where}: 'seeds' must be distinct integers in [0, 2**30), e.g. "
            f"[0, 1, 2], got {value!r} (null: run the stage once)"
        )
    return seeds


def _matching_run(runs: list[Stage], seed: int | None, what: str, where: str) -> Stage:
    """The run of an earlier stage that a run of seed ``seed`` links to: the same seed's run
    of a repeated stage, or the one run of a stage that is not repeated."""
    if not runs[0].repeated:
        return runs[0]
    if seed is None:
        raise ConfigError(
            f"{where}: {what} {runs[0].group!r} is repeated over seeds; repeat "
            f"this stage too ('seeds'), or name one run, e.g. {runs[0].name!r}"
        )
    for run in runs:
        if run.config.seed == seed:
            return run
    raise ConfigError(
        f"{where}: {what} {runs[0].group!r} has no run of seed {seed} (its "
        f"seeds: {[r.config.seed for r in runs]}); give both stages the same "
        "'seeds'"
    )


def load_pipeline(
    recipe: str, overrides: dict[str, Any] | None = None, eval_overrides: dict | None = None
) -> Pipeline:
    """Resolve a pipeline recipe; ``overrides`` (flat or nested run configuration values, e.g.
    from flags) apply to every stage, ``eval_overrides`` to the evaluation. A stage repeated
    over ``seeds`` becomes one run per seed (see :class:`Pipeline`)."""
    path, spec = read_recipe(recipe)
    where = str(path)
    unknown = sorted(set(spec) - set(PIPELINE_KEYS) - {k for k in spec if k.startswith("_")})
    if unknown:
        raise ConfigError(
            f"{where}: unknown key(s) {unknown}; a pipeline recipe has pipeline, "
            "base, stages, evaluate (and output_dir, seeds, power)"
        )
    overrides = nest(dict(overrides or {}), "command line")
    output_dir = overrides.pop("output_dir", None) or spec.get("output_dir", "runs")
    name = overrides.pop("name", None) or spec["pipeline"]
    root = Path(output_dir) / name
    base = nest(dict(spec.get("base", {})), f"{where}: base")
    all_seeds = _seed_list(spec.get("seeds"), where)
    stages: list[Stage] = []
    groups: dict[str, list[Stage]] = {}  # recipe stage -> its runs; run name -> [that run]

    def linked(target: str | None, what: str, stage_where: str) -> list[Stage] | None:
        if target is None:
            return None
        if target not in groups:
            verb = "starts from" if what == "init_from" else "shares generations of"
            raise ConfigError(f"{stage_where} {verb} unknown {target!r}")
        return groups[target]

    for raw in spec.get("stages", []):
        stage_name = raw.get("name")
        if not stage_name:
            raise ConfigError(f"{where}: every stage needs a 'name'")
        stage_where = f"{where}: stage {stage_name}"
        if stage_name in groups:
            raise ConfigError(f"{stage_where}: a stage or run of that name comes earlier")
        seeds = _seed_list(raw["seeds"], stage_where) if "seeds" in raw else all_seeds
        if seeds is not None and "seed" in overrides:
            raise ConfigError(
                f"command line: --seed {overrides['seed']} conflicts with the "
                f"seeds {seeds} of stage {stage_name} in {where}; drop --seed, or "
                "the recipe's 'seeds'"
            )
        own = nest({k: v for k, v in raw.items() if k not in STAGE_KEYS}, stage_where)
        values = merge(merge(base, own), overrides)
        parents = linked(raw.get("init_from"), "init_from", stage_where)
        sources = linked(raw.get("share_round0_generations"), "share", stage_where)
        runs = []
        for seed in seeds or [None]:
            run_name = stage_name if seed is None else f"{stage_name}-seed{seed}"
            run_values = values if seed is None else merge(values, {"seed": seed})
            parent = None
            if parents is not None:
                parent = _matching_run(parents, seed, "init_from", stage_where)
                model = str(final_model_dir(parent.config))
                run_values = merge(run_values, {"model": {"name_or_path": model}})
            run_values = merge(
                run_values, {"output_dir": str(root), "name": run_name, "resume": False}
            )
            config = from_dict(run_values, f"{where}: stage {run_name}")
            # the round-0 set of the run with this seed (another seed's demonstrations differ)
            source = next((r for r in sources or [] if r.config.seed == config.seed), None)
            runs.append(
                Stage(
                    run_name,
                    config,
                    parent and parent.name,
                    source and source.name,
                    stage_name,
                    seed is not None,
                )
            )
        groups[stage_name] = runs
        for run in runs:
            groups.setdefault(run.name, [run])
        stages += runs
    evaluate = None
    if spec.get("evaluate") is not None:
        evaluate = evaluation_from_dict({**spec["evaluate"], **(eval_overrides or {})}, where)
        evaluate = dataclasses.replace(
            evaluate, runs=evaluate.runs or list(dict.fromkeys(s.group for s in stages))
        )
        for run in evaluate.runs + [evaluate.baseline] * bool(evaluate.baseline):
            if run not in groups:
                raise ConfigError(f"{where}: evaluate names unknown stage {run!r}")
    if not isinstance(spec.get("power") or {}, dict):
        raise ConfigError(
            f"{where}: 'power' is a section and takes a mapping, got {spec['power']!r}"
        )
    power = _build(PowerAssumptions, spec.get("power") or {}, where, ("power",))
    for value in (power.baseline_accuracy, power.discordance):
        numbers = value.values() if isinstance(value, dict) else [value]
        if any(v is not None and not 0.0 <= v <= 1.0 for v in numbers):
            raise ConfigError(f"{where}: 'power' values are proportions in [0, 1], got {value!r}")
    comment = spec.get("_comment", "")
    return Pipeline(name, root, stages, evaluate, comment, power, recipe_departures(recipe))
