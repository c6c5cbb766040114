"""What a run refuses to trust: damaged files, and optimizer steps with a non-finite value.

Files. Every artefact a run reads back (a resumed run, a reused generated set, a later stage
starting from a round's model) records, when it is written, the size and sha256 of each of its
files; its loader checks them first and refuses a mismatch with :class:`CorruptFileError`,
naming the file, what was recorded, what was found, and the fix. Never a silent load.

    artefact                        record (gsil.layout)                written by
    ------------------------------  ----------------------------------  -----------------------
    round_<t>/generated.jsonl       its sidecar generated.settings.json gsil.generation.sets
                                    ("files")
    round_<t>/reference_logps.pt    round_<t>/reference_logps.manifest  gsil.trainer
                                    .json                               (prepare_round)
    round_<t>/model/                round_<t>/model/manifest.json       gsil.optimization
                                                                        (save_round_model)
    checkpoint/                     checkpoint/manifest.json            gsil.optimization
                                                                        (_save_checkpoint)

A directory's manifest is written inside it before it is swapped in whole, a file's manifest
after the file (the stale one removed first): a crash leaves either a matching manifest or none.
An artefact with no manifest (written before manifests existed) is loaded with a warning.
Recording and checking read every byte of the artefact once (sha256): for a large checkpoint
(weights and optimizer state) that is one more full read at each save and at each resume.

Steps. :class:`NonFiniteError` is what ``--on-nonfinite stop`` raises when a micro-batch loss
or the step's gradient norm is NaN or infinite (``gsil.optimization.optimizer_step``); the
helpers below make that decision the same on every process.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from gsil.io import read_json, write_json
from gsil.layout import manifest_path

logger = logging.getLogger(__name__)

MANIFEST_FORMAT = 1
_CHUNK = 1 << 20


class CorruptFileError(RuntimeError):
    """A file does not match the size or sha256 recorded when it was written (or is missing).

    ``path`` is the damaged file, ``problem`` what was recorded against what was found, ``fix``
    what to delete (or do) so that the run makes the artefact again.
    """

    def __init__(self, path: str | os.PathLike[str], problem: str, fix: str) -> None:
        self.path, self.problem, self.fix = Path(path), problem, fix
        super().__init__(f"{self.path}: {problem}. {fix}")

    def __reduce__(self):
        return type(self), (self.path, self.problem, self.fix)


def file_record(path: str | os.PathLike[str]) -> dict[str, Any]:
    """``{"size": bytes, "sha256": hex digest}`` of one file."""
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return {"size": size, "sha256": digest.hexdigest()}


def check_file(
    path: str | os.PathLike[str],
    record: dict[str, Any],
    *,
    source: str | os.PathLike[str],
    fix: str,
) -> None:
    """Refuse ``path`` unless it has the ``size`` and ``sha256`` of ``record`` (read from
    ``source``, named in the message).

    Raises:
        CorruptFileError: the file is missing, has another size (truncated, or overwritten)
            or another content.
    """
    path = Path(path)
    if not path.is_file():
        raise CorruptFileError(
            path, f"missing, but {source} records it ({record.get('size')} bytes)", fix
        )
    size = path.stat().st_size
    if size != record.get("size"):
        raise CorruptFileError(
            path,
            f"{size} bytes, but {source} records {record.get('size')} bytes "
            "(truncated or overwritten)",
            fix,
        )
    found = file_record(path)["sha256"]
    if found != record.get("sha256"):
        raise CorruptFileError(
            path,
            f"sha256 {found[:16]}..., but {source} records {str(record.get('sha256'))[:16]}"
            "... (same size, changed content)",
            fix,
        )


def write_manifest(artefact: str | os.PathLike[str]) -> Path:
    """Record the size and sha256 of ``artefact`` (a file) or of every file under it (a
    directory, its manifest excepted) in its manifest (:func:`gsil.layout.manifest_path`),
    written atomically. Returns the manifest's path."""
    artefact = Path(artefact)
    manifest = manifest_path(artefact)
    if artefact.is_dir():
        base = artefact
        files = sorted(p for p in artefact.rglob("*") if p.is_file() and p != manifest)
    else:
        base, files = artefact.parent, [artefact]
    records = {p.relative_to(base).as_posix(): file_record(p) for p in files}
    write_json(manifest, {"format": MANIFEST_FORMAT, "files": records})
    return manifest


