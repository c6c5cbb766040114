"""The testbed's experiment: which runs, on which rows of demonstrations, and what they show.

Nothing here trains; ``experiments.testbed`` runs the grid and this module plans it and reads
the numbers (GSIL_THEORY.md section 7).

Design. Every method starts from the same pretrained base (the SFT starting point of the
paper) and trains for ``rounds`` rounds of ``steps_per_round`` optimizer steps each, on rows
drawn from the same ``N`` demonstrations:

- ``continued-sft``: SFT, one round after another (``rounds x steps_per_round`` steps, the
  budget of every multi-round method); ``sft`` is its first round (``steps_per_round`` steps
  from the base: a run of its own, with its own learning-rate schedule);
- ``dynamic-ft``: Dynamic Fine-Tuning (SFT with each token's loss weighted by its detached
  probability), one round after another like continued SFT;
- ``spin``, ``gsil`` (the logistic loss), ``dft``, ``sdft``: ``rounds`` rounds, each sampling
  its own responses from the current policy (temperature 1);
- at ``loss_n`` demonstrations also GSIL with every other loss, and the negative control: GSIL
  (logistic) with ``shift = negative_shift``, which the theory says drifts over rounds.

Equal steps for every N: a round is ``steps_per_round x rows_per_step`` rows, the ``N``
demonstrations repeated cyclically (:func:`round_rows`), each row with its own id, round ``t``
continuing where round ``t - 1`` stopped. So with 512 rows a round, ``N = 32`` sees each
demonstration 16 times a round and ``N = 2048`` sees a quarter of them; ``rounds x rows``
rows in all, the same for every method and N.

Statistics. Seeds are paired (same demonstrations, same base model, same rows). Per method and
N the seeds' mean with a 95% t-interval, and the paired difference to ``continued-sft`` (equal
steps) and to ``sft``. The positive control (continued SFT on 4N against N, for every such
pair in the grid whose 4N rows a chain can see within its budget) must be resolved, else
:func:`build_report` states that the grid has no power and gives no verdicts.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from analysis.testbed.measures import Estimate, mean_interval
from gsil.demonstrations import Demonstration

MAIN_METHODS = ("sft", "continued-sft", "dynamic-ft", "spin", "gsil", "dft", "sdft")
SFT_KIND = ("continued-sft", "dynamic-ft")  # chains that train without sampling
# the chains drawn round by round and on the temperature frontier at loss_n
ROUND_METHODS = ("continued-sft", "dynamic-ft", "spin", "gsil-logistic", "dft", "sdft")
LOSSES = ("logistic", "brier", "exponential", "kliep", "lsif", "power", "hinge")
NEGATIVE = "negative-control"  # GSIL (logistic) with a large positive shift
BASELINE = "continued-sft"  # equal optimizer steps: the maximum-likelihood baseline
CALIBRATED_TARGET_SCALE = {"exponential": 0.5}  # f* = scale * log r; 1 for the others


def _g(default: Any, help: str) -> Any:
    """A grid field whose ``help`` is its flag's documentation."""
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class GridSpec:
    """The grid: demonstrations, seeds, methods, the round budget, the measures' sizes and the
    learning-rate / beta selection. Each field is a ``gsil testbed`` flag (``--loss-n``)."""

    ns: tuple[int, ...] = _g((32, 128, 512, 2048), "numbers of demonstrations N")
    seeds: tuple[int, ...] = _g(tuple(range(10)), "seeds (demonstrations, base model, rows)")
    methods: tuple[str, ...] = _g(
        tuple(m for m in MAIN_METHODS if m != "sdft"), f"methods at every N, of {MAIN_METHODS}"
    )
    methods_at_loss_n: tuple[str, ...] = _g(
        ("sdft",),
        "methods trained at --loss-n only (SDFT: its teacher reads the demonstration inside an "
        "English prompt the testbed's character model cannot read, so its N curve says nothing)",
    )
    losses: tuple[str, ...] = _g(LOSSES, "GSIL losses compared at --loss-n")
    loss_n: int = _g(128, "the N of the loss comparison, the negative control and the frontier")
    steps_per_round: int = _g(16, "optimizer steps per round (rows = steps x batch x accum)")
    pool: int = _g(2048, "demonstrations drawn per seed (N must not exceed it)")
    base_seed: int | None = _g(
        0, "seed of the one pretrained base every seed starts from (None: a base per seed)"
    )
    negative_shift: float = _g(2.0, "GSIL shift of the negative control (0: no control)")
    temperatures: tuple[float, ...] = _g(
        (0.5, 0.75, 1.0, 1.25, 1.5), "sampling temperatures of the (forward, reverse KL) frontier"
    )
    test_size: int = _g(512, "held-out test demonstrations (forward KL)")
    validation_size: int = _g(256, "validation demonstrations (learning-rate/beta selection)")
    policy_samples: int = _g(256, "policy samples per measure (reverse KL, entropy, accuracy)")
    select_seeds: tuple[int, ...] = _g((1000, 1001), "seeds of the selection runs (not tested)")
    lr_grid: tuple[float, ...] = _g((1e-4, 3e-4, 1e-3), "learning rates tried per method")
    beta_grid: tuple[float, ...] = _g((0.3, 1.0), "betas tried for spin and gsil (logistic)")
    select_rounds: int = _g(1, "rounds per selection run")
    workers: int = _g(2, "worker processes (one torch thread each)")

    def validate(self, rounds: int) -> None:
        """Raise ``ValueError`` naming the flag for a grid that cannot run."""
        problems = []
        if not self.seeds:
            problems.append("--seeds: give at least one seed (at least 2 for an interval)")
        if len(set(self.seeds)) != len(self.seeds):
            problems.append(f"--seeds must be distinct, got {list(self.seeds)}")
        if set(self.seeds) & set(self.select_seeds):
            problems.append(
                "--select-seeds must differ from --seeds (selection never sees a test run)"
            )
        if not self.ns or any(n < 1 for n in self.ns):
            problems.append(f"--ns must be positive numbers of demonstrations, got {list(self.ns)}")
        too_many = [n for n in (*self.ns, self.loss_n) if n > self.pool]
        if too_many:
            problems.append(
                f"N = {too_many} is larger than the pool of {self.pool} demonstrations per "
                "seed: lower --ns/--loss-n or raise --pool"
            )
        for flag, methods in (
            ("--methods", self.methods),
            ("--methods-at-loss-n", self.methods_at_loss_n),
        ):
            unknown = [m for m in methods if m not in MAIN_METHODS]
            if unknown:
                problems.append(f"{flag}: unknown {unknown}; choose from {list(MAIN_METHODS)}")
        unknown = [loss for loss in self.losses if loss not in LOSSES]
        if unknown:
            problems.append(f"--losses: unknown {unknown}; choose from {list(LOSSES)}")
        if self.loss_n < 1:
            problems.append("--loss-n must be >= 1")
        if rounds < 1 or self.steps_per_round < 1 or self.select_rounds < 1:
            problems.append("--rounds, --steps-per-round and --select-rounds must be >= 1")
        if any(t <= 0 for t in self.temperatures) or not self.temperatures:
            problems.append("--temperatures must be positive")
        if min(self.test_size, self.validation_size, self.policy_samples) < 2:
            problems.append("--test-size, --validation-size and --policy-samples must be >= 2")
        if not self.lr_grid or min(self.lr_grid) <= 0 or not self.beta_grid:
            problems.append("--lr-grid and --beta-grid need positive values")
        if self.beta_grid and min(self.beta_grid) <= 0:
            problems.append("--beta-grid values must be > 0")
        if self.workers < 1:
            problems.append("--workers must be >= 1")
        if problems:
            raise ValueError("; ".join(problems))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def compared_methods(self, n: int | None = None) -> tuple[str, ...]:
        """The methods trained at ``n`` (every compared method when ``n`` is None)."""
        extra = self.methods_at_loss_n if n is None or n == self.loss_n else ()
        return tuple(dict.fromkeys((*self.methods, *extra)))


