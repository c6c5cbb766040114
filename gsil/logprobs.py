"""Per-sequence log-probabilities of response tokens, without a full-vocabulary log_softmax.

``log pi(y|x) = sum_t [ z_t[y_t] - logsumexp(z_t) ]`` over the response tokens ``t`` (labels not
equal to ``ignore_index``; the prompt and padding are masked). The naive
``logits.log_softmax(-1).gather(...)`` materialises (and, under autograd, keeps) a second
``batch x length x vocab`` float tensor; here the vocabulary dimension is only ever touched in
chunks of rows:

- :func:`sequence_logps` works from logits with a custom autograd function: the forward keeps
  one logsumexp per token, the backward writes ``softmax - onehot`` chunk by chunk into the one
  gradient buffer the logits need anyway.
- :func:`sequence_logps_from_hidden` goes further for training: it never builds the full logits,
  projecting only the response positions through the output layer, chunk by chunk, with
  activation checkpointing (recomputed in the backward).
- :func:`model_sequence_logps` scores a whole (possibly wrapped) causal LM by either path:
  ``lean`` (:func:`lean_model_logps`: the model's forward for the final hidden states, then
  :func:`sequence_logps_from_hidden`; what training and the reference pass use by default) or
  ``plain`` (the model's full logits, then :func:`sequence_logps`).

Every function can also return, with ``prob_weighted=True``, each sequence's
probability-weighted sum ``sum_t sg(p_t) log p_t`` (``p_t = exp(log p_t)``, detached: the
gradient is ``sum_t p_t grad log p_t``) from the same token log-probs, as a
:class:`SequenceLogps`: Dynamic Fine-Tuning's objective (Wu et al. 2025, arXiv 2508.05629).

Labels follow the Hugging Face convention: aligned with ``input_ids`` (same shape), so the
logit at position ``t`` predicts ``labels[t + 1]``.
"""

from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100
DEFAULT_CHUNK_TOKENS = 256

# the output layer of :func:`sequence_logps_from_hidden`: its (vocab, hidden) weight or the module
OutputLayer = Tensor | nn.Module


def _shift_labels(labels: Tensor, ignore_index: int) -> Tensor:
    """Labels of the next token at each position; the last position predicts nothing."""
    pad = torch.full_like(labels[:, :1], ignore_index)
    return torch.cat([labels[:, 1:], pad], dim=1)


class SequenceLogps(NamedTuple):
    """Two reductions of the same response-token log-probs, each ``(batch,)`` float32."""

    logps: Tensor  # sum_t log p_t (the mean over tokens with ``average``)
    prob_weighted: Tensor  # sum_t sg(p_t) log p_t (the mean with ``average``)


def _reduce(token_logps: Tensor, mask: Tensor, average: bool) -> Tensor:
    summed = (token_logps * mask).sum(-1)
    return summed / mask.sum(-1).clamp(min=1) if average else summed


def _reductions(
    token_logps: Tensor, mask: Tensor, average: bool, prob_weighted: bool
) -> Tensor | SequenceLogps:
    """``(batch, length)`` token log-probs -> their per-row reduction ``(batch,)``, and with
    ``prob_weighted`` also the detached-probability-weighted one (a :class:`SequenceLogps`)."""
    logps = _reduce(token_logps, mask, average)
    if not prob_weighted:
        return logps
    weighted = token_logps * token_logps.detach().exp()
    return SequenceLogps(logps, _reduce(weighted, mask, average))


