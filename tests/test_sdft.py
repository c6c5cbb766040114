"""SDFT (self-distillation fine-tuning): its per-token divergence and its round loss against the
formulas by hand, the demonstration-conditioned teacher prompt, the EMA teacher, and the round
loop: resumed bit for bit, two processes equal to one, bad input one message and exit 2."""

from __future__ import annotations

import copy
import importlib.util
import json
import math
from types import SimpleNamespace

import pytest
import torch
from accelerate import Accelerator, DistributedType
from launch import ZERO3
from test_bad_input import assert_user_error, train, train_args
from test_distributed import assert_same_run, assert_same_weights_bitwise, launch, weights
from tiny import Interrupt, build_tiny_model, build_tiny_tokenizer, interrupting, tiny_demos

from experiments.config import ConfigError, from_dict, validate
from gsil import self_distillation
from gsil.batching import GeneratedResponses, build_examples, collate
from gsil.data import PromptTooLong, TokenLimits, format_prompt
from gsil.generation import GenerationSettings
from gsil.logprobs import LeanPathUnsupported
from gsil.methods import SDFT, get_method
from gsil.models import apply_lora, save_model
from gsil.optimization import OptimSettings
from gsil.self_distillation import (
    SelfDistillation,
    check_engine,
    encode_teacher_prompt,
    teacher_prompt,
    token_divergence,
)
from gsil.trainer import RoundsSettings, run_rounds

# --------------------------------------------------------------------------- by hand


def softmax(row: list[float]) -> list[float]:
    top = max(row)
    exps = [math.exp(v - top) for v in row]
    total = sum(exps)
    return [e / total for e in exps]


def kl(p: list[float], q: list[float]) -> float:
    return sum(a * math.log(a / b) for a, b in zip(p, q, strict=True) if a > 0)


def divergence_by_hand(student_row: list[float], teacher_row: list[float], alpha: float) -> float:
    """The paper's / GKD's generalised JSD, written out: 0 = KL(T||S), 1 = KL(S||T)."""
    student, teacher = softmax(student_row), softmax(teacher_row)
    if alpha == 0:
        return kl(teacher, student)
    if alpha == 1:
        return kl(student, teacher)
    mixture = [(1 - alpha) * s + alpha * t for s, t in zip(student, teacher, strict=True)]
    return alpha * kl(teacher, mixture) + (1 - alpha) * kl(student, mixture)


STUDENT = [[0.5, -1.0, 2.0, 0.0], [3.0, 0.1, -2.0, 1.5]]
TEACHER = [[1.5, 0.2, -0.3, 0.0], [-1.0, 2.5, 0.3, 0.0]]


@pytest.mark.parametrize("alpha", [0.0, 1.0, 0.5, 0.2])
def test_token_divergence_is_the_formula_by_hand(alpha):
    got = token_divergence(torch.tensor(STUDENT), torch.tensor(TEACHER), alpha)
    expected = [divergence_by_hand(s, t, alpha) for s, t in zip(STUDENT, TEACHER, strict=True)]
    assert got.tolist() == pytest.approx(expected, rel=1e-5)
    assert (got > 0).all()
    same = token_divergence(torch.tensor(STUDENT), torch.tensor(STUDENT), alpha)
    assert same.abs().max() < 1e-6


def test_the_forward_and_reverse_kl_gradients_by_hand():
    """d KL(T||S)/dz_S = p_S - p_T; d KL(S||T)/dz_S = p_S (log p_S - log p_T - KL(S||T))."""
    for alpha in (0.0, 1.0):
        logits = torch.tensor(STUDENT, requires_grad=True)
        token_divergence(logits, torch.tensor(TEACHER), alpha).sum().backward()
        for row, (s_row, t_row) in enumerate(zip(STUDENT, TEACHER, strict=True)):
            p, q = softmax(s_row), softmax(t_row)
            if alpha == 0.0:
                expected = [a - b for a, b in zip(p, q, strict=True)]
            else:
                value = kl(p, q)
                expected = [a * (math.log(a / b) - value) for a, b in zip(p, q, strict=True)]
            assert logits.grad[row].tolist() == pytest.approx(expected, abs=1e-6)


