"""What every generation backend shares: the result type, eos handling, and batch plans."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

BACKENDS = ("auto", "hf", "vllm")  # the generation backends, the default first
AUTO, HF, VLLM = BACKENDS


class GenerationBackendError(RuntimeError):
    """The requested generation backend cannot run here (e.g. vllm missing or no GPU)."""


@dataclass(frozen=True, kw_only=True)
class Decoding:
    """How responses are decoded, and in what batches; every backend applies the same rule.

    ``do_sample=False`` is greedy (the paper's choice); sampling uses ``temperature``,
    ``top_p`` and ``top_k`` (0: no top-k), seeded from ``seed``. The budget
    ``max_new_tokens`` and the ``batch_size`` have no default here: they come from the section
    that decides them (``GenerationSettings`` for a round, ``EvalOptions`` for an evaluation).
    HF sampling is seeded per batch, so ``batch_size`` changes sampled responses (not greedy
    ones); ``backend`` is one of :data:`BACKENDS`.

    The defaults of the sampling fields and of ``backend`` are those of every section.
    """

    max_new_tokens: int
    batch_size: int
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0
    backend: str = AUTO

    def __post_init__(self) -> None:
        if self.max_new_tokens is None or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.do_sample and not (self.temperature > 0 and 0 < self.top_p <= 1):
            raise ValueError(
                "sampling needs temperature > 0 and 0 < top_p <= 1, got "
                f"{self.temperature}, {self.top_p}"
            )
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0: no top-k), got {self.top_k}")
        if self.backend not in BACKENDS:
            raise ValueError(f"unknown generation backend {self.backend!r}; use one of {BACKENDS}")


@dataclass(frozen=True)
class GenerationSettings:
    """How a round generates its own responses: the run configuration's ``generation`` section.

    The seed is the run's (``seed + round``); each field's ``help`` is its flag's documentation.
    The round's budget and batch size are defined here; the sampling defaults are
    :class:`Decoding`'s.
    """

    max_new_tokens: int = field(
        default=128, metadata={"help": "longest self-generated response in tokens"}
    )
    do_sample: bool = field(
        default=Decoding.do_sample,
        metadata={"help": "sample (default: greedy, as in the paper)"},
    )
    temperature: float = field(
        default=Decoding.temperature, metadata={"help": "sampling temperature"}
    )
    top_p: float = field(default=Decoding.top_p, metadata={"help": "nucleus sampling mass"})
    backend: str = field(
        default=Decoding.backend,
        metadata={
            "help": "auto (vLLM if installed with a GPU, or as vLLM's CPU build; else HF), hf, or "
            "vllm (one engine for the run)",
            "choices": BACKENDS,
            "flag": "generator",
        },
    )
    batch_size: int = field(
        default=16, metadata={"help": "prompts per generation batch", "flag": "gen_batch_size"}
    )
    num_samples: int = field(
        default=1,
        metadata={
            "help": "k: own responses sampled per prompt each round (k > 1 needs --do-sample; "
            "GSIL averages its generated-side loss over them, SPIN pairs the demonstration with "
            "each, DFT takes them as negatives; a batch then forwards (1 + k) x its prompts)"
        },
    )
    top_k: int = field(
        default=Decoding.top_k,
        metadata={
            "help": "sample from the k most likely tokens only (0: no top-k; needs --do-sample; "
            "DFT's authors: 50)"
        },
    )

    system_prompt: str | None = field(
        default=None,
        metadata={
            "help": "a system message put before each prompt (unless it has one) when the round "
            "generates, and only then: the responses are scored and trained on without it (DFT's "
            "authors drew their negatives under 'You are an unhelpful assistant.')",
            "flag": "gen_system_prompt",
        },
    )

    prompt_format: str = field(
        default="chat",
        metadata={
            "help": "how the round's generation sees a prompt: chat (the one prompt format of "
            "training and evaluation) or instruction ('### Instruction: ...\\n\\n### Response: "
            "', what SPIN's and GSIL's public code generated with while training on the chat "
            "template: a mismatch, for exact replication only)",
            "choices": ("chat", "instruction"),
            "flag": "gen_prompt_format",
        },
    )

    def __post_init__(self) -> None:
        if self.prompt_format not in ("chat", "instruction"):
            raise ValueError(
                f"generation.prompt_format (--gen-prompt-format) must be chat or instruction, "
                f"got {self.prompt_format!r}"
            )
        if self.prompt_format == "instruction" and self.system_prompt is not None:
            raise ValueError(
                "generation.system_prompt (--gen-system-prompt) needs a chat prompt; the "
                "instruction prompt format (--gen-prompt-format instruction) has no system turn"
            )
        if self.num_samples < 1:
            raise ValueError(
                f"generation.num_samples (--num-samples) must be >= 1, got {self.num_samples}"
            )
        if self.top_k < 0:
            raise ValueError(
                f"generation.top_k (--top-k) must be >= 0 (0: no top-k), got {self.top_k}"
            )
        if self.top_k and not self.do_sample:
            raise ValueError(
                f"generation.top_k={self.top_k} applies to sampling: add --do-sample (greedy "
                "decoding takes the most likely token anyway), or set --top-k 0"
            )
        if self.num_samples > 1 and not self.do_sample:
            raise ValueError(
                f"generation.num_samples={self.num_samples} needs generation.do_sample: greedy "
                "decoding would give k identical responses (add --do-sample, or set "
                "--num-samples 1)"
            )

    def decoding(self, seed: int) -> Decoding:
        """The round's decoding, seeded with ``seed`` (the run's seed + the round)."""
        return Decoding(
            max_new_tokens=self.max_new_tokens,
            batch_size=self.batch_size,
            do_sample=self.do_sample,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            seed=seed,
            backend=self.backend,
        )


@dataclass(frozen=True)
class GenerationResult:
    """One generated response.

    Attributes:
        text: the decoded response (special tokens skipped, eos not included).
        token_ids: the response token ids, without the terminating eos and padding.
        num_tokens: ``len(token_ids)``.
        truncated: True when generation hit ``max_new_tokens`` without emitting eos.
    """

    text: str
    token_ids: tuple[int, ...]
    num_tokens: int
    truncated: bool

    def __str__(self) -> str:
        return self.text


def deal_batches(num_batches: int, num_processes: int, rank: int) -> list[int]:
    """The batch numbers process ``rank`` generates: every ``num_processes``-th, in turn.

    Every process makes the same number of ``generate()`` calls: under ZeRO-3 transformers
    synchronises the processes at every new token (``synced_gpus``), so a process with one
    batch fewer would leave the others waiting forever. A filler, numbered -1, repeats the
    last batch and its results are dropped.
    """
    mine = list(range(rank, num_batches, num_processes))
    calls = -(-num_batches // num_processes)
    return mine + [-1] * (calls - len(mine))


def plan_batches(prompt_ids: Sequence[Sequence[int]], batch_size: int) -> list[list[int]]:
    """Prompt indices in batches of ``batch_size``, longest prompts first.

    Similar lengths share a batch (little padding), and an out-of-memory error, if any, shows up
    on the first batch rather than after minutes of work.
    """
    order = sorted(range(len(prompt_ids)), key=lambda i: len(prompt_ids[i]), reverse=True)
    return [order[start : start + batch_size] for start in range(0, len(order), batch_size)]


def make_result(
    new_tokens: Sequence[int], tokenizer: Any, eos_ids: Sequence[int], max_new_tokens: int
) -> GenerationResult:
    """Cut generated tokens at the first eos (what follows is padding) and decode them."""
    eos_set = set(eos_ids)
    stop = next((pos for pos, token in enumerate(new_tokens) if token in eos_set), None)
    response = tuple(new_tokens if stop is None else new_tokens[:stop])
    truncated = stop is None and len(new_tokens) >= max_new_tokens
    text = tokenizer.decode(list(response), skip_special_tokens=True)
    return GenerationResult(
        text=text, token_ids=response, num_tokens=len(response), truncated=truncated
    )


def eos_token_ids(tokenizer: Any, model: Any | None) -> list[int]:
    """The tokenizer's eos plus any extra eos ids in the model's generation config."""
    eos_ids: list[int] = []
    if tokenizer.eos_token_id is not None:
        eos_ids.append(tokenizer.eos_token_id)
    config_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if config_eos is not None:
        for token in [config_eos] if isinstance(config_eos, int) else config_eos:
            if token not in eos_ids:
                eos_ids.append(token)
    if not eos_ids:
        raise ValueError("the tokenizer has no eos token; generation would never stop")
    return eos_ids
