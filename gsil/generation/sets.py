"""Generated sets for the trainer: a JSONL of responses (k per prompt) with a sidecar of the
settings that made it, reused when a resumed run asks for the same thing."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from accelerate import Accelerator

from gsil.data import encode_instruction_prompt, encode_prompt, save_jsonl
from gsil.generation import core
from gsil.generation.common import Decoding, GenerationSettings
from gsil.generation.core import resolve_backend
from gsil.integrity import CorruptFileError, check_file, file_record
from gsil.io import atomic_file

SETTINGS_FORMAT_VERSION = 3  # 2: sampling seeded per batch; 3: k samples per prompt (rows)
logger = logging.getLogger(__name__)


class DemonstrationLike(Protocol):
    """What :func:`generate_set` needs from a demonstration (``gsil.data.Demonstration``)."""

    id: Any
    prompt: Any
    response: str


@dataclass(frozen=True)
class SetRequest:
    """What a generated set is asked for: the ``generation`` section, the round's ``seed``,
    the prompt limit, ``extra_settings`` that tag the policy (e.g. the round, the precision)
    and whether to show progress."""

    generation: GenerationSettings
    seed: int
    max_prompt_length: int | None = None
    extra_settings: Mapping[str, Any] | None = None
    progress: bool = True

    @property
    def decoding(self) -> Decoding:
        """The generation section's decoding, seeded with the request's ``seed``."""
        return self.generation.decoding(self.seed)


def generate_set(
    model: Any,
    tokenizer: Any,
    demos: Sequence[DemonstrationLike],
    path: str | os.PathLike[str],
    request: SetRequest,
    accelerator: Accelerator | None = None,
) -> list[str]:
    """Generate ``generation.num_samples`` responses to each demonstration's prompt, cached as
    JSONL at ``path``.

    Prompts are encoded as training encodes them (:func:`gsil.data.encode_prompt`), or, with
    ``generation.prompt_format`` instruction, as SPIN's and GSIL's public code generated
    (:func:`gsil.data.encode_instruction_prompt`).

    If ``path`` and its sidecar ``path.with_suffix(".settings.json")`` exist and record the same
    settings -- decoding settings and ``num_samples``, the encoded prompt token ids (so a
    changed tokenizer or template counts as a change), the demonstrations, and
    ``extra_settings`` (e.g. the round or policy checkpoint) -- the file is reused. Otherwise
    responses are generated and written atomically. ``batch_size``, ``backend`` and
    ``progress`` do not affect reuse.

    The k samples of a prompt are k requests of their own, each seeded apart from the others
    (HF: the batch's seed, drawn row by row; vLLM: ``seed`` + the request's number), so they
    differ, and the same ``seed`` repeats them. k > 1 needs ``do_sample``
    (``GenerationSettings`` checks it).

    Each JSONL row is one response: ``id, sample, prompt, demo_response, generated_response,
    num_tokens, truncated, tie``, where ``sample`` is j in 0..k-1 (a prompt's k rows are
    consecutive) and ``tie`` says this response equals the demonstration (after stripping
    whitespace): ties are counted per response.

    Returns:
        The generated responses, prompt-major: response j to ``demos[i]`` is at
        ``i * num_samples + j`` (one per demonstration, in order, when ``num_samples`` is 1).
    """
    path = Path(path)
    num_samples = request.generation.num_samples
    if request.generation.prompt_format == "instruction":
        prompt_ids = [encode_instruction_prompt(tokenizer, demo.prompt) for demo in demos]
    else:
        prompt_ids = [
            encode_prompt(tokenizer, demo.prompt, request.max_prompt_length) for demo in demos
        ]
    settings = _set_settings(demos, prompt_ids, request)
    cached = _load_matching_set(path, settings, demos, num_samples)
    if cached is not None:
        return cached

    # request i * k + j is sample j of prompt i: its own row of an HF batch, its own vLLM seed
    decoding = request.decoding
    results = core.generate_from_ids(
        model,
        tokenizer,
        [ids for ids in prompt_ids for _ in range(num_samples)],
        decoding,
        progress=request.progress,
        accelerator=accelerator,
    )
    rows = [
        {
            "id": demo.id,
            "sample": number % num_samples,
            "prompt": demo.prompt,
            "demo_response": demo.response,
            "generated_response": result.text,
            "num_tokens": result.num_tokens,
            "truncated": result.truncated,
            "tie": result.text.strip() == demo.response.strip(),
        }
        for number, (demo, result) in enumerate(
            zip([d for d in demos for _ in range(num_samples)], results, strict=True)
        )
    ]
    if accelerator is None or accelerator.is_main_process:
        sidecar = settings_path(path)
        # Drop the old sidecar first: a crash between the two writes then leaves no stale match.
        sidecar.unlink(missing_ok=True)
        save_jsonl(rows, path)
        record = {
            "settings": settings,
            "backend": resolve_backend(decoding.backend, model),
            "num_rows": len(rows),
            "files": {path.name: file_record(path)},  # size and sha256, checked before reuse
        }
        with atomic_file(sidecar) as handle:
            handle.write(json.dumps(record, indent=2, sort_keys=True) + "\n")
    if accelerator is not None:
        accelerator.wait_for_everyone()  # the files exist before any process reads them
    return [row["generated_response"] for row in rows]


def settings_path(path: str | os.PathLike[str]) -> Path:
    """The sidecar that records the settings of the generated set at ``path``."""
    return Path(path).with_suffix(".settings.json")


def read_generated_set(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Read the rows of a generated-set JSONL file (for metrics such as tie rate, lengths)."""
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def read_previous_set(
    path: str | os.PathLike[str], demos: Sequence[DemonstrationLike], num_samples: int
) -> list[str]:
    """The responses of an earlier round's generated set at ``path``, checked: its sidecar's
    size and sha256, its ``num_samples`` (k) and one row per (demonstration, sample) in the
    order of ``demos``. Laid out as :func:`generate_set` returns them (prompt-major).

    Raises:
        CorruptFileError: the set or its sidecar is missing, changed since it was written, or
            made for other demonstrations or another k; the message names the file and the fix.
    """
    path, sidecar = Path(path), settings_path(path)
    fix = (
        "Mix only sets made for the same demonstrations and --num-samples (the round before, "
        "or the last round of the run whose model this run starts from), or run without "
        "--mix-previous-generations"
    )
    if not (path.is_file() and sidecar.is_file()):
        raise CorruptFileError(
            path, "the earlier round's generated set or its sidecar is missing", fix
        )
    record = json.loads(sidecar.read_text(encoding="utf-8"))
    check_file(path, record["files"][path.name], source=sidecar, fix=fix)
    made_with = record["settings"]["num_samples"]
    if made_with != num_samples:
        raise CorruptFileError(
            path, f"holds {made_with} samples per prompt, not {num_samples}", fix
        )
    rows = read_generated_set(path)
    expected = [(_json_value(d.id), j) for d in demos for j in range(num_samples)]
    found = [(row.get("id"), row.get("sample", 0)) for row in rows]
    if found != expected:
        raise CorruptFileError(
            path, f"holds {len(rows)} rows for other demonstrations than this run's", fix
        )
    return [row["generated_response"] for row in rows]


