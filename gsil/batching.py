"""Tokenized training examples and their batches.

An example is one prompt with its demonstration and, for GSIL, SPIN and DFT, the policy's own k
generated responses (``--num-samples``, default 1). A batch of n examples puts the n
demonstrations first and then k blocks of n generations, block j holding every example's
sample j, so that one forward pass scores all of them: rows ``[:n]`` are demos, row
``n + j * n + i`` is sample j of example i. Memory: a batch of n prompts forwards
``n * (1 + k)`` rows (``n`` without generations, SFT).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from gsil.data import TokenLimits, build_sequence, encode_prompt, encode_response
from gsil.demonstrations import Prompt
from gsil.logprobs import IGNORE_INDEX


@dataclass(frozen=True)
class Example:
    """Token ids of one training item; ``index`` is its position in the round's data.

    ``gen_ids`` holds the k generated responses; ``gen_mask`` says which of them count (None:
    all; ``--drop-ties`` leaves out those equal to the demonstration). ``teacher_prompt_ids``:
    the prompt a demonstration-conditioned teacher reads (SDFT), None for other methods.
    """

    index: int
    prompt_ids: tuple[int, ...]
    demo_ids: tuple[int, ...]
    gen_ids: tuple[tuple[int, ...], ...] | None = None
    gen_mask: tuple[bool, ...] | None = None
    teacher_prompt_ids: tuple[int, ...] | None = None


# (tokenizer, prompt, demonstration) -> the teacher prompt's ids, or None
TeacherPrompt = Callable[[Any, Prompt, str], Sequence[int] | None]


@dataclass(frozen=True)
class GeneratedResponses:
    """The policy's own responses to a list of prompts, ``num_samples`` per prompt,
    prompt-major: response j to prompt i is at ``i * num_samples + j``, as
    :func:`gsil.generation.generate_set` returns them. ``mask`` (one entry per response; None:
    all count) says which of them count (``--drop-ties``)."""

    responses: Sequence[str]
    num_samples: int
    mask: Sequence[bool] | None = None

    def __post_init__(self) -> None:
        if self.num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {self.num_samples}")
        if self.mask is not None and len(self.mask) != len(self.responses):
            raise ValueError("gen_mask needs one entry per generated response")


def build_examples(
    tokenizer,
    prompts: Sequence,
    demo_responses: Sequence[str],
    limits: TokenLimits,
    *,
    generated: GeneratedResponses | None = None,
    teacher_prompt: TeacherPrompt | None = None,
) -> list[Example]:
    """Tokenize prompts (by the one prompt function shared with generation) and responses.

    ``generated`` holds ``generated.num_samples`` own responses per prompt (None: only the
    demonstrations, SFT). Prompts longer than ``limits.max_prompt_length`` are an error;
    responses are cut to ``limits.max_length - len(prompt)`` tokens (see ``encode_response``).
    ``teacher_prompt(tokenizer, prompt, demonstration)`` gives each example's
    ``teacher_prompt_ids`` (a method's :meth:`gsil.methods.Method.teacher_prompt_ids`; it
    keeps its own length limit); None or a None result: no teacher prompt.
    """
    max_prompt_length, max_length = limits.max_prompt_length, limits.max_length
    gen_responses = gen_mask = None
    num_samples = 1
    if generated is not None:
        gen_responses, gen_mask = generated.responses, generated.mask
        num_samples = generated.num_samples
        if len(gen_responses) != len(prompts) * num_samples:
            raise ValueError(
                f"{len(prompts)} prompts x {num_samples} samples but "
                f"{len(gen_responses)} generated responses"
            )
    examples = []
    for index, (prompt, demo) in enumerate(zip(prompts, demo_responses, strict=True)):
        prompt_ids = encode_prompt(tokenizer, prompt, max_prompt_length)
        room = max_length - len(prompt_ids)
        if room < 1:
            raise ValueError(
                f"prompt {index} has {len(prompt_ids)} tokens, leaving no room for a response "
                f"within max_length={max_length}; raise max_length or lower max_prompt_length"
            )
        gen_ids = mask = None
        if gen_responses is not None:
            mine = slice(index * num_samples, (index + 1) * num_samples)
            gen_ids = tuple(
                tuple(encode_response(tokenizer, text, room)) for text in gen_responses[mine]
            )
            mask = None if gen_mask is None else tuple(bool(keep) for keep in gen_mask[mine])
        teacher_ids = teacher_prompt(tokenizer, prompt, demo) if teacher_prompt else None
        examples.append(
            Example(
                index=index,
                prompt_ids=tuple(prompt_ids),
                demo_ids=tuple(encode_response(tokenizer, demo, room)),
                gen_ids=gen_ids,
                gen_mask=mask,
                teacher_prompt_ids=None if teacher_ids is None else tuple(teacher_ids),
            )
        )
    return examples


def collate(examples: Sequence[Example], pad_token_id: int, with_generations: bool) -> dict:
    """Right-padded ``input_ids``, ``attention_mask`` and ``labels`` for a list of examples.

    With generations the batch has ``(1 + k) n`` rows: the n demonstrations, then k blocks of
    the n examples' sample j (the module's layout), plus ``gen_mask`` (bool) and
    ``gen_token_counts``, each ``(n, k)``. ``index`` holds the examples' indices and
    ``demo_token_counts`` the demo response lengths. Examples with ``teacher_prompt_ids`` add
    ``teacher_input_ids``, ``teacher_attention_mask`` and ``teacher_labels``: the k n own
    samples again, in the same order, after the teacher prompt instead of the prompt.
    """
    sequences = [build_sequence(ex.prompt_ids, ex.demo_ids) for ex in examples]
    extra = {}
    if with_generations:
        if any(ex.gen_ids is None for ex in examples):
            raise ValueError("this objective needs generated responses, and an example has none")
        sizes = {len(ex.gen_ids) for ex in examples}
        if len(sizes) != 1:
            raise ValueError(f"examples of one batch have different sample counts: {sizes}")
        num_samples = sizes.pop()
        for sample in range(num_samples):
            sequences += [build_sequence(ex.prompt_ids, ex.gen_ids[sample]) for ex in examples]
        extra = {
            "gen_mask": torch.tensor(
                [ex.gen_mask or (True,) * num_samples for ex in examples], dtype=torch.bool
            ),
            "gen_token_counts": torch.tensor(
                [[len(ids) for ids in ex.gen_ids] for ex in examples], dtype=torch.long
            ),
        }
    if with_generations and all(ex.teacher_prompt_ids is not None for ex in examples):
        teacher_rows = [
            build_sequence(ex.teacher_prompt_ids, ex.gen_ids[sample])
            for sample in range(num_samples)
            for ex in examples
        ]
        padded = _pad(teacher_rows, pad_token_id)
        extra.update({f"teacher_{key}": value for key, value in padded.items()})
    return {
        **_pad(sequences, pad_token_id),
        "index": torch.tensor([ex.index for ex in examples], dtype=torch.long),
        "demo_token_counts": torch.tensor([len(ex.demo_ids) for ex in examples]),
        **extra,
    }


def _pad(sequences: Sequence[tuple[list[int], list[int]]], pad_token_id: int) -> dict:
    """Right-padded ``input_ids``, ``attention_mask`` and ``labels`` of (ids, labels) rows."""
    width = max(len(ids) for ids, _ in sequences)
    input_ids = torch.full((len(sequences), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(sequences), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, (ids, row_labels) in enumerate(sequences):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        labels[row, : len(ids)] = torch.tensor(row_labels)
        attention_mask[row, : len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def split_demo_gen(values: Tensor, num_examples: int) -> tuple[Tensor, Tensor | None]:
    """Undo the batch layout: ``(demo part (n,), generated part (n, k) or None)``."""
    if values.shape[0] == num_examples:
        return values, None
    return values[:num_examples], values[num_examples:].reshape(-1, num_examples).T
