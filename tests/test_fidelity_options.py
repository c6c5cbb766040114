"""Options for replicating authors' recipes: the cosine schedule, left truncation of long
prompts, the model's hub revision, and their configuration keys and flags."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
from tiny import tiny_demos

from experiments.config import ConfigError, from_dict
from gsil.batching import build_examples
from gsil.data import (
    DataError,
    DataSettings,
    TokenLimits,
    encode_prompt,
    load_demonstrations,
    truncate_prompt_left,
)
from gsil.generation import GenerationSettings
from gsil.methods import get_method
from gsil.trainer import OptimSettings, RoundsSettings, run_rounds

# --------------------------------------------------------------------------- schedule


def _learning_rates(model, tokenizer, run_dir, **optim):
    settings = OptimSettings(
        learning_rate=1e-2, epochs=2, batch_size=2, grad_accum=2, checkpoint_every=0, **optim
    )
    run_rounds(
        model,
        tokenizer,
        tiny_demos(8),
        get_method("sft"),
        RoundsSettings(
            run_dir=run_dir,
            rounds=1,
            optim=settings,
            generation=GenerationSettings(max_new_tokens=4),
            max_prompt_length=64,
            max_length=96,
            seed=0,
        ),
    )
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [row["learning_rate"] for row in rows]


def test_cosine_schedule_decays_as_its_formula(tiny_model, tiny_tokenizer, tmp_path):
    # 8 demonstrations, micro-batch 2, 2 micro-batches a step: 2 steps an epoch, 4 in all.
    # After step s with 1 warm-up step: lr * 0.5 * (1 + cos(pi * (s - 1) / 3)); linear:
    # lr * (4 - s) / 3 (each logged after the step's scheduler step).
    cosine = _learning_rates(
        tiny_model, tiny_tokenizer, tmp_path / "cos", lr_scheduler="cosine", warmup_steps=1
    )
    by_hand = [1e-2 * 0.5 * (1 + math.cos(math.pi * (s - 1) / 3)) for s in (1, 2, 3, 4)]
    assert cosine == pytest.approx(by_hand, abs=1e-12)
    assert cosine == pytest.approx([1e-2, 0.75e-2, 0.25e-2, 0.0], abs=1e-12)
    linear = _learning_rates(tiny_model, tiny_tokenizer, tmp_path / "lin", warmup_steps=1)
    assert linear == pytest.approx([1e-2, 2e-2 / 3, 1e-2 / 3, 0.0], abs=1e-12)


# --------------------------------------------------------------------------- truncation

LONG = " ".join(f"w{i}" for i in range(120))  # far over 64 tokens of the byte-level tokenizer


def test_a_long_prompt_loses_its_start_and_keeps_the_template(tiny_tokenizer):
    full = encode_prompt(tiny_tokenizer, LONG)
    cut, removed = truncate_prompt_left(tiny_tokenizer, LONG, 64)
    ids = encode_prompt(tiny_tokenizer, cut)
    assert len(ids) == 64 < len(full) and removed == len(full) - 64
    assert LONG.endswith(cut) and cut.endswith("w119")  # the end is kept
    # the template's turn markers stay: the same head and tail as the uncut prompt
    head = encode_prompt(tiny_tokenizer, "")
    marker = head.index(tiny_tokenizer.convert_tokens_to_ids("<|im_end|>"))
    assert ids[:marker] == full[:marker] and ids[-4:] == full[-4:]
    assert truncate_prompt_left(tiny_tokenizer, "short", 64) == ("short", 0)


def test_a_chat_prompt_loses_the_start_of_its_first_turn_after_the_system(tiny_tokenizer):
    chat = (
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": LONG},
    )
    cut, removed = truncate_prompt_left(tiny_tokenizer, chat, 64)
    assert cut[0] == chat[0] and LONG.endswith(cut[1]["content"]) and removed > 0
    assert len(encode_prompt(tiny_tokenizer, cut)) == 64
    too_long_system = ({"role": "system", "content": LONG}, {"role": "user", "content": "hi"})
    with pytest.raises(DataError, match="does not fit max_prompt_length=64"):
        truncate_prompt_left(tiny_tokenizer, too_long_system, 64)


def test_loading_cuts_long_prompts_instead_of_rejecting_them(tiny_tokenizer, tmp_path):
    path = tmp_path / "demos.jsonl"
    rows = [{"prompt": LONG, "response": "ok"}, {"prompt": "short", "response": "ok"}]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    data = DataSettings(source=str(path), max_prompt_length=64)
    with pytest.raises(DataError, match="demos.jsonl line 1: field 'prompt'.*max_prompt_length=64"):
        load_demonstrations(data, tokenizer=tiny_tokenizer)
    skipping = dataclasses.replace(data, skip_invalid=True)
    assert len(load_demonstrations(skipping, tokenizer=tiny_tokenizer)) == 1
    cutting = dataclasses.replace(data, truncate_prompts=True)
    demos = load_demonstrations(cutting, tokenizer=tiny_tokenizer)
    assert len(demos) == 2 and LONG.endswith(demos[0].prompt) and demos[0].prompt != LONG
    assert demos[0].meta["prompt_truncated_tokens"] > 0 and demos[1].prompt == "short"
    # training (and generation) encode the cut prompt within the same limit: no error there
    examples = build_examples(
        tiny_tokenizer, [d.prompt for d in demos], [d.response for d in demos], TokenLimits(64, 96)
    )
    assert len(examples[0].prompt_ids) == 64


# --------------------------------------------------------------------------- configuration


def test_the_options_are_recipe_keys_and_checked(tmp_path, monkeypatch, tiny_tokenizer):
    config = from_dict(
        {
            "model_revision": "v1.2",
            "lr_scheduler": "cosine",
            "truncate_prompts": True,
            "do_sample": True,
            "top_k": 50,
        }
    )
    assert config.model.revision == "v1.2" and config.optim.lr_scheduler == "cosine"
    assert config.data.truncate_prompts and config.generation.top_k == 50
    assert from_dict(config.to_dict()) == config
    defaults = from_dict({})
    assert (defaults.model.revision, defaults.optim.lr_scheduler) == (None, "linear")
    assert (defaults.data.truncate_prompts, defaults.generation.top_k) == (False, 0)
    with pytest.raises(ConfigError, match="lr_scheduler must be one of"):
        from_dict({"lr_scheduler": "step"})
    with pytest.raises(ConfigError, match="top-k"):
        from_dict({"top_k": 50})  # greedy

    # the run hands the revision to the loader and the truncation to the data
    import experiments.training as training

    seen = {}

    class Stop(Exception):
        pass

    def fake_load_model(spec, **kwargs):
        seen.update(spec=spec, revision=spec.revision, **kwargs)
        return None, tiny_tokenizer

    def fake_load_demonstrations(settings, **kwargs):
        seen.update(truncate_prompts=settings.truncate_prompts)
        raise Stop

    monkeypatch.setattr(training, "load_model", fake_load_model)
    monkeypatch.setattr(training, "load_demonstrations", fake_load_demonstrations)
    with pytest.raises(Stop):
        training.execute(config.replace(output_dir=str(tmp_path), name="r"))
    assert seen["revision"] == "v1.2" and seen["truncate_prompts"] is True
