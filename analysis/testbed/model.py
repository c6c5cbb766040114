"""The testbed's policy: a character tokenizer with a chat template, a small Llama, its base.

Everything goes through the LLM path's own functions: prompts are formatted by
:func:`gsil.data.encode_prompt` (the chat template below), responses are encoded by
:func:`gsil.data.encode_response` (response ids, then EOS) into the training layout of
:func:`gsil.batching.build_examples` / :func:`gsil.batching.collate`, sequence log-probabilities
come from :func:`gsil.logprobs.sequence_logps`, and samples from :func:`gsil.generation.generate`
(the HF backend), which stops at EOS and drops it. So ``log pi(y | x)`` here is the probability
of the event "the characters of y, then EOS", the same event ``p_data(y | x)`` measures.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from analysis.testbed.distribution import BASE, DataSpec, TaskDistribution, alphabet
from gsil.batching import build_examples, collate
from gsil.data import TokenLimits
from gsil.logprobs import sequence_logps as token_sum_logps

PAD, BOS, EOS, UNK = "<|pad|>", "<|bos|>", "<|end|>", "<|unk|>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK, *ROLE_TOKENS)
# BOS, then each turn as its role token and content (an assistant turn ends with EOS), then the
# assistant's role token when a response is to follow: "<|bos|><|user|>3+5<|assistant|>".
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)
NO_TRUNCATION = 1 << 30  # a max_length no testbed sequence reaches


def build_tokenizer():
    """A character-level ``PreTrainedTokenizerFast`` over :func:`alphabet`, built in code.

    One token per character (a WordLevel vocabulary behind a split-every-character
    pre-tokenizer, a fusing decoder), plus the special tokens ``SPECIAL_TOKENS`` (pad, bos, eos,
    unk and one per chat role) and :data:`CHAT_TEMPLATE`. Every string over the alphabet has
    exactly one tokenization and decodes back to itself (no spaces added or cleaned up).
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: index for index, token in enumerate([*SPECIAL_TOKENS, *alphabet()])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    backend.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        additional_special_tokens=list(ROLE_TOKENS),
        clean_up_tokenization_spaces=False,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


@dataclass(frozen=True)
class ModelSpec:
    """The sizes of the testbed's ``LlamaConfig`` (RoPE positions; tied embeddings).

    The default (2 layers, 64 wide, 2 heads of 32, MLP 128) has 84k parameters: small enough
    for a grid of hundreds of short runs on 2 CPU cores (a training step of 32 pairs takes
    about 0.02-0.08 s there, one thread, measured under load; 128 wide, 0.33M parameters, is
    3-4x slower per step and fits the pretraining data better, see the README).
    """

    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 2
    intermediate_size: int = 128
    max_positions: int = 256
    initializer_range: float = 0.02

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"ModelSpec.hidden_size ({self.hidden_size}) must be a multiple of num_heads "
                f"({self.num_heads})"
            )

    @classmethod
    def tiny(cls, **overrides: Any) -> ModelSpec:
        """A model for tests: 2 layers, 32 wide (about 25k parameters); ``overrides`` set
        other fields."""
        sizes = dict(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64)
        return cls(**{**sizes, **overrides})