def test_a_masked_token_counts_for_nothing_and_gives_finite_gradients():
    """A logit of -inf (a token a model masks) in both models: the divergence is the one over
    the other tokens, and its gradient is finite (0 there)."""
    masked = float("-inf")
    for alpha in (0.0, 0.5, 1.0):
        student = torch.tensor([[0.5, masked, 2.0, 0.0]], requires_grad=True)
        teacher = torch.tensor([[1.5, masked, -0.3, 0.0]])
        value = token_divergence(student, teacher, alpha)
        by_hand = divergence_by_hand([0.5, 2.0, 0.0], [1.5, -0.3, 0.0], alpha)
        assert value.item() == pytest.approx(by_hand, rel=1e-5)
        value.sum().backward()
        assert torch.isfinite(student.grad).all() and student.grad[0, 1] == 0


def test_token_divergence_is_finite_at_extreme_logits():
    student = torch.tensor([[80.0, -80.0, 0.0]])
    teacher = torch.tensor([[-80.0, 80.0, 0.0]])
    for alpha in (0.0, 0.5, 1.0):
        value = token_divergence(student, teacher, alpha).item()
        by_hand = divergence_by_hand(student[0].tolist(), teacher[0].tolist(), alpha)
        assert value == pytest.approx(by_hand, rel=1e-5)  # 160 nats; JSD: log 2


# --------------------------------------------------------------------------- the teacher prompt


def test_the_teacher_prompt_shows_the_demonstration_as_the_authors_do(tiny_tokenizer):
    shown = teacher_prompt("add 2 and 3", "5")
    assert shown == (
        "\nadd 2 and 3\n\nThis is an example for a response to the question:\n5\n\n"
        "Now answer with a response of your own, including the thinking process.\n"
    )
    chat = ({"role": "system", "content": "be brief"}, {"role": "user", "content": "add 2 and 3"})
    conditioned = teacher_prompt(chat, "5")
    assert conditioned[0] == chat[0] and conditioned[1]["content"] == shown
    ids = encode_teacher_prompt(tiny_tokenizer, chat, "5", 1024)
    assert tiny_tokenizer.decode(ids) == format_prompt(tiny_tokenizer, conditioned)


def test_a_long_demonstration_loses_its_end_to_fit_the_teacher_prompt(tiny_tokenizer):
    demo = "first part of the answer. " + "x" * 300 + " LAST WORDS"
    full = encode_teacher_prompt(tiny_tokenizer, "q", demo, 10_000)
    ids = encode_teacher_prompt(tiny_tokenizer, "q", demo, 200)
    assert len(full) > 200 and len(ids) == 200  # byte-level: exactly what fits
    text = tiny_tokenizer.decode(ids)
    assert "first part of the answer." in text and "LAST WORDS" not in text
    assert text.endswith("including the thinking process.\n<|im_end|>\n<|im_start|>assistant\n")
    with pytest.raises(PromptTooLong, match="--sdft-max-teacher-prompt-length=50"):
        encode_teacher_prompt(tiny_tokenizer, "q", demo, 50)


# --------------------------------------------------------------------------- the round loss