# --------------------------------------------------------------------------- the runs


@dataclass(frozen=True)
class Chain:
    """One method trained at one N and seed: ``rounds`` runs, each starting from the last."""

    name: str  # continued-sft, dynamic-ft, spin, gsil-<loss>, dft, sdft, negative-control
    n: int
    seed: int

    @property
    def key(self) -> str:
        """The method whose selected settings (lr, beta) the chain uses."""
        return "gsil-logistic" if self.name == NEGATIVE else self.name


def chain_names(spec: GridSpec, n: int) -> list[str]:
    """The chains trained at ``n``: the main methods (``sft`` is continued SFT's first round),
    and at ``loss_n`` the methods trained there only, every GSIL loss and the negative
    control."""
    names = []
    for method in spec.compared_methods(n):
        name = {"sft": BASELINE, "gsil": "gsil-logistic"}.get(method, method)
        if name not in names:
            names.append(name)
    if n == spec.loss_n:
        names += [f"gsil-{loss}" for loss in spec.losses if f"gsil-{loss}" not in names]
        if spec.negative_shift != 0:
            names.append(NEGATIVE)
    return names


def plan_chains(spec: GridSpec) -> list[Chain]:
    """Every chain of the grid, seed by seed (a seed's chains share its base and rows)."""
    ns = sorted(set(spec.ns) | {spec.loss_n})
    return [
        Chain(name, n, seed) for seed in spec.seeds for n in ns for name in chain_names(spec, n)
    ]


