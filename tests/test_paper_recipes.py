"""The paper presets as their authors ran them: SPIN's iterations (uclaml/SPIN, commit a12ba80),
DFT's run (PenGuln/DFT, commit cd7a0fb), and each preset's dry run stating where it still
departs from the authors. Values are copied from the authors' files, not from the presets."""

from __future__ import annotations

import json

import pytest

import experiments.run
from experiments.config import (
    PRESETS_DIR,
    ConfigError,
    load_pipeline,
    read_recipe,
    recipe_departures,
)
from experiments.training import rounds_settings
from gsil.layout import RunLayout

PAPER_PRESETS = sorted(p.stem for p in PRESETS_DIR.glob("paper-*.yaml"))


def _dry_run(capsys, *argv) -> dict:
    experiments.run.main(["--dry-run", *argv])
    out = capsys.readouterr().out
    assert out.startswith("dry run: nothing is loaded or trained")
    return json.loads(out.split("\n", 1)[1])


def test_the_paper_presets_are_found():
    assert {"paper-zephyr", "paper-spin", "paper-dft"} <= set(PAPER_PRESETS)


@pytest.mark.parametrize("preset", PAPER_PRESETS)
def test_each_paper_presets_dry_run_prints_its_departures(preset, capsys):
    """The dry run validates the recipe and prints every sentence of its ``_departures``."""
    _, values = read_recipe(preset)
    written = values["_departures"]
    assert len(written) >= 3 and all(len(sentence) > 40 for sentence in written)
    plan = _dry_run(capsys, "--preset", preset)
    assert plan["departures_from_the_authors"] == written


def test_paper_zephyr_names_the_instruction_prompt_it_does_not_use():
    assert any("### Instruction" in s for s in recipe_departures("paper-zephyr"))