@pytest.mark.parametrize("path", ["lean", "full-logits"])
def test_the_round_loss_is_the_formula_by_hand_on_a_tiny_batch(
    path, tiny_model, tiny_tokenizer, monkeypatch
):
    """3 prompts x k = 2 own samples (one left out by gen_mask), the first token skipped: each
    example's loss is the mean over its kept samples of the mean per-token divergence, the
    student reading prompt + sample, the teacher (the same weights) teacher prompt + sample.
    ``lean`` projects only the response positions; ``full-logits`` is the fallback for models
    the lean path cannot serve."""
    if path == "full-logits":

        def unsupported(model):
            raise LeanPathUnsupported("test")

        monkeypatch.setattr(self_distillation, "lean_head", unsupported)
    alpha, skip = 0.5, 1
    demos = tiny_demos(3)
    responses = ["seven", "1 2", "x", "twelve!", "ok", "5 + 4"]
    mask = [True, False, True, True, True, True]
    method = SDFT(alpha=alpha, skip_tokens=skip)
    examples = build_examples(
        tiny_tokenizer,
        [d.prompt for d in demos],
        [d.response for d in demos],
        TokenLimits(64, 96),
        generated=GeneratedResponses(responses, num_samples=2, mask=mask),
        teacher_prompt=method.teacher_prompt_ids,
    )
    batch = collate(examples, tiny_tokenizer.pad_token_id, with_generations=True)
    distill = method.model_loss(tiny_model, Accelerator(cpu=True))
    losses, stats = distill(tiny_model, batch)

    with torch.no_grad():
        for i, example in enumerate(examples):
            values, logps = [], []
            for j, gen in enumerate(example.gen_ids):
                if not mask[2 * i + j]:
                    continue
                student = tiny_model(torch.tensor([[*example.prompt_ids, *gen]])).logits[0]
                teacher = tiny_model(torch.tensor([[*example.teacher_prompt_ids, *gen]])).logits[0]
                at_s, at_t = len(example.prompt_ids) - 1, len(example.teacher_prompt_ids) - 1
                per_token = [
                    divergence_by_hand(
                        student[at_s + t].tolist(), teacher[at_t + t].tolist(), alpha
                    )
                    for t in range(len(gen))
                ]
                kept = per_token[skip:]
                values.append(sum(kept) / len(kept) if kept else 0.0)
                logps.append(
                    sum(
                        math.log(softmax(student[at_s + t].tolist())[token])
                        for t, token in enumerate(gen)
                    )
                )
            assert losses[i].item() == pytest.approx(sum(values) / len(values), rel=1e-5)
            assert stats["logps/rejected"][i].item() == pytest.approx(
                sum(logps) / len(logps), rel=1e-5
            )
    assert "demonstration" not in tiny_tokenizer.decode(examples[0].prompt_ids)
    assert "\n" + demos[0].response + "\n" in tiny_tokenizer.decode(examples[0].teacher_prompt_ids)


def test_the_teacher_is_an_exponential_moving_average_of_the_policy(tiny_model):
    distill = SelfDistillation(
        tiny_model, Accelerator(cpu=True), alpha=0.0, ema_rate=0.25, skip_tokens=0
    )
    before = {n: p.clone() for n, p in distill.teacher.module.named_parameters()}
    with torch.no_grad():
        for p in tiny_model.parameters():
            p.add_(torch.randn_like(p))
    distill.after_update(tiny_model)
    policy = dict(tiny_model.named_parameters())
    for name, param in distill.teacher.module.named_parameters():
        torch.testing.assert_close(param, 0.75 * before[name] + 0.25 * policy[name])
        assert not param.requires_grad
    state = distill.state_dict()
    fresh = SelfDistillation(
        build_tiny_model(build_tiny_tokenizer()),
        Accelerator(cpu=True),
        alpha=0.0,
        ema_rate=0.25,
        skip_tokens=0,
    )
    fresh.load_state_dict(state)
    for name, param in fresh.teacher.module.named_parameters():
        torch.testing.assert_close(param, dict(distill.teacher.module.named_parameters())[name])


@pytest.mark.parametrize("sharded", ["fsdp", "zero3"])
def test_sharded_launches_are_refused(sharded):
    if sharded == "fsdp":
        accelerator = SimpleNamespace(
            state=SimpleNamespace(), distributed_type=DistributedType.FSDP
        )
    else:
        plugin = SimpleNamespace(zero_stage=3)
        accelerator = SimpleNamespace(
            state=SimpleNamespace(deepspeed_plugin=plugin),
            distributed_type=DistributedType.DEEPSPEED,
        )
    with pytest.raises(ValueError, match="FSDP and DeepSpeed ZeRO-3"):
        check_engine(accelerator)


