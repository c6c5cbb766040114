"""Training methods: one class per method, registered by name, each binding a pure loss of
:mod:`gsil.objectives` to its own settings.

    settings (the run configuration's ``objective`` section: :class:`ObjectiveSettings`)
        └── build_method(settings) ──► METHODS[settings.method].from_settings(settings)
                                         └── method.loss(LogpBatch) ──► (losses (B,), stats)

The trainer asks a method only for its capabilities (``needs_generations``,
``needs_reference``, ``needs_prob_weighted_logps``, ``state_key``) and calls
:meth:`Method.loss` with one :class:`LogpBatch`; it never branches on a method's name. A method
whose loss needs more of the model than per-sequence log-probs (SDFT: token distributions under
a teacher that reads the demonstration) gives the trainer a round's :class:`ModelLoss` from
:meth:`Method.model_loss`, and each example's teacher prompt from
:meth:`Method.teacher_prompt_ids`. A new method is a subclass decorated with :func:`register`,
with its own fields and a ``from_settings`` that reads what it needs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar, Protocol

import torch
from torch import Tensor

from gsil.demonstrations import Prompt
from gsil.estimators import ESTIMATORS, DensityRatioEstimator, get_estimator
from gsil.objectives import (
    DFT_DEFAULTS,
    DFT_VARIANTS,
    SFT_TOKEN_MEANS,
    TOKEN_WEIGHTINGS,
    Stats,
    dft_loss,
    dynamic_ft_loss,
    gsil_loss,
    sft_loss,
    spin_loss,
)
from gsil.self_distillation import SelfDistillation, check_engine, encode_teacher_prompt


def _setting(default, help: str, **metadata):
    """A settings field whose ``help`` is its command-line documentation (experiments.config)."""
    return field(default=default, metadata={"help": help, **metadata})


@dataclass(frozen=True)
class ObjectiveSettings:
    """What to optimise: the run configuration's ``objective`` section. Every method's
    hyper-parameter default lives here, once."""

    method: str = _setting(
        "gsil",
        "training method, by its registered name (gsil.methods.METHODS: gsil, spin, sft, dft "
        "= discriminative fine-tuning, Guo et al. 2025, sdft = self-distillation fine-tuning, "
        "Shenfeld et al. 2026, and any registered since)",
    )
    loss: str = _setting(
        "logistic", "GSIL density-ratio estimator", choices=tuple(ESTIMATORS.keys())
    )
    gamma: float | None = _setting(None, "parameter of the 'power' estimator (gamma > 0)")
    beta: float = _setting(
        0.1,
        "scale of the log-ratio logit f = beta * (log pi - log pi_ref) + shift; also SPIN's beta",
    )
    shift: float = _setting(0.0, "offset of the GSIL logit (the paper's script: 2 with beta 0.01)")
    drop_ties: bool = _setting(
        False,
        "leave out each generated response that equals its "
        "demonstration (a prompt whose k responses all tie is dropped)",
    )
    dft_tau: float | None = _setting(
        None,
        "DFT's temperature tau of the discriminative likelihood (> 0; default: the variant's, "
        "the authors' recipes: "
        + ", ".join(f"{variant} {tau}" for variant, (tau, _) in DFT_DEFAULTS.items())
        + ")",
    )
    dft_gamma: float | None = _setting(
        None,
        "DFT's moving-average weight of each new estimate of the normaliser, in (0, 1] (1: no "
        "memory; default: the variant's, the authors' recipes: "
        + ", ".join(f"{variant} {gamma}" for variant, (_, gamma) in DFT_DEFAULTS.items())
        + ")",
    )
    dft_variant: str = _setting(
        "dft",
        "dft (log-prob scores, importance weights 1/pi_ref) or dft2 "
        "(length-normalised scores, no reference)",
        choices=DFT_VARIANTS,
    )
    dft_u_init: float = _setting(
        0.0, "DFT's initial log normaliser log u of every prompt, each round"
    )
    dft_keep_normalizer: bool = _setting(
        False,
        "keep each prompt's log u from one round to the next instead of dft_u_init at each "
        "round's start (multi-round DFT is this toolkit's extension; the authors train one "
        "round, over whose epochs u is kept)",
    )
    token_weighting: str = _setting(
        "none",
        "SFT's per-token weights: none, or prob (each token's loss -log p_t weighted by its "
        "detached probability p_t: Dynamic Fine-Tuning, Wu et al. 2025, TRL's "
        "loss_type='dft'; not --method dft); --method sft only",
        choices=TOKEN_WEIGHTINGS,
    )
    sft_token_mean: str = _setting(
        "sequence",
        "SFT's (and Dynamic FT's) token mean: sequence (each demonstration's token losses "
        "averaged over its own length, then the examples averaged) or step (the step's token "
        "losses summed and divided by its token count over every micro-batch and process, as "
        "TRL's SFTTrainer and the Hugging Face Trainer's num_items_in_batch: a long "
        "demonstration weighs more); --method sft only",
        choices=SFT_TOKEN_MEANS,
    )

    sdft_alpha: float = _setting(
        0.0,
        "SDFT's per-token divergence, in [0, 1]: 0 forward KL(teacher || student) (the "
        "authors' code and results), 1 reverse KL(student || teacher) (the paper's "
        "derivation), between: generalised Jensen-Shannon (TRL's default 0.5)",
    )
    sdft_ema_rate: float = _setting(
        0.01,
        "SDFT's teacher update after each optimizer step, phi <- (1 - r) phi + r theta, "
        "r in (0, 1] (the authors: 0.01; TRL's ema option: 0.05)",
    )
    sdft_skip_tokens: int = _setting(
        3, "SDFT: leading tokens of each own sample left out of the loss (the authors: 3)"
    )
    sdft_max_teacher_prompt_length: int = _setting(
        2048,
        "SDFT: longest teacher prompt (the prompt with the demonstration shown) in tokens; "
        "a longer demonstration loses its end there",
    )

    def __post_init__(self) -> None:
        if self.sft_token_mean != "sequence" and self.method != "sft":
            raise ValueError(
                f"objective.sft_token_mean={self.sft_token_mean!r} (--sft-token-mean) is how SFT "
                f"averages its tokens; objective.method is {self.method!r}: use --method sft, "
                "or --sft-token-mean sequence"
            )
        if self.token_weighting != "none" and self.method != "sft":
            raise ValueError(
                f"objective.token_weighting={self.token_weighting!r} (--token-weighting) weights "
                f"SFT's tokens; objective.method is {self.method!r}: use --method sft, or "
                "--token-weighting none"
            )

    def estimator_params(self) -> dict[str, float]:
        """Keyword arguments of ``gsil.estimators.get_estimator`` beyond the name."""
        return {"gamma": self.gamma} if self.loss == "power" and self.gamma is not None else {}


@dataclass(frozen=True)
class LogpBatch:
    """What a method's loss sees of one micro-batch: per-sequence log-probs, no model.

    ``B`` prompts, each with one demonstration and ``k`` own samples. Demonstration tensors are
    ``(B,)``, own-sample tensors ``(B, k)``; a side a method does not need is None.
    ``demo_token_counts``/``gen_token_counts`` are response lengths (ones where the log-probs
    are already length-averaged); ``gen_mask`` marks the samples that count (None: all);
    ``state`` is a stateful method's per-example state before the step.
    ``policy_demo_prob_weighted_logps`` ``(B,)`` is each demonstration's
    ``sum_t sg(p_t) log p_t`` (:class:`gsil.logprobs.SequenceLogps`), for a method that
    ``needs_prob_weighted_logps``; else None. ``step_mean_demo_tokens`` is the optimizer
    step's demonstration tokens over its examples, across every micro-batch and process
    (:class:`gsil.optimization.StepPlan`); None outside a training step.
    """

    policy_demo_logps: Tensor
    demo_token_counts: Tensor
    policy_gen_logps: Tensor | None = None
    ref_demo_logps: Tensor | None = None
    ref_gen_logps: Tensor | None = None
    gen_token_counts: Tensor | None = None
    gen_mask: Tensor | None = None
    state: Tensor | None = None
    policy_demo_prob_weighted_logps: Tensor | None = None
    step_mean_demo_tokens: float | None = None

    def kept_mask(self) -> Tensor | None:
        """``gen_mask`` when it leaves some sample out, else None (every sample counts)."""
        if self.gen_mask is None or bool(self.gen_mask.all()):
            return None
        return self.gen_mask


class ModelLoss(Protocol):
    """A method's loss for one round when it needs more of the model than per-sequence
    log-probs (SDFT's token distributions under a teacher): built by
    :meth:`Method.model_loss` when the round's optimisation starts, it replaces the policy
    forward and :meth:`Method.loss`, hears of each optimizer step that updates the weights,
    and has a state that every in-round checkpoint saves and a resumed round loads, and that
    it may hand on to the next round."""

    def __call__(self, model: torch.nn.Module, batch: dict) -> tuple[Tensor, Stats]:
        """Per-example losses ``(n,)`` and statistics of a collated micro-batch
        (:func:`gsil.batching.collate`), the policy ``model`` as prepared (wrapped)."""
        ...

    def after_update(self, model: torch.nn.Module) -> None:
        """After an optimizer step that changed the weights (``model`` unwrapped)."""
        ...

    def state_dict(self) -> dict[str, Tensor]: ...

    def load_state_dict(self, state: dict[str, Tensor]) -> None: ...

    def carried_state(self) -> dict[str, Tensor] | None:
        """At the round's end, the state the next round's ModelLoss starts from (its
        ``load_state_dict``; stored in the round's directory, so a resumed run reads it too);
        None: the next round starts afresh."""
        ...


class Method:
    """A training method: its capabilities and its loss on a :class:`LogpBatch`.

    A stateful method (``state_key`` set; DFT's moving average) keeps one number per example,
    ``initial_state`` at the start of each round; its loss returns each example's new value as
    the statistic ``state_key``, and the trainer keeps it across steps, epochs, processes and
    checkpoints (:func:`gsil.optimization.train_round`).
    """

    key: ClassVar[str] = ""  # the registry name (``--method``)
    needs_generations: ClassVar[bool] = False
    needs_reference: ClassVar[bool] = False
    needs_prob_weighted_logps: ClassVar[bool] = False  # LogpBatch.policy_demo_prob_weighted_logps
    state_key: ClassVar[str | None] = None

    @property
    def name(self) -> str:
        """The name in logs and summaries (``gsil-logistic``, ``spin``, ``dft2``)."""
        return self.key

    @classmethod
    def from_settings(cls, settings: ObjectiveSettings) -> Method:
        raise NotImplementedError

    def loss(self, batch: LogpBatch) -> tuple[Tensor, Stats]:
        """Per-example losses ``(B,)`` and detached per-example statistics."""
        raise NotImplementedError

    def initial_state(self, num_examples: int) -> Tensor | None:
        """The round's starting state, ``(num_examples,)`` float32; None if stateless."""
        return None

    @property
    def keeps_state_across_rounds(self) -> bool:
        """Whether a round starts from the state the round before ended with (matched by
        demonstration id) instead of :meth:`initial_state`."""
        return False

    def check_launch(self, accelerator) -> None:
        """Refuse (``ValueError``, naming the fix) a launch the method cannot train under;
        called before any work. Every launch is fine by default."""

    def teacher_prompt_ids(self, tokenizer, prompt: Prompt, demonstration: str) -> list[int] | None:
        """Token ids of the prompt a demonstration-conditioned teacher reads
        (``Example.teacher_prompt_ids``); None (the default): the method has no such teacher."""
        return None

    def model_loss(self, policy: torch.nn.Module, accelerator) -> ModelLoss | None:
        """The round's :class:`ModelLoss`, built from the round's starting ``policy``
        (unwrapped) when its optimisation starts; None (the default): the trainer computes
        per-sequence log-probs and calls :meth:`loss`."""
        return None


METHODS: dict[str, type[Method]] = {}


def register(key: str) -> Callable[[type[Method]], type[Method]]:
    """Class decorator: make a :class:`Method` available as ``--method key``."""

    def add(cls: type[Method]) -> type[Method]:
        if key in METHODS:
            raise ValueError(f"method {key!r} is registered twice")
        cls.key = key
        METHODS[key] = cls
        return cls

    return add


@register("gsil")
@dataclass(frozen=True)
class GSIL(Method):
    """GSIL (theory page, section 3): :func:`gsil.objectives.gsil_loss` with an estimator."""

    estimator: DensityRatioEstimator
    beta: float = ObjectiveSettings.beta
    shift: float = ObjectiveSettings.shift
    needs_generations: ClassVar[bool] = True
    needs_reference: ClassVar[bool] = True

    @property
    def name(self) -> str:
        return f"gsil-{self.estimator.name}"

    @classmethod
    def from_settings(cls, settings: ObjectiveSettings) -> GSIL:
        estimator = get_estimator(settings.loss, **settings.estimator_params())
        return cls(estimator, settings.beta, settings.shift)

    def loss(self, batch: LogpBatch) -> tuple[Tensor, Stats]:
        return gsil_loss(
            batch.policy_demo_logps,
            batch.policy_gen_logps,
            batch.ref_demo_logps,
            batch.ref_gen_logps,
            self.estimator,
            self.beta,
            self.shift,
            batch.kept_mask(),
        )


@register("spin")
@dataclass(frozen=True)
class SPIN(Method):
    """SPIN (theory page, section 4): :func:`gsil.objectives.spin_loss`."""

    beta: float = ObjectiveSettings.beta
    needs_generations: ClassVar[bool] = True
    needs_reference: ClassVar[bool] = True

    @classmethod
    def from_settings(cls, settings: ObjectiveSettings) -> SPIN:
        return cls(settings.beta)

    def loss(self, batch: LogpBatch) -> tuple[Tensor, Stats]:
        return spin_loss(
            batch.policy_demo_logps,
            batch.policy_gen_logps,
            batch.ref_demo_logps,
            batch.ref_gen_logps,
            self.beta,
            batch.kept_mask(),
        )


@register("sft")
@dataclass(frozen=True)
class SFT(Method):
    """Supervised fine-tuning (no samples, no reference): :func:`gsil.objectives.sft_loss`, or
    with ``token_weighting="prob"`` Dynamic Fine-Tuning (:func:`gsil.objectives.dynamic_ft_loss`,
    named ``dynamic-ft`` in logs), which needs each demonstration's probability-weighted
    log-prob sum.

    With ``token_mean="step"`` each demonstration's token sum is divided by the step's mean
    demonstration length instead of its own, so the step's loss (the mean over its examples)
    is its summed token losses over its token count: TRL's ``SFTTrainer`` normalisation.
    """

    token_weighting: str = ObjectiveSettings.token_weighting
    token_mean: str = ObjectiveSettings.sft_token_mean

    def __post_init__(self) -> None:
        if self.token_weighting not in TOKEN_WEIGHTINGS:
            raise ValueError(
                f"--token-weighting must be one of {TOKEN_WEIGHTINGS}, got {self.token_weighting!r}"
            )
        if self.token_mean not in SFT_TOKEN_MEANS:
            raise ValueError(
                f"--sft-token-mean must be one of {SFT_TOKEN_MEANS}, got {self.token_mean!r}"
            )

    @property
    def name(self) -> str:
        return "dynamic-ft" if self.token_weighting == "prob" else self.key

    @property
    def needs_prob_weighted_logps(self) -> bool:
        return self.token_weighting == "prob"

    @classmethod
    def from_settings(cls, settings: ObjectiveSettings) -> SFT:
        return cls(settings.token_weighting, settings.sft_token_mean)

    def loss(self, batch: LogpBatch) -> tuple[Tensor, Stats]:
        counts = batch.demo_token_counts
        if self.token_mean == "step":
            if batch.step_mean_demo_tokens is None:
                raise ValueError("--sft-token-mean step needs LogpBatch.step_mean_demo_tokens")
            # sum_i S_i / (n * mean length) = the step's token sum over its token count
            counts = torch.full_like(counts, batch.step_mean_demo_tokens)
        if self.token_weighting == "prob":
            if batch.policy_demo_prob_weighted_logps is None:
                raise ValueError("Dynamic FT needs LogpBatch.policy_demo_prob_weighted_logps")
            return dynamic_ft_loss(
                batch.policy_demo_prob_weighted_logps, batch.policy_demo_logps, counts
            )
        return sft_loss(batch.policy_demo_logps, counts)


@register("dft")
@dataclass(frozen=True)
class DFT(Method):
    """Discriminative fine-tuning, DFT or DFT2 (:func:`gsil.objectives.dft_loss`): stateful,
    one moving-average normaliser ``log u`` per prompt, ``u_init`` at each round's start, or
    (``keep_normalizer``) the value the round before ended with. A ``tau`` or ``gamma`` of None
    is the variant's default (:data:`gsil.objectives.DFT_DEFAULTS`). The authors train one round
    on negatives drawn once from the base model; more rounds are this toolkit's extension."""

    tau: float | None = ObjectiveSettings.dft_tau
    gamma: float | None = ObjectiveSettings.dft_gamma
    variant: str = ObjectiveSettings.dft_variant
    u_init: float = ObjectiveSettings.dft_u_init
    keep_normalizer: bool = ObjectiveSettings.dft_keep_normalizer
    needs_generations: ClassVar[bool] = True
    state_key: ClassVar[str | None] = "dft/log_normalizer"

    def __post_init__(self) -> None:
        if self.variant not in DFT_VARIANTS:
            raise ValueError(f"--dft-variant must be one of {DFT_VARIANTS}, got {self.variant!r}")
        default_tau, default_gamma = DFT_DEFAULTS[self.variant]
        if self.tau is None:
            object.__setattr__(self, "tau", default_tau)
        if self.gamma is None:
            object.__setattr__(self, "gamma", default_gamma)
        if self.tau <= 0 or not 0 < self.gamma <= 1:
            raise ValueError(
                f"DFT needs --dft-tau > 0 and 0 < --dft-gamma <= 1, got {self.tau} and {self.gamma}"
            )

    @property
    def name(self) -> str:
        return self.variant

    @property
    def needs_reference(self) -> bool:  # DFT2 scores without a reference
        return self.variant == "dft"

    @classmethod
    def from_settings(cls, settings: ObjectiveSettings) -> DFT:
        return cls(
            settings.dft_tau,
            settings.dft_gamma,
            settings.dft_variant,
            settings.dft_u_init,
            settings.dft_keep_normalizer,
        )

    @property
    def keeps_state_across_rounds(self) -> bool:
        return self.keep_normalizer

    def initial_state(self, num_examples: int) -> Tensor:
        return torch.full((num_examples,), float(self.u_init), dtype=torch.float32)

    def loss(self, batch: LogpBatch) -> tuple[Tensor, Stats]:
        return dft_loss(
            batch.policy_demo_logps,
            batch.policy_gen_logps,
            batch.ref_gen_logps,
            batch.state,
            tau=self.tau,
            gamma=self.gamma,
            variant=self.variant,
            demo_token_counts=batch.demo_token_counts,
            gen_token_counts=batch.gen_token_counts,
            gen_mask=batch.kept_mask(),
        )


@register("sdft")
@dataclass(frozen=True)
class SDFT(Method):
    """Self-distillation fine-tuning (Shenfeld et al. 2026, arXiv 2601.19897; the authors'
    code and TRL's ``trl/experimental/sdft``): the own samples scored token by token against
    the policy shown the demonstration, an EMA teacher. Its loss needs both models' token
    distributions: :meth:`model_loss` (:class:`gsil.self_distillation.SelfDistillation`, whose
    docstring states the formula and where it departs from the paper and TRL)."""

    alpha: float = ObjectiveSettings.sdft_alpha
    ema_rate: float = ObjectiveSettings.sdft_ema_rate
    skip_tokens: int = ObjectiveSettings.sdft_skip_tokens
    max_teacher_prompt_length: int = ObjectiveSettings.sdft_max_teacher_prompt_length
    needs_generations: ClassVar[bool] = True

    def __post_init__(self) -> None:
        problems = []
        if not 0 <= self.alpha <= 1:
            problems.append(f"--sdft-alpha must be in [0, 1], got {self.alpha}")
        if not 0 < self.ema_rate <= 1:
            problems.append(f"--sdft-ema-rate must be in (0, 1], got {self.ema_rate}")
        if self.skip_tokens < 0:
            problems.append(f"--sdft-skip-tokens must be >= 0, got {self.skip_tokens}")
        if self.max_teacher_prompt_length < 1:
            problems.append(
                f"--sdft-max-teacher-prompt-length must be >= 1, got {self.max_teacher_prompt_length}"
            )
        if problems:
            raise ValueError("; ".join(problems))

    @classmethod
    def from_settings(cls, settings: ObjectiveSettings) -> SDFT:
        return cls(
            settings.sdft_alpha,
            settings.sdft_ema_rate,
            settings.sdft_skip_tokens,
            settings.sdft_max_teacher_prompt_length,
        )

    def loss(self, batch: LogpBatch) -> tuple[Tensor, Stats]:
        raise TypeError("SDFT's loss needs token distributions: the trainer calls model_loss")

    def check_launch(self, accelerator) -> None:
        check_engine(accelerator)

    def teacher_prompt_ids(self, tokenizer, prompt: Prompt, demonstration: str) -> list[int]:
        return encode_teacher_prompt(
            tokenizer, prompt, demonstration, self.max_teacher_prompt_length
        )

    def model_loss(self, policy: torch.nn.Module, accelerator) -> ModelLoss:
        return SelfDistillation(
            policy,
            accelerator,
            alpha=self.alpha,
            ema_rate=self.ema_rate,
            skip_tokens=self.skip_tokens,
        )


def build_method(settings: ObjectiveSettings) -> Method:
    """The method the settings name, bound to its settings."""
    if settings.method not in METHODS:
        raise ValueError(f"unknown method {settings.method!r}; choose one of: {', '.join(METHODS)}")
    return METHODS[settings.method].from_settings(settings)


def get_method(method: str, estimator: DensityRatioEstimator | None = None, **settings) -> Method:
    """A method by name with settings given as keywords (the fields of
    :class:`ObjectiveSettings`); ``estimator`` (GSIL) overrides the one ``loss`` names."""
    bound = build_method(ObjectiveSettings(method=method, **settings))
    if estimator is not None:
        if not isinstance(bound, GSIL):
            raise ValueError(f"method {method!r} takes no estimator")
        bound = GSIL(estimator, bound.beta, bound.shift)
    return bound
