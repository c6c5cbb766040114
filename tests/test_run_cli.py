"""`python -m experiments.run` end to end on a tiny model saved to disk, and the run's
implicit classifier (analysis.implicit)."""

import json

import pytest

from analysis.implicit import implicit_logits
from experiments.run import build_parser, main
from gsil.models import save_model


@pytest.fixture
def tiny_run_inputs(tiny_model, tiny_tokenizer, tmp_path):
    model_dir = save_model(tiny_model, tiny_tokenizer, tmp_path / "tiny-model")
    data = tmp_path / "demos.jsonl"
    rows = [{"question": f"double {i}", "answer": f"{2 * i}"} for i in range(6)]
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return model_dir, data


def run_args(model_dir, data, out, *extra):
    return [
        "--model",
        str(model_dir),
        "--data",
        str(data),
        "--prompt-field",
        "question",
        "--response-field",
        "answer",
        "--num-demos",
        "6",
        "--batch-size",
        "2",
        "--max-new-tokens",
        "6",
        "--max-prompt-length",
        "64",
        "--max-length",
        "96",
        "--output-dir",
        str(out),
        "--name",
        "tiny",
        "--lr",
        "1e-2",
        "--gen-batch-size",
        "4",
        "--checkpoint-every",
        "0",
        *extra,
    ]


def test_run_writes_config_metrics_rounds_and_summary(tiny_run_inputs, tmp_path):
    model_dir, data = tiny_run_inputs
    summary = main(run_args(model_dir, data, tmp_path / "runs", "--rounds", "2", "--beta", "0.5"))
    run_dir = tmp_path / "runs" / "tiny"
    config = json.loads((run_dir / "config.json").read_text())
    goal = config["objective"]
    assert config["rounds"] == 2 and goal["beta"] == 0.5 and goal["loss"] == "logistic"
    assert config["seed"] == 0 and goal["method"] == "gsil"  # defaults resolved and written
    assert config["optim"]["learning_rate"] == 1e-2 and config["generation"]["batch_size"] == 4
    assert json.loads((run_dir / "summary.json").read_text())["num_demonstrations"] == 6
    assert [r["round"] for r in summary["rounds"]] == [0, 1]
    assert (
        summary["progress"]["rewards/margins"]["last"]
        > summary["progress"]["rewards/margins"]["first"]
    )
    for round_index in (0, 1):
        assert (run_dir / f"round_{round_index}" / "model" / "config.json").exists()
    # the trained run's implicit classifier, on held-out items against fresh generations
    metrics = implicit_logits(run_dir, num_items=6)
    assert 0.0 <= metrics["ece"] <= 1.0
    rows = (run_dir / "implicit_logits.jsonl").read_text().splitlines()
    assert len(rows) == 6 and {"demo_logit", "gen_logit"} <= set(json.loads(rows[0]))
    # the AUC by hand from the stored logits: the share of the 36 (demo, generation) pairs the
    # logit ranks right, a tie counting half
    logits = [json.loads(row) for row in rows]
    pairs = [(d["demo_logit"], g["gen_logit"]) for d in logits for g in logits]
    by_hand = sum((d > g) + 0.5 * (d == g) for d, g in pairs) / len(pairs)
    assert metrics["auc"] == pytest.approx(by_hand, abs=1e-12)


def test_resume_refuses_a_changed_configuration(tiny_run_inputs, tmp_path):
    model_dir, data = tiny_run_inputs
    main(run_args(model_dir, data, tmp_path / "runs", "--method", "sft"))
    with pytest.raises(SystemExit, match="differs"):
        main(
            run_args(
                model_dir, data, tmp_path / "runs", "--method", "sft", "--lr", "1.0", "--resume"
            )
        )
    with pytest.raises(SystemExit, match="nothing to resume"):
        main(run_args(model_dir, data, tmp_path / "other", "--resume"))


def test_help_explains_every_flag(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--help"])
    text = capsys.readouterr().out
    for flag in [
        "--model",
        "--data",
        "--method",
        "--loss",
        "--gamma",
        "--beta",
        "--shift",
        "--rounds",
        "--epochs",
        "--lr",
        "--batch-size",
        "--max-length",
        "--num-demos",
        "--seed",
        "--output-dir",
        "--generator",
        "--lora-rank",
        "--resume",
    ]:
        assert flag in text


def test_bad_configuration_is_refused(tiny_run_inputs, tmp_path):
    model_dir, data = tiny_run_inputs
    with pytest.raises(SystemExit, match="max-prompt-length"):
        main(run_args(model_dir, data, tmp_path, "--max-prompt-length", "200"))


@pytest.mark.parametrize("native", [True, False])
def test_auto_precision_is_bf16_only_where_it_is_native(monkeypatch, caplog, native):
    """bf16 on a CPU without AVX-512 BF16/AMX is emulated (measured ~100x slower than fp32 on
    an AVX2 machine): ``auto`` picks it only where it is native; an explicit bf16 warns."""
    import torch

    from experiments import training as run

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: native)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    assert run.resolve_precision("auto") == ("bf16" if native else "fp32")
    assert run.resolve_precision("fp32") == "fp32"
    with caplog.at_level("WARNING", logger="experiments.training"):
        assert run.resolve_precision("bf16") == "bf16"
    assert ("emulates" in caplog.text) is (not native)


def test_report_to_tensorboard_from_the_command_line(tiny_run_inputs, tmp_path):
    """``gsil train ... --report-to tensorboard``: every metrics.jsonl value is in the event
    files, and the resolved configuration tree is logged as hyper-parameters."""
    from test_tracking import assert_tensorboard_has_every_metric, read_hparams

    from experiments import cli

    model_dir, data = tiny_run_inputs
    argv = run_args(model_dir, data, tmp_path / "runs", "--report-to", "tensorboard")
    assert cli.main(["train", *argv]) == 0
    run_dir = tmp_path / "runs" / "tiny"
    assert_tensorboard_has_every_metric(run_dir)
    hparams = read_hparams(run_dir)
    assert hparams["optim.learning_rate"] == 1e-2 and hparams["objective.method"] == "gsil"
    assert json.loads((run_dir / "config.json").read_text())["logging"]["report_to"] == [
        "tensorboard"
    ]