# --------------------------------------------------------------------------- the round loop


def sdft_run(model, tokenizer, run_dir, objective, resume=False):
    """6 prompts, micro-batch 2: 3 steps a round, 2 rounds, a checkpoint after every step."""
    return run_rounds(
        model,
        tokenizer,
        tiny_demos(6),
        objective,
        RoundsSettings(
            run_dir=run_dir,
            rounds=2,
            optim=OptimSettings(learning_rate=1e-2, batch_size=2, checkpoint_every=1),
            generation=GenerationSettings(max_new_tokens=6, batch_size=6, do_sample=True),
            max_prompt_length=64,
            max_length=96,
            seed=0,
            resume=resume,
        ),
    )


def rows(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory, cpu_only):
    tokenizer = build_tiny_tokenizer()
    run_dir = tmp_path_factory.mktemp("sdft") / "straight"
    objective = get_method("sdft", sdft_ema_rate=0.5)
    sdft_run(build_tiny_model(tokenizer), tokenizer, run_dir, objective)
    return run_dir


def test_sdft_trains_through_the_round_loop(straight_run):
    metrics = rows(straight_run)
    assert len(metrics) == 6 and all(math.isfinite(r["loss"]) for r in metrics)
    assert metrics[0]["loss"] > 0 and "sdft/teacher_logps" in metrics[0]
    assert not (straight_run / "round_0" / "reference_logps.pt").exists()  # no reference pass
    assert (straight_run / "round_1" / "generated.jsonl").exists()  # on-policy samples


@pytest.mark.parametrize(
    "after_calls", [2, 3, 4], ids=["in-round-0", "at-round-1-start", "in-round-1"]
)
def test_sdft_resume_is_bitwise_equal_to_the_uninterrupted_run(
    after_calls, straight_run, tmp_path, cpu_only
):
    """Interrupted after ``after_calls`` steps (the EMA teacher has moved, rate 0.5) and
    resumed: the teacher comes back from the checkpoint, and every loss and weight is equal."""
    tokenizer = build_tiny_tokenizer()
    objective = get_method("sdft", sdft_ema_rate=0.5)
    broken = tmp_path / "broken"
    with pytest.raises(Interrupt):
        sdft_run(
            build_tiny_model(tokenizer),
            tokenizer,
            broken,
            interrupting(objective, after_calls=after_calls),
        )
    if after_calls == 3:  # round 0 finished: round 1 starts from the teacher it handed on
        teacher = torch.load(broken / "round_0" / "model_loss_state.pt")
        assert not (broken / "checkpoint").exists()
    else:
        teacher = torch.load(broken / "checkpoint" / "model_loss_state.pt")
    policy = _round_weights(broken / "round_0") if after_calls == 3 else None
    start = build_tiny_model(tokenizer).state_dict()
    assert any(not torch.equal(teacher[n], start[n]) for n in teacher)  # it moved
    if policy is not None:  # and lags the policy
        assert any(not torch.equal(teacher[n], policy[n]) for n in teacher)
    sdft_run(build_tiny_model(tokenizer), tokenizer, broken, objective, resume=True)
    assert_same_weights_bitwise(broken, straight_run)
    assert rows(broken) == [
        {**row, "step_seconds": resumed["step_seconds"]}
        for row, resumed in zip(rows(straight_run), rows(broken), strict=True)
    ]


