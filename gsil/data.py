"""Demonstrations: loading, validation, the one prompt format, and tokenization.

A demonstration is a (prompt, response) pair. Sources, named by :class:`DataSettings`
(the run configuration's ``data`` section) and read by ``load_demonstrations``:

- a local ``.jsonl`` / ``.json`` / ``.parquet`` file (field names configurable),
- ``rg:task1,task2``: reasoning-gym tasks with worked solutions; ``gsil.reasoning_tasks`` also
  holds the answer format (``extract_final_answer``), ``score_answer`` and ``split_seed``,
- anything else: a Hugging Face hub dataset name, loaded with ``datasets.load_dataset``.

A prompt is either a string (one user turn) or a list of chat messages
``[{"role": ..., "content": ...}, ...]`` ending in a user turn.

``format_prompt`` is the single place where a prompt becomes model text; generation, training
and evaluation all go through it (via ``encode_prompt``), so the prompt ids the policy sees
when answering are exactly the prefix of the ids it is trained on.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# the types live in gsil.demonstrations (shared with gsil.reasoning_tasks); re-exported here
from gsil.demonstrations import (  # noqa: F401
    DataError,
    Demonstration,
    Demonstrations,
    Prompt,
    PromptTooLong,
)
from gsil.io import atomic_file
from gsil.reasoning_tasks import DEFAULT_REASONING_TASKS, load_reasoning_demonstrations

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100  # label value that the cross-entropy / log-prob code skips
LOCAL_SUFFIXES = (".jsonl", ".json", ".parquet")
CHAT_ROLES = ("system", "user", "assistant")
# Used only when a tokenizer has no chat template (base models). Each message becomes
# "### <Role>:\n<content>\n\n" and the prompt ends with "### Assistant:\n", preceded by the
# tokenizer's BOS token text when it has one (encode_prompt adds no special tokens itself).
FALLBACK_TURN = "### {role}:\n{content}\n\n"
FALLBACK_GENERATION_PROMPT = "### Assistant:\n"


class _InvalidRecord(Exception):
    """Internal: one record is bad; ``reason`` is the skip-count key, ``message`` the advice."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason
        self.message = message


# --------------------------------------------------------------------------- loading


@dataclass(frozen=True)
class TokenLimits:
    """How long a training example may be: its prompt at most ``max_prompt_length`` tokens
    (None: no limit; a longer prompt is an error), prompt + response at most ``max_length``
    (responses are cut, see :func:`encode_response`)."""

    max_prompt_length: int | None
    max_length: int


def _setting(default, help: str, **metadata):
    """A settings field whose ``help`` is its command-line documentation (experiments.config)."""
    return field(default=default, metadata={"help": help, **metadata})


@dataclass(frozen=True)
class DataSettings:
    """Which demonstrations, and their token lengths: the run configuration's ``data`` section."""

    source: str = _setting(
        "rg:" + ",".join(DEFAULT_REASONING_TASKS),
        "demonstrations: a .jsonl/.json/.parquet "
        "file, 'rg:task1,task2' (reasoning-gym, generated offline), or a hub "
        "dataset",
        flag="data",
    )
    prompt_field: str = _setting(
        "prompt", "record field holding the prompt (string or chat messages)"
    )
    response_field: str = _setting("response", "record field holding the demonstration response")
    split: str = _setting("train", "dataset split (hub datasets; 'train' for reasoning-gym)")
    num_demos: int | None = _setting(
        64, "number of demonstrations to use (None: all; required for rg: sources)"
    )
    skip_invalid: bool = _setting(
        False, "drop bad records (counted and reported) instead of stopping"
    )
    max_prompt_length: int = _setting(256, "longest prompt in tokens (longer ones are bad records)")
    max_length: int = _setting(512, "longest prompt + response in tokens (responses are cut)")
    truncate_prompts: bool = _setting(
        False,
        "cut prompts longer than max_prompt_length from the left (their text; the chat "
        "template's markers stay) instead of treating them as bad records (an error, or "
        "dropped with --skip-invalid); the GSIL authors' code keeps a long prompt's end",
    )

    def token_limits(self) -> TokenLimits:
        """The lengths a training example may take (``gsil.batching.build_examples``)."""
        return TokenLimits(self.max_prompt_length, self.max_length)