class _ChunkedTokenLogps(torch.autograd.Function):
    """Token log-probs ``z[y] - logsumexp(z)`` per row of a (rows, vocab) view, in row chunks."""

    @staticmethod
    def forward(ctx, logits: Tensor, targets: Tensor, chunk_rows: int) -> Tensor:  # type: ignore[override]
        rows = logits.shape[0]
        token_logps = torch.empty(rows, dtype=torch.float32, device=logits.device)
        lse = torch.empty(rows, dtype=torch.float32, device=logits.device)
        for start in range(0, rows, chunk_rows):
            chunk = logits[start : start + chunk_rows].float()
            chunk_lse = torch.logsumexp(chunk, dim=-1)
            lse[start : start + chunk_rows] = chunk_lse
            picked = chunk.gather(1, targets[start : start + chunk_rows, None]).squeeze(1)
            token_logps[start : start + chunk_rows] = picked - chunk_lse
        ctx.save_for_backward(logits, targets, lse)
        ctx.chunk_rows = chunk_rows
        return token_logps

    @staticmethod
    def backward(ctx, grad_token_logps: Tensor):  # type: ignore[override]
        logits, targets, lse = ctx.saved_tensors
        grad_logits = torch.empty_like(logits)
        step = ctx.chunk_rows
        for start in range(0, logits.shape[0], step):
            rows = slice(start, start + step)
            # d(z[y] - lse(z))/dz = onehot(y) - softmax(z); in place, one chunk-sized buffer
            grad = torch.exp(logits[rows].float() - lse[rows, None]).neg_()
            grad.scatter_add_(1, targets[rows, None], torch.ones_like(grad[:, :1]))
            grad.mul_(grad_token_logps[rows, None])
            grad_logits[rows] = grad
        return grad_logits, None, None


def sequence_logps(
    logits: Tensor,
    labels: Tensor,
    *,
    average: bool = False,
    ignore_index: int = IGNORE_INDEX,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
    prob_weighted: bool = False,
) -> Tensor | SequenceLogps:
    """Sum (or mean, ``average=True``) of response-token log-probs per sequence.

    Args:
        logits: ``(batch, length, vocab)`` model outputs, any float dtype (computed in float32).
        labels: ``(batch, length)`` token ids aligned with the inputs, ``ignore_index`` on prompt
            and padding positions.
        chunk_tokens: rows of the vocabulary matrix processed at once; bounds the extra memory
            to about ``chunk_tokens x vocab`` floats.
        prob_weighted: also reduce ``sg(p_t) log p_t`` (see the module's docstring).

    Returns:
        ``(batch,)`` float32 log-probabilities; with ``prob_weighted`` a :class:`SequenceLogps`.
    """
    if logits.shape[:2] != labels.shape:
        raise ValueError(
            f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} disagree on "
            "(batch, length)"
        )
    targets = _shift_labels(labels, ignore_index)
    mask = targets != ignore_index
    safe_targets = torch.where(mask, targets, 0)
    batch, length, vocab = logits.shape
    token_logps = _ChunkedTokenLogps.apply(
        logits.reshape(batch * length, vocab), safe_targets.reshape(-1), chunk_tokens
    ).view(batch, length)
    return _reductions(token_logps, mask, average, prob_weighted)


def _projected_token_logps(hidden: Tensor, output_layer: OutputLayer, targets: Tensor) -> Tensor:
    """``z[y] - logsumexp(z)`` for ``z = output_layer(hidden)``: ``(rows, hidden)`` -> ``(rows,)``."""
    if isinstance(output_layer, Tensor):
        logits = (hidden @ output_layer.T).float()
    else:
        logits = output_layer(hidden).float()
    return logits.gather(1, targets[:, None]).squeeze(1) - torch.logsumexp(logits, dim=-1)


class _ProjectedTokenLogps(torch.autograd.Function):
    """:func:`_projected_token_logps` for a plain ``(vocab, hidden)`` weight with a backward
    written by hand: the forward keeps one logsumexp per row (not the logits), the backward
    recomputes the chunk's logits once and turns them into their gradient in place
    (``g (onehot(y) - softmax(z))``), then the two matmuls. Same arithmetic as checkpointing
    :func:`_projected_token_logps`, without its second logsumexp and its temporaries."""

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, targets: Tensor) -> Tensor:  # type: ignore[override]
        logits = (hidden @ weight.T).float()
        picked = logits.gather(1, targets[:, None]).squeeze(1)
        top = logits.amax(dim=-1, keepdim=True)
        # logsumexp in place: no chunk-sized temporaries (the logits are not needed after)
        lse = logits.sub_(top).exp_().sum(dim=-1).log_().add_(top.squeeze(1))
        ctx.save_for_backward(hidden, weight, targets, lse)
        return picked - lse

    @staticmethod
    def backward(ctx, grad_token_logps: Tensor):  # type: ignore[override]
        hidden, weight, targets, lse = ctx.saved_tensors
        grad = (hidden @ weight.T).float()
        grad.sub_(lse[:, None]).exp_().mul_(grad_token_logps.neg()[:, None])  # -g softmax(z)
        grad.scatter_add_(1, targets[:, None], grad_token_logps[:, None])  # + g onehot(y)
        grad = grad.to(weight.dtype)
        grad_hidden = grad @ weight if ctx.needs_input_grad[0] else None
        grad_weight = grad.T @ hidden if ctx.needs_input_grad[1] else None
        return grad_hidden, grad_weight, None