def discard_manifest(artefact: str | os.PathLike[str]) -> None:
    """Remove a file artefact's manifest before the file is written again: a crash before the
    new manifest then leaves a file without one (loaded with a warning), never a stale one."""
    manifest_path(artefact).unlink(missing_ok=True)


def verify_manifest(
    artefact: str | os.PathLike[str], *, what: str, fix: str, warn_missing: bool = True
) -> bool:
    """Check ``artefact`` (a file or a directory) against its manifest, before loading it.

    Every file the manifest lists must exist with its recorded size and sha256; files it does
    not list are ignored. Returns True when checked, False when there is no manifest (an
    artefact from before manifests: logged as a warning when ``warn_missing``).

    Raises:
        CorruptFileError: naming the first damaged file (or the unreadable manifest) and ``fix``.
    """
    artefact = Path(artefact)
    manifest = manifest_path(artefact)
    if not manifest.is_file():
        if warn_missing:
            logger.warning(
                "%s %s has no manifest (%s): written before gsil recorded checksums, "
                "loaded unchecked",
                what,
                artefact,
                manifest.name,
            )
        return False
    try:
        files = read_json(manifest)["files"]
        items = [(str(name), dict(record)) for name, record in files.items()]
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        raise CorruptFileError(
            manifest,
            f"the manifest of {what} {artefact} is unreadable ({type(error).__name__}: {error})",
            fix,
        ) from error
    base = artefact if artefact.is_dir() else artefact.parent
    for name, record in items:
        check_file(base / name, record, source=manifest, fix=fix)
    return True


class NonFiniteError(RuntimeError):
    """A micro-batch loss or the gradient norm of an optimizer step is NaN or infinite.

    Raised (``--on-nonfinite stop``) before the optimizer steps, on every process alike:
    the weights are those before the step and the last checkpoint on disk is untouched.
    ``quantity`` is ``"loss"`` or ``"gradient norm"``, ``example_ids`` the offending examples
    (those with a non-finite loss; for the gradient, every example of the step), ``where`` the
    round and step once :func:`gsil.optimization.train_round` has filled it in.
    """

    def __init__(
        self, quantity: str, example_ids: Sequence[Any], where: str = "", applied: bool = False
    ) -> None:
        self.quantity, self.example_ids, self.applied = quantity, list(example_ids), applied
        self.where = where
        super().__init__(quantity)

    def __reduce__(self):
        return type(self), (self.quantity, self.example_ids, self.where, self.applied)

    def describe(self) -> str:
        """What was non-finite, where, and for which examples."""
        where = f" at {self.where}" if self.where else ""
        return f"non-finite {self.quantity}{where}, examples {self.example_ids}"

    def __str__(self) -> str:
        state = (
            "DeepSpeed had already applied this step (its engine steps inside backward): the "
            "weights in memory are not to be trusted; the last checkpoint on disk is untouched"
            if self.applied
            else "the optimizer did not step: the weights are those before this step and the "
            "last checkpoint on disk is untouched"
        )
        return (
            f"{self.describe()}: {state}. Check these examples and the learning rate (a "
            "resumed run repeats the same step); --on-nonfinite skip drops such steps' updates "
            "instead"
        )


def nonfinite_rows(losses: torch.Tensor, indices: Sequence[int]) -> list[int]:
    """The entries of ``indices`` whose loss (row of ``losses``: one per index, any trailing
    dimensions) is NaN or infinite; all of ``indices`` if the shapes do not pair up."""
    values = losses.detach()
    if values.numel() and bool(torch.isfinite(values).all()):
        return []
    if values.dim() == 0 or values.shape[0] != len(indices):
        return list(indices)
    bad = ~torch.isfinite(values.reshape(len(indices), -1)).all(dim=1)
    return [index for index, flag in zip(indices, bad.tolist(), strict=True) if flag]


def any_process(accelerator: Any, flag: bool) -> bool:
    """Whether ``flag`` holds on any process: one all-reduce, so every process must call it
    (and then takes the same decision)."""
    if accelerator.num_processes == 1:
        return flag
    total = accelerator.reduce(
        torch.tensor([float(flag)], device=accelerator.device), reduction="sum"
    )
    return bool(total.item() > 0)


def all_processes(accelerator: Any, local: Sequence[Any]) -> list[Any]:
    """Every process's ``local`` items, concatenated in rank order (a collective)."""
    if accelerator.num_processes == 1:
        return list(local)
    from accelerate.utils import gather_object

    return list(gather_object(list(local)))
