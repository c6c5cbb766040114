"""DFT's recipe in the round loop (PenGuln/DFT, commit cd7a0fb): negatives drawn under a system
prompt that training does not see (generator/gen.py), a fresh block of the k negatives each
epoch (scripts/dft_trainer.py, ``sample: true``), and the normaliser u kept from one round to
the next (this toolkit's multi-round extension), on a tiny random model (seconds)."""

import copy
from collections import Counter

import pytest
import torch
from safetensors.torch import load_file
from tiny import Interrupt, Spy, interrupting, tiny_demos

import gsil.trainer as trainer
from experiments import run
from experiments.errors import run_command
from gsil.data import format_prompt, with_system_message
from gsil.generation import GenerationSettings
from gsil.layout import RunLayout
from gsil.methods import get_method
from gsil.optimization import epoch_samples
from gsil.trainer import OptimSettings, RoundsSettings, run_rounds

SAMPLED = GenerationSettings(max_new_tokens=5, do_sample=True, num_samples=4, batch_size=8)


def settings(run_dir, optim=None, **overrides):
    values = dict(
        run_dir=run_dir,
        rounds=1,
        optim=optim or OptimSettings(learning_rate=1e-2, batch_size=2, checkpoint_every=1),
        generation=SAMPLED,
        max_prompt_length=64,
        max_length=96,
        seed=2,
    )
    return RoundsSettings(**{**values, **overrides})


def recording(method):
    """``method``, and the list of its loss calls: (state before, state after, ref_gen, gen
    shape) of each micro-batch, in order."""
    calls = []

    def around(loss, batch):
        losses, stats = loss(batch)
        calls.append(
            (
                batch.state.tolist(),
                stats[method.state_key].tolist(),
                batch.ref_gen_logps,
                tuple(batch.policy_gen_logps.shape),
            )
        )
        return losses, stats

    return Spy(method, around), calls


def test_epoch_samples_are_consecutive_blocks_wrapping_modulo_k():
    assert epoch_samples(16, 2, 0) == [0, 1] and epoch_samples(16, 2, 1) == [2, 3]
    assert epoch_samples(5, 2, 2) == [4, 0]
    assert epoch_samples(3, 0, 7) == [0, 1, 2]
    with pytest.raises(ValueError):
        epoch_samples(2, 3, 0)


def test_with_system_message_opens_a_prompt_once():
    system = {"role": "system", "content": "S"}
    assert with_system_message("hi", "S") == (system, {"role": "user", "content": "hi"})
    own = ({"role": "system", "content": "mine"}, {"role": "user", "content": "hi"})
    assert with_system_message(own, "S") == own


def test_the_generation_system_prompt_reaches_generation_alone(
    tiny_model, tiny_tokenizer, tmp_path, monkeypatch
):
    asked, trained = [], []
    real_generate_set, real_train_round = trainer.generate_set, trainer.train_round

    def generate_spy(model, tokenizer, demos, *args, **kwargs):
        asked.extend(d.prompt for d in demos)
        return real_generate_set(model, tokenizer, demos, *args, **kwargs)

    def train_spy(model, data, *args):
        trained.extend(tiny_tokenizer.decode(e.prompt_ids) for e in data.examples)
        return real_train_round(model, data, *args)

    monkeypatch.setattr(trainer, "generate_set", generate_spy)
    monkeypatch.setattr(trainer, "train_round", train_spy)
    demos = tiny_demos(4)
    unhelpful = "You are an unhelpful assistant."
    generation = GenerationSettings(max_new_tokens=5, do_sample=True, system_prompt=unhelpful)
    run_rounds(
        tiny_model,
        tiny_tokenizer,
        demos,
        get_method("dft", dft_variant="dft2"),
        settings(tmp_path, generation=generation),
    )
    system = {"role": "system", "content": unhelpful}
    assert asked == [(system, {"role": "user", "content": d.prompt}) for d in demos]
    assert trained == [format_prompt(tiny_tokenizer, d.prompt) for d in demos]
    assert all(unhelpful not in text for text in trained)