def selection_keys(spec: GridSpec) -> list[str]:
    """The methods whose settings are selected: every chain's ``key`` in the grid."""
    keys: list[str] = []
    for n in sorted(set(spec.ns) | {spec.loss_n}):
        for name in chain_names(spec, n):
            key = Chain(name, n, 0).key
            if key not in keys:
                keys.append(key)
    return keys


def objective_values(name: str, setting: Mapping[str, float], negative_shift: float) -> dict:
    """The run configuration values (flag names) of chain ``name`` with a selected
    ``setting`` (``lr``, and ``beta`` where the method has one)."""
    values: dict[str, Any] = {"lr": setting["lr"]}
    if "beta" in setting:
        values["beta"] = setting["beta"]
    if name == BASELINE:
        return {**values, "method": "sft"}
    if name in ("spin", "dft", "sdft"):
        return {**values, "method": name}
    if name == "dynamic-ft":
        return {**values, "method": "sft", "token_weighting": "prob"}
    if name == NEGATIVE:
        return {**values, "method": "gsil", "loss": "logistic", "shift": negative_shift}
    loss = name.removeprefix("gsil-")
    if not name.startswith("gsil-") or loss not in LOSSES:
        raise ValueError(f"unknown testbed method {name!r}")
    return {**values, "method": "gsil", "loss": loss, "shift": 0.0}


def has_beta(key: str) -> bool:
    """Whether a method's beta is selected: SPIN and GSIL with the logistic loss (the other
    losses take the logistic loss's beta; DFT and SFT have none)."""
    return key in ("spin", "gsil-logistic")


def round_rows(demos: Sequence[Demonstration], rows: int, round_index: int) -> list[Demonstration]:
    """Round ``round_index``'s ``rows`` training rows: ``demos`` repeated cyclically from row
    ``round_index * rows`` on, each row's id ``<demo id>@<row>`` (unique within the chain).

    Every method and N gets ``rows`` rows a round, so equal optimizer steps; a demonstration
    appears ``rows / N`` times a round when ``N <= rows``.
    """
    if not demos:
        raise ValueError("round_rows needs at least one demonstration")
    start = round_index * rows
    return [
        Demonstration(
            prompt=demos[(start + i) % len(demos)].prompt,
            response=demos[(start + i) % len(demos)].response,
            id=f"{demos[(start + i) % len(demos)].id}@{start + i}",
        )
        for i in range(rows)
    ]


