"""The real embedded model (SmolLM2-135M-Instruct) through a short GSIL round."""

import json

import pytest
import torch

from gsil.data import DataSettings, load_demonstrations
from gsil.estimators import get_estimator
from gsil.generation import GenerationSettings
from gsil.methods import get_method
from gsil.models import load_model
from gsil.trainer import OptimSettings, RoundsSettings, run_rounds

pytestmark = pytest.mark.integration


def test_embedded_model_takes_gsil_steps(tmp_path):
    model, tokenizer = load_model("smollm2-135m", dtype="float32")
    demos = load_demonstrations(
        DataSettings(source="rg:chain_sum", num_demos=4, max_prompt_length=128),
        seed=0,
        tokenizer=tokenizer,
    )
    initial = {name: p.detach().clone() for name, p in model.named_parameters()}
    objective = get_method("gsil", get_estimator("logistic"), beta=0.1)
    optim = OptimSettings(learning_rate=1e-5, batch_size=2, checkpoint_every=0)
    summary = run_rounds(
        model,
        tokenizer,
        demos,
        objective,
        RoundsSettings(
            run_dir=tmp_path,
            rounds=1,
            optim=optim,
            generation=GenerationSettings(max_new_tokens=12, batch_size=4),
            max_prompt_length=128,
            max_length=192,
            seed=0,
        ),
    )
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2
    assert all(torch.isfinite(torch.tensor([r["loss"], r["grad_norm"]])).all() for r in rows)
    # the first step sees the reference itself: f = shift = 0, so each loss part is log 2
    assert rows[0]["loss/chosen"] == pytest.approx(0.6931, abs=1e-3)
    assert rows[0]["logps/chosen"] < 0 and rows[0]["logps/rejected"] < 0
    assert summary["rounds"][0]["num_demonstrations"] == 4
    reloaded, _ = load_model(str(tmp_path / "round_0" / "model"), dtype="float32")
    saved = dict(reloaded.named_parameters())
    # the steps moved the weights, and the saved round model is the trained policy
    assert any(not torch.equal(initial[name], saved[name]) for name in initial)
    for name, param in model.named_parameters():
        torch.testing.assert_close(saved[name], param.detach(), rtol=0, atol=0)
