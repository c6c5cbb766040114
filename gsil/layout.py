"""Where a run keeps its files: the one module that spells the run-directory layout.

    <run>/config.json                   the full resolved configuration
    <run>/metrics.jsonl                 one row per optimizer step
    <run>/summary.json                  the run's figures; its presence marks the run finished
    <run>/checkpoint/                   latest in-round state (model, optimizer, scheduler, RNG)
    <run>/checkpoint/manifest.json      sha256 and size of each checkpoint file (gsil.integrity)
    <run>/trackers/                     experiment trackers' files (TensorBoard events, ...)
    <run>/round_<t>/generated.jsonl     the round's self-generated set (+ generated.settings.json)
    <run>/round_<t>/reference_logps.pt  the round's reference log-probs (+ .manifest.json)
    <run>/round_<t>/method_state.pt     a stateful method's state at the round's end (DFT's u)
    <run>/round_<t>/model/              the policy after the round (+ model/manifest.json)
    <run>/round_<t>/model_loss_state.pt what a method's ModelLoss hands the next round (SDFT's
                                        EMA teacher; + .manifest.json)
    <run>/round_<t>/summary.json        the round's figures; its presence marks the round done
    <run>/round_<t>/eval/               benchmark results of that round's model
    <run>/round_<t>/eval/request.json   what each benchmark there was asked for (limit, dtype...)
    <run>/round_<t>/eval-validation/    its validation-split results (choosing settings)

The generated set's sidecar (``generated.settings.json``) records the sha256 and size of the
JSONL; the other artefacts have a manifest (:func:`manifest_path`).

An experiment (a pipeline) is a directory of such runs plus its own ``pipeline.json``,
``summary.json``, ``report.md`` and ``figures/``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

_ROUND = re.compile(r"^round_(\d+)$")
MANIFEST = "manifest.json"  # a directory artefact's manifest, inside it
EVAL_REQUEST = "request.json"  # in an eval directory: what each benchmark was asked for


@dataclass(frozen=True)
class RunLayout:
    """The paths of one run directory."""

    root: Path

    def __init__(self, root: str | Path) -> None:
        object.__setattr__(self, "root", Path(root))

    @property
    def config(self) -> Path:
        return self.root / "config.json"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def summary(self) -> Path:
        return self.root / "summary.json"

    @property
    def checkpoint(self) -> Path:
        return self.root / "checkpoint"

    @property
    def checkpoint_staging(self) -> Path:
        return self.root / ".checkpoint.staging"

    @property
    def trackers(self) -> Path:
        return self.root / "trackers"

    def round_dir(self, round_index: int) -> Path:
        return self.root / f"round_{round_index}"

    def generated(self, round_index: int) -> Path:
        return self.round_dir(round_index) / "generated.jsonl"

    def generated_settings(self, round_index: int) -> Path:
        return self.round_dir(round_index) / "generated.settings.json"

    def reference_logps(self, round_index: int) -> Path:
        return self.round_dir(round_index) / "reference_logps.pt"

    def method_state(self, round_index: int) -> Path:
        """A stateful method's per-example state at the round's end (+ .manifest.json)."""
        return self.round_dir(round_index) / "method_state.pt"

    def model(self, round_index: int) -> Path:
        return self.round_dir(round_index) / "model"

    def model_loss_state(self, round_index: int) -> Path:
        return self.round_dir(round_index) / "model_loss_state.pt"

    def round_summary(self, round_index: int) -> Path:
        return self.round_dir(round_index) / "summary.json"

    def eval_dir(self, round_index: int, split: str = "test") -> Path:
        """Benchmark results of the round's model: ``eval/`` (test items), or
        ``eval-validation/`` (validation items, for choosing settings)."""
        name = "eval" if split == "test" else f"eval-{split}"
        return self.round_dir(round_index) / name

    def round_dirs(self) -> list[Path]:
        """Existing ``round_<t>`` directories, by round."""
        found = [p for p in self.root.glob("round_*") if _ROUND.match(p.name)]
        return sorted(found, key=lambda p: int(_ROUND.match(p.name).group(1)))

    def finished_rounds(self) -> list[int]:
        """Rounds whose ``summary.json`` exists, in order."""
        return [round_index(p) for p in self.round_dirs() if (p / "summary.json").exists()]

    def is_run(self) -> bool:
        """Whether ``root`` holds a run (its config and metrics or summary)."""
        return self.config.is_file() and (self.metrics.exists() or self.summary.exists())


def round_index(round_dir: Path) -> int:
    """``round_3`` -> 3."""
    match = _ROUND.match(Path(round_dir).name)
    if match is None:
        raise ValueError(f"{round_dir} is not a round directory (round_<t>)")
    return int(match.group(1))


def manifest_path(artefact: str | Path) -> Path:
    """Where the manifest (sha256 and size of each file, :mod:`gsil.integrity`) of ``artefact``
    is: inside a directory, so that it is replaced with it, whole (``checkpoint/manifest.json``,
    ``round_<t>/model/manifest.json``); beside a file, its suffix replaced
    (``reference_logps.pt`` -> ``reference_logps.manifest.json``)."""
    path = Path(artefact)
    return path / MANIFEST if path.is_dir() else path.with_suffix(".manifest.json")


def run_of_model(model_dir: str | Path) -> tuple[RunLayout, int] | None:
    """``<run>/round_<t>/model`` -> (the run's layout, t); None for any other directory."""
    path = Path(model_dir)
    if path.name == "model" and _ROUND.match(path.parent.name):
        return RunLayout(path.parent.parent), round_index(path.parent)
    return None
