"""HF ``generate`` on the CPU: the dynamic KV cache (what ``gsil.generation.hf`` uses) against a
static cache, and a static cache with ``torch.compile``, on the same prompts, in one run.

    python -m benchmarks.hf_generation --model runs/default/sft/round_0/model

Greedy, 64 held-out reasoning prompts in batches of 32, 160 new tokens at most, fp32. Prints
tokens/s of each and how many outputs equal the dynamic-cache ones. The compiled variant is run
twice: the first pass includes compilation.
"""

from __future__ import annotations

import argparse
import time

import torch

from gsil.data import DataSettings, encode_prompt, load_demonstrations
from gsil.generation.hf import left_pad
from gsil.models import load_model


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--data", default=DataSettings.source)
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=160)
    parser.add_argument(
        "--no-compile", action="store_true", help="leave out the torch.compile variant"
    )
    args = parser.parse_args(argv)

    model, tokenizer = load_model(args.model, dtype="float32", device="cpu")
    demos = load_demonstrations(
        DataSettings(source=args.data, split="test", num_demos=args.prompts, max_prompt_length=256),
        tokenizer=tokenizer,
    )
    prompt_ids = [encode_prompt(tokenizer, demo.prompt, 256) for demo in demos]
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id

    def run(label: str, **options) -> list[list[int]]:
        outputs, tokens, started = [], 0, time.perf_counter()
        for start in range(0, len(prompt_ids), args.batch_size):
            input_ids, mask = left_pad(prompt_ids[start : start + args.batch_size], pad)
            with torch.inference_mode():
                output = model.generate(
                    input_ids=input_ids,
                    attention_mask=mask,
                    do_sample=False,
                    max_new_tokens=args.max_new_tokens,
                    eos_token_id=[eos],
                    pad_token_id=pad,
                    **options,
                )
            for row in output[:, input_ids.shape[1] :].tolist():
                row = row[: row.index(eos) + 1] if eos in row else row
                outputs.append(row)
                tokens += len(row)
        seconds = time.perf_counter() - started
        print(
            f"{label:<36}{tokens:>7} tokens {seconds:>7.1f} s {tokens / seconds:>7.1f} tok/s",
            flush=True,
        )
        return outputs

    dynamic = run("dynamic cache")
    static = run("static cache", cache_implementation="static")
    variants = [("static", static)]
    if not args.no_compile:
        model.forward = torch.compile(model.forward, mode="reduce-overhead", dynamic=False)
        run("static cache + compile (compiling)", cache_implementation="static")
        variants.append(
            ("static + compile", run("static cache + compile", cache_implementation="static"))
        )
    for label, outputs in variants:
        same = sum(a == b for a, b in zip(outputs, dynamic, strict=True))
        print(f"{label}: {same}/{len(dynamic)} outputs equal the dynamic cache's")


if __name__ == "__main__":
    main()
