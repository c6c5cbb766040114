"""Demonstrations from a known stochastic program: ``log p(y | x)`` exact for every string y.

Prompts are sums of small numbers, ``"3+5+7"``. A response is written by a small program:

1. with probability ``noise_weight`` (lambda) the writer produces noise: a length
   ``L ~ Geometric`` (``P(L = l) = (1 - q) q^l``, ``q = noise_continue``) and ``L`` characters
   drawn uniformly from the alphabet (:func:`alphabet`), so that every string has positive
   probability (reverse KL stays finite);
2. otherwise the program (``p_prog``) chooses
   - an order: the operands as written (``forward_prob``) or largest first (stable sort);
   - a format: ``steps`` (``steps_prob``), the running sums written out, ``"3+5=8, 8+7=15.
     Answer: 15"``, or ``terse``, ``"Answer: 15"`` (the order is then latent: it is not written);
   - with probability ``mistake_prob`` one mistake: one of the ``k - 1`` additions (uniform) is
     off by one (``+1`` or ``-1``, uniform) and the error propagates to the answer.

So ``p(y | x) = (1 - lambda) p_prog(y | x) + lambda p_noise(y)``. Several derivations can yield
one string: both orders coincide when the operands are already largest first, a terse answer
hides the order, and a terse mistake can sit in any step. ``p_prog(y | x)`` is therefore the
sum over *every* derivation (order, format, mistake step, sign) that writes ``y``: the program
has at most ``2 x 2 x (1 + 2 (k - 1))`` derivations, all enumerated, so the sum is exact, not a
guessed parse (:meth:`TaskDistribution.support`).
"""

from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass
from functools import lru_cache

from gsil.demonstrations import Demonstration

DIGITS = "0123456789"
ANSWER_PREFIX = "Answer: "
STEP_SEPARATOR = ", "
STEPS_END = ". "
SPLITS = ("train", "validation", "test")
_ANSWER_PATTERN = re.compile(r"Answer: (\d+)$")


def alphabet() -> str:
    """Every character a prompt or a response may hold (sorted); the tokenizer's vocabulary.

    The noise part of the distribution draws its characters uniformly from it.
    """
    characters = set(DIGITS + "+=" + ANSWER_PREFIX + STEP_SEPARATOR + STEPS_END)
    return "".join(sorted(characters))


@dataclass(frozen=True)
class DataSpec:
    """The parameters of the stochastic program (see the module docstring).

    Prompts: ``k`` operands with ``k`` drawn from ``operand_counts`` with
    ``operand_count_probs``, each operand uniform on ``[operand_min, operand_max]``.
    Responses: ``forward_prob`` (order as written, else largest first), ``steps_prob`` (steps
    format, else terse), ``mistake_prob`` (one off-by-one mistake), ``noise_weight`` (lambda,
    the uniform-noise mixture weight) and ``noise_continue`` (q, the noise length's geometric
    continuation probability: mean length ``q / (1 - q)``).
    """

    operand_counts: tuple[int, ...] = (2, 3)
    operand_count_probs: tuple[float, ...] = (0.5, 0.5)
    operand_min: int = 1
    operand_max: int = 9
    forward_prob: float = 0.7
    steps_prob: float = 0.7
    mistake_prob: float = 0.05
    noise_weight: float = 0.01
    noise_continue: float = 0.9

    def __post_init__(self) -> None:
        if len(self.operand_counts) != len(self.operand_count_probs) or not self.operand_counts:
            raise ValueError(
                "DataSpec.operand_counts and operand_count_probs need one probability per count"
            )
        if any(count < 2 for count in self.operand_counts):
            raise ValueError(f"DataSpec.operand_counts must be >= 2, got {self.operand_counts}")
        if not math.isclose(sum(self.operand_count_probs), 1.0):
            raise ValueError(
                f"DataSpec.operand_count_probs must sum to 1, got {self.operand_count_probs}"
            )
        if not 1 <= self.operand_min <= self.operand_max:
            raise ValueError(
                "DataSpec needs 1 <= operand_min <= operand_max (an off-by-one mistake must "
                f"not go below 0), got {self.operand_min}, {self.operand_max}"
            )
        for name in ("forward_prob", "steps_prob", "mistake_prob", "noise_weight"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"DataSpec.{name} must lie in [0, 1], got {value}")
        if not 0.0 <= self.noise_continue < 1.0:
            raise ValueError(
                f"DataSpec.noise_continue must lie in [0, 1), got {self.noise_continue}"
            )