def load_demonstrations(
    settings: DataSettings, *, seed: int = 0, tokenizer: Any = None
) -> Demonstrations:
    """Load and validate the demonstrations ``settings`` names: from a file, reasoning-gym
    tasks or the hub.

    ``settings`` (:class:`DataSettings`):

    - ``source``: a path ending in .jsonl/.json/.parquet; ``"rg:task1,task2"``; or a hub dataset.
    - ``prompt_field``, ``response_field``: record fields holding the prompt and the response.
    - ``split``: hub split; for ``rg:`` sources ``"train"`` or ``"test"`` (disjoint seeds, see
      ``gsil.reasoning_tasks.split_seed``); ignored for local files.
    - ``num_demos``: at most this many records (first ones; None: all); required for ``rg:``
      sources, where it is split evenly over the tasks.
    - ``skip_invalid``: drop bad records (counted by reason in ``.skipped`` and logged)
      instead of raising ``DataError``.
    - ``max_prompt_length``, ``truncate_prompts``: with a ``tokenizer``, prompts whose
      formatted length exceeds the limit count as bad records, or with ``truncate_prompts``
      are cut from the left to fit (:func:`truncate_prompt_left`;
      ``meta["prompt_truncated_tokens"]`` says by how much). Without a tokenizer prompt
      lengths are not checked.

    ``seed`` is the reasoning-gym seed (local and hub records are kept in file order).

    Raises:
        DataError: naming the file, line (JSONL, 1-based) or index (JSON/Parquet, 0-based) and
            field of the first bad record, with how to fix it.
    """
    source, size, split = settings.source, settings.num_demos, settings.split
    prompt_field, response_field = settings.prompt_field, settings.response_field
    skip_invalid, truncate_prompts = settings.skip_invalid, settings.truncate_prompts
    max_prompt_length = settings.max_prompt_length
    if size is not None and size < 0:
        raise DataError(f"num_demos must be >= 0 or None, got {size}")
    skipped: Counter[str] = Counter()
    if source.startswith("rg:"):
        if size is None:
            raise DataError(
                f"{source!r}: reasoning-gym sources need num_demos=N (items to generate; "
                "--num-demos)"
            )
        demos = load_reasoning_demonstrations(source[3:], size=size, seed=seed, split=split)
        skipped.update(demos.skipped)
        records: Iterator[tuple[str, Any]] = ((d.meta["location"], d) for d in demos)
    else:
        records = _raw_records(source, split)

    kept: list[Demonstration] = []
    truncated = 0
    first_seen: dict[str, str] = {}  # an explicit id -> where it first appeared
    for location, record in records:
        if size is not None and len(kept) >= size:
            break
        try:
            if isinstance(record, _InvalidRecord):
                raise record
            demo = record
            if not isinstance(record, Demonstration):
                demo = _to_demonstration(record, location, prompt_field, response_field)
            if demo.id != location:  # ids given by the data (not the fallback location)
                if demo.id in first_seen:
                    raise _InvalidRecord(
                        "duplicate_id",
                        f"field 'id': {demo.id!r} was already used at {first_seen[demo.id]}; "
                        "ids must be unique (fix the duplicate, or drop the 'id' field to use "
                        "line numbers)",
                    )
                first_seen[demo.id] = location
            if tokenizer is not None and max_prompt_length is not None:
                try:
                    if truncate_prompts:
                        prompt, cut = truncate_prompt_left(
                            tokenizer, demo.prompt, max_prompt_length
                        )
                        if cut:
                            meta = {**demo.meta, "prompt_truncated_tokens": cut}
                            demo = dataclasses.replace(demo, prompt=prompt, meta=meta)
                            truncated += 1
                    else:
                        encode_prompt(tokenizer, demo.prompt, max_prompt_length)
                except PromptTooLong as err:
                    raise _InvalidRecord(
                        "prompt_too_long", f"field {prompt_field!r}: {err}"
                    ) from None
        except _InvalidRecord as bad:
            if not skip_invalid:
                raise DataError(f"{location}: {bad.message}") from None
            skipped[bad.reason] += 1
            continue
        kept.append(demo)

    if truncated:
        logger.info(
            "%s: %d prompts cut from the left to max_prompt_length=%d tokens",
            source,
            truncated,
            max_prompt_length,
        )
    if skipped:
        logger.warning("%s: skipped %d records (%s)", source, sum(skipped.values()), dict(skipped))
    if not kept and size != 0:
        if skipped:
            hint = "; rerun without --skip-invalid to see the first bad one" * skip_invalid
            raise DataError(
                f"{source}: no usable demonstrations, every record was skipped "
                f"({dict(skipped)}){hint}"
            )
        raise DataError(
            f"{source}: no demonstrations in it (an empty file?); give a file with "
            "one record per line (JSONL) or a non-empty list (JSON)"
        )
    return Demonstrations(kept, skipped)


