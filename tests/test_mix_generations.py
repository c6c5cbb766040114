"""SPIN's recipe in the round loop: round t trains on the generated sets of rounds t-1 and t
together (``mix_previous_generations``), and the plain instruction prompt its (and GSIL's) code
generated with (``generation.prompt_format``), on a tiny random model (seconds)."""

import copy
import json
from collections import Counter

import pytest
import torch
from safetensors.torch import load_file
from tiny import Interrupt, interrupting, tiny_demos

import gsil.trainer as trainer
from gsil.generation import GenerationSettings, read_generated_set
from gsil.integrity import CorruptFileError
from gsil.layout import RunLayout
from gsil.methods import get_method
from gsil.trainer import OptimSettings, RoundsSettings, run_rounds

GENERATION = GenerationSettings(max_new_tokens=6, do_sample=False, batch_size=4)


def settings(run_dir, **overrides):
    values = dict(
        run_dir=run_dir,
        rounds=2,
        optim=OptimSettings(learning_rate=1e-2, batch_size=2, checkpoint_every=1),
        generation=GENERATION,
        max_prompt_length=64,
        max_length=96,
        seed=1,
        mix_previous_generations=True,
    )
    return RoundsSettings(**{**values, **overrides})


@pytest.fixture
def trained_on(monkeypatch, tiny_tokenizer):
    """A spy on the train stage: per round, the (prompt, generated response) pairs it got."""
    seen: dict[int, list[tuple[str, str]]] = {}
    real_train_round = trainer.train_round

    def spy(model, data, method, optim, place, accelerator):
        seen[place.round_index] = [
            (
                tiny_tokenizer.decode(example.prompt_ids),
                tiny_tokenizer.decode(example.gen_ids[0], skip_special_tokens=True),
            )
            for example in data.examples
        ]
        return real_train_round(model, data, method, optim, place, accelerator)

    monkeypatch.setattr(trainer, "train_round", spy)
    return seen


def set_pairs(run_dir, round_index, tokenizer):
    """(formatted prompt, response) of each row of a round's generated set, as written."""
    from gsil.data import format_prompt

    rows = read_generated_set(RunLayout(run_dir).generated(round_index))
    return [(format_prompt(tokenizer, r["prompt"]), r["generated_response"]) for r in rows]


def test_round_t_trains_on_the_sets_of_rounds_t_minus_1_and_t(
    tiny_model, tiny_tokenizer, tmp_path, trained_on
):
    demos = tiny_demos(6)
    run_rounds(tiny_model, tiny_tokenizer, demos, get_method("spin"), settings(tmp_path))
    first, second = (set_pairs(tmp_path, t, tiny_tokenizer) for t in (0, 1))
    assert first != second, "the policy changed nothing: the test could not tell the sets apart"
    assert Counter(trained_on[0]) == Counter(first)  # round 0: its own set alone
    assert Counter(trained_on[1]) == Counter(second + first)  # round 1: both, 12 pairs
    assert len(trained_on[1]) == 2 * len(demos)


def test_without_the_option_each_round_trains_on_its_own_set(
    tiny_model, tiny_tokenizer, tmp_path, trained_on
):
    run_rounds(
        tiny_model,
        tiny_tokenizer,
        tiny_demos(6),
        get_method("spin"),
        settings(tmp_path, mix_previous_generations=False),
    )
    assert Counter(trained_on[1]) == Counter(set_pairs(tmp_path, 1, tiny_tokenizer))


def test_round_0_mixes_in_the_set_a_run_names_as_its_previous(
    tiny_model, tiny_tokenizer, tmp_path, trained_on
):
    """A pipeline stage starting from an earlier run's model mixes that run's last set."""
    demos = tiny_demos(4)
    earlier = tmp_path / "earlier"
    run_rounds(
        copy.deepcopy(tiny_model), tiny_tokenizer, demos, get_method("spin"), settings(earlier)
    )
    later = tmp_path / "later"
    previous = RunLayout(earlier).generated(1)
    run_rounds(
        tiny_model,
        tiny_tokenizer,
        demos,
        get_method("spin"),
        settings(later, rounds=1, previous_generations=previous),
    )
    own = set_pairs(later, 0, tiny_tokenizer)
    assert Counter(trained_on[0]) == Counter(own + set_pairs(earlier, 1, tiny_tokenizer))


