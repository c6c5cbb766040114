"""Run round-loop jobs on the tiny model under ``accelerate launch`` (or in one process).

    accelerate launch --multi_gpu --num_processes 2 tests/distributed_run.py OUT JOBS_JSON

On a machine without GPUs ``--multi_gpu`` starts the processes with torchrun and accelerate
joins them over gloo (``accelerate launch --cpu`` would start only one). Each job in
``JOBS_JSON`` (a list of :func:`run_job` keyword dicts) writes ``OUT/<name>/``; the tests in
``test_distributed.py`` compare those directories with one-process runs of the same jobs.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from tiny import (  # noqa: E402
    Interrupt,
    build_tiny_model,
    build_tiny_tokenizer,
    interrupting,
    tiny_demos,
)

from gsil.estimators import get_estimator  # noqa: E402
from gsil.generation import GenerationSettings
from gsil.methods import get_method  # noqa: E402
from gsil.trainer import OptimSettings, RoundsSettings, run_rounds  # noqa: E402

GENERATION = GenerationSettings(max_new_tokens=6, do_sample=False, batch_size=3)


def run_job(
    out: Path,
    accelerator,
    *,
    name: str,
    method: str = "gsil",
    loss: str = "logistic",
    rounds: int = 2,
    num_demos: int = 10,
    interrupt_after_calls: int = 0,
    zero3_init: bool = False,
    objective_settings: dict | None = None,
    mix_previous_generations: bool = False,
    **optim: object,
) -> Path:
    """One run of ``run_rounds`` into ``out/name``; with ``interrupt_after_calls`` the run is
    interrupted at that objective call and then resumed in the same processes.
    ``objective_settings`` holds further :class:`gsil.methods.ObjectiveSettings` fields
    (``token_weighting``). ``zero3_init`` starts from a model already partitioned by ZeRO-3
    (as ``from_pretrained`` leaves it under accelerate's ``zero3_init_flag``): each process
    holds only its shard of every parameter."""
    tokenizer = build_tiny_tokenizer()

    def policy():
        model = build_tiny_model(tokenizer)
        if zero3_init:
            import deepspeed

            ds_config = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3}}
            deepspeed.zero.Init(module=model, config_dict_or_path=ds_config, dtype=torch.float32)
            assert all(p.numel() == 0 for p in model.parameters())  # only placeholders left
        return model

    estimator = get_estimator(loss) if method == "gsil" else None
    objective = get_method(method, estimator, beta=0.5, **(objective_settings or {}))
    settings = OptimSettings(**{"checkpoint_every": 1, **optim})
    kwargs = dict(
        rounds=rounds,
        optim=settings,
        generation=GENERATION,
        max_prompt_length=64,
        max_length=96,
        seed=1,
        mix_previous_generations=mix_previous_generations,
    )
    run_dir = out / name
    demos = tiny_demos(num_demos)
    if interrupt_after_calls:
        try:
            run_rounds(
                policy(),
                tokenizer,
                demos,
                interrupting(objective, interrupt_after_calls),
                RoundsSettings(run_dir=run_dir, **kwargs),
                accelerator=accelerator,
            )
        except Interrupt:
            pass
        else:
            raise AssertionError(f"{name}: the run was never interrupted")
        run_rounds(
            policy(),
            tokenizer,
            demos,
            objective,
            RoundsSettings(run_dir=run_dir, resume=True, **kwargs),
            accelerator=accelerator,
        )
    else:
        run_rounds(
            policy(),
            tokenizer,
            demos,
            objective,
            RoundsSettings(run_dir=run_dir, **kwargs),
            accelerator=accelerator,
        )
    return run_dir


def main(out: str, jobs_json: str) -> None:
    from gsil.processes import make_accelerator

    torch.set_num_threads(1)
    accelerator = make_accelerator()  # the launcher picks DDP or DeepSpeed (gloo on CPUs)
    for job in json.loads(jobs_json):
        run_job(Path(out), accelerator, **job)
    if accelerator.is_main_process:
        (Path(out) / "processes.json").write_text(json.dumps(accelerator.num_processes))


if __name__ == "__main__":
    main(*sys.argv[1:])