def _plain_weight(output_layer: OutputLayer, hidden: Tensor) -> Tensor | None:
    """The output layer's weight when :class:`_ProjectedTokenLogps` computes exactly what the
    layer does: a weight tensor, or an ``nn.Linear`` without bias whose weight is whole (not a
    ZeRO-3 shard gathered by hooks), outside autocast; else None (checkpointing instead)."""
    if torch.is_autocast_enabled(hidden.device.type):
        return None
    if isinstance(output_layer, Tensor):
        return output_layer
    if type(output_layer) is not nn.Linear or output_layer.bias is not None:
        return None  # a LoRA wrapper, a bias: the module's own forward
    weight = output_layer.weight
    hooked = output_layer._forward_pre_hooks or output_layer._forward_hooks
    if hasattr(weight, "ds_id") or hooked or hasattr(output_layer, "_hf_hook"):
        return None  # a DeepSpeed-partitioned weight, hooks that must run (accelerate, torch)
    return weight


def _needs_grad(hidden: Tensor, output_layer: OutputLayer) -> bool:
    if not torch.is_grad_enabled():
        return False
    if isinstance(output_layer, Tensor):
        return hidden.requires_grad or output_layer.requires_grad
    return hidden.requires_grad or any(p.requires_grad for p in output_layer.parameters())


def sequence_logps_from_hidden(
    hidden: Tensor,
    output_layer: OutputLayer,
    labels: Tensor,
    *,
    average: bool = False,
    ignore_index: int = IGNORE_INDEX,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
    prob_weighted: bool = False,
) -> Tensor | SequenceLogps:
    """Like :func:`sequence_logps`, from final hidden states and the output layer.

    Only response positions are projected to the vocabulary, ``chunk_tokens`` rows at a time,
    and each chunk's logits are recomputed in the backward instead of kept: the full
    ``(batch, length, vocab)`` logits never exist; the extra memory is about
    ``chunk_tokens x vocab`` floats. A plain bias-free linear output layer (the usual tied or
    untied head) goes through a hand-written backward (:class:`_ProjectedTokenLogps`), any
    other (LoRA, a bias, ZeRO-3's gathering hooks, autocast) through activation checkpointing
    of its own forward.

    Args:
        hidden: ``(batch, length, hidden)`` final hidden states (what the output layer reads).
        output_layer: the ``(vocab, hidden)`` output weight (logits ``hidden @ weight.T``), or
            the output module itself (``lm_head``; a bias, a LoRA-wrapped head or ZeRO-3's
            parameter gathering then work as in the model's own forward). Valid for models
            whose logits are exactly this layer's output (no soft-capping or scaling after it).
        labels: ``(batch, length)`` as in :func:`sequence_logps`.
        prob_weighted: also reduce ``sg(p_t) log p_t`` (see the module's docstring).

    Returns:
        ``(batch,)`` float32 log-probabilities; with ``prob_weighted`` a :class:`SequenceLogps`.
    """
    if hidden.shape[:2] != labels.shape:
        raise ValueError(
            f"hidden {tuple(hidden.shape)} and labels {tuple(labels.shape)} disagree on "
            "(batch, length)"
        )
    targets = _shift_labels(labels, ignore_index)
    mask = targets != ignore_index
    batch, length, _ = hidden.shape
    positions = mask.reshape(-1).nonzero().squeeze(1)
    selected_hidden = hidden.reshape(batch * length, -1).index_select(0, positions)
    selected_targets = targets.reshape(-1).index_select(0, positions)
    recompute = _needs_grad(hidden, output_layer)
    weight = _plain_weight(output_layer, hidden) if recompute else None
    chunks = []
    for start in range(0, positions.numel(), chunk_tokens):
        hidden_chunk = selected_hidden[start : start + chunk_tokens]
        target_chunk = selected_targets[start : start + chunk_tokens]
        if weight is not None:
            chunks.append(_ProjectedTokenLogps.apply(hidden_chunk, weight, target_chunk))
        elif recompute:
            chunks.append(
                checkpoint(
                    _projected_token_logps,
                    hidden_chunk,
                    output_layer,
                    target_chunk,
                    use_reentrant=False,
                )
            )
        else:
            chunks.append(_projected_token_logps(hidden_chunk, output_layer, target_chunk))
    token_logps = torch.zeros(batch * length, dtype=torch.float32, device=hidden.device)
    if chunks:
        token_logps = token_logps.index_put((positions,), torch.cat(chunks))
    return _reductions(token_logps.view(batch, length), mask, average, prob_weighted)


