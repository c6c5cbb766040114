"""The run configuration: one dataclass, resolved once (preset, then flags) and saved with the run.

Each field's ``help`` metadata is its command-line documentation, so the CLI and this file
cannot drift apart.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PRESETS_DIR = Path(__file__).parent / "presets"


def _f(default: Any, help: str, **kwargs: Any) -> Any:
    return field(default=default, metadata={"help": help, **kwargs})


@dataclass
class RunConfig:
    # what and where
    name: str = _f(None, "run name; results go to OUTPUT_DIR/NAME (default: derived from the "
                   "method, loss and seed)")  # fmt: skip
    output_dir: str = _f("runs", "parent directory of run directories")
    model: str = _f("smollm2-135m", "policy to start from: 'smollm2-135m' (embedded, offline), "
                    "a local model directory, or a Hugging Face hub id")  # fmt: skip
    data: str = _f("rg:chain_sum,basic_arithmetic", "demonstrations: a .jsonl/.json/.parquet "
                   "file, 'rg:task1,task2' (reasoning-gym, generated offline), or a hub dataset")  # fmt: skip
    prompt_field: str = _f("prompt", "record field holding the prompt (string or chat messages)")
    response_field: str = _f("response", "record field holding the demonstration response")
    split: str = _f("train", "dataset split (hub datasets; 'train' for reasoning-gym)")
    num_demos: int = _f(64, "number of demonstrations to use (required for rg: sources)")
    skip_invalid: bool = _f(False, "drop bad records (counted and reported) instead of stopping")
    # the method
    method: str = _f("gsil", "training objective", choices=["gsil", "spin", "sft"])
    loss: str = _f("logistic", "GSIL density-ratio estimator", choices=[
        "logistic", "brier", "exponential", "kliep", "lsif", "power", "hinge"])  # fmt: skip
    gamma: float = _f(None, "parameter of the 'power' estimator (gamma > 0)")
    beta: float = _f(0.1, "scale of the log-ratio logit f = beta * (log pi - log pi_ref) + shift; "
                     "also SPIN's beta")  # fmt: skip
    shift: float = _f(0.0, "offset of the GSIL logit (the paper's script used 2 with beta 0.01)")
    rounds: int = _f(1, "self-imitation rounds (each regenerates responses and resets the "
                     "reference to the current policy)")  # fmt: skip
    drop_ties: bool = _f(False, "drop pairs whose generated response equals the demonstration")
    average_logps: bool = _f(False, "length-averaged log-probs instead of sums (sums: default)")
    # optimisation
    epochs: int = _f(1, "epochs over the demonstrations per round")
    lr: float = _f(1e-5, "peak learning rate")
    optimizer: str = _f("adamw", "optimizer", choices=["adamw", "rmsprop"])
    weight_decay: float = _f(0.0, "weight decay")
    warmup_steps: int = _f(0, "linear warm-up steps (then linear decay to 0 over the round)")
    batch_size: int = _f(8, "prompts per micro-batch and device (GSIL/SPIN forward 2x rows)")
    grad_accum: int = _f(1, "micro-batches accumulated per optimizer step")
    max_grad_norm: float = _f(1.0, "gradient clipping norm")
    precision: str = _f("auto", "compute precision: auto (bf16 on GPU, fp32 on CPU), fp32 or bf16 "
                        "(mixed-precision autocast)", choices=["auto", "fp32", "bf16"])  # fmt: skip
    gradient_checkpointing: bool = _f(False, "trade compute for activation memory")
    lora_rank: int = _f(0, "LoRA rank (0: full fine-tuning)")
    checkpoint_every: int = _f(50, "optimizer steps between resumable checkpoints (0: none)")
    # lengths and generation
    max_prompt_length: int = _f(256, "longest prompt in tokens (longer ones are bad records)")
    max_length: int = _f(512, "longest prompt + response in tokens (responses are cut)")
    max_new_tokens: int = _f(128, "longest self-generated response in tokens")
    do_sample: bool = _f(False, "sample generations (default greedy, as in the paper)")
    temperature: float = _f(1.0, "sampling temperature (with --do-sample)")
    top_p: float = _f(1.0, "nucleus sampling mass (with --do-sample)")
    generator: str = _f("auto", "generation backend: auto (vLLM if installed with a GPU, or "
                        "as vLLM's CPU build; else HF), hf or vllm (one engine for the run)",
                        choices=["auto", "hf", "vllm"])  # fmt: skip
    gen_batch_size: int = _f(16, "prompts per generation batch")
    # reproducibility
    seed: int = _f(0, "the one seed: data sampling, generation and training")
    resume: bool = _f(False, "continue an interrupted run in the same directory")

    def run_name(self) -> str:
        if self.name:
            return self.name
        loss = f"-{self.loss}" if self.method == "gsil" else ""
        return f"{self.method}{loss}-seed{self.seed}"

    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.run_name()

    def estimator_params(self) -> dict:
        return {"gamma": self.gamma} if self.loss == "power" and self.gamma is not None else {}

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def preset_path(name_or_path: str) -> Path:
    """The JSON file of a preset: a name under ``experiments/presets/`` or a file path."""
    path = Path(name_or_path)
    if not path.exists():
        path = PRESETS_DIR / f"{name_or_path}.json"
    if not path.exists():
        available = ", ".join(sorted(p.stem for p in PRESETS_DIR.glob("*.json")))
        raise SystemExit(f"unknown preset {name_or_path!r}; available: {available}")
    return path


def is_pipeline_preset(name_or_path: str) -> bool:
    """Whether a preset describes several stages (``experiments.pipeline``), not one run."""
    return "pipeline" in json.loads(preset_path(name_or_path).read_text())


def load_preset(name_or_path: str) -> dict:
    """A preset's overrides: a name under ``experiments/presets/`` or a JSON file path."""
    path = preset_path(name_or_path)
    values = json.loads(path.read_text())
    values.pop("_comment", None)
    known = {f.name for f in dataclasses.fields(RunConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise SystemExit(f"{path}: unknown field(s) {unknown}; valid: {sorted(known)}")
    return values


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per field, e.g. ``--max-new-tokens``; defaults are left unset (None) so that
    only flags the user typed override the preset."""
    for spec in dataclasses.fields(RunConfig):
        flag = "--" + spec.name.replace("_", "-")
        default = spec.default
        help_text = f"{spec.metadata['help']} (default: {default})"
        if isinstance(default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None,
                                help=help_text)  # fmt: skip
            continue
        kind = type(default) if default is not None else (float if spec.name == "gamma" else str)
        parser.add_argument(flag, type=kind, default=None, choices=spec.metadata.get("choices"),
                            help=help_text)  # fmt: skip


def resolve_config(args: argparse.Namespace, preset: str | None) -> RunConfig:
    """Defaults, then the preset, then the flags given on the command line."""
    values = load_preset(preset) if preset else {}
    for spec in dataclasses.fields(RunConfig):
        given = getattr(args, spec.name, None)
        if given is not None:
            values[spec.name] = given
    config = RunConfig(**values)
    validate(config)
    return config


def validate(config: RunConfig) -> None:
    problems = []
    if config.num_demos is not None and config.num_demos < 1:
        problems.append("--num-demos must be >= 1")
    if config.rounds < 1 or config.epochs < 1:
        problems.append("--rounds and --epochs must be >= 1")
    if config.batch_size < 1 or config.grad_accum < 1:
        problems.append("--batch-size and --grad-accum must be >= 1")
    if config.max_prompt_length >= config.max_length:
        problems.append("--max-prompt-length must be smaller than --max-length")
    if config.loss == "power" and config.gamma is not None and config.gamma <= 0:
        problems.append("--gamma must be > 0 for the power estimator")
    if config.lr <= 0:
        problems.append("--lr must be > 0")
    if problems:
        raise SystemExit("invalid configuration: " + "; ".join(problems))
