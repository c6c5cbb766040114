"""Memory-lean sequence log-probs agree with the naive log_softmax().gather()."""

import pytest
import torch

from gsil.logprobs import (
    IGNORE_INDEX,
    naive_sequence_logps,
    sequence_logps,
    sequence_logps_from_hidden,
)


def masked_batch(batch=3, length=9, vocab=50, seed=0, dtype=torch.float64):
    generator = torch.Generator().manual_seed(seed)
    logits = 3 * torch.randn(batch, length, vocab, generator=generator, dtype=dtype)
    labels = torch.randint(0, vocab, (batch, length), generator=generator)
    prompt_lengths = [2, 4, 1]
    pad_from = [9, 6, 7]  # right padding
    for row in range(batch):
        labels[row, : prompt_lengths[row]] = IGNORE_INDEX
        labels[row, pad_from[row] :] = IGNORE_INDEX
    return logits, labels


def by_hand(logits, labels, average):
    """Explicit loop: the definition, position by position."""
    out = []
    for row in range(labels.shape[0]):
        total, count = 0.0, 0
        for t in range(labels.shape[1] - 1):
            target = int(labels[row, t + 1])
            if target == IGNORE_INDEX:
                continue
            total += float(torch.log_softmax(logits[row, t].double(), -1)[target])
            count += 1
        out.append(total / max(count, 1) if average else total)
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("average", [False, True])
@pytest.mark.parametrize("chunk_tokens", [1, 4, 1024])
def test_chunked_matches_naive_and_definition(average, chunk_tokens):
    logits, labels = masked_batch()
    ours = sequence_logps(logits, labels, average=average, chunk_tokens=chunk_tokens)
    naive = naive_sequence_logps(logits, labels, average=average)
    torch.testing.assert_close(ours.double(), naive.double(), atol=1e-5, rtol=0)
    torch.testing.assert_close(ours.double(), by_hand(logits, labels, average), atol=1e-5, rtol=0)


def test_chunked_gradient_matches_naive():
    logits, labels = masked_batch(dtype=torch.float32)
    weights = torch.tensor([1.0, -2.0, 0.5])
    ours_input = logits.clone().requires_grad_(True)
    naive_input = logits.clone().requires_grad_(True)
    (sequence_logps(ours_input, labels, chunk_tokens=5) * weights).sum().backward()
    (naive_sequence_logps(naive_input, labels) * weights).sum().backward()
    torch.testing.assert_close(ours_input.grad, naive_input.grad, atol=1e-6, rtol=1e-5)
    # masked positions (prompt, padding, the last position) get no gradient at all
    assert ours_input.grad[0, -1].abs().max() == 0
    assert ours_input.grad[1, 6:].abs().max() == 0


def test_bfloat16_logits_are_computed_in_float32():
    logits, labels = masked_batch(dtype=torch.float32)
    ours = sequence_logps(logits.bfloat16(), labels)
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours, naive_sequence_logps(logits.bfloat16(), labels))


@pytest.mark.parametrize("chunk_tokens", [2, 1024])
def test_from_hidden_matches_naive_values_and_gradients(chunk_tokens):
    generator = torch.Generator().manual_seed(1)
    hidden = torch.randn(3, 9, 16, generator=generator)
    weight = torch.randn(50, 16, generator=generator)
    _, labels = masked_batch()
    hidden_a, weight_a = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    hidden_b, weight_b = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    ours = sequence_logps_from_hidden(hidden_a, weight_a, labels, chunk_tokens=chunk_tokens)
    naive = naive_sequence_logps(hidden_b @ weight_b.T, labels)
    torch.testing.assert_close(ours, naive, atol=1e-5, rtol=0)
    ours.sum().backward()
    naive.sum().backward()
    torch.testing.assert_close(hidden_a.grad, hidden_b.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(weight_a.grad, weight_b.grad, atol=1e-5, rtol=1e-5)


def test_fully_masked_row_gives_zero_and_shape_errors():
    logits, labels = masked_batch()
    labels[0] = IGNORE_INDEX
    assert float(sequence_logps(logits, labels)[0]) == 0.0
    assert float(sequence_logps(logits, labels, average=True)[0]) == 0.0
    with pytest.raises(ValueError, match="disagree"):
        sequence_logps(logits, labels[:, :-1])
