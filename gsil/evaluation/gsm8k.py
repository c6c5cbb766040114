"""GSM8K, two ways: ``gsm8k`` through lm-evaluation-harness, ``gsm8k-chat`` our chat format.

Data for both: a local JSONL in the GSM8K schema (``question``; ``answer`` = worked solution
ending in ``#### N``), or the hub dataset ``openai/gsm8k`` (config ``main``) for online users.
Local files are checked by :func:`load_gsm8k` first, so a missing file or a bad line is named.

``gsm8k`` (:func:`evaluate_gsm8k`) is lm-evaluation-harness's own ``gsm8k`` task, run through
``lm_eval.simple_evaluate`` on the policy in memory (``HFLM(pretrained=model, tokenizer=...)``):
its plain-text prompt (``Question: ...\nAnswer:``, no chat template), its 5-shot default with
exemplars from the train split, its greedy generation until ``Question:``, and its two scores,
``exact_match,strict-match`` (the number after ``#### ``) and ``exact_match,flexible-extract``
(the last number in the answer). These are the numbers published GSM8K figures report, so this
is the benchmark to compare with them. Offline, the task is lm-eval's installed YAML with only
the dataset replaced by the local files (:func:`lm_eval_task_config`); a hub name keeps lm-eval's
dataset. The headline score is strict-match; flexible-extract and lm-eval's standard errors are
in the breakdown, the exact task config, seeds and lm-eval version in the settings.

``gsm8k-chat`` (:func:`evaluate_gsm8k_chat`) asks the question the way the rest of this project
does: the question followed by the same ``Answer: <answer>`` instruction as the reasoning tasks
(``gsil.reasoning_tasks.task_prompt``), formatted by the one chat template function. k-shot
exemplars are drawn from the train split (deterministic in the seed, the same k for every
question) and given as prior user/assistant turns; their solutions have the calculator
annotations ``<<a*b=c>>`` removed and end in ``Answer: N``, the format the model is asked for.
:func:`extract_numeric_answer` takes the last ``#### N``, else the last ``Answer: ...`` line's
number, else the last number in the text (commas and ``$`` stripped); it is correct when it
equals the gold number exactly. It measures what a chat policy does when asked as in training;
its numbers are not comparable with published GSM8K figures.
"""

from __future__ import annotations

import copy
import json
import random
import re
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from gsil.evaluation.harness import (
    global_rng_restored,
    json_ready,
    lm_eval_version,
    model_for_lm_eval,
    recorded_seeds,
    seed_arguments,
)
from gsil.evaluation.options import EvalRequest
from gsil.evaluation.results import (
    BenchmarkResult,
    base_settings,
    package_versions,
    proportion_interval,
)
from gsil.generation import generate
from gsil.reasoning_tasks import ANSWER_PREFIX, extract_final_answer, task_prompt

BENCHMARK = "gsm8k"  # lm-evaluation-harness's task
CHAT_BENCHMARK = "gsm8k-chat"  # our chat-format variant
HUB_NAME = "openai/gsm8k"
HUB_CONFIG = "main"
LM_EVAL_TASK = "gsm8k"  # the task's name in lm-eval (its installed tasks/gsm8k/gsm8k.yaml)
LM_EVAL_METRIC = "exact_match"
STRICT_MATCH = "strict-match"  # lm-eval's filter: the number after "#### "; the headline score
FLEXIBLE_EXTRACT = "flexible-extract"  # lm-eval's filter: the last number in the answer
FILTERS = (STRICT_MATCH, FLEXIBLE_EXTRACT)

_NUMBER = re.compile(r"-?\$?\s?\d[\d,]*(?:\.\d+)?")
_MARKED_ANSWER = re.compile(r"####\s*([^\n]*)")
_CALCULATOR = re.compile(r"<<[^<>]*>>")


@dataclass(frozen=True)
class GSM8KItem:
    """One problem: ``solution`` is the worked answer text, ``answer`` its final number."""

    id: str
    question: str
    solution: str
    answer: str


# --------------------------------------------------------------------------- answers


def normalize_number(text: str) -> str | None:
    """``"$1,234.50"`` -> ``"1234.5"``; ``"72."`` -> ``"72"``; None when not a number."""
    cleaned = text.strip().replace(",", "").replace("$", "").replace(" ", "").rstrip(".")
    try:
        value = Decimal(cleaned)
    except InvalidOperation:
        return None
    if not value.is_finite():
        return None
    # One spelling per value: 72.00 -> "72", 7.2E+2 -> "720", -0 -> "0".
    return format((value + 0).normalize(), "f")