def test_departures_must_be_sentences(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("_departures: not a list\nmethod: sft\n")
    with pytest.raises(ConfigError, match="_departures"):
        recipe_departures(str(recipe))
    with pytest.raises(SystemExit, match="_departures"):
        experiments.run.main(["--dry-run", "--preset", str(recipe)])


# SPIN's four iterations (configs/config.yaml, config_iter1-3.yaml and scripts/finetune*.sh,
# whose flags override the configs): (learning rate, beta, epochs, mixes the iteration before)
SPIN_ITERATIONS = {
    "spin-iter0": (5e-7, 0.1, 6, False),
    "spin-iter1": (5e-7, 0.1, 6, True),
    "spin-iter2": (1e-7, 0.1, 6, True),
    "spin-iter3": (1e-7, 5.0, 6, True),
}


def test_paper_spin_is_the_authors_four_iterations():
    pipeline = load_pipeline("paper-spin")
    assert [s.name for s in pipeline.stages] == list(SPIN_ITERATIONS)
    for stage in pipeline.stages:
        config = stage.config
        lr, beta, epochs, mixes = SPIN_ITERATIONS[stage.name]
        assert config.objective.method == "spin"
        assert (config.optim.learning_rate, config.objective.beta) == (lr, beta), stage.name
        assert (config.optim.epochs, config.mix_previous_generations) == (epochs, mixes)
        assert (config.optim.optimizer, config.optim.lr_scheduler) == ("rmsprop", "linear")
        assert (config.optim.warmup_ratio, config.optim.warmup_steps) == (0.1, 0)
        assert (config.data.max_length, config.data.max_prompt_length) == (1024, 512)
        assert config.data.truncate_prompts  # truncation_mode keep_end
        assert (config.generation.do_sample, config.generation.max_new_tokens) == (False, 256)
        assert config.rounds == 1 and config.seed == 42
    first = pipeline.stages[0].config.model
    assert first.name_or_path == "alignment-handbook/zephyr-7b-sft-full"
    assert first.revision == "ac6e600eefcce74f5e8bae1035d4f66019e93190"
    # iteration t starts from iteration t-1's model and mixes in the set it trained on
    for before, stage in zip(pipeline.stages, pipeline.stages[1:], strict=False):
        assert stage.init_from == before.name
        previous = rounds_settings(stage.config).previous_generations
        assert previous == RunLayout(before.config.run_dir()).generated(0)
    assert rounds_settings(pipeline.stages[0].config).previous_generations is None


def test_paper_spin_dry_run_counts_the_mixed_pairs(capsys):
    """61,135 prompts, 8 per GPU x 4 GPUs x 2 accumulated: iteration 0 trains 61,135 pairs,
    ceil(61135 / 32) = 1,911 micro-batches = 956 steps an epoch, 5,736 in 6 epochs; the later
    iterations 122,270 pairs (both sets), 3,821 micro-batches = 1,911 steps, 11,466 in 6."""
    plan = _dry_run(capsys, "--preset", "paper-spin")
    steps = {stage["run"]: stage["optimizer_steps"] for stage in plan["stages"]}
    assert steps == {
        "spin-iter0": 5_736,
        "spin-iter1": 11_466,
        "spin-iter2": 11_466,
        "spin-iter3": 11_466,
    }


def test_warmup_ratio_warms_up_a_share_of_the_rounds_steps(tiny_model, tiny_tokenizer, tmp_path):
    """8 examples in micro-batches of 2: 4 steps; ratio 0.3 -> ceil(1.2) = 2 warm-up steps, so
    the rates after each step are lr x 1/2, 1, then linear decay over the last 2: 1/2, 0."""
    from tiny import tiny_demos

    from gsil.methods import get_method
    from gsil.optimization import OptimSettings
    from gsil.trainer import RoundsSettings, run_rounds

    optim = OptimSettings(learning_rate=1e-3, batch_size=2, warmup_ratio=0.3, checkpoint_every=0)
    run_rounds(
        tiny_model,
        tiny_tokenizer,
        tiny_demos(8),
        get_method("sft"),
        RoundsSettings(run_dir=tmp_path, max_prompt_length=64, max_length=96, optim=optim),
    )
    rows = RunLayout(tmp_path).metrics.read_text().splitlines()
    rates = [json.loads(row)["learning_rate"] / 1e-3 for row in rows]
    assert rates == pytest.approx([0.5, 1.0, 0.5, 0.0])


def test_warmup_ratio_out_of_range_is_refused():
    with pytest.raises(SystemExit, match="warmup_ratio"):
        experiments.run.main(["--dry-run", "--method", "sft", "--warmup-ratio", "1.5"])


# recipes/dft/mistral_base_dft.yaml and mistral_base_dft2.yaml: (variant, tau, gamma)
DFT_RUNS = {"dft": ("dft", 1.0, 0.85), "dft2": ("dft2", 0.3, 0.9)}


def test_paper_dft_is_the_authors_runs():
    pipeline = load_pipeline("paper-dft")
    assert [s.name for s in pipeline.stages] == list(DFT_RUNS)
    assert pipeline.stages[1].share_round0_generations == "dft"  # the same offline negatives
    for stage in pipeline.stages:
        config = stage.config
        goal, optim, gen = config.objective, config.optim, config.generation
        assert (goal.method, goal.dft_variant, goal.dft_tau, goal.dft_gamma) == (
            "dft",
            *DFT_RUNS[stage.name],
        )
        assert goal.dft_u_init == 0.0 and not goal.dft_keep_normalizer  # one round
        assert (config.model.name_or_path, config.model.revision) == (
            "mistralai/Mistral-7B-v0.1",
            "7231864981174d9bee8c7687c24c8344414eae6b",
        )
        assert (config.data.source, config.data.split) == (
            "HuggingFaceH4/ultrafeedback_binarized",
            "train_sft",
        )
        assert (config.data.max_length, config.data.max_prompt_length) == (1024, 512)
        assert (optim.optimizer, optim.learning_rate, optim.lr_scheduler) == (
            "adamw",
            2e-6,
            "cosine",
        )
        assert (optim.epochs, optim.warmup_ratio, optim.batch_size, optim.grad_accum) == (
            2,
            0.1,
            4,
            8,
        )
        # generator/gen_uf.sh: --temp 0.7 --top_p 1.0 --top_k 50 --max_new_tokens 320
        assert (gen.do_sample, gen.temperature, gen.top_p, gen.top_k) == (True, 0.7, 1.0, 50)
        assert gen.max_new_tokens == 320
        assert gen.system_prompt == "You are an unhelpful assistant."
        # samples_per_prompt 2 with sample: true over 2 epochs reads generated_0 .. generated_3
        assert (optim.samples_per_epoch, gen.num_samples) == (2, 4)
        assert config.rounds == 1 and config.seed == 42


def test_paper_dft_dry_run_counts_the_authors_steps(capsys):
    """61,135 prompts, 128 a step: ceil(61135 / 128) = 478 steps an epoch, 956 in 2."""
    plan = _dry_run(capsys, "--preset", "paper-dft")
    assert [stage["optimizer_steps"] for stage in plan["stages"]] == [956, 956]


def test_a_dft_preset_asking_more_samples_per_epoch_than_drawn_is_one_error(capsys):
    from experiments.errors import run_command

    argv = ["--dry-run", "--preset", "paper-dft", "--samples-per-epoch", "5"]
    code = run_command(experiments.run.main, argv)
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "--samples-per-epoch" in err and "--num-samples" in err


def test_a_spin_like_pipeline_mixes_the_previous_stages_set(tiny_model, tiny_tokenizer, tmp_path):
    """paper-spin's shape at toy scale, through the command: iteration 1 starts from
    iteration 0's model, its lr and beta its own, and trains on both iterations' sets."""
    from tiny import tiny_pipeline_base

    from gsil.models import save_model

    model_dir = save_model(tiny_model, tiny_tokenizer, tmp_path / "model")
    base = tiny_pipeline_base(model_dir, method="spin", epochs=2, warmup_ratio=0.5)
    recipe = {
        "pipeline": "spin-like",
        "_departures": ["A toy: two demonstrations, a random model, four new tokens a response."],
        "base": base,
        "stages": [
            {"name": "iter0"},
            {
                "name": "iter1",
                "init_from": "iter0",
                "mix_previous_generations": True,
                "lr": 1e-7,
                "beta": 5.0,
            },
        ],
    }
    preset = tmp_path / "spin-like.json"
    preset.write_text(json.dumps(recipe))
    experiments.run.main(["--preset", str(preset), "--output-dir", str(tmp_path / "runs")])
    root = tmp_path / "runs" / "spin-like"
    first, second = RunLayout(root / "iter0"), RunLayout(root / "iter1")
    summary = json.loads(second.round_summary(0).read_text())
    assert summary["mixed_previous_generations"] == str(first.generated(0))
    # 2 demonstrations in micro-batches of 2: 1 step an epoch, 2 mixed pairs: 2 steps an epoch
    rows = [json.loads(row) for row in second.metrics.read_text().splitlines()]
    assert len(rows) == 4
    assert max(row["learning_rate"] for row in rows) == pytest.approx(1e-7)
    saved = json.loads(second.config.read_text())
    assert (saved["objective"]["beta"], saved["optim"]["learning_rate"]) == (5.0, 1e-7)


def test_a_dft_like_pipeline_shares_its_negatives(tiny_model, tiny_tokenizer, tmp_path):
    """paper-dft's shape at toy scale, through the command: DFT draws 4 negatives a prompt under
    the system prompt, trains on 2 an epoch, and DFT2 trains on the same negatives."""
    from tiny import tiny_pipeline_base

    from gsil.generation import read_generated_set
    from gsil.models import save_model

    model_dir = save_model(tiny_model, tiny_tokenizer, tmp_path / "model")
    unhelpful = "You are an unhelpful assistant."
    base = tiny_pipeline_base(
        model_dir,
        method="dft",
        epochs=2,
        do_sample=True,
        top_k=50,
        num_samples=4,
        samples_per_epoch=2,
        gen_system_prompt=unhelpful,
        lr_scheduler="cosine",
    )
    recipe = {
        "pipeline": "dft-like",
        "base": base,
        "stages": [
            {"name": "dft", "dft_variant": "dft"},
            {"name": "dft2", "dft_variant": "dft2", "share_round0_generations": "dft"},
        ],
    }
    preset = tmp_path / "dft-like.json"
    preset.write_text(json.dumps(recipe))
    experiments.run.main(["--preset", str(preset), "--output-dir", str(tmp_path / "runs")])
    root = tmp_path / "runs" / "dft-like"
    sets = [read_generated_set(RunLayout(root / n).generated(0)) for n in ("dft", "dft2")]
    assert sets[0] == sets[1] and len(sets[0]) == 2 * 4
    assert all(row["prompt"][0] == {"role": "system", "content": unhelpful} for row in sets[0])
    for name in ("dft", "dft2"):
        rows = RunLayout(root / name).metrics.read_text().splitlines()
        assert len(rows) == 2  # 2 prompts a step, 2 epochs