def build_model(spec: ModelSpec, tokenizer: Any, seed: int):
    """A freshly initialised ``LlamaForCausalLM`` of ``spec`` (fp32, eval mode); the caller's
    global RNG state is left untouched."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_heads,
        max_position_embeddings=spec.max_positions,
        initializer_range=spec.initializer_range,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model.eval()


def count_parameters(model: Any) -> int:
    """Number of distinct parameters (tied weights counted once)."""
    return sum(parameter.numel() for parameter in model.parameters())


@dataclass(frozen=True)
class PretrainSpec:
    """How the base model is pretrained on ``data`` (:data:`~analysis.testbed.distribution.BASE`).

    ``num_examples`` (prompt, response) pairs are drawn once; ``steps`` AdamW steps of
    ``batch_size`` pairs (cycling through them) minimise the response tokens' mean negative
    log-likelihood, with a linear warm-up over ``warmup_steps`` and a cosine decay to 0.
    """

    steps: int = 800
    batch_size: int = 64
    lr: float = 3e-3
    weight_decay: float = 0.0
    warmup_steps: int = 50
    num_examples: int = 51_200  # one pass of 800 steps x 64
    data: DataSpec = BASE

    @classmethod
    def quick(cls) -> PretrainSpec:
        """A few seconds of pretraining, for tests and ``--quick``."""
        return cls(steps=30, batch_size=16, warmup_steps=5, num_examples=480)


def _digest(*sections: Any) -> str:
    text = json.dumps([asdict(section) for section in sections], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def pretrained_base_dir(
    pretrain: PretrainSpec, model_spec: ModelSpec, seed: int, cache_dir: Path
) -> Path:
    """The base model's directory, ``cache_dir/base-<digest>-seed<seed>``, pretrained and saved
    (atomically, by :func:`gsil.models.save_model`) on the first call, reused afterwards.

    The digest covers ``pretrain`` (with its data spec) and ``model_spec``: another setting is
    another directory. The directory is an ordinary model directory that
    :func:`gsil.models.load_model` (and so ``run_rounds``) reads. Processes asking for the
    same base at once take turns (a lock file beside it): one trains, the others reuse.
    """
    from gsil.models import save_model

    path = Path(cache_dir) / f"base-{_digest(pretrain, model_spec)}-seed{seed}"
    if (path / "config.json").is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.parent / f".{path.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if not (path / "config.json").is_file():
            tokenizer = build_tokenizer()
            model = build_model(model_spec, tokenizer, seed)
            pretrain_model(model, tokenizer, pretrain, seed)
            save_model(model, tokenizer, path)
    return path


def pretrained_base(
    pretrain: PretrainSpec, model_spec: ModelSpec, seed: int, cache_dir: Path
) -> tuple[Any, Any]:
    """``(model, tokenizer)`` of :func:`pretrained_base_dir`, loaded by
    :func:`gsil.models.load_model` on the CPU in fp32 (eval mode)."""
    from gsil.models import load_model

    path = pretrained_base_dir(pretrain, model_spec, seed, cache_dir)
    return load_model(path, dtype="float32", device="cpu")


def pretrain_model(model: Any, tokenizer: Any, pretrain: PretrainSpec, seed: int) -> list[float]:
    """Train ``model`` in place on ``pretrain.data``'s pairs (response-only loss, the training
    layout of :mod:`gsil.batching`); returns the loss of each step. Seeded by ``seed``."""
    demos = TaskDistribution(pretrain.data).demonstrations(
        pretrain.num_examples, seed, split="train"
    )
    examples = build_examples(
        tokenizer,
        [demo.prompt for demo in demos],
        [demo.response for demo in demos],
        TokenLimits(max_prompt_length=None, max_length=model.config.max_position_embeddings),
    )
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=pretrain.lr, weight_decay=pretrain.weight_decay
    )

    def schedule(step: int) -> float:
        if step < pretrain.warmup_steps:
            return (step + 1) / pretrain.warmup_steps
        progress = (step - pretrain.warmup_steps) / max(1, pretrain.steps - pretrain.warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(examples), generator=generator).tolist()
    losses = []
    model.train()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for step in range(pretrain.steps):
            start = (step * pretrain.batch_size) % len(examples)
            picked = [
                examples[order[(start + i) % len(examples)]] for i in range(pretrain.batch_size)
            ]
            batch = collate(picked, tokenizer.pad_token_id, with_generations=False)
            logits = model(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
            ).logits
            loss = -token_sum_logps(logits, batch["labels"]).sum() / batch[
                "demo_token_counts"
            ].sum().clamp(min=1)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            losses.append(loss.item())
    model.eval()
    return losses


def sequence_logps(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    responses: Sequence[str],
    temperature: float = 1.0,
    batch_size: int = 256,
) -> torch.Tensor:
    """Exact ``log pi_T(y | x)`` per pair, float64 ``(n,)``.

    The sum over the response tokens *and the EOS after them* of ``log softmax(z / T)``, in the
    training layout (``build_examples``: the prompt by ``encode_prompt``, the response by
    ``encode_response``, never truncated). This is the log-probability that sampling at
    temperature ``T`` (top-k and top-p off) writes exactly ``y`` and stops.
    """
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    examples = build_examples(
        tokenizer, prompts, responses, TokenLimits(max_prompt_length=None, max_length=NO_TRUNCATION)
    )
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    parts = []
    try:
        with torch.inference_mode():
            for start in range(0, len(examples), batch_size):
                batch = collate(examples[start : start + batch_size], tokenizer.pad_token_id, False)
                logits = model(
                    input_ids=batch["input_ids"].to(device),
                    attention_mask=batch["attention_mask"].to(device),
                ).logits
                parts.append(
                    token_sum_logps(logits.float() / temperature, batch["labels"].to(device))
                )
    finally:
        model.train(was_training)
    if not parts:
        return torch.zeros(0, dtype=torch.float64)
    return torch.cat(parts).double().cpu()


@dataclass(frozen=True)
class PolicySamples:
    """Sampled responses, one per prompt, in the prompts' order.

    ``complete[i]`` is True when response i ended with EOS and holds only alphabet characters;
    otherwise (it hit ``max_new_tokens``, or it holds a special token, which the decoded text
    drops) ``texts[i]`` is not a string whose complete probability ``sequence_logps`` gives,
    and p_data puts no mass on what was sampled.
    """

    texts: list[str]
    complete: list[bool]


def sample(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    temperature: float,
    seed: int,
    max_new_tokens: int = 64,
) -> PolicySamples:
    """One response per prompt sampled at ``temperature`` (no top-k, no top-p) through
    :func:`gsil.generation.generate` (HF backend), seeded by ``seed``."""
    from gsil.generation import Decoding, generate

    decoding = Decoding(
        max_new_tokens=max_new_tokens,
        batch_size=256,
        do_sample=True,
        temperature=temperature,
        seed=seed,
        backend="hf",
    )
    results = generate(model, tokenizer, list(prompts), decoding, progress=False)
    special = set(tokenizer.all_special_ids)
    return PolicySamples(
        texts=[result.text for result in results],
        complete=[
            not result.truncated and not special.intersection(result.token_ids)
            for result in results
        ],
    )


def time_training_step(spec: ModelSpec, batch_size: int = 32, repeats: int = 10) -> float:
    """Seconds per training step (forward, backward, AdamW) of ``spec``: ``batch_size`` pairs
    of the pretraining data, through :func:`pretrain_model` (a warm-up call first)."""
    tokenizer = build_tokenizer()
    model = build_model(spec, tokenizer, seed=0)
    pretrain = PretrainSpec(steps=2, batch_size=batch_size, num_examples=batch_size, warmup_steps=1)
    pretrain_model(model, tokenizer, pretrain, seed=0)  # warm-up
    pretrain = PretrainSpec(
        steps=repeats, batch_size=batch_size, num_examples=batch_size, warmup_steps=1
    )
    start = time.perf_counter()
    pretrain_model(model, tokenizer, pretrain, seed=0)
    return (time.perf_counter() - start) / repeats
