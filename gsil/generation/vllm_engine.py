"""The vLLM backend: the same prompt token ids and decoding settings as the HF one, one engine
for a whole run.

Imported only when vLLM is selected, so the package works without vLLM. On GPUs install
``vllm``; on CPUs vLLM's CPU build (``make setup-vllm``, see the README).

An engine takes 40-60 s to start (on this project's 2-core CPU), so
:class:`VLLMEngine` is created once per run: it starts from the policy's config with
placeholder weights (nothing but the config and tokenizer touches the disk), then the policy's
weights and each later round's are pushed in memory (``load_weights``; see
:mod:`gsil.generation.vllm_worker`). Each request gets its own seed (``seed + prompt index``),
so k sampled responses to one prompt differ and equal seeds give equal samples.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import logging
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from gsil import env
from gsil.generation.common import (
    Decoding,
    GenerationBackendError,
    GenerationResult,
    eos_token_ids,
    make_result,
)

logger = logging.getLogger(__name__)

WORKER_EXTENSION = "gsil.generation.vllm_worker.PolicyWeightLoader"
DEFAULT_CPU_KVCACHE_GIB = "2"  # VLLM_CPU_KVCACHE_SPACE when unset: enough for batch generation


def _import_vllm():
    try:
        import vllm
    except ImportError as error:
        raise GenerationBackendError(
            "backend='vllm' needs vllm, which is not installed: on GPUs pip install "
            "'gsil[vllm]'; on CPUs `make setup-vllm` (vLLM's CPU build in .venv-vllm); or use "
            "backend='hf'"
        ) from error
    return vllm


class VLLMEngine:
    """One vLLM engine serving the current policy.

    Args:
        model: the policy (a transformers model, peft-wrapped is fine) or a model directory.
        tokenizer: its tokenizer (for the eos ids and decoding).
        dtype: ``"float32"``, ``"bfloat16"`` or ``"auto"`` (the checkpoint's).
        seed: the engine's seed (requests carry their own).
        max_model_len: longest prompt + response in tokens (default: the model's).
        enforce_eager: run the model eagerly instead of vLLM's compiled graph. ``None``: the
            environment's ``GSIL_VLLM_EAGER`` (``1`` or ``0``), else eager on CPUs and compiled
            on GPUs. Measured on this project's 2-core CPU (SmolLM2-135M, fp32, one run): eager
            starts in 57 s, compiled in 176 s on every start (vLLM's CPU build fails to reload
            its compile cache and compiles again) for 15% more tokens/s on 200 evaluation
            prompts (183.6 against 159.1, identical outputs): worth it for generation longer
            than about 15 minutes (``GSIL_VLLM_EAGER=0``, e.g. the full experiment's evaluation).
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        dtype: str = "auto",
        seed: int = 0,
        max_model_len: int | None = None,
        enforce_eager: bool | None = None,
    ) -> None:
        vllm = _import_vllm()
        self.tokenizer = tokenizer
        self.eos_ids = eos_token_ids(tokenizer, None if _is_path(model) else model)
        self._scratch = Path(tempfile.mkdtemp(prefix="gsil-vllm-"))
        try:
            if _is_path(model):
                model_dir, load_format = os.fspath(model), "auto"
            else:
                # a live policy: the engine starts from its config with placeholder weights,
                # then gets the real ones in memory as every later round does. Writing the
                # weights for the start would not work on several ranks: transformers'
                # save_pretrained writes nothing on a rank other than 0.
                model_dir, load_format = self._write_config(model), "dummy"
            on_gpu = torch.cuda.is_available()
            options: dict[str, Any] = {"enforce_eager": eager_mode(enforce_eager, on_gpu)}
            if on_gpu:
                # the HF policy and its optimizer state stay on the same GPU
                options["gpu_memory_utilization"] = env.vllm_gpu_memory()
            else:
                _cpu_environment()
            # vLLM puts its model on the first GPU its engine process sees: show it only this
            # process's GPU, so that each rank's engine sits beside the rank's own policy
            with _only_visible(_this_gpu() if on_gpu else None):
                self.llm = vllm.LLM(
                    model=model_dir,
                    tokenizer=model_dir,
                    dtype=dtype,
                    seed=seed,
                    max_model_len=max_model_len,
                    worker_extension_cls=WORKER_EXTENSION,
                    load_format=load_format,
                    **options,
                )
            if load_format == "dummy":
                self.load_weights(model)
        except BaseException:
            self.close()
            shutil.rmtree(self._scratch, ignore_errors=True)
            raise
        # the config copy is no longer needed: weights arrive in memory
        shutil.rmtree(self._scratch, ignore_errors=True)

    def _write_config(self, model: Any) -> str:
        """The policy's config and tokenizer (no weights) in a scratch directory, for vLLM to
        build its model from."""
        from gsil.models import is_peft_model

        policy = model.get_base_model() if is_peft_model(model) else model
        model_dir = self._scratch / "policy"
        policy.config.save_pretrained(model_dir)
        if getattr(policy, "generation_config", None) is not None:
            policy.generation_config.save_pretrained(model_dir)
        self.tokenizer.save_pretrained(model_dir)
        return os.fspath(model_dir)

    def load_weights(self, model: Any) -> None:
        """Push the policy's current weights into the engine, in memory (LoRA merged)."""
        from safetensors.torch import save

        from gsil.models import is_peft_model

        # merge LoRA adapters on a copy: the live policy keeps training its adapters
        policy = copy.deepcopy(model).merge_and_unload() if is_peft_model(model) else model
        state = policy.state_dict()
        if getattr(policy.config, "tie_word_embeddings", False):
            state.pop("lm_head.weight", None)  # the same tensor as the input embeddings
        blob = save({name: t.detach().contiguous().cpu() for name, t in state.items()})
        loaded = self.llm.collective_rpc("load_policy_weights", args=(blob,))
        if not loaded or min(loaded) <= 0:
            raise RuntimeError(f"vLLM loaded no policy weights ({loaded})")
        self.llm.reset_prefix_cache()  # cached prefixes were computed with the old weights

    def generate(
        self,
        prompt_ids: Sequence[Sequence[int]],
        decoding: Decoding,
        *,
        progress: bool = False,
        request_numbers: Sequence[int] | None = None,
    ) -> list[GenerationResult]:
        """One response per prompt; request i is seeded ``decoding.seed + request_numbers[i]`` (its
        index in the whole set by default), so a sharded set samples what one process would."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        numbers = range(len(prompt_ids)) if request_numbers is None else request_numbers
        sampling = [
            SamplingParams(
                n=1,
                temperature=decoding.temperature if decoding.do_sample else 0.0,  # 0: greedy
                top_p=decoding.top_p if decoding.do_sample else 1.0,
                top_k=decoding.top_k if decoding.do_sample else 0,  # 0: no top-k, as HF
                max_tokens=decoding.max_new_tokens,
                seed=decoding.seed + number,
                stop_token_ids=self.eos_ids,
                skip_special_tokens=True,
            )
            for number in numbers
        ]
        requests = [TokensPrompt(prompt_token_ids=list(ids)) for ids in prompt_ids]
        outputs = self.llm.generate(requests, sampling, use_tqdm=progress)
        results = []
        for output in outputs:
            completion = output.outputs[0]
            result = make_result(
                list(completion.token_ids), self.tokenizer, self.eos_ids, decoding.max_new_tokens
            )
            # vLLM reports the stop reason itself; trust it over our token-count inference.
            truncated = completion.finish_reason == "length"
            results.append(
                GenerationResult(result.text, result.token_ids, result.num_tokens, truncated)
            )
        return results

    def close(self) -> None:
        """Shut the engine down and free its memory (and its worker processes)."""
        llm = getattr(self, "llm", None)
        if llm is None:
            return
        engine_core = getattr(llm.llm_engine, "engine_core", None)
        if engine_core is not None and hasattr(engine_core, "shutdown"):
            engine_core.shutdown()
        self.llm = None
        del llm
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def __enter__(self) -> VLLMEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _cpu_environment() -> None:
    """vLLM's CPU settings, where the user has not set them.

    ``VLLM_CPU_KVCACHE_SPACE`` (GiB): enough for batch generation. ``VLLM_CPU_NUM_OF_RESERVED_CPU``:
    vLLM keeps one core for its scheduler process and binds the model's threads to the rest; on
    a machine of 4 cores or fewer that idles a large share of it. Measured on 2 cores: 82 tokens/s
    with one core reserved, 148 with none.
    """
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", DEFAULT_CPU_KVCACHE_GIB)
    if (os.cpu_count() or 1) <= 4:
        os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")


def eager_mode(enforce_eager: bool | None, on_gpu: bool) -> bool:
    """Whether the engine runs eagerly: as asked, else as ``GSIL_VLLM_EAGER`` says, else eager
    on CPUs only (see :class:`VLLMEngine`)."""
    if enforce_eager is not None:
        return enforce_eager
    setting = env.vllm_eager()
    return setting if setting is not None else not on_gpu


def _this_gpu() -> str:
    """The physical id of this process's current GPU (accelerate sets it to the rank's)."""
    index = torch.cuda.current_device()
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    return visible_device_id(visible, index)


def visible_device_id(visible: str | None, index: int) -> str:
    """The ``CUDA_VISIBLE_DEVICES`` entry of device ``index`` as this process numbers it:
    ``visible`` is this process's ``CUDA_VISIBLE_DEVICES`` (``None``: every GPU, in order)."""
    if visible is None or not visible.strip():
        return str(index)
    ids = [entry.strip() for entry in visible.split(",") if entry.strip()]
    if index >= len(ids):
        raise ValueError(f"GPU {index} is not among CUDA_VISIBLE_DEVICES={visible!r}")
    return ids[index]


@contextlib.contextmanager
def _only_visible(device: str | None):
    """Set ``CUDA_VISIBLE_DEVICES`` to ``device`` while vLLM spawns its engine process (which
    reads it at start; this process's CUDA is already initialised and keeps its devices).

    With ``VLLM_ENABLE_V1_MULTIPROCESSING=0`` vLLM runs in this process and uses its GPU 0
    whatever this says: several ranks then need the external-launcher executor instead.
    """
    if device is None:
        yield
        return
    before = os.environ.get("CUDA_VISIBLE_DEVICES")
    os.environ["CUDA_VISIBLE_DEVICES"] = device
    try:
        yield
    finally:
        if before is None:
            del os.environ["CUDA_VISIBLE_DEVICES"]
        else:
            os.environ["CUDA_VISIBLE_DEVICES"] = before


class EngineSlot:
    """One engine serving a sequence of policies (a run's rounds, an evaluation's models):
    started with the first policy it serves, then given each later one in memory.

    Args:
        engine: an engine already running, to serve from instead of starting one.
        **options: :class:`VLLMEngine` keyword arguments for the start (``dtype`` defaults to
            the first policy's: ``"auto"`` for a model directory).
    """

    def __init__(self, engine: VLLMEngine | None = None, **options: Any) -> None:
        self.engine = engine
        self.options = options

    def serve(self, policy: Any, tokenizer: Any) -> VLLMEngine:
        """The engine, holding ``policy``'s current weights."""
        if self.engine is None:
            options = {"dtype": policy_dtype(policy), **self.options}
            logger.info("starting a vLLM engine (%s)", options["dtype"])
            self.engine = VLLMEngine(policy, tokenizer, **options)
        else:
            self.engine.load_weights(policy)
        return self.engine

    def close(self) -> None:
        if self.engine is not None:
            self.engine.close()
            self.engine = None


def policy_dtype(model: Any) -> str:
    """vLLM's dtype name for ``model``'s weights (``"auto"``, the checkpoint's, for a path)."""
    return "auto" if _is_path(model) else str(next(model.parameters()).dtype).split(".")[-1]


def _is_path(model: Any) -> bool:
    return isinstance(model, str | os.PathLike)


def generate_vllm(
    model: Any,
    tokenizer: Any,
    prompt_ids: Sequence[Sequence[int]],
    decoding: Decoding,
    *,
    progress: bool = False,
    request_numbers: Sequence[int] | None = None,
) -> list[GenerationResult]:
    """Generate with ``model`` if it is a :class:`VLLMEngine`; otherwise start one for this
    call only (a minute of start-up: pass an engine when generating more than once)."""
    options = dict(progress=progress, request_numbers=request_numbers)
    if isinstance(model, VLLMEngine):
        return model.generate(prompt_ids, decoding, **options)
    logger.info("starting a vLLM engine for one call (pass a VLLMEngine to reuse one)")
    with VLLMEngine(model, tokenizer, dtype=policy_dtype(model), seed=decoding.seed) as engine:
        return engine.generate(prompt_ids, decoding, **options)