def empirical_log_probs(demos: Sequence[Demonstration]) -> list[float]:
    """``log p_N(y_i | x_i)`` of each demonstration under the empirical distribution of
    ``demos``: ``log(count(x_i, y_i) / count(x_i))``."""
    pairs = Counter((d.prompt, d.response) for d in demos)
    prompts = Counter(d.prompt for d in demos)
    return [math.log(pairs[(d.prompt, d.response)] / prompts[d.prompt]) for d in demos]


def classifier_target(loss: str, log_ratio: Sequence[float]) -> list[float]:
    """The population minimiser ``f*`` of a GSIL loss at log density ratio ``log r``:
    ``log r`` for the calibrated losses, ``log r / 2`` for exponential; hinge has no ratio
    (its minimiser is ``sign(log r)``) and is compared with ``log r`` to show it is not
    calibrated (GSIL_THEORY.md section 2)."""
    scale = CALIBRATED_TARGET_SCALE.get(loss, 1.0)
    return [scale * value for value in log_ratio]


# --------------------------------------------------------------------------- statistics

# results[chain name][n][seed] = the measures of rounds 0 (the base) .. T, one dict each
Results = Mapping[str, Mapping[int, Mapping[int, Sequence[Mapping[str, Any]]]]]


def estimate_dict(estimate: Estimate | None) -> dict | None:
    return None if estimate is None else estimate.to_dict()


def across_seeds(values: Mapping[int, float]) -> dict | None:
    """The seeds' mean and its 95% t-interval (None without values)."""
    finite = [v for v in values.values() if v is not None and math.isfinite(v)]
    return estimate_dict(mean_interval(finite)) if finite else None


def paired(values: Mapping[int, float], baseline: Mapping[int, float]) -> dict | None:
    """Mean over common seeds of ``values - baseline`` with its 95% t-interval."""
    seeds = sorted(
        s for s in set(values) & set(baseline) if values[s] is not None and baseline[s] is not None
    )
    if not seeds:
        return None
    return estimate_dict(mean_interval([values[s] - baseline[s] for s in seeds]))


def direction(estimate: Mapping[str, float] | None) -> str:
    """``lower`` / ``higher`` when the 95% interval excludes 0, else ``unresolved``."""
    if estimate is None or estimate["n"] < 2 or not math.isfinite(estimate["low"]):
        return "unresolved"
    if estimate["high"] < 0:
        return "lower"
    if estimate["low"] > 0:
        return "higher"
    return "unresolved"


def measure_at(results: Results, name: str, n: int, round_index: int, key: str) -> dict:
    """``{seed: value}`` of one scalar measure (``forward_kl`` means, ``demo_logp``, ...)."""
    out = {}
    for seed, rounds in results.get(name, {}).get(n, {}).items():
        if round_index < len(rounds) and rounds[round_index] is not None:
            value = rounds[round_index].get(key)
            if isinstance(value, Mapping):
                value = value.get("mean")
            if value is not None:
                out[seed] = float(value)
    return out


def method_rounds(method: str, rounds: int) -> tuple[str, int]:
    """The chain and round a table method is read at: ``sft`` is continued SFT's round 1;
    every other method its last round (equal optimizer steps)."""
    if method == "sft":
        return BASELINE, 1
    return ({"gsil": "gsil-logistic"}.get(method, method)), rounds


