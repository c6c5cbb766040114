"""A GSIL step against a plain SFT loop and TRL's DPOTrainer, on the same token ids, in one run.

    python -m benchmarks.compare_trl [--out runs/bench/compare_trl.json]

Every row runs in a fresh subprocess, on the same batch (default: the embedded SmolLM2-135M in
fp32, 8 sequences x 256 tokens a step, the first 64 of each a prompt; rows 0-3 the
demonstrations, i.e. DPO's *chosen* responses, rows 4-7 the policy's own samples, the
*rejected* ones, of the same 4 prompts):

* ``sft``: the floor, a minimal hand-written loop: the model's own ``labels=`` loss over its full
  logits (prompt positions masked), backward, AdamW;
* ``gsil``: one optimizer step of :meth:`gsil.optimization.RoundStepper.step` (GSIL's logistic
  loss), reference log-probs precomputed by :func:`gsil.optimization.reference_logps`, on the
  default (lean) log-prob path; ``gsil-plain`` on the plain path (full logits), ``gsil-ckpt``
  with activation checkpointing of every decoder layer, ``gsil-ckpt2`` of every second one;
* ``trl``: TRL's ``DPOTrainer`` (``precompute_ref_log_probs=True``, fp32, sigmoid loss, the same
  learning rate and clipping) without activation checkpointing, and ``trl-ckpt`` with it (TRL's
  default). The token ids go in as TRL's tokenized columns (``prompt_ids``, ``chosen_ids``,
  ``rejected_ids``), skipping its text tokenization. Needs TRL (``pip install -e ".[bench]"``);
  without it these rows are left out, saying so.

Each row: the median step time after ``--warmup`` steps, the peak resident memory of the steps
after the warm-up (VmHWM, reset after the warm-up: model, optimizer state and the step's
activations) and of the whole process (``ru_maxrss``, loading included), printed as ratios to
TRL (memory) and to the SFT loop (time) and written as JSON. Timings on a busy machine are
noise: run it on a quiet one (about 15 minutes on 2 CPU cores).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from benchmarks._memory import reset_peak, status_kib

GSIL_ROWS = {  # row -> (log-prob path, decoder layers per checkpoint; 0: none)
    "gsil": ("lean", 0),
    "gsil-plain": ("plain", 0),
    "gsil-ckpt": ("lean", 1),
    "gsil-ckpt2": ("lean", 2),
}
TRL_ROWS = {"trl": False, "trl-ckpt": True}  # row -> activation checkpointing
ROWS = ("sft", *GSIL_ROWS, *TRL_ROWS)
LEARNING_RATE = 1e-6
BETA = 0.1


@dataclass(frozen=True)
class Bench:
    """The workload every row runs: ``rows`` sequences (half demonstrations, half samples of
    the same prompts) of ``length`` tokens, the first ``prompt`` of each a prompt; ``steps``
    timed optimizer steps after ``warmup`` untimed ones."""

    model: str = "smollm2-135m"
    rows: int = 8
    length: int = 256
    prompt: int = 64
    warmup: int = 1
    steps: int = 3


def make_token_ids(bench: Bench, vocab: int, seed: int = 0) -> dict:
    """Random token ids of the batch: ``prompt_ids``, ``chosen_ids`` (the demonstrations) and
    ``rejected_ids`` (the samples), ``rows / 2`` lists each."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(min(100, vocab - 1), vocab, (bench.rows, bench.length), generator=generator)
    pairs = bench.rows // 2
    prompt, demo, gen = ids[:pairs, : bench.prompt], ids[:pairs, bench.prompt :], ids[pairs:]
    return {
        "prompt_ids": prompt.tolist(),
        "chosen_ids": demo.tolist(),
        # the sample shares its pair's prompt; its response is the rest of its own row
        "rejected_ids": gen[:, bench.prompt :].tolist(),
    }


def _load(bench: Bench):
    import torch

    from gsil.models import load_model

    torch.manual_seed(0)
    model, tokenizer = load_model(bench.model, dtype="float32", device="cpu")
    return model, tokenizer


class Meter:
    """Step times (wall and this process's CPU time, all threads) and the peak resident memory
    after the warm-up steps."""

    def __init__(self, warmup: int):
        self.warmup = warmup
        self.seconds: list[float] = []
        self.cpu_seconds: list[float] = []
        self.count = 0
        self.started = (0.0, 0.0)

    def begin(self) -> None:
        if self.count == self.warmup:
            reset_peak()  # model, optimizer state and allocator pools exist now
        self.started = (time.perf_counter(), time.process_time())

    def end(self) -> None:
        if self.count >= self.warmup:
            self.seconds.append(time.perf_counter() - self.started[0])
            self.cpu_seconds.append(time.process_time() - self.started[1])
        self.count += 1

    def result(self, row: str, **extra) -> dict:
        return {
            "row": row,
            "step_s": round(statistics.median(self.seconds), 3),
            "step_times_s": [round(s, 3) for s in self.seconds],
            # less sensitive to other jobs on the machine than the wall time
            "step_cpu_s": round(statistics.median(self.cpu_seconds), 3),
            "step_peak_mib": round(status_kib("VmHWM") / 1024, 1),
            "process_peak_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            **extra,
        }