def _raw_records(source: str, split: str) -> Iterator[tuple[str, Any]]:
    """Yield (location, record dict or _InvalidRecord) for a local file or a hub dataset."""
    path = Path(source)
    if path.suffix.lower() in LOCAL_SUFFIXES or path.exists():
        if not path.is_file():
            raise DataError(
                f"{source}: no such file (give an existing path, 'rg:<tasks>' or a hub name)"
            )
        suffix = path.suffix.lower()
        if suffix == ".jsonl":
            return _jsonl_records(path)
        if suffix == ".json":
            return _json_records(path)
        if suffix == ".parquet":
            return _table_records(_read_parquet(path), str(path))
        raise DataError(f"{source}: unsupported file type {suffix!r}; use one of {LOCAL_SUFFIXES}")
    return _table_records(_load_hub(source, split), f"hub dataset {source!r} split {split!r}")


def _jsonl_records(path: Path) -> Iterator[tuple[str, Any]]:
    # Lines are decoded one by one so a bad byte or bad JSON is reported with its line number.
    # A UTF-8 byte-order mark (Windows editors write one) and CRLF line ends are accepted.
    with path.open("rb") as handle:
        for line_number, raw in enumerate(handle, start=1):
            where = f"{path} line {line_number}"
            try:
                text = raw.decode("utf-8-sig" if line_number == 1 else "utf-8")
                if text.strip():  # blank lines (e.g. a trailing newline) are not records
                    yield where, json.loads(text)
            except UnicodeDecodeError as err:
                message = f"not valid UTF-8 (byte {err.start}: {err.reason}); re-save it as UTF-8"
                yield where, _InvalidRecord("bad_utf8", message)
            except json.JSONDecodeError as err:
                message = f"invalid JSON ({err.msg}, column {err.colno}); write one object per line"
                yield where, _InvalidRecord("bad_json", message)


def _json_records(path: Path) -> Iterator[tuple[str, Any]]:
    # A whole-file JSON document cannot be partly skipped: decoding errors always raise.
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")  # a byte-order mark is accepted (and dropped)
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise DataError(
            f"{path} line {line}: not valid UTF-8 ({err.reason}); re-save the file as UTF-8"
        ) from None
    try:
        records = json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(
            f"{path} line {err.lineno} column {err.colno}: invalid JSON ({err.msg})"
        ) from None
    if not isinstance(records, list):
        raise DataError(
            f"{path}: expected a JSON list of objects at the top level, got {type(records).__name__}"
        )
    for index, record in enumerate(records):
        yield f"{path} index {index}", record