def positive_control(
    results: Results, ns: Sequence[int], rounds: int, rows_seen: int | None = None
) -> dict:
    """Continued SFT on 4N against N, for every (N, 4N) in the grid: the paired difference in
    forward KL must be resolved below 0. A chain sees ``rows_seen`` rows in all (rounds x
    rows per round); at ``4N > rows_seen`` the larger set cannot be used up, so 4N and N may
    differ by little for a reason that is not a lack of power: such a pair is reported
    (``within_budget`` False) but does not count. ``has_power`` needs at least one counted
    pair, all of them resolved."""
    pairs = []
    for n in sorted(ns):
        if 4 * n in ns:
            small = measure_at(results, BASELINE, n, rounds, "forward_kl")
            large = measure_at(results, BASELINE, 4 * n, rounds, "forward_kl")
            difference = paired(large, small)
            pairs.append(
                {
                    "n": n,
                    "four_n": 4 * n,
                    "difference": difference,
                    "resolved": direction(difference) == "lower",
                    "within_budget": rows_seen is None or 4 * n <= rows_seen,
                }
            )
    counted = [p for p in pairs if p["within_budget"]]
    return {
        "pairs": pairs,
        "rows_seen": rows_seen,
        "has_power": bool(counted) and all(p["resolved"] for p in counted),
    }


def dominates(frontier: Sequence[Sequence[float]], baseline: Sequence[Sequence[float]]) -> bool:
    """Whether every (forward KL, reverse KL) point of ``baseline`` is weakly dominated by some
    point of ``frontier`` (lower or equal in both) and at least one strictly: the method is
    better on the whole temperature frontier, not at one temperature (Caccia et al. 2018)."""
    if not frontier or not baseline:
        return False
    strictly = False
    for base_fkl, base_rkl in baseline:
        better = [(f, r) for f, r in frontier if f <= base_fkl and r <= base_rkl]
        if not better:
            return False
        strictly |= any(f < base_fkl or r < base_rkl for f, r in better)
    return strictly


def mean_frontier(results: Results, name: str, n: int, rounds: int) -> list[dict]:
    """The seeds' mean (forward KL, reverse KL, outside mass) per temperature of a chain's
    last round, with 95% intervals."""
    by_temperature: dict[float, dict[str, dict[int, float]]] = {}
    for seed, chain_rounds in results.get(name, {}).get(n, {}).items():
        if len(chain_rounds) <= rounds or not chain_rounds[rounds]:
            continue
        for point in chain_rounds[rounds].get("frontier") or []:
            entry = by_temperature.setdefault(point["temperature"], {})
            for key in ("forward_kl", "reverse_kl", "outside_mass"):
                if point.get(key) is not None:
                    entry.setdefault(key, {})[seed] = point[key]
    return [
        {"temperature": t, **{key: across_seeds(v) for key, v in values.items()}}
        for t, values in sorted(by_temperature.items())
    ]