def run_sft(bench: Bench, token_ids: dict) -> dict:
    """The floor: the model's own ``labels=`` loss, backward, AdamW (no clipping, no scheduler)."""
    import torch

    model, _ = _load(bench)
    model.train()
    sequences = [
        p + c for p, c in zip(token_ids["prompt_ids"], token_ids["chosen_ids"], strict=True)
    ]
    sequences += [
        p + r for p, r in zip(token_ids["prompt_ids"], token_ids["rejected_ids"], strict=True)
    ]
    input_ids = torch.tensor(sequences)
    labels = input_ids.clone()
    labels[:, : bench.prompt] = -100
    attention_mask = torch.ones_like(input_ids)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE)
    meter = Meter(bench.warmup)
    for _ in range(bench.warmup + bench.steps):
        meter.begin()
        loss = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        meter.end()
    return meter.result("sft", loss=float(loss))


def run_gsil(bench: Bench, token_ids: dict, row: str) -> dict:
    """GSIL optimizer steps with reference log-probs computed once beforehand."""
    import torch
    from accelerate import Accelerator

    import gsil.optimization as optimization
    from gsil.batching import Example
    from gsil.estimators import get_estimator
    from gsil.methods import get_method
    from gsil.models import enable_activation_checkpointing

    path, every_n_layers = GSIL_ROWS[row]
    model, tokenizer = _load(bench)
    examples = [
        Example(i, tuple(prompt), tuple(demo), (tuple(gen),))
        for i, (prompt, demo, gen) in enumerate(
            zip(
                token_ids["prompt_ids"],
                token_ids["chosen_ids"],
                token_ids["rejected_ids"],
                strict=True,
            )
        )
    ]
    settings = optimization.OptimSettings(
        learning_rate=LEARNING_RATE,
        batch_size=len(examples),
        gradient_checkpointing=every_n_layers > 0,
        checkpoint_layers_every=max(every_n_layers, 1),
        logprob_path=path,
    )
    accelerator = Accelerator(cpu=True)
    pad_id = tokenizer.pad_token_id
    ref_demo, ref_gen = optimization.reference_logps(
        model, examples, settings, pad_id=pad_id, accelerator=accelerator, with_generations=True
    )
    data = optimization.RoundData(examples, ref_demo, ref_gen, pad_id=pad_id)
    method = get_method("gsil", get_estimator("logistic"), beta=BETA)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    if settings.gradient_checkpointing:  # what RoundStepper.prepare does in a run
        enable_activation_checkpointing(model, settings.checkpoint_layers_every)
    model.train()
    model, optimizer = accelerator.prepare(model, optimizer)
    (step_plan,) = optimization.plan_steps(range(len(examples)), len(examples), 1, 1, 0)
    stepper = optimization.RoundStepper(
        optimization.Prepared(model, optimizer, scheduler), data, method, settings, accelerator
    )
    meter = Meter(bench.warmup)
    for _ in range(bench.warmup + bench.steps):
        meter.begin()
        stats = stepper.step(step_plan)
        meter.end()
    return meter.result(row, loss=stats["loss"], logprob_path=path, checkpoint_every=every_n_layers)