def _last_number(text: str) -> str | None:
    numbers = [normalize_number(match) for match in _NUMBER.findall(text)]
    numbers = [number for number in numbers if number is not None]
    return numbers[-1] if numbers else None


def gold_answer(solution: str) -> str | None:
    """The number after the last ``####`` of a GSM8K solution (None if missing)."""
    marks = _MARKED_ANSWER.findall(solution)
    return _last_number(marks[-1]) if marks else None


def extract_numeric_answer(text: str) -> str | None:
    """The model's final number: last ``#### N``, else the ``Answer:`` line, else last number."""
    marks = [mark for mark in _MARKED_ANSWER.findall(text) if _last_number(mark) is not None]
    if marks:
        return _last_number(marks[-1])
    final = extract_final_answer(text)
    if final is not None and _last_number(final) is not None:
        return _last_number(final)
    return _last_number(text)


def numbers_match(predicted: str | None, gold: str) -> bool:
    """Exact numeric equality (``"72"`` == ``"72.0"``); False for a missing prediction."""
    if predicted is None:
        return False
    a, b = normalize_number(predicted), normalize_number(gold)
    return a is not None and a == b


def exemplar_solution(solution: str) -> str:
    """A GSM8K solution in our answer format: no ``<<calc>>`` notes, ``#### N`` -> ``Answer: N``."""
    text = _CALCULATOR.sub("", solution).rstrip()
    gold = gold_answer(text)
    body = _MARKED_ANSWER.sub("", text).rstrip()
    return f"{body}\n{ANSWER_PREFIX} {gold}"


# --------------------------------------------------------------------------- data


def is_local_source(source: str) -> bool:
    """Whether ``source`` names a local file (a ``.jsonl``/``.json`` name or an existing path)
    rather than a hub dataset."""
    path = Path(source)
    return path.suffix.lower() in (".jsonl", ".json") or path.exists()


def load_gsm8k(source: str, split: str = "test", limit: int | None = None) -> list[GSM8KItem]:
    """Problems from a local GSM8K-schema JSONL (``split`` ignored) or a hub dataset.

    Raises:
        FileNotFoundError: a local path that does not exist (with the fix).
        ValueError: a malformed row (file and line named) or an unreachable hub dataset.
    """
    if is_local_source(source):
        rows = _read_local(Path(source))
    else:
        rows = _read_hub(source, split)
    items = []
    for where, row in rows:
        if limit is not None and len(items) >= limit:
            break
        if not isinstance(row, dict) or not all(
            isinstance(row.get(k), str) for k in ("question", "answer")
        ):
            raise ValueError(
                f"{where}: expected string fields 'question' and 'answer' (GSM8K schema)"
            )
        gold = gold_answer(row["answer"])
        if gold is None:
            raise ValueError(f"{where}: 'answer' must end with '#### <number>' (GSM8K schema)")
        item_id = str(row["id"]) if row.get("id") is not None else where
        items.append(GSM8KItem(item_id, row["question"], row["answer"], gold))
    return items