def build_report(
    results: Results, spec: GridSpec, rounds: int, rows_seen: int | None = None
) -> dict:
    """Every table and verdict of the grid from its per-round measures (see the module
    docstring); verdicts are None when the positive control is not resolved (``rows_seen``:
    the rows a chain sees in all, :func:`positive_control`)."""
    ns = sorted(set(spec.ns))
    control = positive_control(results, ns, rounds, rows_seen)
    table: dict[str, dict] = {}
    for method in spec.compared_methods():
        name, at = method_rounds(method, rounds)
        for n in ns:
            kl = measure_at(results, name, n, at, "forward_kl")
            if not kl:
                continue
            row = table.setdefault(method, {})
            row[n] = {
                "forward_kl": across_seeds(kl),
                "vs_continued_sft": paired(
                    kl, measure_at(results, BASELINE, n, rounds, "forward_kl")
                ),
                "vs_sft": paired(kl, measure_at(results, BASELINE, n, 1, "forward_kl")),
                "reverse_kl": across_seeds(measure_at(results, name, n, at, "reverse_kl")),
                "outside_mass": across_seeds(measure_at(results, name, n, at, "outside_mass")),
                "entropy": across_seeds(measure_at(results, name, n, at, "entropy")),
                "accuracy": across_seeds(measure_at(results, name, n, at, "accuracy")),
            }
    losses = {}
    for loss in spec.losses:
        name = f"gsil-{loss}"
        kl = measure_at(results, name, spec.loss_n, rounds, "forward_kl")
        if kl:
            losses[name] = {
                "forward_kl": across_seeds(kl),
                "vs_continued_sft": paired(
                    kl, measure_at(results, BASELINE, spec.loss_n, rounds, "forward_kl")
                ),
                "classifier": classifier_table(results, name, spec.loss_n),
            }
    per_round = {
        name: {
            t: {
                "forward_kl": across_seeds(measure_at(results, name, spec.loss_n, t, "forward_kl")),
                "demo_logp": across_seeds(measure_at(results, name, spec.loss_n, t, "demo_logp")),
                "demo_logp_change": paired(
                    measure_at(results, name, spec.loss_n, t, "demo_logp"),
                    measure_at(results, name, spec.loss_n, t - 1, "demo_logp"),
                )
                if t
                else None,
            }
            for t in range(rounds + 1)
        }
        for name in results
        if spec.loss_n in results[name]
    }
    frontier = {
        name: mean_frontier(results, name, spec.loss_n, rounds)
        for name in results
        if spec.loss_n in results[name]
    }
    negative = None
    if NEGATIVE in results:
        negative = {
            "n": spec.loss_n,
            "shift": spec.negative_shift,
            "vs_gsil_logistic": paired(
                measure_at(results, NEGATIVE, spec.loss_n, rounds, "forward_kl"),
                measure_at(results, "gsil-logistic", spec.loss_n, rounds, "forward_kl"),
            ),
        }
        negative["detected"] = direction(negative["vs_gsil_logistic"]) == "higher"
    report = {
        "grid": spec.to_dict(),
        "rounds": rounds,
        "positive_control": control,
        "negative_control": negative,
        "table": table,
        "losses": losses,
        "per_round": per_round,
        "frontier": frontier,
    }
    report["verdicts"] = verdicts(report) if control["has_power"] else None
    return report


def classifier_table(results: Results, name: str, n: int) -> dict:
    """Seed means of a GSIL chain's implicit-classifier fit in its first round (reference: the
    base): against its loss's target at the exact ``log p_data/pi_ref`` and at the empirical
    ``log p_N/pi_ref``."""
    out = {}
    for target in ("data", "empirical"):
        for stat in ("rmse", "correlation"):
            values = {}
            for seed, rounds in results.get(name, {}).get(n, {}).items():
                fit = (rounds[1] or {}).get("classifier") if len(rounds) > 1 else None
                if fit and fit.get(target) and fit[target].get(stat) is not None:
                    values[seed] = fit[target][stat]
            out[f"{target}_{stat}"] = across_seeds(values)
            out[f"{target}_{stat}_by_seed"] = values
    return out


def _fmt(estimate: Mapping[str, float] | None, digits: int = 3) -> str:
    if estimate is None:
        return "n/a"
    if estimate["n"] < 2 or not math.isfinite(estimate["low"]):
        return f"{estimate['mean']:.{digits}f} (1 seed)"
    return f"{estimate['mean']:.{digits}f} [{estimate['low']:.{digits}f}, {estimate['high']:.{digits}f}]"


