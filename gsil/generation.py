"""Self-generated responses: the current policy answers the demonstration prompts.

Prompts are formatted by :func:`gsil.data.encode_prompt` -- the one prompt function shared with
training and evaluation -- and the resulting token ids are fed unchanged to either backend:

* ``"hf"``: batched ``model.generate`` with left padding and the KV cache. Prompts are sorted by
  length (longest first) so each batch holds similar lengths and wastes little on padding;
  results come back in the caller's order.
* ``"vllm"``: used by ``backend="auto"`` when vllm is installed and a GPU is present; it gets
  the same prompt token ids (``TokensPrompt``) and the same decoding settings.

:func:`generate_set` adds caching for the trainer: a generated set is written as JSONL with a
sidecar of the settings that made it, and reused when a resumed run asks for the same thing.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from tqdm.auto import tqdm

from gsil.data import encode_prompt, save_jsonl
from gsil.io import atomic_file

BACKENDS = ("auto", "hf", "vllm")
SETTINGS_FORMAT_VERSION = 2  # 2: sampling seeded per batch


class GenerationBackendError(RuntimeError):
    """The requested generation backend cannot run here (e.g. vllm missing or no GPU)."""


class DemonstrationLike(Protocol):
    """What :func:`generate_set` needs from a demonstration (``gsil.data.Demonstration``)."""

    id: Any
    prompt: Any
    response: str


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
) -> list[GenerationResult]:
    """Generate one response per prompt with the policy ``model``.

    Args:
        model: a transformers causal LM (peft-wrapped is fine); for the vllm backend a model
            directory path also works.
        tokenizer: its tokenizer (needs a chat template and an eos token).
        prompts: user messages (str) or chat message lists, formatted by ``encode_prompt``.
        max_new_tokens: generation budget per response.
        do_sample: False for greedy decoding (the paper's choice), True to sample.
        temperature, top_p: sampling settings (ignored when greedy). No top-k is applied.
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
    if any(len(ids) == 0 for ids in prompt_ids):
        raise ValueError("every prompt must have at least one token")
    if not prompt_ids:
        return []
    settings = dict(
        max_new_tokens=max_new_tokens,
        do_sample=do_sample,
        temperature=temperature,
        top_p=top_p,
        seed=seed,
        progress=progress,
    )
    world = accelerator.num_processes if accelerator is not None else 1
    rank = accelerator.process_index if accelerator is not None else 0
    batches = plan_batches(prompt_ids, batch_size)
    mine = deal_batches(len(batches), world, rank)
    if resolve_backend(backend) == "vllm":
        from gsil.generation_vllm import generate_vllm

        indices = [index for number in mine if number >= 0 for index in batches[number]]
        results = generate_vllm(model, tokenizer, [prompt_ids[i] for i in indices], **settings)
        local = list(zip(indices, results, strict=True))
    else:
        work = [(n, batches[n if n >= 0 else -1]) for n in mine]
        local = _generate_hf(model, tokenizer, prompt_ids, work, **settings)
    if world > 1:
        local = gather_object(local)
    ordered: list[GenerationResult | None] = [None] * len(prompt_ids)
    for index, result in local:
        ordered[index] = result
    if any(result is None for result in ordered):
        raise RuntimeError("generation: some prompts were generated by no process (a bug)")
    return ordered  # type: ignore[return-value]


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


def resolve_backend(backend: str) -> str:
    """Turn ``"auto"`` into ``"vllm"`` (vllm installed and a GPU present) or ``"hf"``."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown generation backend {backend!r}; use one of {BACKENDS}")
    if backend == "auto":
        vllm_usable = importlib.util.find_spec("vllm") is not None and torch.cuda.is_available()
        return "vllm" if vllm_usable else "hf"
    return backend


def _generate_hf(
    model: Any,
    tokenizer: Any,
    prompt_ids: Sequence[Sequence[int]],
    batches: Sequence[tuple[int, Sequence[int]]],
    *,
    max_new_tokens: int,
    do_sample: bool,
    temperature: float,
    top_p: float,
    seed: int,
    progress: bool,
) -> list[tuple[int, GenerationResult]]:
    """Left-padded ``model.generate`` over ``(batch number, prompt indices)`` batches; a batch
    numbered -1 is run for the processes' lockstep only and returns nothing.

    Sampling is seeded per batch from ``seed`` and the batch number, so a batch's samples do
    not depend on which process generates it or on what ran before.
    """
    eos_ids = _eos_token_ids(tokenizer, model)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_ids[0]
    device = next(model.parameters()).device
    # Explicit settings override whatever the checkpoint's generation_config suggests, so the
    # decoding rule is the one asked for (and the one the vllm backend uses).
    decoding: dict[str, Any] = dict(
        max_new_tokens=max_new_tokens,
        do_sample=do_sample,
        num_beams=1,
        eos_token_id=eos_ids,
        pad_token_id=pad_id,
        use_cache=True,
    )
    if do_sample:
        decoding.update(temperature=temperature, top_p=top_p, top_k=0, repetition_penalty=1.0)

    results: list[tuple[int, GenerationResult]] = []
    was_training = model.training
    model.eval()
    cuda_devices = [device] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=cuda_devices), torch.inference_mode():
            for number, batch in tqdm(batches, desc="generating", disable=not progress,
                                      unit="batch"):  # fmt: skip
                torch.manual_seed(seed * 1_000_003 + number)
                input_ids, attention_mask = _left_pad([prompt_ids[i] for i in batch], pad_id)
                output = model.generate(
                    input_ids=input_ids.to(device),
                    attention_mask=attention_mask.to(device),
                    **decoding,
                )
                new_tokens = output[:, input_ids.shape[1] :].tolist()
                if number < 0:
                    continue  # a filler batch (see generate_from_ids)
                for index, tokens in zip(batch, new_tokens, strict=True):
                    results.append(
                        (index, _make_result(tokens, tokenizer, eos_ids, max_new_tokens))
                    )
    finally:
        model.train(was_training)
    return results


def _left_pad(sequences: list[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token id lists into ``(input_ids, attention_mask)`` tensors."""
    width = max(len(ids) for ids in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, ids in enumerate(sequences):
        if ids:
            input_ids[row, width - len(ids) :] = torch.tensor(list(ids), dtype=torch.long)
            attention_mask[row, width - len(ids) :] = 1
    return input_ids, attention_mask


def _make_result(
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


def _eos_token_ids(tokenizer: Any, model: Any | None) -> list[int]:
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


def generate_set(
    model: Any,
    tokenizer: Any,
    demos: Sequence[DemonstrationLike],
    path: str | os.PathLike[str],
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
    extra_settings: Mapping[str, Any] | None = None,
    accelerator: Accelerator | None = None,
) -> list[str]:
    """Generate responses to the demonstrations' prompts, cached as JSONL at ``path``.

    If ``path`` and its sidecar ``path.with_suffix(".settings.json")`` exist and record the same
    settings -- decoding settings, the encoded prompt token ids (so a changed tokenizer or
    template counts as a change), the demonstrations, and ``extra_settings`` (e.g. the round or
    policy checkpoint) -- the file is reused. Otherwise responses are generated and written
    atomically. ``batch_size``, ``backend`` and ``progress`` do not affect reuse.

    Each JSONL row holds ``id, prompt, demo_response, generated_response, num_tokens,
    truncated, tie`` where ``tie`` says the generated response equals the demonstration
    (after stripping whitespace).

    Returns:
        The generated responses, in the order of ``demos``.
    """
    path = Path(path)
    prompt_ids = [encode_prompt(tokenizer, demo.prompt, max_prompt_length) for demo in demos]
    settings = _set_settings(
        demos, prompt_ids, max_new_tokens, do_sample, temperature, top_p, seed,
        max_prompt_length, extra_settings,
    )  # fmt: skip
    cached = _load_matching_set(path, settings, demos)
    if cached is not None:
        return cached

    results = generate_from_ids(
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
        accelerator=accelerator,
    )
    rows = [
        {
            "id": demo.id,
            "prompt": demo.prompt,
            "demo_response": demo.response,
            "generated_response": result.text,
            "num_tokens": result.num_tokens,
            "truncated": result.truncated,
            "tie": result.text.strip() == demo.response.strip(),
        }
        for demo, result in zip(demos, results, strict=True)
    ]
    if accelerator is None or accelerator.is_main_process:
        sidecar = settings_path(path)
        # Drop the old sidecar first: a crash between the two writes then leaves no stale match.
        sidecar.unlink(missing_ok=True)
        save_jsonl(rows, path)
        record = {"settings": settings, "backend": resolve_backend(backend), "num_rows": len(rows)}
        with atomic_file(sidecar) as handle:
            handle.write(json.dumps(record, indent=2, sort_keys=True) + "\n")
    if accelerator is not None:
        accelerator.wait_for_everyone()  # the files exist before any process reads them
    return [row["generated_response"] for row in rows]


def settings_path(path: str | os.PathLike[str]) -> Path:
    """The sidecar that records the settings of the generated set at ``path``."""
    return Path(path).with_suffix(".settings.json")


def read_generated_set(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Read the rows of a generated-set JSONL file (for metrics such as tie rate, lengths)."""
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def _set_settings(
    demos: Sequence[DemonstrationLike],
    prompt_ids: Sequence[Sequence[int]],
    max_new_tokens: int,
    do_sample: bool,
    temperature: float,
    top_p: float,
    seed: int,
    max_prompt_length: int | None,
    extra_settings: Mapping[str, Any] | None,
) -> dict[str, Any]:
    """Everything that determines a generated set, as a JSON-comparable dict."""
    demo_record = [[demo.id, demo.prompt, demo.response] for demo in demos]
    return {
        "format_version": SETTINGS_FORMAT_VERSION,
        "max_new_tokens": max_new_tokens,
        "do_sample": do_sample,
        # Greedy output does not depend on these, so they must not force regeneration.
        "temperature": temperature if do_sample else None,
        "top_p": top_p if do_sample else None,
        "seed": seed if do_sample else None,
        "max_prompt_length": max_prompt_length,
        "num_prompts": len(demos),
        "prompt_ids_sha256": _sha256_json([list(ids) for ids in prompt_ids]),
        "demos_sha256": _sha256_json(demo_record),
        # A JSON round trip makes tuples and lists compare equal with what was read back.
        "extra": json.loads(json.dumps(dict(extra_settings or {}), sort_keys=True, default=str)),
    }


def _load_matching_set(
    path: Path, settings: Mapping[str, Any], demos: Sequence[DemonstrationLike]
) -> list[str] | None:
    """Return the cached responses if ``path`` was made with ``settings``, else None."""
    sidecar = settings_path(path)
    if not (path.is_file() and sidecar.is_file()):
        return None
    try:
        record = json.loads(sidecar.read_text(encoding="utf-8"))
        rows = read_generated_set(path)
    except (OSError, json.JSONDecodeError):
        return None  # unreadable or half-written: regenerate
    if record.get("settings") != settings or len(rows) != len(demos):
        return None
    if any(row.get("id") != _json_value(demo.id) for row, demo in zip(rows, demos, strict=True)):
        return None
    return [row["generated_response"] for row in rows]


def _json_value(value: Any) -> Any:
    """``value`` as it reads back from JSON (tuples become lists, etc.)."""
    return json.loads(json.dumps(value, default=str))


def _sha256_json(value: Iterable[Any]) -> str:
    encoded = json.dumps(value, sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.sha256(encoded.encode("utf-8")).hexdigest()