def run_trl(bench: Bench, token_ids: dict, row: str, out_dir: Path) -> dict:
    """TRL's DPOTrainer with precomputed reference log-probs on the same token ids."""
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer

    class TokenIdsDPOTrainer(DPOTrainer):
        """Takes the tokenized columns as given (TRL would tokenize text columns)."""

        def _prepare_dataset(self, dataset, *args, **kwargs):
            return dataset

    meter = Meter(bench.warmup)

    class Timing(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            meter.begin()

        def on_step_end(self, args, state, control, **kwargs):
            meter.end()

    checkpointing = TRL_ROWS[row]
    model, tokenizer = _load(bench)
    config = DPOConfig(
        output_dir=str(out_dir),
        per_device_train_batch_size=bench.rows // 2,
        max_steps=bench.warmup + bench.steps,
        learning_rate=LEARNING_RATE,
        lr_scheduler_type="constant",
        beta=BETA,
        loss_type=["sigmoid"],
        precompute_ref_log_probs=True,
        gradient_checkpointing=checkpointing,
        bf16=False,
        use_cpu=True,
        max_length=None,
        report_to="none",
        save_strategy="no",
        logging_steps=bench.warmup + bench.steps,
        dataloader_num_workers=0,
        seed=0,
    )
    trainer = TokenIdsDPOTrainer(
        model=model,
        args=config,
        train_dataset=Dataset.from_dict(token_ids),
        processing_class=tokenizer,
        callbacks=[Timing()],
    )
    result = trainer.train()
    import trl

    return meter.result(
        row, loss=result.training_loss, trl=trl.__version__, checkpointing=checkpointing
    )


def child(row: str, bench: Bench, ids_file: Path) -> dict:
    token_ids = json.loads(ids_file.read_text())
    if row == "sft":
        return run_sft(bench, token_ids)
    if row in GSIL_ROWS:
        return run_gsil(bench, token_ids, row)
    with tempfile.TemporaryDirectory() as out_dir:
        return run_trl(bench, token_ids, row, Path(out_dir))


def run_row(row: str, bench: Bench, ids_file: Path) -> dict:
    """One row in a fresh interpreter; its JSON result (the child's last stdout line)."""
    command = [sys.executable, "-m", "benchmarks.compare_trl", "--child", row, str(ids_file)]
    command += ["--bench", json.dumps(asdict(bench))]
    output = subprocess.run(command, capture_output=True, text=True)
    if output.returncode != 0:
        raise RuntimeError(f"row {row} failed:\n{output.stderr[-4000:]}")
    return json.loads(output.stdout.strip().splitlines()[-1])


def cpu_name() -> str:
    """The CPU model and its widest vector extension (AVX-512 or AVX2), from /proc/cpuinfo."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or "unknown CPU"
    name = next(
        (line.split(":", 1)[1].strip() for line in info.splitlines() if "model name" in line), "?"
    )
    flags = next(
        (line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")),
        [],
    )
    vector = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "no AVX2"
    import torch

    kernels = torch.backends.cpu.get_cpu_capability()
    return f"{name}, {os.cpu_count()} cores ({vector}; torch's CPU kernels: {kernels})"


def table(results: list[dict]) -> list[str]:
    """The rows as a Markdown table, with time relative to the SFT loop and memory to TRL's
    DPOTrainer without checkpointing (where those rows ran)."""
    by_row = {r["row"]: r for r in results}
    floor = by_row.get("sft")
    trl = by_row.get("trl")
    lines = [
        "| row | s/step | CPU s/step | step peak MiB | process peak MiB | time / SFT loop "
        "| memory / TRL |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        time_ratio = f"{r['step_s'] / floor['step_s']:.2f}x" if floor else "-"
        memory_ratio = f"{r['step_peak_mib'] / trl['step_peak_mib']:.2f}x" if trl else "-"
        lines.append(
            f"| {r['row']} | {r['step_s']:.2f} | {r.get('step_cpu_s', float('nan')):.2f} | "
            f"{r['step_peak_mib']:.0f} | "
            f"{r['process_peak_mib']:.0f} | {time_ratio} | {memory_ratio} |"
        )
    return lines


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=Bench.model, help="model id or directory")
    parser.add_argument("--rows", type=int, default=Bench.rows, help="sequences a step (even)")
    parser.add_argument("--length", type=int, default=Bench.length, help="tokens a sequence")
    parser.add_argument("--prompt", type=int, default=Bench.prompt, help="prompt tokens")
    parser.add_argument("--warmup", type=int, default=Bench.warmup, help="untimed steps")
    parser.add_argument("--steps", type=int, default=Bench.steps, help="timed steps")
    parser.add_argument("--only", help=f"comma-separated rows of {','.join(ROWS)} (default all)")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    parser.add_argument("--bench", help=argparse.SUPPRESS)
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        result = child(args.child[0], Bench(**json.loads(args.bench)), Path(args.child[1]))
        print(json.dumps(result))
        return result
    bench = Bench(args.model, args.rows, args.length, args.prompt, args.warmup, args.steps)
    if bench.rows % 2 or not 0 < bench.prompt < bench.length:
        raise SystemExit("--rows must be even and 0 < --prompt < --length")
    rows = ROWS if not args.only else tuple(args.only.split(","))
    unknown = set(rows) - set(ROWS)
    if unknown:
        raise SystemExit(f"--only: unknown rows {sorted(unknown)}; choose from {ROWS}")
    from importlib.util import find_spec

    if find_spec("trl") is None and any(row in TRL_ROWS for row in rows):
        print("TRL is not installed (pip install -e '.[bench]'): its rows are left out")
        rows = tuple(row for row in rows if row not in TRL_ROWS)
    from transformers import AutoConfig

    from gsil.models import load_model

    if Path(bench.model).is_dir():
        vocab = AutoConfig.from_pretrained(bench.model).vocab_size
    else:  # the embedded model: loading it once also builds its cache for the children
        vocab = load_model(bench.model, device="cpu")[0].config.vocab_size
    header = (
        f"{bench.model}, fp32, {bench.rows} sequences x {bench.length} tokens a step "
        f"({bench.prompt} prompt tokens each), median of {bench.steps} steps after "
        f"{bench.warmup} warm-up, {cpu_name()}"
    )
    print(header, flush=True)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        ids_file = Path(tmp) / "token_ids.json"
        ids_file.write_text(json.dumps(make_token_ids(bench, vocab)))
        for row in rows:
            results.append(run_row(row, bench, ids_file))
            print(json.dumps(results[-1]), flush=True)
    lines = table(results)
    print("\n".join(lines))
    report = {"workload": asdict(bench), "header": header, "rows": results, "table": lines}
    if args.out:
        from gsil.io import write_json

        args.out.parent.mkdir(parents=True, exist_ok=True)
        write_json(args.out, report)
    return report


if __name__ == "__main__":
    main()