def _read_local(path: Path) -> list[tuple[str, Any]]:
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: no such GSM8K file; give a JSONL with 'question' and 'answer' fields "
            f"(e.g. GSM8K's test.jsonl) or the hub name {HUB_NAME!r} when online"
        )
    rows = []
    with path.open(encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                rows.append((f"{path.name}:{line_number}", json.loads(line)))
            except json.JSONDecodeError as err:
                raise ValueError(f"{path} line {line_number}: invalid JSON ({err.msg})") from None
    return rows


def _read_hub(name: str, split: str) -> list[tuple[str, Any]]:
    import datasets

    config = HUB_CONFIG if name in (HUB_NAME, "gsm8k") else None
    try:
        dataset = datasets.load_dataset(name, config, split=split)
    except Exception as err:  # offline, unknown name or split: one piece of advice
        raise ValueError(
            f"could not load GSM8K from the hub ({name!r}, split {split!r}): {err}. Offline, "
            "pass local JSONL files instead (--gsm8k test.jsonl --gsm8k-train train.jsonl)."
        ) from err
    return [(f"gsm8k:{split}:{index}", dict(row)) for index, row in enumerate(dataset)]


def select_exemplars(
    train: Sequence[GSM8KItem], shots: int, seed: int, exclude_questions: set[str] = frozenset()
) -> list[GSM8KItem]:
    """``shots`` train problems, the same for every question, deterministic in ``seed``.

    Questions in ``exclude_questions`` (the test set) are never exemplars, even if a user
    passes the same file twice.
    """
    pool = [item for item in train if item.question not in exclude_questions]
    if shots > len(pool):
        raise ValueError(f"{shots} shots asked but only {len(pool)} train problems available")
    return random.Random(seed).sample(pool, shots)


def build_messages(question: str, exemplars: Sequence[GSM8KItem]) -> list[dict[str, str]]:
    """Chat messages: each exemplar as a user/assistant pair, then the question."""
    messages = []
    for shot in exemplars:
        messages.append({"role": "user", "content": task_prompt(shot.question)})
        messages.append({"role": "assistant", "content": exemplar_solution(shot.solution)})
    messages.append({"role": "user", "content": task_prompt(question)})
    return messages


# --------------------------------------------------------------------------- gsm8k-chat


def score_completions(
    items: Sequence[GSM8KItem],
    completions: Sequence[str],
    prompts: Sequence[Any] | None = None,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """One record per item: extracted number, gold, ``score`` (1.0/0.0) and ``correct``."""
    if len(items) != len(completions):
        raise ValueError(f"{len(items)} items but {len(completions)} completions")
    records = []
    for index, (item, completion) in enumerate(
        tqdm(
            zip(items, completions, strict=True),
            total=len(items),
            desc="scoring",
            disable=not progress,
        )
    ):
        predicted = extract_numeric_answer(completion)
        correct = numbers_match(predicted, item.answer)
        records.append(
            {
                "id": item.id,
                "prompt": prompts[index] if prompts is not None else item.question,
                "completion": completion,
                "extracted_answer": predicted,
                "gold": item.answer,
                "score": float(correct),
                "correct": correct,
            }
        )
    return records


def summarize(records: Sequence[dict[str, Any]], settings: dict[str, Any]) -> BenchmarkResult:
    """Accuracy with a Wilson interval."""
    correct = sum(bool(record["correct"]) for record in records)
    n = len(records)
    return BenchmarkResult(
        benchmark=CHAT_BENCHMARK,
        metric="accuracy",
        score=correct / n if n else None,
        n=n,
        interval=list(proportion_interval(correct, n)),
        interval_method="wilson",
        breakdown={
            "correct": correct,
            "no_number": sum(record["extracted_answer"] is None for record in records),
        },
        settings=settings,
    )


def evaluate_gsm8k_chat(
    model: Any, tokenizer: Any, request: EvalRequest
) -> tuple[BenchmarkResult, list[dict[str, Any]]]:
    """``gsm8k-chat``: answer GSM8K test problems (``options.gsm8k_source``, the first
    ``request.limit``) in our chat format, k-shot when ``options.gsm8k_shots`` > 0 (exemplars
    drawn with ``request.seed``), and score them with :func:`extract_numeric_answer`.

    ``options.gsm8k_train_source`` defaults to the source when that is a hub name (its train
    split); a local test file needs an explicit train file for shots > 0.
    """
    options, limit, seed = request.options, request.limit, request.seed
    source, train_source = options.gsm8k_source, options.gsm8k_train_source
    shots = options.gsm8k_shots or 0
    if shots < 0:
        raise ValueError(f"shots must be >= 0, got {shots}")
    decoding = request.decoding(CHAT_BENCHMARK)
    items = load_gsm8k(source, "test", limit)
    exemplars: list[GSM8KItem] = []
    if shots:
        if train_source is None:
            if is_local_source(source):
                raise ValueError(
                    f"{shots}-shot GSM8K draws exemplars from the train split: pass a train "
                    "JSONL (--gsm8k-train train.jsonl) alongside the local test file"
                )
            train_source = source
        train = load_gsm8k(train_source, "train")
        exemplars = select_exemplars(train, shots, seed, {item.question for item in items})
    prompts = [build_messages(item.question, exemplars) for item in items]
    outputs = generate(
        model,
        tokenizer,
        prompts,
        decoding,
        max_prompt_length=decoding.max_prompt_length,
        progress=request.progress,
    )
    records = score_completions(items, [out.text for out in outputs], prompts, request.progress)
    for record, out in zip(records, outputs, strict=True):
        record.update(num_tokens=out.num_tokens, truncated=out.truncated)
    settings = base_settings(
        tokenizer,
        decoding,
        source=source,
        train_source=train_source,
        shots=shots,
        exemplar_ids=[shot.id for shot in exemplars],
        data_seed=seed,
    )
    return summarize(records, settings), records


# --------------------------------------------------------------------------- gsm8k (lm-eval)


def lm_eval_task_config(source: str = HUB_NAME, train_source: str | None = None) -> dict[str, Any]:
    """lm-eval's installed ``gsm8k`` task config, its dataset pointed at ``source``.

    A local test file (and a local train file: the few-shot exemplars, lm-eval's
    ``fewshot_split``) replaces only the dataset, as ``dataset_path: json`` with
    ``dataset_kwargs: {data_files: {test: ..., train: ...}}``; prompt, shots, generation,
    metric and filters stay lm-eval's. Without a train file the task has no few-shot split
    (zero-shot only). ``openai/gsm8k`` (or ``gsm8k``) keeps lm-eval's own dataset; another hub
    name replaces its path (the same schema, no config name). The dict is what
    ``lm_eval.simple_evaluate(tasks=[config])`` takes.

    Raises:
        FileNotFoundError: a local file that does not exist (named, with the fix).
        ValueError: a malformed local line (file and line named), or a train source that does
            not go with the test source (a hub train set for a local test file or vice versa).
    """
    config = _installed_task_config()
    if is_local_source(source):
        load_gsm8k(source)  # a missing file or bad line is named here, not deep inside lm-eval
        data_files = {"test": str(Path(source).resolve())}
        if train_source is None:
            config.update(training_split=None, fewshot_split=None)
        elif not is_local_source(train_source):
            raise ValueError(
                f"the local GSM8K test file {source} needs a local train file for its few-shot "
                f"exemplars (--gsm8k-train train.jsonl), not the hub dataset {train_source!r}"
            )
        else:
            load_gsm8k(train_source)
            data_files["train"] = str(Path(train_source).resolve())
        config.update(
            dataset_path="json", dataset_name=None, dataset_kwargs={"data_files": data_files}
        )
        return config
    if train_source is not None and train_source != source:
        raise ValueError(
            f"GSM8K from the hub ({source!r}) takes its few-shot exemplars from its own train "
            f"split; a separate train source ({train_source!r}) goes with a local test file only"
        )
    if source not in (HUB_NAME, "gsm8k"):
        config.update(dataset_path=source, dataset_name=None)
    return config


def _installed_task_config() -> dict[str, Any]:
    """A copy of the installed ``tasks/gsm8k/gsm8k.yaml`` as lm-eval's task index reads it."""
    import lm_eval.tasks
    from lm_eval.tasks import TaskManager

    folder = Path(lm_eval.tasks.__file__).parent / LM_EVAL_TASK
    # Indexing that one folder takes milliseconds; every installed task, about 15 s.
    manager = TaskManager(include_path=folder, include_defaults=False) if folder.is_dir() else None
    entry = manager.task_index.get(LM_EVAL_TASK) if manager is not None else None
    if entry is None or not entry.cfg:  # another lm-eval layout: search every installed task
        entry = TaskManager().task_index[LM_EVAL_TASK]
    config = copy.deepcopy(dict(entry.cfg))
    config.pop("tag", None)  # a name shared with other tasks (math_word_problems), not config
    return config


def evaluate_gsm8k(
    model: Any, tokenizer: Any = None, request: EvalRequest | None = None
) -> tuple[BenchmarkResult, list[dict[str, Any]]]:
    """``gsm8k``: lm-evaluation-harness's ``gsm8k`` task on ``model``, via ``simple_evaluate``.

    Args:
        model: a transformers causal LM in memory (wrapped in lm-eval's ``HFLM`` with
            ``tokenizer``; its train/eval mode is restored afterwards), or an lm-eval ``LM``
            instance, used as it is.
        request: its options ``gsm8k_source`` / ``gsm8k_train_source`` (local GSM8K-schema
            JSONL files, test and train for the few-shot exemplars, or a hub name: see
            :func:`lm_eval_task_config`); ``gsm8k_shots`` (``None``: lm-eval's default for the
            task, 5; 0 needs no train file); ``lm_eval_seed`` (lm-eval's random, numpy, torch
            and few-shot seeds; ``None``: lm-eval's own defaults, those of a plain ``lm_eval``
            run; ``settings["seeds"]`` names the ones used); ``gsm8k_batch_size`` and the
            ``gsm8k`` budget (``None`` keeps lm-eval's defaults, HFLM's 1 and 256 tokens); and
            ``request.limit``, the first ``limit`` test problems (lm-eval's ``limit``).

    Returns:
        The result (metric ``exact_match,strict-match``; ``breakdown["filters"]`` holds both
        filters' scores, lm-eval's standard errors and 95% intervals) and one record per
        problem (the prompt lm-eval built, the raw answer, each filter's extraction and score).

    Raises:
        FileNotFoundError, ValueError: missing or malformed data (see
            :func:`lm_eval_task_config`), ``num_fewshot > 0`` for a local test file without a
            train file, a dataset lm-eval cannot load, or a model without a tokenizer.
    """
    import lm_eval
    from lm_eval.tasks import TaskManager

    request = request or EvalRequest()
    options, limit = request.options, request.limit
    source, train_source = options.gsm8k_source, options.gsm8k_train_source
    num_fewshot, seed = options.gsm8k_shots, options.lm_eval_seed
    batch_size, max_gen_toks = options.gsm8k_batch_size, options.max_new_tokens_for(BENCHMARK)
    if num_fewshot is not None and num_fewshot < 0:
        raise ValueError(f"num_fewshot must be >= 0, got {num_fewshot}")
    config = lm_eval_task_config(source, train_source)
    shots = config.get("num_fewshot", 0) if num_fewshot is None else num_fewshot
    if shots and config.get("fewshot_split") is None:
        raise ValueError(
            f"{shots}-shot GSM8K (lm-eval's default is {config.get('num_fewshot')}) draws its "
            f"exemplars from a train split: pass a train JSONL (--gsm8k-train train.jsonl) "
            f"alongside the local test file {source}, or 0 shots (--shots 0)"
        )
    gen_kwargs = None if max_gen_toks is None else {"max_gen_toks": max_gen_toks}
    # simple_evaluate seeds random, numpy and torch globally (and dataset loading draws from
    # them): the caller's random states are put back afterwards.
    with global_rng_restored():
        task = _load_task(config)
        with model_for_lm_eval(model, tokenizer, batch_size, BENCHMARK) as lm:
            output = lm_eval.simple_evaluate(
                model=lm,
                tasks=[task],
                num_fewshot=num_fewshot,
                limit=limit,
                gen_kwargs=gen_kwargs,
                log_samples=True,
                task_manager=TaskManager(include_defaults=False),  # the task is built already
                **seed_arguments(seed),
            )
            effective_max_gen_toks = max_gen_toks or getattr(lm, "max_gen_toks", None)
    records = lm_eval_records(output["samples"][LM_EVAL_TASK], source)
    result = _lm_eval_result(output, records, config, effective_max_gen_toks, tokenizer)
    result.settings.update(
        source=source,
        train_source=train_source,
        limit=limit,
        batch_size=batch_size,
        data_seed=seed,
        seeds=recorded_seeds(output),
    )
    return result, records


def _load_task(config: dict[str, Any]) -> Any:
    """The lm-eval Task of ``config``, its dataset loaded; a dataset lm-eval cannot load
    (offline hub, unreadable JSON) is one clear error. ``simple_evaluate`` takes it as is."""
    from lm_eval.tasks import TaskManager

    try:
        return TaskManager(include_defaults=False).load([config])["tasks"][LM_EVAL_TASK]
    except Exception as err:
        where = config.get("dataset_kwargs") or config["dataset_path"]
        raise ValueError(
            f"lm-eval could not load GSM8K from {where}: {err}. Offline, pass local JSONL files "
            "(--gsm8k test.jsonl --gsm8k-train train.jsonl)."
        ) from err


def lm_eval_records(samples: Sequence[dict[str, Any]], source: str) -> list[dict[str, Any]]:
    """One record per problem from lm-eval's logged samples (one sample per problem and filter).

    ``score`` is strict-match's exact match; each filter's extracted answer and exact match are
    under its name. Local problems keep :func:`load_gsm8k`'s ids (``test.jsonl:3``), so these
    records pair with ``gsm8k-chat``'s; hub problems are ``gsm8k:test:<index>``.
    """
    by_doc: dict[int, dict[str, dict[str, Any]]] = defaultdict(dict)
    for sample in samples:
        by_doc[int(sample["doc_id"])][sample["filter"]] = sample
    items = load_gsm8k(source) if is_local_source(source) else []
    records = []
    for doc_id in sorted(by_doc):
        filtered = by_doc[doc_id]
        missing = [name for name in FILTERS if name not in filtered]
        if missing:
            raise ValueError(f"lm-eval logged no {missing} sample for GSM8K problem {doc_id}")
        first = filtered[STRICT_MATCH]
        prompt, generation_kwargs = first["arguments"][0]
        item = items[doc_id] if doc_id < len(items) else None
        same = item is not None and item.question == first["doc"].get("question")
        record: dict[str, Any] = {
            "id": item.id if same else f"gsm8k:test:{doc_id}",
            "doc_id": doc_id,
            "prompt": prompt,
            "completion": first["resps"][0][0],
            "gold": gold_answer(first["target"]),
            "score": float(first[LM_EVAL_METRIC]),
        }
        for name in FILTERS:
            record[name] = {
                "extracted": filtered[name]["filtered_resps"][0],
                LM_EVAL_METRIC: float(filtered[name][LM_EVAL_METRIC]),
            }
        record.update(prompt_hash=first["prompt_hash"], doc_hash=first["doc_hash"])
        records.append(record)
    return records


def _lm_eval_result(
    output: dict[str, Any],
    records: Sequence[dict[str, Any]],
    config: dict[str, Any],
    max_gen_toks: int | None,
    tokenizer: Any,
) -> BenchmarkResult:
    scores = output["results"][LM_EVAL_TASK]
    n = int(output["n-samples"][LM_EVAL_TASK]["effective"])
    filters = {}
    for name in FILTERS:
        correct = round(sum(record[name][LM_EVAL_METRIC] for record in records))
        stderr = scores.get(f"{LM_EVAL_METRIC}_stderr,{name}")
        filters[name] = {
            "score": float(scores[f"{LM_EVAL_METRIC},{name}"]),
            "correct": correct,
            "stderr": float(stderr) if isinstance(stderr, int | float) else None,
            "interval": list(proportion_interval(correct, n)),
        }
    strict = filters[STRICT_MATCH]
    task_config = json_ready(output["configs"][LM_EVAL_TASK])
    generation = task_config.get("generation_kwargs", {})
    harness_version = lm_eval_version()
    settings = base_settings(
        tokenizer,
        None,
        harness="lm-evaluation-harness",
        lm_eval_version=harness_version,
        task=LM_EVAL_TASK,
        task_version=output["versions"].get(LM_EVAL_TASK),
        num_fewshot=output["n-shot"].get(LM_EVAL_TASK),
        fewshot_split=task_config.get("fewshot_split"),
        dataset=task_config.get("dataset_path"),
        data_files=(config.get("dataset_kwargs") or {}).get("data_files"),
        filters=list(FILTERS),
        filter_list=task_config.get("filter_list"),
        metric_list=task_config.get("metric_list"),
        lm_eval_task_config=task_config,
        max_length=output.get("max_length"),
    )
    # lm-eval's generation and prompt, in place of our Decoding and chat template
    settings.update(
        decoding={
            "max_new_tokens": generation.get("max_gen_toks", max_gen_toks),
            "do_sample": generation.get("do_sample", False),
            "temperature": generation.get("temperature"),
            "until": generation.get("until"),
        },
        prompt_format={
            "kind": "lm-eval task prompt (plain text, no chat template)",
            "doc_to_text": task_config.get("doc_to_text"),
            "target_delimiter": task_config.get("target_delimiter"),
            "fewshot_delimiter": task_config.get("fewshot_delimiter"),
        },
        versions={**package_versions(), "lm-eval": harness_version},
    )
    return BenchmarkResult(
        benchmark=BENCHMARK,
        metric=f"{LM_EVAL_METRIC},{STRICT_MATCH}",
        score=strict["score"] if n else None,
        n=n,
        interval=strict["interval"],
        interval_method="wilson",
        breakdown={
            "filters": filters,
            "lm_eval_results": json_ready(scores),
            "no_strict_match": sum(
                record[STRICT_MATCH]["extracted"] == "[invalid]" for record in records
            ),
        },
        settings=settings,
        note=None if n else "no GSM8K problems were evaluated",
    )