def _read_parquet(path: Path) -> Any:
    import datasets

    try:
        return datasets.Dataset.from_parquet(str(path), keep_in_memory=True)
    except Exception as err:  # pyarrow raises several types for corrupt files
        raise DataError(f"{path}: could not read as Parquet ({err})") from err


def _load_hub(name: str, split: str) -> Any:
    import datasets

    try:
        return datasets.load_dataset(name, split=split)
    except Exception as err:  # offline, unknown name, missing split: all need the same advice
        raise DataError(
            f"could not load hub dataset {name!r} split {split!r}: {err}. If you are offline, "
            "download it while online (or set HF_DATASETS_OFFLINE=1 with a filled cache), or "
            "pass a local .jsonl/.json/.parquet file or an 'rg:<tasks>' source instead."
        ) from err


def _table_records(rows: Iterable[Any], where: str) -> Iterator[tuple[str, Any]]:
    return ((f"{where} row {index}", record) for index, record in enumerate(rows))


def _to_demonstration(
    record: Any, location: str, prompt_field: str, response_field: str
) -> Demonstration:
    if not isinstance(record, Mapping):
        raise _InvalidRecord(
            "wrong_type", f"expected a JSON object (record), got {type(record).__name__}"
        )
    for name in (prompt_field, response_field):
        if record.get(name) is None:
            present = ", ".join(sorted(map(str, record))) or "none"
            raise _InvalidRecord(
                "missing_field",
                f"missing field {name!r} (fields present: {present}); add it, or pass "
                f"{'prompt' if name == prompt_field else 'response'}_field= to name the field your data uses",
            )
    prompt = _validate_prompt(record[prompt_field], prompt_field)
    response = _response_text(record[response_field], response_field)
    if not response.strip():
        raise _InvalidRecord(
            "empty_field", f"field {response_field!r} is empty; give the response text to imitate"
        )
    record_id = str(record["id"]) if record.get("id") is not None else location
    return Demonstration(
        prompt=prompt, response=response, id=record_id, meta={"location": location}
    )


def _response_text(response: Any, field_name: str) -> str:
    """The response as text: a string, or the last assistant turn of a chat conversation.

    Preference datasets such as UltraFeedback store ``chosen`` as ``[user, assistant]``
    messages; the demonstration is then the final assistant message.
    """
    if isinstance(response, str):
        return response
    if isinstance(response, list | tuple) and all(isinstance(m, Mapping) for m in response):
        assistant = [m for m in response if m.get("role") == "assistant"]
        if assistant and isinstance(assistant[-1].get("content"), str):
            return assistant[-1]["content"]
        raise _InvalidRecord(
            "wrong_type",
            f"field {field_name!r} is a list of messages without an assistant turn; give the "
            "response text, or messages ending in {'role': 'assistant', 'content': ...}",
        )
    raise _InvalidRecord(
        "wrong_type",
        f"field {field_name!r} must be a string or chat messages, got {type(response).__name__}",
    )


def _validate_prompt(prompt: Any, field_name: str = "prompt") -> Prompt:
    """Return the prompt as a string or a tuple of {role, content} messages, or raise.

    Chat messages keep only ``role`` and ``content``; the last one must be a user turn
    because generation continues with the assistant's answer.
    """
    if isinstance(prompt, str):
        if not prompt.strip():
            raise _InvalidRecord(
                "empty_field", f"field {field_name!r} is empty; give the prompt text"
            )
        return prompt
    if not isinstance(prompt, list | tuple):
        raise _InvalidRecord(
            "wrong_type",
            f"field {field_name!r} must be a string or a list of chat messages, got {type(prompt).__name__}",
        )
    if not prompt:
        raise _InvalidRecord(
            "empty_field",
            f"field {field_name!r} is an empty message list; give at least one user message",
        )
    messages = []
    for position, message in enumerate(prompt):
        where = f"field {field_name!r} message {position}"
        if not isinstance(message, Mapping):
            raise _InvalidRecord(
                "wrong_type",
                f"{where} must be an object with 'role' and 'content', got {type(message).__name__}",
            )
        role, content = message.get("role"), message.get("content")
        if role not in CHAT_ROLES:
            raise _InvalidRecord(
                "wrong_type", f"{where} has role {role!r}; use one of {CHAT_ROLES}"
            )
        if not isinstance(content, str) or not content.strip():
            raise _InvalidRecord("empty_field", f"{where} needs a non-empty string 'content'")
        messages.append({"role": role, "content": content})
    if messages[-1]["role"] != "user":
        raise _InvalidRecord(
            "wrong_type",
            f"field {field_name!r} must end with a user message (the response answers it); put the final assistant turn in the response field",
        )
    return tuple(messages)