# p_data: the demonstrations' distribution.
TARGET = DataSpec()
# The base model's pretraining distribution: related (same program, same prompts) but other
# format and order preferences, and four times as many mistakes.
BASE = DataSpec(forward_prob=0.3, steps_prob=0.3, mistake_prob=0.2, noise_weight=0.02)


def parse_prompt(prompt: str) -> tuple[int, ...]:
    """The operands of ``"3+5+7"``; a ValueError names the prompt if it is not such a sum."""
    parts = prompt.split("+")
    if len(parts) < 2 or not all(part.isdigit() for part in parts):
        raise ValueError(f"prompt {prompt!r} is not a sum of numbers like '3+5+7'")
    return tuple(int(part) for part in parts)


def _render(order: tuple[int, ...], steps: bool, mistake: tuple[int, int] | None) -> str:
    """The response of one derivation: operands in ``order``, format, ``(step, delta)`` or None."""
    total = order[0]
    written = []
    for step, operand in enumerate(order[1:]):
        result = total + operand
        if mistake is not None and mistake[0] == step:
            result += mistake[1]
        written.append(f"{total}+{operand}={result}")
        total = result
    answer = f"{ANSWER_PREFIX}{total}"
    return STEP_SEPARATOR.join(written) + STEPS_END + answer if steps else answer


def _derivations(operands: tuple[int, ...], spec: DataSpec) -> list[tuple[str, float]]:
    """Every derivation of the program as ``(response, probability)``; probabilities sum to 1.

    A derivation is (order, format, mistake); the same response may appear several times.
    """
    orders = (
        (operands, spec.forward_prob),
        (tuple(sorted(operands, reverse=True)), 1.0 - spec.forward_prob),
    )
    formats = ((True, spec.steps_prob), (False, 1.0 - spec.steps_prob))
    num_steps = len(operands) - 1
    mistakes: list[tuple[tuple[int, int] | None, float]] = [(None, 1.0 - spec.mistake_prob)]
    for step in range(num_steps):
        for delta in (-1, 1):
            mistakes.append(((step, delta), spec.mistake_prob / (2 * num_steps)))
    return [
        (_render(order, steps, mistake), p_order * p_format * p_mistake)
        for order, p_order in orders
        for steps, p_format in formats
        for mistake, p_mistake in mistakes
    ]


@lru_cache(maxsize=65536)
def _program_support(operands: tuple[int, ...], spec: DataSpec) -> dict[str, float]:
    support: dict[str, float] = {}
    for response, probability in _derivations(operands, spec):
        if probability > 0.0:
            support[response] = support.get(response, 0.0) + probability
    return support


