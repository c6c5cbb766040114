"""What a run refuses to trust: damaged files.

Files. Every artefact a run reads back (a resumed run, a reused generated set, a later stage
starting from a round's model) records, when it is written, the size and sha256 of each of its
files; its loader checks them first and refuses a mismatch with :class:`CorruptFileError`,
naming the file, what was recorded, what was found, and the fix. Never a silent load.

    artefact                        record (gsil.layout)                written by
    ------------------------------  ----------------------------------  -----------------------
    round_<t>/generated.jsonl       its sidecar generated.settings.json gsil.generation.sets
                                    ("files")
    round_<t>/reference_logps.pt    round_<t>/reference_logps.manifest  gsil.trainer
                                    .json                               (SelfImitation)
    round_<t>/model/                round_<t>/model/manifest.json       gsil.optimization
                                                                        (save_round_model)
    checkpoint/                     checkpoint/manifest.json            gsil.optimization
                                                                        (_save_checkpoint)

A directory's manifest is written inside it before it is swapped in whole, a file's manifest
after the file (the stale one removed first): a crash leaves either a matching manifest or none.
An artefact with no manifest (written before manifests existed) is loaded with a warning.
Recording and checking read every byte of the artefact once (sha256): for a large checkpoint
(weights and optimizer state) that is one more full read at each save and at each resume.

Steps with a NaN or infinite loss or gradient norm are :mod:`gsil.nonfinite`'s.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any, TypeVar

from gsil.io import atomic_file, read_json, write_json
from gsil.layout import manifest_path

logger = logging.getLogger(__name__)

MANIFEST_FORMAT = 1
T = TypeVar("T")
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


def write_recorded(path: str | os.PathLike[str], write: Callable[[IO[bytes]], None]) -> None:
    """Write a file artefact atomically and record it: ``write(handle)`` fills a temporary
    file that replaces ``path`` whole, then its manifest is written. The stale manifest goes
    first, so a crash leaves either a matching manifest or none, never a stale one."""
    discard_manifest(path)
    with atomic_file(path, "wb") as handle:
        write(handle)
    write_manifest(path)


def read_recorded(
    path: str | os.PathLike[str], read: Callable[[Path], T], *, what: str, fix: str
) -> T:
    """Check a file artefact against its manifest, then ``read(path)`` it.

    Raises:
        CorruptFileError: the file is missing, truncated or changed, or ``read`` failed on it;
            the message names the file, ``what`` it is, and ``fix``.
    """
    path = Path(path)
    verify_manifest(path, what=what, fix=fix)
    try:
        return read(path)
    except Exception as error:  # torch.load raises pickle, zip and runtime errors alike
        raise CorruptFileError(path, f"unreadable {what} ({error!r})", fix) from error


def discard_recorded(path: str | os.PathLike[str]) -> None:
    """Remove a file artefact and its manifest."""
    discard_manifest(path)
    Path(path).unlink(missing_ok=True)
