"""Tokens/s of each generation backend on the same prompts and settings, in one run.

    .venv-vllm/bin/python -m benchmarks.generation [--model smollm2-135m] [--prompts 96]

Greedy answers to held-out reasoning-gym prompts (the evaluation's and the rounds' workload),
``--max-new-tokens`` each, by HF ``generate`` (batched) and by vLLM, in fp32 and bf16. Prints
tokens/s, the ratio to HF at the same precision, vLLM's engine start, the tokens/s with that
start amortised over this set, and the share of outputs identical to HF greedy fp32. Needs
vLLM (``make setup-vllm``); without it only the HF rows are printed. Run on a quiet machine,
with a model whose answers are long (a base model's short answers leave HF batches padding
most of their steps; tokens/s counts answer tokens only).
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import time

import torch

from gsil.data import encode_prompt, load_demonstrations
from gsil.generation import generate_from_ids
from gsil.models import load_model


def timed(function):
    started = time.perf_counter()
    result = function()
    return result, time.perf_counter() - started


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--data", default="rg:chain_sum,basic_arithmetic")
    parser.add_argument("--prompts", type=int, default=96)
    parser.add_argument("--max-new-tokens", type=int, default=160)
    parser.add_argument("--batch-size", type=int, default=32, help="HF prompts per batch")
    args = parser.parse_args(argv)

    model, tokenizer = load_model(args.model, dtype="float32", device="cpu")
    demos = load_demonstrations(args.data, split="test", size=args.prompts, seed=0,
                                tokenizer=tokenizer, max_prompt_length=256)  # fmt: skip
    prompt_ids = [encode_prompt(tokenizer, demo.prompt, 256) for demo in demos]
    greedy = dict(max_new_tokens=args.max_new_tokens, do_sample=False, seed=0, progress=False)
    rows, reference = [], None
    for precision, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        # a bf16 copy of the weights (autocast would re-cast every weight at every step)
        hf_model = model if dtype == torch.float32 else copy.deepcopy(model).to(dtype)
        results, seconds = timed(lambda: generate_from_ids(
            hf_model, tokenizer, prompt_ids, backend="hf", batch_size=args.batch_size, **greedy  # noqa: B023
        ))  # fmt: skip
        reference = reference or [r.token_ids for r in results]
        rows.append(_row("HF generate", precision, results, seconds, 0.0, reference))
        if importlib.util.find_spec("vllm") is None:
            continue
        from gsil.generation.vllm_engine import VLLMEngine

        name = "float32" if dtype == torch.float32 else "bfloat16"
        engine, start = timed(lambda: VLLMEngine(model, tokenizer, dtype=name, seed=0))  # noqa: B023
        with engine:
            results, seconds = timed(
                lambda: generate_from_ids(engine, tokenizer, prompt_ids, **greedy)  # noqa: B023
            )
        rows.append(_row("vLLM", precision, results, seconds, start, reference))
    hf_speed = {
        row["precision"]: row["tokens_per_s"] for row in rows if row["backend"] == "HF generate"
    }
    print(f"\n{len(prompt_ids)} prompts, {args.max_new_tokens} new tokens at most, {args.model}, "
          f"greedy, {torch.get_num_threads()} threads")  # fmt: skip
    print(f"{'backend':<13}{'prec.':<6}{'tokens':>8}{'tok/s':>8}{'vs HF':>7}{'start s':>9}"
          f"{'tok/s w/ start':>16}{'= HF fp32':>11}")  # fmt: skip
    for row in rows:
        print(f"{row['backend']:<13}{row['precision']:<6}{row['tokens']:>8}"
              f"{row['tokens_per_s']:>8.0f}{row['tokens_per_s'] / hf_speed[row['precision']]:>7.2f}"
              f"{row['start_s']:>9.1f}{row['tokens_per_s_with_start']:>16.0f}"
              f"{row['identical']:>8}/{len(prompt_ids)}")  # fmt: skip
    return rows


def _row(backend, precision, results, seconds, start, reference) -> dict:
    tokens = sum(result.num_tokens for result in results)
    identical = sum(r.token_ids == ref for r, ref in zip(results, reference, strict=True))
    return {
        "backend": backend, "precision": precision, "tokens": tokens,
        "tokens_per_s": tokens / seconds, "start_s": start,
        "tokens_per_s_with_start": tokens / (seconds + start), "identical": identical,
    }  # fmt: skip


if __name__ == "__main__":
    main()