def verdicts(report: Mapping[str, Any]) -> dict[str, str]:
    """Per claim, the number with its interval and a plain-words verdict."""
    out = {}
    loss_n, rounds = report["grid"]["loss_n"], report["rounds"]
    table = report["table"]
    frontier = report["frontier"]
    base_front = [
        (p["forward_kl"]["mean"], p["reverse_kl"]["mean"])
        for p in frontier.get(BASELINE, [])
        if p.get("forward_kl") and p.get("reverse_kl")
    ]
    lines = []
    for method, row in table.items():
        if method in ("sft", BASELINE):
            continue
        name, _ = method_rounds(method, rounds)
        front = [
            (p["forward_kl"]["mean"], p["reverse_kl"]["mean"])
            for p in frontier.get(name, [])
            if p.get("forward_kl") and p.get("reverse_kl")
        ]
        on_frontier = dominates(front, base_front)
        for n, cell in sorted(row.items()):
            d = direction(cell["vs_continued_sft"])
            word = {
                "lower": "lower forward KL than",
                "higher": "higher forward KL than",
                "unresolved": "no resolved difference from",
            }[d]
            lines.append(
                f"{method} at N={n}: {word} continued SFT at equal steps "
                f"(difference {_fmt(cell['vs_continued_sft'])} nats)"
            )
        if front and base_front:
            lines.append(
                f"{method} at N={loss_n}: "
                + (
                    "better than continued SFT on the whole temperature frontier"
                    if on_frontier
                    else "not better than continued SFT on the temperature frontier, so it does "
                    "not beat SFT (Caccia et al.)"
                )
            )
    out["a_sample_efficiency"] = "\n".join(lines)
    per_round = report["per_round"]

    def lowers(name: str) -> tuple[bool, str]:
        changes = [
            per_round[name][t]["demo_logp_change"]
            for t in range(1, rounds + 1)
            if name in per_round
        ]
        text = ", ".join(f"round {t}: {_fmt(c)}" for t, c in enumerate(changes, start=1))
        return any(direction(c) == "lower" for c in changes), text

    if "gsil-logistic" in per_round and "spin" in per_round:
        gsil_lowers, gsil_text = lowers("gsil-logistic")
        spin_lowers, spin_text = lowers("spin")
        verdict = (
            "supported: GSIL never lowered it, SPIN did"
            if not gsil_lowers and spin_lowers
            else "contradicted: GSIL lowered it"
            if gsil_lowers
            else "not shown: neither lowered it in a resolved way"
        )
        out["b_demo_loglik"] = (
            f"change of the demonstrations' log-likelihood per round at N={loss_n} "
            f"(nats/sequence): GSIL {gsil_text}; SPIN {spin_text}. Verdict: {verdict}"
        )
    losses = report["losses"]
    if "gsil-logistic" in losses:
        fit = losses["gsil-logistic"]["classifier"]
        hinge = losses.get("gsil-hinge", {}).get("classifier")
        text = (
            f"GSIL-logistic round 1 at N={loss_n}: f against log(p_N/pi_ref) RMSE "
            f"{_fmt(fit['empirical_rmse'])}, correlation {_fmt(fit['empirical_correlation'])}; "
            f"against log(p_data/pi_ref) RMSE {_fmt(fit['data_rmse'])}, correlation "
            f"{_fmt(fit['data_correlation'])}."
        )
        tracks = (fit["empirical_correlation"] or {}).get("low", -1) > 0
        if hinge:
            difference = paired(fit["empirical_rmse_by_seed"], hinge["empirical_rmse_by_seed"])
            text += f" RMSE minus hinge's (not calibrated): {_fmt(difference)}."
            tracks = tracks and direction(difference) == "lower"
        verdict = (
            "supported: the calibrated classifier tracks the log ratio"
            + (" better than hinge" if hinge else "")
            if tracks
            else "not shown"
        )
        out["c_calibration"] = f"{text} Verdict: {verdict}"
    if "gsil-logistic" in per_round and rounds >= 2:
        kls = per_round["gsil-logistic"]
        text = ", ".join(f"round {t}: {_fmt(kls[t]['forward_kl'])}" for t in range(rounds + 1))
        out["d_convergence"] = f"GSIL-logistic forward KL per round at N={loss_n}: {text}."
    negative = report["negative_control"]
    if negative is not None:
        out["negative_control"] = (
            f"GSIL with shift {negative['shift']} minus shift 0 after {rounds} rounds: "
            f"{_fmt(negative['vs_gsil_logistic'])} nats: "
            + (
                "detected (worse, as the theory predicts)"
                if negative["detected"]
                else "NOT detected: the measures did not see the predicted failure"
            )
        )
    return out