# --------------------------------------------------------------------------- tokenization


def format_prompt(tokenizer: Any, prompt: Prompt | list[dict[str, str]]) -> str:
    """The prompt as model text, ending where the assistant's response begins.

    Uses the tokenizer's chat template with ``add_generation_prompt=True``. We add no system
    message of our own (a template may insert its model's default one, as SmolLM2's does).
    Without a chat template, the documented ``FALLBACK_TURN`` format is used.
    """
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    turns = "".join(
        FALLBACK_TURN.format(role=m["role"].capitalize(), content=m["content"]) for m in messages
    )
    return (getattr(tokenizer, "bos_token", None) or "") + turns + FALLBACK_GENERATION_PROMPT


# The plain prompt SPIN's and GSIL's public code generated with (spin/generate.py): not the
# chat template their training used (theory page, section 6); for exact replication only.
INSTRUCTION_PROMPT = "### Instruction: {prompt}\n\n### Response: "


def encode_instruction_prompt(tokenizer: Any, prompt: Prompt) -> list[int]:
    """Token ids of :data:`INSTRUCTION_PROMPT` around the prompt's text (a chat prompt's last
    user message), without special tokens, as SPIN's generation script encodes it."""
    if not isinstance(prompt, str):
        prompt = next(m["content"] for m in reversed(prompt) if m["role"] == "user")
    text = INSTRUCTION_PROMPT.format(prompt=prompt)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def with_system_message(prompt: Prompt, system: str) -> Prompt:
    """``prompt`` as chat messages opening with the system message ``system``; a prompt that
    opens with a system message already is returned as it is (DFT's generator does the same)."""
    messages = ({"role": "user", "content": prompt},) if isinstance(prompt, str) else prompt
    if messages[0]["role"] == "system":
        return prompt
    return ({"role": "system", "content": system}, *messages)


def encode_prompt(
    tokenizer: Any, prompt: Prompt | list[dict[str, str]], max_prompt_length: int | None = None
) -> list[int]:
    """Token ids of ``format_prompt`` (no extra special tokens: the template has them).

    Raises:
        PromptTooLong: if there are more than ``max_prompt_length`` ids.
    """
    ids = list(tokenizer(format_prompt(tokenizer, prompt), add_special_tokens=False)["input_ids"])
    if max_prompt_length is not None and len(ids) > max_prompt_length:
        raise PromptTooLong(
            f"prompt has {len(ids)} tokens, more than max_prompt_length={max_prompt_length}; shorten it, raise the limit, or use skip_invalid=True to drop it"
        )
    return ids


