"""The demonstration types: what every loader returns and every consumer takes.

Kept apart from the loaders (``gsil.data`` for files and hub datasets, ``gsil.reasoning_tasks``
for reasoning-gym) so that neither loader imports the other.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

Prompt = str | tuple[dict[str, str], ...]


class DataError(ValueError):
    """A demonstration source or record is unusable; the message says where and how to fix it."""


class PromptTooLong(DataError):
    """A formatted prompt has more tokens than ``max_prompt_length``."""


@dataclass(frozen=True)
class Demonstration:
    """One demonstration: a prompt (string or chat messages) and the response to imitate.

    ``meta`` carries source details: ``location`` (file and line/row) for files and hub rows;
    ``task``, ``answer`` (gold) and ``entry`` (what reasoning-gym's scorer needs) for
    reasoning tasks.
    """

    prompt: Prompt
    response: str
    id: str
    meta: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (chat prompts become lists) for ``save_jsonl``."""
        record = asdict(self)
        if isinstance(self.prompt, tuple):
            record["prompt"] = list(self.prompt)
        return record


class Demonstrations(list[Demonstration]):
    """A list of ``Demonstration`` that also reports what loading skipped.

    ``skipped`` counts dropped records by reason, e.g. ``{"bad_json": 2}`` with
    ``skip_invalid=True``, or ``{"basic_arithmetic:gold_disagrees": 3}`` for reasoning tasks.
    """

    def __init__(self, items: Iterable[Demonstration] = (), skipped: Mapping[str, int] = ()):
        super().__init__(items)
        self.skipped: Counter[str] = Counter(dict(skipped))
