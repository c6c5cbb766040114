"""Training-step cost on the embedded model (SmolLM2-135M), all figures from one run.

- median time of a GSIL step against an SFT step on the same sequences (same token count;
  reference log-probs precomputed, so the ideal ratio is 1.0), and tokens/s;
- peak memory of a step (fresh subprocess each, VmHWM) against a naive fp32 SFT step (the
  model's own ``labels=`` loss over full logits), with and without bf16 autocast and
  gradient checkpointing;
- the reference pass for one batch against one training step;
- generation tokens/s: batched, left-padded ``generate`` against one prompt at a time.

Run: ``python -m benchmarks.train_step`` (about 10 minutes on 2 CPU cores; ``--quick`` for less;
``--model DIR --rows 4 --length 32 --prompt 8`` for a small model).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass

import torch

from benchmarks._memory import reset_peak, status_kib


@dataclass(frozen=True)
class Workload:
    """The model and the batch every measurement uses: ``rows`` sequences of ``length`` tokens
    per step (SFT: ``rows`` demos; GSIL: ``rows / 2`` demos and as many generations), the first
    ``prompt`` tokens of each a prompt."""

    model: str = "smollm2-135m"
    rows: int = 8
    length: int = 256
    prompt: int = 64


def _setup(work: Workload, precision: str, checkpointing: bool):
    from accelerate import Accelerator

    from gsil.batching import Example
    from gsil.estimators import get_estimator
    from gsil.methods import get_method
    from gsil.models import load_model
    from gsil.optimization import OptimSettings, RoundData

    torch.manual_seed(0)
    model, tokenizer = load_model(work.model, dtype="float32")
    vocab = model.config.vocab_size
    ids = torch.randint(min(100, vocab - 1), vocab, (work.rows, work.length)).tolist()
    half = work.rows // 2
    prompt = work.prompt
    pair_examples = [  # one generated response per prompt (k = 1)
        Example(i, tuple(ids[i][:prompt]), tuple(ids[i][prompt:]), (tuple(ids[i + half][prompt:]),))
        for i in range(half)
    ]
    sft_examples = [
        Example(i, tuple(row[:prompt]), tuple(row[prompt:])) for i, row in enumerate(ids)
    ]
    settings = OptimSettings(batch_size=work.rows, gradient_checkpointing=checkpointing)
    accelerator = Accelerator(cpu=True, mixed_precision="bf16" if precision == "bf16" else "no")
    if checkpointing:
        model.gradient_checkpointing_enable()
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    model, optimizer = accelerator.prepare(model, optimizer)
    ref = torch.randn(half) - 400.0
    gsil = (
        get_method("gsil", get_estimator("logistic"), beta=0.1),
        RoundData(pair_examples, ref, ref.clone(), pad_id=tokenizer.pad_token_id),
    )
    sft = (get_method("sft"), RoundData(sft_examples, None, None, pad_id=tokenizer.pad_token_id))
    return model, tokenizer, optimizer, scheduler, accelerator, settings, {"gsil": gsil, "sft": sft}


def _step(model, tokenizer, optimizer, scheduler, accelerator, settings, objective, data):
    from gsil.optimization import Prepared, RoundStepper, plan_steps

    # one optimizer step over every example, in one micro-batch on this one process
    (step_plan,) = plan_steps(range(len(data.examples)), len(data.examples), 1, 1, 0)
    stepper = RoundStepper(
        Prepared(model, optimizer, scheduler), data, objective, settings, accelerator
    )
    start = time.perf_counter()
    stats = stepper.step(step_plan)
    return time.perf_counter() - start, stats["tokens"]


def time_steps(work: Workload, repeats: int, precision: str) -> dict:
    """Interleaved GSIL and SFT steps; medians after one warm-up step each."""
    from gsil.batching import collate
    from gsil.optimization import forward_logps

    model, tokenizer, optimizer, scheduler, accelerator, settings, jobs = _setup(
        work, precision, False
    )
    times: dict[str, list[float]] = {"gsil": [], "sft": []}
    tokens = {}
    for repeat in range(repeats + 1):
        for name, (objective, data) in jobs.items():
            seconds, tokens[name] = _step(
                model, tokenizer, optimizer, scheduler, accelerator, settings, objective, data
            )
            if repeat:
                times[name].append(seconds)
    objective, data = jobs["gsil"]
    batch = collate(data.examples, tokenizer.pad_token_id, True)
    ref_times = []
    for _ in range(repeats):
        start = time.perf_counter()
        with torch.no_grad(), accelerator.autocast():
            forward_logps(model, batch, False)
        ref_times.append(time.perf_counter() - start)
    medians = {name: statistics.median(values) for name, values in times.items()}
    return {
        "precision": precision,
        "gsil_step_s": round(medians["gsil"], 3),
        "sft_step_s": round(medians["sft"], 3),
        "gsil_over_sft": round(medians["gsil"] / medians["sft"], 3),
        "tokens_per_step": tokens["gsil"],
        "gsil_tokens_per_s": round(tokens["gsil"] / medians["gsil"], 1),
        "reference_pass_s": round(statistics.median(ref_times), 3),
        "reference_over_step": round(statistics.median(ref_times) / medians["gsil"], 3),
    }


def peak_memory(work: Workload, kind: str, precision: str, checkpointing: bool) -> dict:
    """Peak resident memory added by one training step (after a warm-up step)."""
    model, tokenizer, optimizer, scheduler, accelerator, settings, jobs = _setup(
        work, precision, checkpointing
    )
    if kind == "naive-sft":
        from gsil.batching import collate

        batch = collate(jobs["sft"][1].examples, tokenizer.pad_token_id, False)

        def run():
            with accelerator.autocast():
                loss = model(
                    input_ids=batch["input_ids"],
                    attention_mask=batch["attention_mask"],
                    labels=batch["labels"],
                    use_cache=False,
                ).loss
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    else:
        objective, data = jobs[kind]

        def run():
            _step(model, tokenizer, optimizer, scheduler, accelerator, settings, objective, data)

    run()  # warm-up: optimizer state and allocator pools exist before we measure
    before = reset_peak()
    run()
    return {
        "kind": kind,
        "precision": precision,
        "checkpointing": checkpointing,
        "step_peak_extra_gib": round((status_kib("VmHWM") - before) / 2**20, 3),
        "process_peak_gib": round(status_kib("VmHWM") / 2**20, 3),
    }


def generation_speed(work: Workload, num_prompts: int, max_new_tokens: int) -> dict:
    from gsil.data import encode_prompt
    from gsil.evaluation.options import DEFAULT_REASONING_TASKS
    from gsil.generation import Decoding, generate_from_ids
    from gsil.models import load_model
    from gsil.reasoning_tasks import load_reasoning_demonstrations

    model, tokenizer = load_model(work.model, dtype="float32")
    tasks = ",".join(DEFAULT_REASONING_TASKS)
    demos = load_reasoning_demonstrations(tasks, size=num_prompts, seed=7)
    prompt_ids = [encode_prompt(tokenizer, d.prompt) for d in demos]
    out = {}
    for label, batch_size in (("batched", 16), ("unbatched", 1)):
        start = time.perf_counter()
        results = generate_from_ids(
            model,
            tokenizer,
            prompt_ids,
            Decoding(max_new_tokens=max_new_tokens, batch_size=batch_size),
            progress=False,
        )
        seconds = time.perf_counter() - start
        new_tokens = sum(r.num_tokens for r in results)
        out[label] = {
            "seconds": round(seconds, 2),
            "new_tokens": new_tokens,
            "tokens_per_s": round(new_tokens / seconds, 1),
        }
    out["batched_speedup"] = round(
        out["batched"]["tokens_per_s"] / out["unbatched"]["tokens_per_s"], 2
    )
    return out


def _child(work: Workload, task: str, *params: str) -> dict:
    command = [
        sys.executable,
        "-m",
        "benchmarks.train_step",
        "--workload",
        json.dumps(asdict(work)),
    ]
    command += ["--child", task, *params]
    return json.loads(subprocess.check_output(command, text=True).strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="fewer repeats and cases")
    parser.add_argument("--model", default=Workload.model, help="model id or directory")
    parser.add_argument("--rows", type=int, default=Workload.rows, help="sequences per step")
    parser.add_argument("--length", type=int, default=Workload.length, help="tokens a sequence")
    parser.add_argument("--prompt", type=int, default=Workload.prompt, help="prompt tokens")
    parser.add_argument("--prompts", type=int, default=16, help="prompts generated for")
    parser.add_argument("--workload", help=argparse.SUPPRESS)
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        work = Workload(**json.loads(args.workload))
        task, *params = args.child
        if task == "time":
            result = time_steps(work, int(params[0]), params[1])
        elif task == "memory":
            result = peak_memory(work, params[0], params[1], params[2] == "1")
        else:
            result = generation_speed(work, int(params[0]), int(params[1]))
        print(json.dumps(result))
        return [result]
    work = Workload(args.model, args.rows, args.length, args.prompt)
    repeats = 3 if args.quick else args.repeats
    print(
        f"{work.model}, {work.rows} sequences x {work.length} tokens per step, CPU "
        f"({torch.get_num_threads()} threads)"
    )
    results = []
    for precision in ("fp32",) if args.quick else ("fp32", "bf16"):
        results.append(_child(work, "time", str(repeats), precision))
        print("step time:", json.dumps(results[-1]))
    cases = [("naive-sft", "fp32", "0"), ("sft", "fp32", "0"), ("gsil", "fp32", "0")]
    if not args.quick:
        cases += [("gsil", "bf16", "0"), ("gsil", "fp32", "1"), ("gsil", "bf16", "1")]
    for case in cases:
        results.append(_child(work, "memory", *case))
        print("memory:", json.dumps(results[-1]))
    new_tokens = "32" if args.quick else "64"
    results.append(_child(work, "generate", str(args.prompts), new_tokens))
    print("generation:", json.dumps(results[-1]))
    return results


if __name__ == "__main__":
    main()