def _set_settings(
    demos: Sequence[DemonstrationLike], prompt_ids: Sequence[Sequence[int]], request: SetRequest
) -> dict[str, Any]:
    """Everything that determines a generated set, as a JSON-comparable dict."""
    decoding = request.decoding
    do_sample = decoding.do_sample
    demo_record = [[demo.id, demo.prompt, demo.response] for demo in demos]
    # top-k only when it applies (sampling, k > 0), so sets made before it existed still match
    top_k_setting = {"top_k": decoding.top_k} if do_sample and decoding.top_k else {}
    return {
        "format_version": SETTINGS_FORMAT_VERSION,
        "max_new_tokens": decoding.max_new_tokens,
        "do_sample": do_sample,
        # Greedy output does not depend on these, so they must not force regeneration.
        "temperature": decoding.temperature if do_sample else None,
        "top_p": decoding.top_p if do_sample else None,
        "seed": decoding.seed if do_sample else None,
        "max_prompt_length": request.max_prompt_length,
        "num_samples": request.generation.num_samples,
        "num_prompts": len(demos),
        "prompt_ids_sha256": _sha256_json([list(ids) for ids in prompt_ids]),
        "demos_sha256": _sha256_json(demo_record),
        # A JSON round trip makes tuples and lists compare equal with what was read back.
        "extra": json.loads(
            json.dumps(dict(request.extra_settings or {}), sort_keys=True, default=str)
        ),
        **top_k_setting,
    }


def _load_matching_set(
    path: Path, settings: Mapping[str, Any], demos: Sequence[DemonstrationLike], num_samples: int
) -> list[str] | None:
    """Return the cached responses if ``path`` was made with ``settings``, else None.

    A set to be reused must first match the size and sha256 its sidecar recorded (a sidecar
    from before those were recorded: a warning).

    Raises:
        CorruptFileError: the JSONL was truncated or changed since it was written.
    """
    sidecar = settings_path(path)
    if not (path.is_file() and sidecar.is_file()):
        return None
    try:
        record = json.loads(sidecar.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None  # unreadable or half-written: regenerate
    if not isinstance(record, dict) or record.get("settings") != settings:
        return None
    files = record.get("files")
    recorded = files.get(path.name) if isinstance(files, dict) else None
    if recorded is None:
        logger.warning(
            "generated set %s: its sidecar records no checksum (written before gsil "
            "recorded them); reused unchecked",
            path,
        )
    else:
        check_file(
            path,
            recorded,
            source=sidecar,
            fix=f"Delete {path} and {sidecar.name} to generate the round's responses again",
        )
    try:
        rows = read_generated_set(path)
    except (OSError, json.JSONDecodeError):
        return None  # unreadable or half-written: regenerate
    if len(rows) != len(demos) * num_samples:
        return None
    for number, row in enumerate(rows):
        demo = demos[number // num_samples]
        if row.get("id") != _json_value(demo.id) or row.get("sample", 0) != number % num_samples:
            return None
    return [row["generated_response"] for row in rows]


def _json_value(value: Any) -> Any:
    """``value`` as it reads back from JSON (tuples become lists, etc.)."""
    return json.loads(json.dumps(value, default=str))


def _sha256_json(value: Iterable[Any]) -> str:
    encoded = json.dumps(value, sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.sha256(encoded.encode("utf-8")).hexdigest()
