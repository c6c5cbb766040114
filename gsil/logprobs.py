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

Labels follow the Hugging Face convention: aligned with ``input_ids`` (same shape), so the
logit at position ``t`` predicts ``labels[t + 1]``.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100
DEFAULT_CHUNK_TOKENS = 256


def _shift_labels(labels: Tensor, ignore_index: int) -> Tensor:
    """Labels of the next token at each position; the last position predicts nothing."""
    pad = torch.full_like(labels[:, :1], ignore_index)
    return torch.cat([labels[:, 1:], pad], dim=1)


def _reduce(token_logps: Tensor, mask: Tensor, average: bool) -> Tensor:
    summed = (token_logps * mask).sum(-1)
    return summed / mask.sum(-1).clamp(min=1) if average else summed


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
) -> Tensor:
    """Sum (or mean, ``average=True``) of response-token log-probs per sequence.

    Args:
        logits: ``(batch, length, vocab)`` model outputs, any float dtype (computed in float32).
        labels: ``(batch, length)`` token ids aligned with the inputs, ``ignore_index`` on prompt
            and padding positions.
        chunk_tokens: rows of the vocabulary matrix processed at once; bounds the extra memory
            to about ``chunk_tokens x vocab`` floats.

    Returns:
        ``(batch,)`` float32 log-probabilities.
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
    return _reduce(token_logps, mask, average)


def _projected_token_logps(hidden: Tensor, weight: Tensor, targets: Tensor) -> Tensor:
    logits = (hidden @ weight.T).float()
    return logits.gather(1, targets[:, None]).squeeze(1) - torch.logsumexp(logits, dim=-1)


def sequence_logps_from_hidden(
    hidden: Tensor,
    output_weight: Tensor,
    labels: Tensor,
    *,
    average: bool = False,
    ignore_index: int = IGNORE_INDEX,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
) -> Tensor:
    """Like :func:`sequence_logps`, from final hidden states and the output (lm_head) weight.

    Only response positions are projected to the vocabulary, ``chunk_tokens`` rows at a time,
    and each chunk's logits are recomputed in the backward instead of kept: the full
    ``(batch, length, vocab)`` logits never exist. Valid for models whose logits are exactly
    ``hidden @ weight.T`` (no bias, soft-capping or scaling).
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
    chunks = []
    for start in range(0, positions.numel(), chunk_tokens):
        hidden_chunk = selected_hidden[start : start + chunk_tokens]
        target_chunk = selected_targets[start : start + chunk_tokens]
        if torch.is_grad_enabled() and (hidden.requires_grad or output_weight.requires_grad):
            chunks.append(
                checkpoint(
                    _projected_token_logps,
                    hidden_chunk,
                    output_weight,
                    target_chunk,
                    use_reentrant=False,
                )
            )
        else:
            chunks.append(_projected_token_logps(hidden_chunk, output_weight, target_chunk))
    token_logps = torch.zeros(batch * length, dtype=torch.float32, device=hidden.device)
    if chunks:
        token_logps = token_logps.index_put((positions,), torch.cat(chunks))
    return _reduce(token_logps.view(batch, length), mask, average)


def naive_sequence_logps(
    logits: Tensor, labels: Tensor, *, average: bool = False, ignore_index: int = IGNORE_INDEX
) -> Tensor:
    """Reference implementation (full ``log_softmax``), for tests and benchmarks only."""
    targets = _shift_labels(labels, ignore_index)
    mask = targets != ignore_index
    all_logps = logits.float().log_softmax(-1)
    token_logps = all_logps.gather(2, torch.where(mask, targets, 0)[..., None]).squeeze(2)
    return _reduce(token_logps, mask, average)