def naive_sequence_logps(
    logits: Tensor, labels: Tensor, *, average: bool = False, ignore_index: int = IGNORE_INDEX
) -> Tensor:
    """Reference implementation (full ``log_softmax``), for tests and benchmarks only."""
    targets = _shift_labels(labels, ignore_index)
    mask = targets != ignore_index
    all_logps = logits.float().log_softmax(-1)
    token_logps = all_logps.gather(2, torch.where(mask, targets, 0)[..., None]).squeeze(2)
    return _reduce(token_logps, mask, average)


# ---------------------------------------------------------------------------------------------
# A causal LM's response log-probs, by either path


LOGPROB_PATHS = ("lean", "plain")
# config fields after which the logits are no longer the output layer's output (Gemma 2/3,
# Cohere, Granite): the lean path refuses such models
_LOGIT_TRANSFORMS = {
    "final_logit_softcapping": (None,),
    "logit_scale": (None, 1, 1.0),
    "logits_scaling": (None, 1, 1.0),
}

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LeanHead:
    """Where the lean path reads a causal LM: the module whose output's ``last_hidden_state``
    the output layer reads (``decoder``), that output layer (a LoRA-wrapped ``lm_head`` too),
    and the forward's keyword that limits the logits it computes (None: the model has none)."""

    decoder: nn.Module
    output_layer: nn.Module
    keep_logits_arg: str | None


class LeanPathUnsupported(ValueError):
    """The model's logits are not the output layer applied to the decoder's last hidden state
    (or its wrapper cannot run the output layer on its own); the message says why."""


def _core_model(model: nn.Module) -> nn.Module:
    """The model inside its DDP / DeepSpeed / ``torch.compile`` wrappers (a peft model stays
    peft-wrapped: its output layer may carry adapters)."""
    while True:
        if _is_fsdp(model):
            raise LeanPathUnsupported(
                "FSDP shards the output layer with the whole model; it cannot run alone"
            )
        inner = getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            inner = getattr(model, "module", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


def _is_fsdp(module: nn.Module) -> bool:
    names = {cls.__name__ for cls in type(module).__mro__}
    return bool(names & {"FullyShardedDataParallel", "FSDPModule"})


def lean_head(model: nn.Module) -> LeanHead:
    """The decoder, output layer and logits-limiting keyword of a (wrapped) causal LM.

    Raises:
        LeanPathUnsupported: no output layer or decoder, FSDP, or a config that transforms the
            logits after the output layer (soft-capping, scaling).
    """
    core = _core_model(model)
    causal_lm = core.get_base_model() if hasattr(core, "get_base_model") else core
    config = getattr(causal_lm, "config", None)
    for name, neutral in _LOGIT_TRANSFORMS.items():
        value = getattr(config, name, None)
        if value not in neutral:
            raise LeanPathUnsupported(
                f"{type(causal_lm).__name__} transforms its logits after the output layer "
                f"(config.{name} = {value})"
            )
    get_output, get_decoder = (
        getattr(causal_lm, "get_output_embeddings", None),
        getattr(causal_lm, "get_decoder", None),
    )
    output_layer = get_output() if get_output is not None else None
    try:
        decoder = get_decoder() if get_decoder is not None else None
    except (AttributeError, NotImplementedError, ValueError):
        decoder = None
    if output_layer is None or decoder is None or decoder is causal_lm:
        raise LeanPathUnsupported(
            f"{type(causal_lm).__name__} has no separate decoder and output layer"
        )
    parameters = inspect.signature(causal_lm.forward).parameters
    keep = next((k for k in ("logits_to_keep", "num_logits_to_keep") if k in parameters), None)
    return LeanHead(decoder, output_layer, keep)


def _hidden_states(output) -> Tensor:
    if isinstance(output, Tensor):
        return output
    if isinstance(output, tuple):
        return output[0]
    return output.last_hidden_state


def final_hidden_states(
    model: nn.Module, head: LeanHead, input_ids: Tensor, attention_mask: Tensor
) -> tuple[Tensor, bool, torch.dtype]:
    """Run ``model`` whole (through its wrappers), asking for the last position's logits only,
    and return its decoder's final hidden states with the forward's autocast state (enabled,
    dtype), kept by a forward hook on ``head.decoder``."""
    captured: list[tuple[Tensor, bool, torch.dtype]] = []

    def keep_hidden(module, args, output):
        hidden = _hidden_states(output)
        device = hidden.device.type
        autocast = torch.is_autocast_enabled(device), torch.get_autocast_dtype(device)
        captured.append((hidden, *autocast))

    handle = head.decoder.register_forward_hook(keep_hidden)
    try:
        extra = {head.keep_logits_arg: 1} if head.keep_logits_arg else {}
        model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **extra)
    finally:
        handle.remove()
    if len(captured) != 1:
        raise RuntimeError(
            f"the decoder ran {len(captured)} times in one forward; use the plain log-prob path"
        )
    return captured[0]