def test_each_epoch_trains_on_a_fresh_block_of_the_k_samples(tiny_model, tiny_tokenizer, tmp_path):
    """k = 4, m = 2, 2 epochs: epoch 0 scores samples 0 and 1 of every prompt, epoch 1 samples
    2 and 3 (their reference log-probs, found in the round's stored (N, k) table)."""
    dft, calls = recording(get_method("dft"))
    optim = OptimSettings(learning_rate=1e-2, batch_size=2, epochs=2, samples_per_epoch=2)
    run_rounds(tiny_model, tiny_tokenizer, tiny_demos(4), dft, settings(tmp_path, optim=optim))
    table = torch.load(RunLayout(tmp_path).reference_logps(0))["gen"]  # (4 prompts, k = 4)
    assert table.shape == (4, 4) and len(set(table.flatten().tolist())) == 16
    assert [shape[1] for *_, shape in calls] == [2] * 4  # 2 micro-batches an epoch, 2 epochs
    for number, (_, _, ref_gen, _) in enumerate(calls):
        columns = {
            int(column)
            for value in ref_gen.flatten().tolist()
            for column in torch.nonzero(table == value)[:, 1]
        }
        assert columns == ({0, 1} if number < 2 else {2, 3}), number


@pytest.mark.parametrize("keep", [False, True])
def test_u_is_kept_across_rounds_only_when_asked(keep, tiny_model, tiny_tokenizer, tmp_path):
    """One epoch a round visits each prompt once: with the option, round 1 sees as u exactly
    the values round 0 ended with; without it, u_init (0) everywhere."""
    dft, calls = recording(get_method("dft", dft_keep_normalizer=keep))
    run_rounds(tiny_model, tiny_tokenizer, tiny_demos(6), dft, settings(tmp_path, rounds=2))
    round0, round1 = calls[:3], calls[3:]
    ended = Counter(u for _, after, _, _ in round0 for u in after)
    started = Counter(u for before, _, _, _ in round1 for u in before)
    # the first step's prompts keep u = 0 (pi = pi_ref there); the later ones moved
    assert sum(ended.values()) == 6 and ended != Counter({0.0: 6})
    assert started == (ended if keep else Counter({0.0: 6}))


@pytest.mark.parametrize("interrupt_after_calls", [3, 4])  # between the rounds; in round 1
def test_a_run_keeping_u_resumes_to_the_same_weights(
    tiny_model_readonly, tiny_tokenizer, tmp_path, interrupt_after_calls
):
    dft = get_method("dft", dft_keep_normalizer=True)
    optim = OptimSettings(learning_rate=1e-2, batch_size=2, epochs=1, checkpoint_every=1)

    def go(run_dir, method, **overrides):
        model = copy.deepcopy(tiny_model_readonly)
        rounds = settings(run_dir, optim=optim, rounds=2, **overrides)
        return run_rounds(model, tiny_tokenizer, tiny_demos(6), method, rounds)

    go(tmp_path / "straight", dft)
    go(tmp_path / "forgets", get_method("dft"))
    with pytest.raises(Interrupt):
        go(tmp_path / "resumed", interrupting(dft, interrupt_after_calls))
    go(tmp_path / "resumed", dft, resume=True)
    weights = {
        name: load_file(str(RunLayout(tmp_path / name).model(1) / "model.safetensors"))
        for name in ("straight", "resumed", "forgets")
    }
    for key in weights["straight"]:
        torch.testing.assert_close(
            weights["resumed"][key], weights["straight"][key], rtol=0, atol=0
        )
    assert any(  # u matters: forgetting it trains another model
        not torch.equal(weights["forgets"][key], weights["straight"][key])
        for key in weights["straight"]
    )


def test_more_samples_per_epoch_than_generated_is_one_error(capsys):
    argv = ["--dry-run", "--method", "dft", "--do-sample", "--num-samples", "2"]
    code = run_command(run.main, [*argv, "--samples-per-epoch", "3"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert "optim.samples_per_epoch (--samples-per-epoch) = 3" in err
    assert "generation.num_samples (--num-samples) = 2" in err
    assert len(err.strip().splitlines()) == 1
