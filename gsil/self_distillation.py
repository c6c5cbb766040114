"""SDFT, self-distillation fine-tuning: the policy learns from its own samples, scored token by
token against itself shown the demonstration in context, as a teacher kept as an exponential
moving average of its weights.

Shenfeld, Damani, Hübotter and Agrawal 2026, "Self-Distillation Enables Continual Learning",
arXiv 2601.19897; the authors' code (github.com/idanshen/Self-Distillation: ``main.py``,
``distil_trainer.py``) and TRL's experimental trainer (``trl/experimental/sdft/``:
``sdft_trainer.py``, ``loss_utils.py``, ``sdft_config.py``, TRL 1.16).

For a prompt x with demonstration c, the policy's own sample y (the round's generated set)::

    student_t = pi_theta(. | x, y_<t)                       (the prompt as every method formats it)
    teacher_t = pi_phi(. | T(x, c), y_<t)                   (T: TEACHER_TEMPLATE, no gradient)
    loss(x, y) = mean over t >= s of D_alpha(student_t, teacher_t)     (s = skip_tokens)
    phi <- (1 - r) phi + r theta after every optimizer step            (r = ema_rate)

``D_alpha`` is exact over the whole vocabulary at each position (the paper's "analytic
per-token" estimator), the generalised Jensen-Shannon divergence of GKD that both codes use:
``alpha = 0`` is the forward KL(teacher || student) (the authors' code's default, with which,
by their README and the paper's v2, section 3, every result was produced), ``alpha = 1`` the reverse
KL(student || teacher) of the paper's derivation, in between
``alpha KL(teacher || m) + (1 - alpha) KL(student || m)`` with ``m = (1 - alpha) student +
alpha teacher``. A sequence's loss is the mean over its tokens after the first ``s`` (the
authors skip 3, against the teacher's phrases such as "Based on the example"); an example's,
the mean over its k samples. The defaults are the authors' (``main.py``): alpha 0, EMA rate
0.01 after every step, 3 skipped tokens, one sample per prompt.

Where this differs, and why:

- **Rounds.** The authors sample afresh for every optimizer step; here the round's policy
  samples once per round (the generation stage every method shares) and the round trains on
  those samples: on-policy at the round's first step, increasingly stale after it (many short
  rounds come closer). The EMA teacher starts as a copy of the initial model (as the authors')
  and is one moving average over the whole run: each round hands it on to the next
  (``round_<t>/model_loss_state.pt``). Under LoRA, whose adapters are merged between rounds,
  it restarts from each round's policy.
- **TRL's defaults differ from the authors'**: its teacher is the initial model (``base``;
  ``ema`` with rate 0.05 is an option), its divergence alpha 0.5 on the student's top-100
  logits, its teacher prompt ``"{prompt}\\n\\n{privileged_context}"``, no skipped tokens.
  The full-vocabulary divergence here is TRL's ``distillation_mode="full_logits"``.
- **Temperature.** Both codes divide both models' logits by the sampling temperature; here
  the models' own distributions are compared (the same at temperature 1, the authors').
- **No importance weights.** The authors correct vLLM's sampling mismatch with a truncated
  importance weight, TRL a stale sample with a clipped one; the round's samples carry none.
- **Lengths.** The teacher prompt has at most ``max_teacher_prompt_length`` tokens (the
  demonstration's end is cut to fit; the authors allow 8192 tokens); the student's prompt and
  sample keep the run's ``max_prompt_length`` and ``max_length``.

The teacher is a full copy of the policy on every process (DDP and DeepSpeed ZeRO-2 keep whole
weights there), in the policy's dtype: a bf16 policy (the authors', ZeRO's bf16 weights)
averages in bf16, where an update smaller than a weight's precision is lost; under
accelerate's bf16 mixed precision the weights stay float32. FSDP and ZeRO-3 shard the weights
and are refused. Both models' logits are made at the response positions only
(:func:`response_logits`), ``(tokens, vocabulary)`` each, with float32 softmaxes; the run's
``--logprob-path`` and ``--average-logps`` do not apply.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
from accelerate import Accelerator, DistributedType
from torch import Tensor, nn

from gsil.data import PromptTooLong, encode_prompt
from gsil.demonstrations import Prompt
from gsil.logprobs import IGNORE_INDEX, LeanPathUnsupported, final_hidden_states, lean_head
from gsil.objectives import Stats, sample_mean
from gsil.processes import is_zero3

# the authors' teacher prompt (main.py), as the last user turn
TEACHER_TEMPLATE = (
    "\n{prompt}\n\nThis is an example for a response to the question:\n{demonstration}\n\n"
    "Now answer with a response of your own, including the thinking process.\n"
)


def teacher_prompt(prompt: Prompt, demonstration: str) -> Prompt:
    """The prompt the teacher reads: the last user turn with the demonstration shown in it
    (:data:`TEACHER_TEMPLATE`); earlier turns (a system message) stay as they are."""
    if isinstance(prompt, str):
        return TEACHER_TEMPLATE.format(prompt=prompt, demonstration=demonstration)
    *earlier, last = prompt
    shown = TEACHER_TEMPLATE.format(prompt=last["content"], demonstration=demonstration)
    return (*earlier, {**last, "content": shown})


def encode_teacher_prompt(
    tokenizer: Any, prompt: Prompt, demonstration: str, max_length: int
) -> list[int]:
    """Token ids of :func:`teacher_prompt` through the one prompt format
    (:func:`gsil.data.encode_prompt`), at most ``max_length`` of them: a demonstration too long
    to fit loses its end (its text, so the template and the chat markers stay whole).

    Raises:
        PromptTooLong: the prompt and the template alone take more than ``max_length`` tokens.
    """
    ids = encode_prompt(tokenizer, teacher_prompt(prompt, demonstration))
    demo_ids = list(tokenizer(demonstration, add_special_tokens=False)["input_ids"])
    keep = len(demo_ids) - (len(ids) - max_length)
    while len(ids) > max_length and keep > 0:
        kept_text = tokenizer.decode(demo_ids[:keep], skip_special_tokens=False)
        ids = encode_prompt(tokenizer, teacher_prompt(prompt, kept_text))
        keep -= len(ids) - max_length  # still too long: cut as many tokens more
    if len(ids) > max_length:
        raise PromptTooLong(
            f"the SDFT teacher prompt has more than --sdft-max-teacher-prompt-length={max_length} "
            "tokens even with the demonstration cut away; raise that limit"
        )
    return ids


def _kl(log_p: Tensor, log_q: Tensor) -> Tensor:
    """``KL(p || q) = sum_v p_v (log p_v - log q_v)`` over the last dimension."""
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def token_divergence(student_logits: Tensor, teacher_logits: Tensor, alpha: float) -> Tensor:
    """SDFT's per-token divergence ``D_alpha(student || teacher)`` over the vocabulary.

    Args:
        student_logits: ``(N, V)`` the student's logits at N positions (with gradient).
        teacher_logits: ``(N, V)`` the teacher's at the same positions (no gradient needed).
        alpha: 0 forward KL(teacher || student), 1 reverse KL(student || teacher), in between
            ``alpha KL(teacher || m) + (1 - alpha) KL(student || m)``,
            ``m = (1 - alpha) student + alpha teacher`` (GKD's generalised JSD, as TRL's
            ``compute_divergence`` and the authors' ``distil_trainer.py``).

    Returns:
        ``(N,)`` float32 divergences (softmaxes in float32). A logit of -inf (a token a model
        masks) is taken as the lowest float32 first: probability 0, a term of 0 where both
        models mask it, and finite gradients.
    """
    lowest = torch.finfo(torch.float32).min
    student = student_logits.float().clamp(min=lowest).log_softmax(-1)
    teacher = teacher_logits.float().clamp(min=lowest).log_softmax(-1)
    if alpha == 0.0:
        return _kl(teacher, student)
    if alpha == 1.0:
        return _kl(student, teacher)
    mixture = torch.logsumexp(
        torch.stack([student + math.log(1 - alpha), teacher + math.log(alpha)]), dim=0
    )
    return alpha * _kl(teacher, mixture) + (1 - alpha) * _kl(student, mixture)


def next_tokens(labels: Tensor) -> Tensor:
    """``(rows, length)``: the token each position's logits predict (labels aligned with the
    inputs, ``IGNORE_INDEX`` on the prompt and padding; so is the last position)."""
    return torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], IGNORE_INDEX)], dim=1)


def sequence_means(per_token: Tensor, positions: Tensor, skip_tokens: int) -> Tensor:
    """Each row's mean of ``per_token`` (``(N,)``, the ``positions`` of ``(rows, length)`` in
    row-major order) over its tokens after the first ``skip_tokens``; 0 for a row with none."""
    rank = positions.cumsum(dim=1) - 1  # the token's index within its response
    kept = (rank >= skip_tokens)[positions].to(per_token.dtype)
    rows = positions.nonzero()[:, 0]
    sums = per_token.new_zeros(positions.shape[0]).index_add(0, rows, per_token * kept)
    counts = per_token.new_zeros(positions.shape[0]).index_add(0, rows, kept)
    return sums / counts.clamp(min=1)


def response_logits(
    model: nn.Module, input_ids: Tensor, attention_mask: Tensor, positions: Tensor
) -> Tensor:
    """A causal LM's logits ``(N, V)`` at ``positions`` (``(rows, length)`` bool, row-major).

    As :func:`gsil.logprobs.lean_model_logps`: the model runs whole, through its wrappers
    (DDP's forward prepares the gradient all-reduce), asked for the last position's logits
    only; a forward hook keeps the decoder's final hidden states, of which the output layer
    projects only the ``positions`` (under the forward's autocast state), so the
    ``(rows, length, vocab)`` logits of prompt positions are never made. A model whose logits
    are not the output layer's (:class:`gsil.logprobs.LeanPathUnsupported`) gives its full
    logits, then picked.
    """
    try:
        head = lean_head(model)
    except LeanPathUnsupported:
        logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
        return logits[positions]
    hidden, enabled, dtype = final_hidden_states(model, head, input_ids, attention_mask)
    with torch.autocast(hidden.device.type, dtype=dtype, enabled=enabled):
        return head.output_layer(hidden[positions])


class EMATeacher:
    """A copy of the policy, without gradients, moved towards it after each optimizer step:
    ``phi <- (1 - rate) phi + rate theta`` on the parameters the policy trains (the others stay
    equal: LoRA's frozen base)."""

    def __init__(self, policy: nn.Module, rate: float) -> None:
        self.module = copy.deepcopy(policy).eval().requires_grad_(False)
        self.rate = rate
        self.names = [name for name, p in policy.named_parameters() if p.requires_grad]

    @torch.no_grad()
    def update(self, policy: nn.Module) -> None:
        student = dict(policy.named_parameters())
        teacher = dict(self.module.named_parameters())
        for name in self.names:
            teacher[name].lerp_(student[name].detach(), self.rate)

    def state_dict(self) -> dict[str, Tensor]:
        teacher = dict(self.module.named_parameters())
        return {name: teacher[name].detach().cpu().clone() for name in self.names}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        teacher = dict(self.module.named_parameters())
        if sorted(state) != sorted(self.names):
            raise RuntimeError(
                "the checkpoint's SDFT teacher holds other parameters than the policy trains "
                "(another model or LoRA setting); delete the checkpoint or start without --resume"
            )
        with torch.no_grad():
            for name in self.names:
                teacher[name].copy_(state[name])


def check_engine(accelerator: Accelerator) -> None:
    """Refuse the launches whose weights are sharded: the teacher is a whole copy."""
    if is_zero3(accelerator) or accelerator.distributed_type == DistributedType.FSDP:
        raise ValueError(
            "--method sdft keeps a whole copy of the policy as its EMA teacher, which FSDP and "
            "DeepSpeed ZeRO-3 shard; launch with DDP (or ZeRO-1/2)"
        )


class SelfDistillation:
    """One round of SDFT's loss (a :class:`gsil.methods.ModelLoss`): the student is the
    prepared policy the trainer passes, the teacher an :class:`EMATeacher` started from it."""

    def __init__(
        self,
        policy: nn.Module,
        accelerator: Accelerator,
        *,
        alpha: float,
        ema_rate: float,
        skip_tokens: int,
    ) -> None:
        check_engine(accelerator)
        self.accelerator = accelerator
        self.teacher = EMATeacher(policy, ema_rate)
        self.alpha, self.skip_tokens = alpha, skip_tokens

    def __call__(self, model: nn.Module, batch: dict) -> tuple[Tensor, Stats]:
        """Per-example losses ``(n,)`` of a collated batch (:func:`gsil.batching.collate`: n
        demonstrations, then k blocks of n own samples, and their ``teacher_*`` rows)."""
        if "teacher_input_ids" not in batch:
            raise ValueError(
                "SDFT needs each example's teacher prompt (Example.teacher_prompt_ids)"
            )
        n = batch["index"].shape[0]
        labels = batch["labels"][n:]
        targets = next_tokens(labels)
        student_at = targets != IGNORE_INDEX
        teacher_at = next_tokens(batch["teacher_labels"]) != IGNORE_INDEX
        if not torch.equal(student_at.sum(1), teacher_at.sum(1)):
            raise RuntimeError("student and teacher rows score different responses (a bug)")
        student_picked = response_logits(
            model, batch["input_ids"][n:], batch["attention_mask"][n:], student_at
        )
        with torch.no_grad(), self.accelerator.autocast():
            teacher_picked = response_logits(
                self.teacher.module,
                batch["teacher_input_ids"],
                batch["teacher_attention_mask"],
                teacher_at,
            )
        per_token = token_divergence(student_picked, teacher_picked, self.alpha)
        per_sequence = sequence_means(per_token, student_at, self.skip_tokens)
        gen_mask = batch.get("gen_mask")
        losses = sample_mean(per_sequence.view(-1, n).T, gen_mask)
        picked_targets = targets[student_at]  # the response tokens, in the same order
        stats = {
            "logps/rejected": _sequence_logps(
                student_picked, picked_targets, student_at, n, gen_mask
            ),
            "sdft/teacher_logps": _sequence_logps(
                teacher_picked, picked_targets, student_at, n, gen_mask
            ),
        }
        return losses, stats

    def after_update(self, model: nn.Module) -> None:
        self.teacher.update(model)

    def state_dict(self) -> dict[str, Tensor]:
        return self.teacher.state_dict()

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.teacher.load_state_dict(state)

    def carried_state(self) -> dict[str, Tensor] | None:
        """The teacher, for the next round (one moving average over the whole run) when it
        tracks every weight; None under LoRA (the next round's policy is the merged one with
        fresh adapters: its teacher starts from it)."""
        if len(self.teacher.names) < len(list(self.teacher.module.parameters())):
            return None
        return self.teacher.state_dict()


@torch.no_grad()
def _sequence_logps(
    logits: Tensor, targets: Tensor, positions: Tensor, n: int, gen_mask: Tensor | None
) -> Tensor:
    """Summed log-probs of the own samples, ``(n,)`` as a mean over k (a statistic)."""
    token_logps = logits.float().log_softmax(-1).gather(1, targets[:, None]).squeeze(1)
    rows = positions.nonzero()[:, 0]
    sums = token_logps.new_zeros(positions.shape[0]).index_add(0, rows, token_logps)
    return sample_mean(sums.view(-1, n).T, gen_mask)