def truncate_prompt_left(
    tokenizer: Any, prompt: Prompt, max_prompt_length: int
) -> tuple[Prompt, int]:
    """``prompt`` with its oldest text cut so that ``encode_prompt`` fits ``max_prompt_length``,
    and how many text tokens were cut (0: it fitted as it was).

    The text is cut, not the formatted ids: the chat template's turn markers stay whole, so
    the prompt still ends where the assistant's response begins. A string prompt loses the
    start of its text; a chat prompt the start of its first non-system message. The kept text
    is decoded from the last tokens of that message and encoded again (the formatted length
    is checked, and more is cut while it does not fit).

    Raises:
        PromptTooLong: the prompt does not fit even with that message's text removed.
    """
    if max_prompt_length < 1:
        raise ValueError(f"max_prompt_length must be >= 1, got {max_prompt_length}")
    length = len(encode_prompt(tokenizer, prompt))
    if length <= max_prompt_length:
        return prompt, 0
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    target = next((i for i, m in enumerate(messages) if m["role"] != "system"), 0)
    text_ids = list(tokenizer(messages[target]["content"], add_special_tokens=False)["input_ids"])
    keep = len(text_ids) - (length - max_prompt_length)
    while keep > 0:
        kept_text = tokenizer.decode(text_ids[-keep:], skip_special_tokens=False)
        messages[target] = {**messages[target], "content": kept_text}
        candidate = kept_text if isinstance(prompt, str) else tuple(messages)
        length = len(encode_prompt(tokenizer, candidate))
        if length <= max_prompt_length:
            return candidate, len(text_ids) - keep
        keep -= length - max_prompt_length
    raise PromptTooLong(
        f"prompt does not fit max_prompt_length={max_prompt_length} tokens even with the text "
        "of its first non-system message cut away; raise the limit or shorten its other turns"
    )


def encode_response(
    tokenizer: Any, response: str, max_response_length: int | None = None
) -> list[int]:
    """Response token ids followed by ``tokenizer.eos_token_id`` (end of turn for chat models).

    ``max_response_length`` counts the EOS. When the response does not fit, its first
    ``max_response_length`` tokens are kept and the EOS is dropped, so that the model is never
    taught to stop in the middle of an answer.
    """
    if max_response_length is not None and max_response_length < 1:
        raise ValueError(f"max_response_length must be >= 1, got {max_response_length}")
    eos = tokenizer.eos_token_id
    if eos is None:
        raise DataError(
            "tokenizer has no eos_token_id; set tokenizer.eos_token to the end-of-turn token"
        )
    ids = list(tokenizer(response, add_special_tokens=False)["input_ids"]) + [eos]
    if max_response_length is not None and len(ids) > max_response_length:
        return ids[:max_response_length]  # the EOS is last, so it is always cut off here
    return ids


def build_sequence(
    prompt_ids: Sequence[int], response_ids: Sequence[int]
) -> tuple[list[int], list[int]]:
    """Training ``input_ids`` (prompt then response) and ``labels`` (prompt masked with -100)."""
    if not response_ids:
        raise DataError("empty response ids: nothing to train on")
    input_ids = [*prompt_ids, *response_ids]
    labels = [IGNORE_INDEX] * len(prompt_ids) + list(response_ids)
    return input_ids, labels


# --------------------------------------------------------------------------- files and ties


def save_jsonl(
    records: Iterable[Mapping[str, Any] | Demonstration], path: str | os.PathLike[str]
) -> Path:
    """Write one JSON object per line atomically (a temp file, then ``os.replace``).

    Readers never see a half-written file, even if the run dies mid-write.
    """
    with atomic_file(path) as handle:
        for record in records:
            record = record.to_dict() if isinstance(record, Demonstration) else record
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
    return Path(path)


def tie_mask(demo_responses: Sequence[str], generated_responses: Sequence[str]) -> list[bool]:
    """Per pair, whether the generation equals the demonstration (ignoring outer whitespace).

    A tie gives the classifier a pair it cannot separate; the trainer may report or drop them.
    """
    if len(demo_responses) != len(generated_responses):
        raise ValueError(
            f"{len(demo_responses)} demonstrations but {len(generated_responses)} generations"
        )
    return [
        d.strip() == g.strip() for d, g in zip(demo_responses, generated_responses, strict=True)
    ]


def count_ties(demo_responses: Sequence[str], generated_responses: Sequence[str]) -> int:
    """How many generations equal their demonstration (see ``tie_mask``)."""
    return sum(tie_mask(demo_responses, generated_responses))
