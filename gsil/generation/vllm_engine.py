"""The vLLM generation backend: same prompt token ids, same decoding settings as the HF one.

Imported only when vLLM is selected (``backend="vllm"``, or ``"auto"`` with vLLM installed and
a CUDA GPU present), so the package works without vLLM.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from gsil.generation.common import (
    GenerationBackendError,
    GenerationResult,
    eos_token_ids,
    make_result,
)


def generate_vllm(
    model: Any,
    tokenizer: Any,
    prompt_ids: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    do_sample: bool,
    temperature: float,
    top_p: float,
    seed: int,
    progress: bool,
) -> list[GenerationResult]:
    """Generate with vLLM from the same prompt token ids and decoding settings.

    vLLM loads weights from disk, so an in-memory model is first written with
    :func:`gsil.models.save_model` (LoRA merged) to a temporary directory; a path is used as is.
    A new engine is built per call (generation runs once per round, so that cost is paid once).
    """
    try:
        from vllm import LLM, SamplingParams
        from vllm.inputs import TokensPrompt
    except ImportError as error:
        raise GenerationBackendError(
            "backend='vllm' needs vllm, which is not installed: pip install 'gsil[vllm]' "
            "(CUDA GPU required), or use backend='hf'"
        ) from error
    if not torch.cuda.is_available():
        raise GenerationBackendError("backend='vllm' needs a CUDA GPU; use backend='hf'")
    import gc

    from gsil.models import save_model

    eos_ids = eos_token_ids(tokenizer, None if isinstance(model, str | os.PathLike) else model)
    sampling = SamplingParams(
        n=1,
        temperature=temperature if do_sample else 0.0,  # 0 means greedy in vLLM
        top_p=top_p if do_sample else 1.0,
        max_tokens=max_new_tokens,
        seed=seed,
        stop_token_ids=eos_ids,
        skip_special_tokens=True,
    )
    with tempfile.TemporaryDirectory(prefix="gsil-vllm-") as scratch:
        if isinstance(model, str | os.PathLike):
            model_dir = os.fspath(model)
        else:
            model_dir = os.fspath(save_model(model, tokenizer, Path(scratch) / "policy"))
        engine = LLM(
            model=model_dir,
            tokenizer=model_dir,
            seed=seed,
            dtype="auto",
            # The HF policy (and its optimizer state) stays resident on the same GPU.
            gpu_memory_utilization=float(os.environ.get("GSIL_VLLM_GPU_MEMORY", "0.5")),
        )
        requests = [TokensPrompt(prompt_token_ids=list(ids)) for ids in prompt_ids]
        outputs = engine.generate(requests, sampling, use_tqdm=progress)
        del engine
        gc.collect()
        torch.cuda.empty_cache()
    results = []
    for output in outputs:
        completion = output.outputs[0]
        tokens = list(completion.token_ids)
        result = make_result(tokens, tokenizer, eos_ids, max_new_tokens)
        # vLLM reports the stop reason itself; trust it over our token-count inference.
        truncated = completion.finish_reason == "length"
        results.append(
            GenerationResult(result.text, result.token_ids, result.num_tokens, truncated)
        )
    return results


# ----------------------------------------------------------------------------- generated sets