class TaskDistribution:
    """``p(x) p(y | x)`` of one :class:`DataSpec`: sampling and the exact log-probability."""

    def __init__(self, spec: DataSpec):
        self.spec = spec
        self._alphabet = alphabet()
        self._log_alphabet = math.log(len(self._alphabet))

    # ------------------------------------------------------------------ prompts x ~ p(x)

    def sample_prompt(self, rng: random.Random) -> str:
        """One prompt ``x ~ p(x)``, drawn with ``rng``."""
        spec = self.spec
        count = rng.choices(spec.operand_counts, weights=spec.operand_count_probs)[0]
        return "+".join(str(rng.randint(spec.operand_min, spec.operand_max)) for _ in range(count))

    def prompts(self, n: int, seed: int) -> list[str]:
        """``n`` prompts ``x ~ p(x)``, the same for the same seed (a prefix of a longer draw)."""
        rng = random.Random(f"testbed-prompts/{seed}")
        return [self.sample_prompt(rng) for _ in range(n)]

    # ------------------------------------------------------------------ responses y ~ p(.|x)

    def sample(self, prompt: str, rng: random.Random) -> str:
        """One response ``y ~ p(. | x)``: noise with probability lambda, else the program."""
        spec = self.spec
        if rng.random() < spec.noise_weight:
            length = 0
            while rng.random() < spec.noise_continue:
                length += 1
            return "".join(rng.choice(self._alphabet) for _ in range(length))
        operands = parse_prompt(prompt)
        order = operands
        if rng.random() >= spec.forward_prob:
            order = tuple(sorted(operands, reverse=True))
        steps = rng.random() < spec.steps_prob
        mistake = None
        if rng.random() < spec.mistake_prob:
            mistake = (rng.randrange(len(operands) - 1), rng.choice((-1, 1)))
        return _render(order, steps, mistake)

    def support(self, prompt: str) -> dict[str, float]:
        """The program part's finite support: ``{response: p_prog(response | x)}``, each
        probability the sum over every derivation writing that response (sums to 1)."""
        return dict(_program_support(parse_prompt(prompt), self.spec))

    def in_program_support(self, prompt: str, response: str) -> bool:
        """Whether some derivation of the program writes ``response`` (else only the noise
        explains it, at a cost of about ``-log(lambda p_noise)``, 3.3 nats a character)."""
        return response in _program_support(parse_prompt(prompt), self.spec)

    def noise_log_prob(self, response: str) -> float:
        """``log p_noise(y) = log(1 - q) + |y| log q - |y| log |alphabet|`` (-inf for a string
        with a character outside the alphabet)."""
        if any(character not in self._alphabet for character in response):
            return -math.inf
        q = self.spec.noise_continue
        length = len(response)
        if length and q == 0.0:
            return -math.inf
        return math.log1p(-q) + length * ((math.log(q) if length else 0.0) - self._log_alphabet)

    def log_prob(self, prompt: str, response: str) -> float:
        """Exact ``log p(y | x) = log((1 - lambda) p_prog(y | x) + lambda p_noise(y))``.

        Finite for every string over :func:`alphabet` when lambda > 0; -inf for a string with
        another character (or outside the program's support when lambda = 0).
        """
        weight = self.spec.noise_weight
        program = _program_support(parse_prompt(prompt), self.spec).get(response, 0.0)
        terms = []
        if program > 0.0 and weight < 1.0:
            terms.append(math.log1p(-weight) + math.log(program))
        noise = self.noise_log_prob(response)
        if weight > 0.0 and noise > -math.inf:
            terms.append(math.log(weight) + noise)
        if not terms:
            return -math.inf
        top = max(terms)
        return top + math.log(sum(math.exp(term - top) for term in terms))

    # ------------------------------------------------------------------ the verifiable answer

    @staticmethod
    def answer(prompt: str) -> str:
        """The correct final answer: the sum, as text."""
        return str(sum(parse_prompt(prompt)))

    @classmethod
    def is_correct(cls, prompt: str, response: str) -> bool:
        """Whether ``response`` ends with ``"Answer: <the sum>"``."""
        match = _ANSWER_PATTERN.search(response)
        return match is not None and match.group(1) == cls.answer(prompt)

    # ------------------------------------------------------------------ demonstrations

    def demonstrations(self, n: int, seed: int, split: str = "train") -> list[Demonstration]:
        """``n`` demonstrations ``(x, y) ~ p(x) p(y | x)``.

        Each ``(seed, split)`` has its own random stream, so splits are independent draws (the
        prompts may repeat across splits: there are only a few hundred sums). The first ``n``
        of a stream do not depend on ``n``: 32 demonstrations are a prefix of 128 (paired
        designs). ``meta`` holds the gold ``answer``, whether the demonstration ``correct``ly
        answers it and its exact ``data_logp``.
        """
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; use one of {SPLITS}")
        if n < 0:
            raise ValueError(f"the number of demonstrations must be >= 0, got {n}")
        rng = random.Random(f"testbed-demonstrations/{split}/{seed}")
        demos = []
        for index in range(n):
            prompt = self.sample_prompt(rng)
            response = self.sample(prompt, rng)
            demos.append(
                Demonstration(
                    prompt=prompt,
                    response=response,
                    id=f"{split}-{seed}-{index}",
                    meta={
                        "answer": self.answer(prompt),
                        "correct": self.is_correct(prompt, response),
                        "data_logp": self.log_prob(prompt, response),
                    },
                )
            )
        return demos
