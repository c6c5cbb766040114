"""Tokenized training examples and their batches.

An example is one prompt with its demonstration and, for GSIL and SPIN, the policy's own
generated response. A batch puts the demonstrations first and the generations after them, so
that one forward pass scores both (rows ``[:n]`` are demos, ``[n:]`` generations).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from gsil.data import build_sequence, encode_prompt, encode_response
from gsil.logprobs import IGNORE_INDEX


@dataclass(frozen=True)
class Example:
    """Token ids of one training item; ``index`` is its position in the round's data."""

    index: int
    prompt_ids: tuple[int, ...]
    demo_ids: tuple[int, ...]
    gen_ids: tuple[int, ...] | None = None


def build_examples(
    tokenizer,
    prompts: Sequence,
    demo_responses: Sequence[str],
    gen_responses: Sequence[str] | None,
    *,
    max_prompt_length: int | None,
    max_length: int,
) -> list[Example]:
    """Tokenize prompts (by the one prompt function shared with generation) and responses.

    Responses are cut to ``max_length - len(prompt)`` tokens (see ``encode_response``).
    """
    if gen_responses is not None and len(gen_responses) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(gen_responses)} generated responses")
    examples = []
    for index, (prompt, demo) in enumerate(zip(prompts, demo_responses, strict=True)):
        prompt_ids = encode_prompt(tokenizer, prompt, max_prompt_length)
        room = max_length - len(prompt_ids)
        if room < 1:
            raise ValueError(
                f"prompt {index} has {len(prompt_ids)} tokens, leaving no room for a response "
                f"within max_length={max_length}; raise max_length or lower max_prompt_length"
            )
        gen_ids = None
        if gen_responses is not None:
            gen_ids = tuple(encode_response(tokenizer, gen_responses[index], room))
        examples.append(
            Example(
                index=index,
                prompt_ids=tuple(prompt_ids),
                demo_ids=tuple(encode_response(tokenizer, demo, room)),
                gen_ids=gen_ids,
            )
        )
    return examples


def collate(examples: Sequence[Example], pad_token_id: int, with_generations: bool) -> dict:
    """Right-padded ``input_ids``, ``attention_mask`` and ``labels`` for a list of examples.

    With generations the batch has ``2 n`` rows: the n demonstrations, then the n generations.
    ``index`` holds the examples' indices and ``demo_token_counts`` the demo response lengths.
    """
    sequences = [build_sequence(ex.prompt_ids, ex.demo_ids) for ex in examples]
    if with_generations:
        if any(ex.gen_ids is None for ex in examples):
            raise ValueError("this objective needs generated responses, and an example has none")
        sequences += [build_sequence(ex.prompt_ids, ex.gen_ids) for ex in examples]
    width = max(len(ids) for ids, _ in sequences)
    input_ids = torch.full((len(sequences), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(sequences), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, (ids, row_labels) in enumerate(sequences):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        labels[row, : len(ids)] = torch.tensor(row_labels)
        attention_mask[row, : len(ids)] = 1
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "labels": labels,
        "index": torch.tensor([ex.index for ex in examples], dtype=torch.long),
        "demo_token_counts": torch.tensor([len(ex.demo_ids) for ex in examples]),
    }


def split_demo_gen(values: Tensor, num_examples: int) -> tuple[Tensor, Tensor | None]:
    """Undo the batch layout: ``(demo part, generated part or None)``."""
    if values.shape[0] == num_examples:
        return values, None
    return values[:num_examples], values[num_examples:]