def test_the_teacher_is_one_moving_average_over_the_rounds(straight_run, tmp_path, cpu_only):
    """Round 1's teacher starts from round 0's last teacher (handed on in round_0/), not from
    round 0's policy; under LoRA (merged between rounds) it restarts."""
    loaded = []

    class Recording(SDFT):
        def model_loss(self, policy, accelerator):
            distill = super().model_loss(policy, accelerator)
            load = distill.load_state_dict

            def record(state):
                loaded.append({name: value.clone() for name, value in state.items()})
                load(state)

            distill.load_state_dict = record
            return distill

    tokenizer = build_tiny_tokenizer()
    run_dir = tmp_path / "recorded"
    sdft_run(build_tiny_model(tokenizer), tokenizer, run_dir, Recording(ema_rate=0.5))
    handed_on = torch.load(run_dir / "round_0" / "model_loss_state.pt")
    assert len(loaded) == 1 and loaded[0].keys() == handed_on.keys()
    for name, value in handed_on.items():
        assert torch.equal(loaded[0][name], value)
    policy = _round_weights(run_dir / "round_0")
    assert any(not torch.equal(handed_on[n], policy[n]) for n in handed_on)
    assert rows(run_dir) == [
        {**row, "step_seconds": mine["step_seconds"]}
        for row, mine in zip(rows(straight_run), rows(run_dir), strict=True)
    ]
    lora = SelfDistillation(
        apply_lora(build_tiny_model(tokenizer), rank=2),
        Accelerator(cpu=True),
        alpha=0.0,
        ema_rate=0.5,
        skip_tokens=0,
    )
    assert lora.carried_state() is None and lora.state_dict()  # the adapters only


def _round_weights(round_dir) -> dict:
    from safetensors.torch import load_file

    state = load_file(str(round_dir / "model" / "model.safetensors"))
    state.setdefault("lm_head.weight", state["model.embed_tokens.weight"])
    return state


SDFT_JOB = dict(method="sdft", learning_rate=1e-3, batch_size=2)


@pytest.fixture(scope="module")
def sdft_processes(tmp_path_factory):
    """The SDFT job on 2 processes (straight and interrupted-and-resumed) and on one."""
    from accelerate.state import AcceleratorState
    from distributed_run import run_job

    out = tmp_path_factory.mktemp("sdft-processes")
    (out / "two").mkdir()
    jobs = [
        {"name": "sdft", **SDFT_JOB},
        {"name": "sdft-resumed", **SDFT_JOB, "interrupt_after_calls": 4},
    ]
    launch(out / "two", jobs)
    assert json.loads((out / "two" / "processes.json").read_text()) == 2
    AcceleratorState._reset_state(reset_partial_state=True)
    run_job(out / "one", Accelerator(cpu=True), name="sdft", **{**SDFT_JOB, "batch_size": 4})
    AcceleratorState._reset_state(reset_partial_state=True)
    return out


def test_sdft_on_two_processes_gives_the_one_process_run(sdft_processes):
    assert_same_run(sdft_processes / "two" / "sdft", sdft_processes / "one" / "sdft", SDFT_JOB)


def test_sdft_two_process_resume_is_bitwise_exact(sdft_processes):
    two = sdft_processes / "two"
    assert_same_weights_bitwise(two / "sdft-resumed", two / "sdft")


@pytest.fixture(scope="module")
def deepspeed_installed():
    if importlib.util.find_spec("deepspeed") is None:
        pytest.skip("deepspeed is not installed (make setup installs it with the dev extras)")


