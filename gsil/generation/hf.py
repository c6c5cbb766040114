"""The Hugging Face backend: batched, left-padded ``model.generate`` with the KV cache."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from gsil.faults import kill_point
from gsil.generation.common import Decoding, GenerationResult, eos_token_ids, make_result


def generate_hf(
    model: Any,
    tokenizer: Any,
    prompt_ids: Sequence[Sequence[int]],
    batches: Sequence[tuple[int, Sequence[int]]],
    decoding: Decoding,
    progress: bool,
) -> list[tuple[int, GenerationResult]]:
    """Left-padded ``model.generate`` over ``(batch number, prompt indices)`` batches; a batch
    numbered -1 is run for the processes' lockstep only and returns nothing.

    Sampling is seeded per batch from ``decoding.seed`` and the batch number, so a batch's samples do
    not depend on which process generates it or on what ran before.
    """
    eos_ids = eos_token_ids(tokenizer, model)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_ids[0]
    device = next(model.parameters()).device
    # Explicit settings override whatever the checkpoint's generation_config suggests, so the
    # decoding rule is the one asked for (and the one the vllm backend uses).
    options: dict[str, Any] = dict(
        max_new_tokens=decoding.max_new_tokens,
        do_sample=decoding.do_sample,
        num_beams=1,
        eos_token_id=eos_ids,
        pad_token_id=pad_id,
        use_cache=True,
    )
    if decoding.do_sample:
        options.update(
            temperature=decoding.temperature,
            top_p=decoding.top_p,
            top_k=decoding.top_k,  # 0: no top-k (transformers' convention too)
            repetition_penalty=1.0,
        )

    results: list[tuple[int, GenerationResult]] = []
    was_training = model.training
    model.eval()
    cuda_devices = [device] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=cuda_devices), torch.inference_mode():
            for number, batch in tqdm(
                batches, desc="generating", disable=not progress, unit="batch"
            ):
                torch.manual_seed(decoding.seed * 1_000_003 + number)
                input_ids, attention_mask = left_pad([prompt_ids[i] for i in batch], pad_id)
                output = model.generate(
                    input_ids=input_ids.to(device),
                    attention_mask=attention_mask.to(device),
                    **options,
                )
                new_tokens = output[:, input_ids.shape[1] :].tolist()
                if number < 0:
                    continue  # a filler batch (see gsil.generation.core.generate_from_ids)
                for index, tokens in zip(batch, new_tokens, strict=True):
                    results.append(
                        (index, make_result(tokens, tokenizer, eos_ids, decoding.max_new_tokens))
                    )
                kill_point("mid_generation")  # test hook (gsil.faults): the set is incomplete
    finally:
        model.train(was_training)
    return results


def left_pad(sequences: list[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token id lists into ``(input_ids, attention_mask)`` tensors."""
    width = max(len(ids) for ids in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, ids in enumerate(sequences):
        if ids:
            input_ids[row, width - len(ids) :] = torch.tensor(list(ids), dtype=torch.long)
            attention_mask[row, width - len(ids) :] = 1
    return input_ids, attention_mask