def lean_model_logps(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    labels: Tensor,
    *,
    average: bool = False,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
    prob_weighted: bool = False,
) -> Tensor | SequenceLogps:
    """Response log-probs of a causal LM without its full logits (:func:`sequence_logps_from_hidden`).

    The model is called as a whole, through its wrappers (DDP's forward prepares the gradient
    all-reduce, DeepSpeed's its hooks), asking for the last position's logits only; a forward
    hook on its decoder keeps the final hidden states, which the output layer then projects at
    the response positions only, in chunks recomputed in the backward. The output layer runs as
    a module (tied or untied, LoRA-wrapped, gathered by ZeRO-3's hooks) under the autocast state
    of the model's forward.

    Args:
        model: a causal LM, possibly wrapped (peft, DDP, DeepSpeed, ``torch.compile``).
        input_ids, attention_mask, labels: ``(batch, length)``; labels as in
            :func:`sequence_logps`.
        prob_weighted: also reduce ``sg(p_t) log p_t`` (see the module's docstring).

    Returns:
        ``(batch,)`` float32 log-probabilities; with ``prob_weighted`` a :class:`SequenceLogps`.

    Raises:
        LeanPathUnsupported: see :func:`lean_head`.
    """
    head = lean_head(model)
    hidden, autocast_enabled, autocast_dtype = final_hidden_states(
        model, head, input_ids, attention_mask
    )
    with torch.autocast(hidden.device.type, dtype=autocast_dtype, enabled=autocast_enabled):
        return sequence_logps_from_hidden(
            hidden,
            head.output_layer,
            labels,
            average=average,
            chunk_tokens=chunk_tokens,
            prob_weighted=prob_weighted,
        )


_warned_unsupported: set[str] = set()


def model_sequence_logps(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    labels: Tensor,
    *,
    average: bool,
    path: str,
    prob_weighted: bool = False,
) -> Tensor | SequenceLogps:
    """Per-row response log-probs ``(batch,)`` of a (wrapped) causal LM, by ``path`` (with
    ``prob_weighted``, a :class:`SequenceLogps` that adds ``sum_t sg(p_t) log p_t``):

    - ``"lean"``: :func:`lean_model_logps`, no full logits; a model it cannot serve
      (:class:`LeanPathUnsupported`) takes the plain path, with a warning (once per reason);
    - ``"plain"``: the model's full ``(batch, length, vocab)`` logits, then
      :func:`sequence_logps`.
    """
    if path not in LOGPROB_PATHS:
        raise ValueError(f"unknown log-prob path {path!r}; choose one of {LOGPROB_PATHS}")
    if path == "lean":
        try:
            return lean_model_logps(
                model,
                input_ids,
                attention_mask,
                labels,
                average=average,
                prob_weighted=prob_weighted,
            )
        except LeanPathUnsupported as reason:
            if str(reason) not in _warned_unsupported:
                _warned_unsupported.add(str(reason))
                logger.warning("lean log-prob path unavailable: %s; using the plain path", reason)
    outputs = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    return sequence_logps(outputs.logits, labels, average=average, prob_weighted=prob_weighted)