def format_report(report: Mapping[str, Any]) -> str:
    """The report as markdown: power, the forward-KL table, the claims and their verdicts."""
    rounds = report["rounds"]
    lines = ["# Testbed report", ""]
    control = report["positive_control"]
    lines.append("## Positive control (continued SFT on 4N against N)")
    for pair in control["pairs"]:
        outcome = "resolved" if pair["resolved"] else "NOT resolved"
        if not pair.get("within_budget", True):
            outcome += (
                f" (not counted: a chain sees {control['rows_seen']} rows, fewer than "
                f"{pair['four_n']}, so it cannot use up the larger set)"
            )
        lines.append(
            f"- N={pair['n']} -> {pair['four_n']}: forward KL difference "
            f"{_fmt(pair['difference'])} nats: {outcome}"
        )
    if not any(p.get("within_budget", True) for p in control["pairs"]):
        lines.append("- no (N, 4N) pair in the grid within the rows a chain sees")
    lines.append("")
    lines.append(
        f"## Forward KL to p_data after {rounds} round(s) (nats/sequence, mean over seeds, 95% interval)"
    )
    ns = sorted({n for row in report["table"].values() for n in row})
    lines.append("| method | " + " | ".join(f"N={n}" for n in ns) + " |")
    lines.append("|---" * (len(ns) + 1) + "|")
    for method, row in report["table"].items():
        cells = [_fmt(row[n]["forward_kl"]) if n in row else "" for n in ns]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("Paired difference to continued SFT (equal steps; negative: closer to p_data):")
    lines.append("")
    lines.append("| method | " + " | ".join(f"N={n}" for n in ns) + " |")
    lines.append("|---" * (len(ns) + 1) + "|")
    for method, row in report["table"].items():
        if method == BASELINE:
            continue
        cells = [_fmt(row[n]["vs_continued_sft"]) if n in row else "" for n in ns]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    if report["losses"]:
        lines += ["", f"## GSIL losses at N={report['grid']['loss_n']}", ""]
        lines.append(
            "| loss | forward KL | vs continued SFT | f vs log(p_N/pi_ref): RMSE | correlation |"
        )
        lines.append("|---|---|---|---|---|")
        for name, row in report["losses"].items():
            fit = row["classifier"]
            lines.append(
                f"| {name} | {_fmt(row['forward_kl'])} | {_fmt(row['vs_continued_sft'])} | "
                f"{_fmt(fit['empirical_rmse'])} | {_fmt(fit['empirical_correlation'])} |"
            )
    negative = report.get("negative_control")
    if negative is not None:
        lines += ["", "## Negative control", ""]
        lines.append(
            f"GSIL-logistic with shift {negative['shift']} minus shift 0 at N={negative['n']}, "
            f"forward KL after {rounds} rounds: {_fmt(negative['vs_gsil_logistic'])} nats "
            f"({'detected' if negative['detected'] else 'NOT detected'})"
        )
    per_round = report.get("per_round", {})
    if per_round:
        lines += ["", f"## Per round at N={report['grid']['loss_n']} (round 0: the base)", ""]
        lines.append(
            "| method | measure | " + " | ".join(f"round {t}" for t in range(rounds + 1)) + " |"
        )
        lines.append("|---" * (rounds + 3) + "|")
        for name in (*ROUND_METHODS, NEGATIVE):
            if name not in per_round:
                continue
            for key, label in (("forward_kl", "forward KL"), ("demo_logp", "demo log-lik")):
                cells = [_fmt(per_round[name][t][key]) for t in range(rounds + 1)]
                lines.append(f"| {name} | {label} | " + " | ".join(cells) + " |")
    lines += ["", "## Verdicts", ""]
    if report["verdicts"] is None:
        lines.append(
            "The positive control is not resolved: the grid has no power to see an effect of "
            "that size, so no verdicts are stated. Add seeds or steps."
        )
    else:
        for claim, text in report["verdicts"].items():
            lines.append(f"- **{claim}**: " + text.replace("\n", "\n  - "))
    return "\n".join(lines) + "\n"