def test_a_previous_set_for_other_demonstrations_is_refused(tiny_model, tiny_tokenizer, tmp_path):
    earlier = tmp_path / "earlier"
    run_rounds(
        copy.deepcopy(tiny_model),
        tiny_tokenizer,
        tiny_demos(4),
        get_method("spin"),
        settings(earlier, rounds=1),
    )
    with pytest.raises(CorruptFileError, match="other demonstrations"):
        run_rounds(
            tiny_model,
            tiny_tokenizer,
            tiny_demos(6),
            get_method("spin"),
            settings(
                tmp_path / "later", rounds=1, previous_generations=RunLayout(earlier).generated(0)
            ),
        )


@pytest.mark.parametrize("interrupt_after_calls", [2, 6])  # round 0; round 1 (mixed) mid-epoch
def test_a_mixed_run_resumes_to_the_same_weights(
    tiny_model_readonly, tiny_tokenizer, tmp_path, interrupt_after_calls
):
    demos, spin = tiny_demos(6), get_method("spin", beta=0.5)
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run_rounds(copy.deepcopy(tiny_model_readonly), tiny_tokenizer, demos, spin, settings(straight))
    with pytest.raises(Interrupt):
        run_rounds(
            copy.deepcopy(tiny_model_readonly),
            tiny_tokenizer,
            demos,
            interrupting(spin, interrupt_after_calls),
            settings(resumed),
        )
    run_rounds(
        copy.deepcopy(tiny_model_readonly),
        tiny_tokenizer,
        demos,
        spin,
        settings(resumed, resume=True),
    )
    weights = [
        load_file(str(RunLayout(run).model(1) / "model.safetensors")) for run in (straight, resumed)
    ]
    for name in weights[0]:
        torch.testing.assert_close(weights[1][name], weights[0][name], rtol=0, atol=0)
    # round 0: 6 examples / batch 2 = 3 steps; round 1 (12 examples, mixed): 6 steps
    rows = RunLayout(resumed).metrics.read_text().splitlines()
    assert [json.loads(row)["step"] for row in rows] == list(range(1, 10))


def test_the_instruction_prompt_format_reaches_generation_alone(
    tiny_model, tiny_tokenizer, tmp_path, monkeypatch
):
    """--gen-prompt-format instruction: the round generates from SPIN's plain prompt (its
    spin/generate.py, no special tokens) and still trains on the chat template."""
    import gsil.generation.core as generation_core
    from gsil.data import format_prompt

    asked, trained = [], []
    real_generate, real_train_round = generation_core.generate_from_ids, trainer.train_round

    def generate_spy(model, tokenizer, prompt_ids, *args, **kwargs):
        asked.extend(tokenizer.decode(ids) for ids in prompt_ids)
        return real_generate(model, tokenizer, prompt_ids, *args, **kwargs)

    def train_spy(model, data, *args):
        trained.extend(tiny_tokenizer.decode(e.prompt_ids) for e in data.examples)
        return real_train_round(model, data, *args)

    monkeypatch.setattr(generation_core, "generate_from_ids", generate_spy)
    monkeypatch.setattr(trainer, "train_round", train_spy)
    demos = tiny_demos(3)
    generation = GenerationSettings(max_new_tokens=4, prompt_format="instruction")
    run_rounds(
        tiny_model,
        tiny_tokenizer,
        demos,
        get_method("spin"),
        settings(tmp_path, rounds=1, generation=generation),
    )
    assert asked == [f"### Instruction: {d.prompt}\n\n### Response: " for d in demos]
    assert trained == [format_prompt(tiny_tokenizer, d.prompt) for d in demos]


def test_the_dry_run_warns_of_the_instruction_prompt_format(capsys):
    import experiments.run

    experiments.run.main(["--dry-run", "--method", "spin", "--gen-prompt-format", "instruction"])
    plan = json.loads(capsys.readouterr().out.split("\n", 1)[1])
    assert "chat template" in plan["warning"] and "exact replication" in plan["warning"]
    with pytest.raises(SystemExit, match="--gen-system-prompt"):
        experiments.run.main(
            ["--dry-run", "--gen-prompt-format", "instruction", "--gen-system-prompt", "Be."]
        )