def test_sdft_under_zero2_gives_the_one_process_run(sdft_processes, deepspeed_installed, tmp_path):
    """ZeRO-2 keeps whole weights on every process (it shards the optimizer state and the
    gradients): the EMA teacher works as under DDP."""
    zero2_engine = ["--use_deepspeed", "--zero_stage", "2"]
    launch(tmp_path, [{"name": "sdft", **SDFT_JOB}], engine=zero2_engine)
    zero2, one = tmp_path / "sdft", sdft_processes / "one" / "sdft"
    assert len(rows(zero2)) == len(rows(one)) == 6
    for row, expected in zip(rows(zero2), rows(one), strict=True):
        assert row["loss"] == pytest.approx(expected["loss"], abs=1e-4)
        assert row["grad_norm"] == pytest.approx(expected["grad_norm"], rel=1e-4)
    final, reference = weights(zero2), weights(one)  # ZeRO-2 also saves the tied lm_head
    start = build_tiny_model(build_tiny_tokenizer()).state_dict()
    moved = sum(((reference[k] - start[k]) ** 2).sum() for k in reference) ** 0.5
    gap = sum(((final[k] - reference[k]) ** 2).sum() for k in reference) ** 0.5
    assert moved > 0 and 100 * gap <= moved


def test_sdft_under_zero3_is_refused_before_any_work(deepspeed_installed, tmp_path):
    with pytest.raises(AssertionError) as failed:
        launch(tmp_path, [{"name": "sdft", **SDFT_JOB}], engine=ZERO3)
    assert "FSDP and DeepSpeed ZeRO-3" in str(failed.value)
    assert not (tmp_path / "sdft" / "round_0").exists()  # nothing generated


# --------------------------------------------------------------------------- bad input


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    tokenizer = build_tiny_tokenizer()
    return save_model(build_tiny_model(tokenizer), tokenizer, tmp_path_factory.mktemp("m") / "m")


@pytest.mark.parametrize(
    "skip_invalid, named",
    [(False, "missing field 'response'"), (True, "no usable demonstrations")],
    ids=["stop", "skip-invalid"],
)
def test_sdft_without_demonstrations_is_one_message_and_exit_2(
    skip_invalid, named, tmp_path, model_dir, capsys
):
    """Prompts alone: SDFT's teacher has no demonstration to read; the run stops before
    any work, naming the file and the missing field."""
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"double {i}"}) + "\n" for i in range(4)))
    argv = train_args(model_dir, path, tmp_path / "runs", "--method", "sdft")
    if skip_invalid:
        argv.append("--skip-invalid")
    code, err = train(argv, capsys)
    assert_user_error(code, err, str(path), named)
    assert len([line for line in err.splitlines() if "error: " in line]) == 1, err
    assert not (tmp_path / "runs" / "tiny" / "round_0").exists()


def test_bad_sdft_settings_are_refused_naming_the_flags():
    with pytest.raises(ConfigError) as refused:
        validate(
            from_dict(
                {
                    "method": "sdft",
                    "sdft_alpha": 1.5,
                    "sdft_ema_rate": 0.0,
                    "sdft_skip_tokens": -1,
                }
            )
        )
    for flag in ("--sdft-alpha", "--sdft-ema-rate", "--sdft-skip-tokens"):
        assert flag in str(refused.value)


def test_sdft_loss_of_per_sequence_log_probs_is_refused():
    with pytest.raises(TypeError, match="model_loss"):
        SDFT().loss(None)
    assert copy.deepcopy(SDFT()).needs_generations and not SDFT().needs_reference


def test_a_sharded_launch_is_refused_before_any_work(
    tmp_path, model_dir, data_file, capsys, monkeypatch
):
    """Under ZeRO-3 (here: its detection forced) the command stops at once: one message, exit 2,
    no generation."""
    monkeypatch.setattr(self_distillation, "is_zero3", lambda accelerator: True)
    argv = train_args(model_dir, data_file, tmp_path / "runs", "--method", "sdft")
    code, err = train(argv, capsys)
    assert_user_error(code, err, "--method sdft", "FSDP and DeepSpeed ZeRO-3", "DDP")
    assert not (tmp_path / "runs" / "tiny" / "round_0").exists()
    monkeypatch.undo()
    code, err = train(argv, capsys)
    assert code == 0, err


@pytest.fixture
def data_file(tmp_path):
    path = tmp_path / "demos.jsonl"
    rows = [{"prompt": f"double {i}", "response": f"{2 * i}"} for i in range(4)]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path
