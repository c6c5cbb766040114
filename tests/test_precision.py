"""experiments.precision: bf16-rounded weights against fp32, paired on the same items."""

from __future__ import annotations

import json

import torch

from experiments.precision import identical_share, main, round_weights_to_bf16
from gsil.models import save_model


def test_rounding_makes_every_weight_bf16_representable_and_is_idempotent(tiny_model):
    before = {name: p.detach().clone() for name, p in tiny_model.named_parameters()}
    changed = round_weights_to_bf16(tiny_model)
    assert changed > 0
    for name, p in tiny_model.named_parameters():
        assert p.dtype == torch.float32  # computed in fp32
        assert torch.equal(p, p.to(torch.bfloat16).to(torch.float32)), name
        # the nearest bf16 value: within half a bf16 unit (2**-8 relative) of the fp32 weight
        assert torch.all((p - before[name]).abs() <= before[name].abs() * 2.0**-8 + 1e-30), name
    assert round_weights_to_bf16(tiny_model) == 0


def test_identical_share_counts_equal_completions(tmp_path):
    a, b = tmp_path / "a.records.jsonl", tmp_path / "b.records.jsonl"
    a.write_text(
        "".join(
            json.dumps({"id": i, "completion": c, "score": 1}) + "\n"
            for i, c in [("x", "1"), ("y", "2"), ("z", "3")]
        )
    )
    b.write_text(
        "".join(
            json.dumps({"id": i, "completion": c, "score": 1}) + "\n"
            for i, c in [("x", "1"), ("y", "0"), ("z", "3")]
        )
    )
    assert identical_share(a, b) == {"identical": 2, "n": 3, "share": 2 / 3}


def test_precision_compares_rounded_weights_with_fp32_on_the_same_items(
    tmp_path, tiny_model_readonly, tiny_tokenizer, capsys
):
    model_dir = save_model(tiny_model_readonly, tiny_tokenizer, tmp_path / "model")
    out = tmp_path / "precision"
    summary = main(
        [
            "--model",
            str(model_dir),
            "--out",
            str(out),
            "--limit",
            "3",
            "--max-new-tokens",
            "4",
            "--backend",
            "hf",
            "--no-bf16-compute",
        ]
    )
    assert set(summary["variants"]) == {"bf16-weights"}
    variant = summary["variants"]["bf16-weights"]
    fp32 = json.loads((out / "fp32" / "reasoning.json").read_text())
    rounded = json.loads((out / "bf16-weights" / "reasoning.json").read_text())
    assert variant["fp32_accuracy"] == fp32["score"] and variant["accuracy"] == rounded["score"]
    assert variant["identical_completions"]["n"] == fp32["n"] == rounded["n"] > 0
    assert "not measured" in summary["bf16_compute"]
    assert json.loads((out / "precision.json").read_text()) == summary
    assert "| bf16-weights |" in capsys.readouterr().out
