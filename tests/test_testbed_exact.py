"""The testbed's exactness: the data distribution's log-probability, the policy's, the measures.

Expected values come from hand computations (written out below), from independent enumeration
or from sampling, never from the code under test.
"""

from __future__ import annotations

import importlib.util
import itertools
import math
import random

import numpy as np
import pytest
import torch
from scipy import stats

from analysis.testbed.distribution import (
    BASE,
    TARGET,
    DataSpec,
    TaskDistribution,
    alphabet,
)
from analysis.testbed.measures import (
    classifier_fit,
    entropy,
    forward_kl,
    mean_interval,
    paired_difference,
    proportion,
    reverse_kl,
)
from analysis.testbed.model import (
    ModelSpec,
    PretrainSpec,
    build_model,
    build_tokenizer,
    pretrained_base,
    sample,
    sequence_logps,
)

# A program without noise and with distinct probabilities, for the hand computations below.
HAND = DataSpec(forward_prob=0.6, steps_prob=0.8, mistake_prob=0.1, noise_weight=0.0)


def noise_prob(response: str, q: float) -> float:
    """p_noise by its definition: geometric length, then uniform characters."""
    return (1 - q) * q ** len(response) / len(alphabet()) ** len(response)


def chi_square_p(observed: dict[str, int], expected: dict[str, float], total: int) -> float:
    """Pearson chi-square p-value; cells expecting fewer than 5 are pooled into one."""
    big = [key for key in expected if expected[key] * total >= 5]
    small = [key for key in expected if key not in big]
    obs = [observed.get(key, 0) for key in big]
    exp = [expected[key] * total for key in big]
    if small:
        obs.append(sum(observed.get(key, 0) for key in small))
        exp.append(sum(expected[key] for key in small) * total)
    assert sum(obs) == total
    return float(stats.chisquare(obs, np.array(exp) * total / sum(exp)).pvalue)


# --------------------------------------------------------------------------- the distribution


def test_program_probabilities_by_hand_and_ambiguous_strings_summed():
    dist = TaskDistribution(HAND)
    # 1+2+3: forward (0.6) is 1,2,3; largest first (0.4) is 3,2,1.
    support = dist.support("1+2+3")
    assert support["1+2=3, 3+3=6. Answer: 6"] == pytest.approx(0.6 * 0.8 * 0.9)
    assert support["3+2=5, 5+1=6. Answer: 6"] == pytest.approx(0.4 * 0.8 * 0.9)
    # one step off by +1, 4 (step, sign) choices, propagated
    assert support["1+2=4, 4+3=7. Answer: 7"] == pytest.approx(0.6 * 0.8 * 0.1 / 4)
    assert support["1+2=3, 3+3=5. Answer: 5"] == pytest.approx(0.6 * 0.8 * 0.1 / 4)
    # ambiguous: a terse answer hides the order (2 derivations) ...
    assert support["Answer: 6"] == pytest.approx((0.6 + 0.4) * 0.2 * 0.9)
    # ... and a terse +1 mistake may sit in either step of either order (4 derivations)
    assert support["Answer: 7"] == pytest.approx((0.6 + 0.4) * 0.2 * 0.1 * 2 / 4)
    # ambiguous: operands already largest first, both orders write the same steps
    support = dist.support("3+2+1")
    assert support["3+2=5, 5+1=6. Answer: 6"] == pytest.approx((0.6 + 0.4) * 0.8 * 0.9)
    assert dist.log_prob("3+2+1", "3+2=5, 5+1=6. Answer: 6") == pytest.approx(math.log(0.72))
    # a mistake that makes both orders' strings equal: 2+2 written either way
    assert dist.support("2+2")["2+2=5. Answer: 5"] == pytest.approx(1.0 * 0.8 * 0.1 / 2)
    # steps: 2 orders x (1 + 4 mistakes); terse: the sum, one less, one more
    assert len(dist.support("1+2+3")) == 2 * 5 + 3
    assert dist.log_prob("1+2+3", "2+1=3, 3+3=6. Answer: 6") == -math.inf  # not a derivation
    assert dist.in_program_support("1+2+3", "Answer: 7")
    assert not dist.in_program_support("1+2+3", "2+1=3, 3+3=6. Answer: 6")


@pytest.mark.parametrize("prompt", ["1+2", "2+2", "9+1+9", "3+2+1", "4+4+4", "1+9+5"])
@pytest.mark.parametrize("spec", [TARGET, BASE, HAND])
def test_program_support_sums_to_one(spec, prompt):
    assert sum(TaskDistribution(spec).support(prompt).values()) == pytest.approx(1.0, abs=1e-12)


def test_mixture_log_prob_by_hand():
    dist = TaskDistribution(TARGET)
    lam, q = TARGET.noise_weight, TARGET.noise_continue
    response = "Answer: 9"
    program = dist.support("4+5")[response]
    assert dist.log_prob("4+5", response) == pytest.approx(
        math.log((1 - lam) * program + lam * noise_prob(response, q))
    )
    garbage = "=:,9 A+"  # no derivation writes it: only noise
    assert dist.log_prob("4+5", garbage) == pytest.approx(math.log(lam * noise_prob(garbage, q)))
    assert dist.log_prob("4+5", "") == pytest.approx(math.log(lam * (1 - q)))
    assert dist.log_prob("4+5", "Answer: 9!") == -math.inf  # '!' is off the alphabet


def test_the_full_distribution_normalises():
    """Every string up to length 3 enumerated; longer ones: the program support and the
    noise's geometric tail ``lambda q^4`` (less what the support strings already counted)."""
    spec = DataSpec(noise_weight=0.3, noise_continue=0.6)
    dist = TaskDistribution(spec)
    prompt = "7+3+5"
    short = 0.0
    for length in range(4):
        for characters in itertools.product(alphabet(), repeat=length):
            short += math.exp(dist.log_prob(prompt, "".join(characters)))
    support = dist.support(prompt)
    assert min(len(response) for response in support) > 3
    long_support = sum(math.exp(dist.log_prob(prompt, response)) for response in support)
    noise_tail = spec.noise_weight * (
        spec.noise_continue**4 - sum(noise_prob(r, spec.noise_continue) for r in support)
    )
    assert short == pytest.approx(spec.noise_weight * (1 - spec.noise_continue**4), rel=1e-9)
    assert short + long_support + noise_tail == pytest.approx(1.0, abs=1e-9)


def test_sample_frequencies_match_exp_log_prob():
    """10^5 responses to one prompt: each support string's count against exp(log_prob), all
    other strings (noise) pooled against the remaining mass."""
    spec = DataSpec(noise_weight=0.05)
    dist = TaskDistribution(spec)
    prompt = "5+2+7"
    total = 100_000
    rng = random.Random(0)
    counts: dict[str, int] = {}
    for _ in range(total):
        response = dist.sample(prompt, rng)
        key = response if response in dist.support(prompt) else "<other>"
        counts[key] = counts.get(key, 0) + 1
    expected = {r: math.exp(dist.log_prob(prompt, r)) for r in dist.support(prompt)}
    expected["<other>"] = 1.0 - sum(expected.values())
    assert chi_square_p(counts, expected, total) > 1e-3


def test_noise_samples_match_the_noise_law():
    """Pure noise (lambda = 1): lengths geometric, characters uniform, as log_prob assumes."""
    spec = DataSpec(noise_weight=1.0, noise_continue=0.7)
    dist = TaskDistribution(spec)
    rng = random.Random(1)
    samples = [dist.sample("1+1", rng) for _ in range(20_000)]
    lengths: dict[str, int] = {}
    for response in samples:
        key = str(min(len(response), 15))
        lengths[key] = lengths.get(key, 0) + 1
    law = {str(n): 0.3 * 0.7**n for n in range(15)}
    law["15"] = 0.7**15
    assert chi_square_p(lengths, law, len(samples)) > 1e-3
    characters: dict[str, int] = {}
    for response in samples:
        for character in response:
            characters[character] = characters.get(character, 0) + 1
    uniform = {character: 1 / len(alphabet()) for character in alphabet()}
    assert chi_square_p(characters, uniform, sum(characters.values())) > 1e-3
    assert all(
        dist.log_prob("1+1", r) == pytest.approx(math.log(noise_prob(r, 0.7))) for r in samples[:50]
    )


def test_demonstrations_are_nested_reproducible_and_split_apart():
    dist = TaskDistribution(TARGET)
    small, large = dist.demonstrations(32, seed=3), dist.demonstrations(128, seed=3)
    assert [(d.prompt, d.response) for d in small] == [(d.prompt, d.response) for d in large[:32]]
    again = dist.demonstrations(32, seed=3)
    assert [(d.prompt, d.response) for d in again] == [(d.prompt, d.response) for d in small]
    other_seed = dist.demonstrations(32, seed=4)
    test = dist.demonstrations(32, seed=3, split="test")
    for other in (other_seed, test):
        assert [(d.prompt, d.response) for d in other] != [(d.prompt, d.response) for d in small]
    assert len({d.id for d in large + test}) == 160
    for demo in large:
        assert demo.meta["data_logp"] == dist.log_prob(demo.prompt, demo.response)
        assert demo.meta["answer"] == str(sum(int(n) for n in demo.prompt.split("+")))
    with pytest.raises(ValueError, match="split"):
        dist.demonstrations(3, seed=0, split="dev")


def test_answers_and_correctness():
    dist = TaskDistribution(TARGET)
    assert dist.answer("3+5+7") == "15"
    assert dist.is_correct("3+5+7", "3+5=8, 8+7=15. Answer: 15")
    assert dist.is_correct("3+5+7", "Answer: 15")
    assert not dist.is_correct("3+5+7", "3+5=9, 9+7=16. Answer: 16")
    assert not dist.is_correct("3+5+7", "Answer: 150")
    assert not dist.is_correct("3+5+7", "Answer: 15.")
    assert not dist.is_correct("3+5+7", "15")
    with pytest.raises(ValueError, match="not a sum"):
        dist.support("3*5")


def test_bad_specs_are_refused():
    with pytest.raises(ValueError, match="operand_count_probs"):
        DataSpec(operand_count_probs=(0.5, 0.6))
    with pytest.raises(ValueError, match="mistake_prob"):
        DataSpec(mistake_prob=1.5)
    with pytest.raises(ValueError, match="operand_min"):
        DataSpec(operand_min=0)


# --------------------------------------------------------------------------- tokenizer, model


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="module")
def model(tokenizer):
    # a wide initialisation so that the random model's logits are far from uniform
    return build_model(ModelSpec.tiny(initializer_range=0.5), tokenizer, seed=0)


SAMPLED_PROMPT = "2+7"


def turned_model(tokenizer, tokens: tuple[str, ...]):
    """A random model, the output rows of ``tokens`` turned towards the hidden states that
    predict a response's first and second tokens, so that each of them is likely there (about
    1/4 each): with EOS, "" and one-character responses are likely."""
    from gsil.data import encode_prompt

    model = build_model(ModelSpec.tiny(initializer_range=0.3), tokenizer, seed=0)
    prompt_ids = encode_prompt(tokenizer, SAMPLED_PROMPT)
    contexts = [prompt_ids] + [
        prompt_ids + [tokenizer.convert_tokens_to_ids(c)] for c in alphabet()
    ]
    with torch.no_grad():
        hidden = torch.stack(
            [
                model.model(input_ids=torch.tensor([ids])).last_hidden_state[0, -1]
                for ids in contexts
            ]
        )
        logits = model.lm_head(hidden)
        direction = hidden.mean(0) / hidden.mean(0).norm() ** 2
        # a logit one below the other tokens' logsumexp
        scale = torch.logsumexp(logits, dim=-1).mean() - 1.0
        for token in tokens:
            model.lm_head.weight[tokenizer.convert_tokens_to_ids(token)] = scale * direction
    return model


def test_tokenizer_round_trip_one_token_per_character(tokenizer, tmp_path):
    from transformers import AutoTokenizer

    rng = random.Random(0)
    texts = [
        "",
        " ",
        "1+2=3, 3+3=6. Answer: 6",
        " . , :: A  ",
        *("".join(rng.choice(alphabet()) for _ in range(rng.randint(1, 40))) for _ in range(200)),
    ]
    tokenizer.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    for tok in (tokenizer, reloaded):
        special = set(tok.all_special_ids)
        for text in texts:
            ids = tok(text, add_special_tokens=False)["input_ids"]
            assert len(ids) == len(text)
            assert not special.intersection(ids)
            assert [tok.convert_ids_to_tokens(i) for i in ids] == list(text)
            assert tok.decode(ids, skip_special_tokens=True) == text
        assert tok.eos_token == "<|end|>" and tok.pad_token_id != tok.eos_token_id


def test_chat_template_through_encode_prompt(tokenizer):
    from gsil.data import encode_prompt, encode_response, format_prompt

    assert format_prompt(tokenizer, "3+5") == "<|bos|><|user|>3+5<|assistant|>"
    ids = encode_prompt(tokenizer, "3+5")
    tokens = tokenizer.convert_ids_to_tokens(ids)
    assert tokens == ["<|bos|>", "<|user|>", "3", "+", "5", "<|assistant|>"]
    assert encode_response(tokenizer, "Answer: 8")[-1] == tokenizer.eos_token_id


def hand_logp(model, tokenizer, prompt: str, response: str, temperature: float) -> float:
    """log pi_T(response + EOS | prompt) from one forward pass and a full log_softmax."""
    vocab = tokenizer.get_vocab()
    prompt_ids = [vocab["<|bos|>"], vocab["<|user|>"], *(vocab[c] for c in prompt)]
    prompt_ids.append(vocab["<|assistant|>"])
    response_ids = [vocab[c] for c in response] + [vocab["<|end|>"]]
    ids = torch.tensor([prompt_ids + response_ids])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].double()
    logps = torch.log_softmax(logits / temperature, dim=-1)
    total = 0.0
    for offset, token in enumerate(response_ids):
        total += logps[len(prompt_ids) - 1 + offset, token].item()
    return total


@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_sequence_logps_equals_a_hand_computation(model, tokenizer, temperature):
    prompts = ["3+5", "1+2+9", "4+4", "7+1"]
    responses = ["3+5=8. Answer: 8", "Answer: 12", "", "=, . 77"]  # padded in one batch
    got = sequence_logps(model, tokenizer, prompts, responses, temperature=temperature)
    want = [
        hand_logp(model, tokenizer, p, r, temperature)
        for p, r in zip(prompts, responses, strict=True)
    ]
    assert got.dtype == torch.float64
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-5)
    one_by_one = sequence_logps(
        model, tokenizer, prompts, responses, temperature=temperature, batch_size=1
    )
    np.testing.assert_allclose(one_by_one.numpy(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("temperature", "likely"),
    [(1.0, ("<|end|>",)), (0.5, ("<|end|>",)), (1.0, ("<|end|>", "<|user|>"))],
)
def test_samples_match_exp_sequence_logps(tokenizer, temperature, likely):
    """Sampling (gsil.generation, HF backend) and scoring agree: with 2 new tokens, the complete
    strings are "" and the single characters; their sampled frequencies against
    exp(sequence_logps), the rest (unterminated, or a special token such as a likely
    ``<|user|>``, which the decoded text drops) against what remains."""
    model = turned_model(tokenizer, likely)
    prompt, total = SAMPLED_PROMPT, 6000
    drawn = sample(model, tokenizer, [prompt] * total, temperature, seed=0, max_new_tokens=2)
    counts: dict[str, int] = {}
    for text, complete in zip(drawn.texts, drawn.complete, strict=True):
        key = text if complete else "<incomplete>"
        counts[key] = counts.get(key, 0) + 1
    strings = ["", *alphabet()]
    logps = sequence_logps(model, tokenizer, [prompt] * len(strings), strings, temperature)
    expected = dict(zip(strings, logps.exp().tolist(), strict=True))
    expected["<incomplete>"] = 1.0 - sum(expected.values())
    assert expected["<incomplete>"] < 0.9  # the complete strings carry real weight
    assert sum(p * total >= 5 for p in expected.values()) >= 10  # many cells are compared
    assert chi_square_p(counts, expected, total) > 1e-3


def test_unterminated_and_special_samples_are_flagged(tokenizer):
    """One new token: a sample is complete only when it is EOS; a likely ``<|user|>`` decodes
    to "" as well, and is flagged (unterminated). A special token followed by EOS is covered by
    the chi-square test above (its ``<|user|>`` case fails when specials are not flagged)."""
    model = turned_model(tokenizer, ("<|end|>", "<|user|>"))
    drawn = sample(model, tokenizer, [SAMPLED_PROMPT] * 200, 1.0, seed=0, max_new_tokens=1)
    assert len(drawn.texts) == len(drawn.complete) == 200
    assert all(
        text == "" for text, complete in zip(drawn.texts, drawn.complete, strict=True) if complete
    )
    assert any(complete for complete in drawn.complete)
    flagged_empty = [
        text == "" and not complete
        for text, complete in zip(drawn.texts, drawn.complete, strict=True)
    ]
    assert any(flagged_empty)  # <|user|> alone: decoded "", not complete
    assert any(text != "" for text in drawn.texts)  # a character, unterminated


def test_pretrained_base_is_trained_cached_and_reloaded(tokenizer, tmp_path, monkeypatch):
    import analysis.testbed.model as model_module

    spec = ModelSpec.tiny()
    pretrain = PretrainSpec.quick()
    prompts, responses = ["3+4", "1+2+3"], ["3+4=7. Answer: 7", "Answer: 6"]
    untrained = build_model(spec, tokenizer, seed=0)
    first, first_tokenizer = pretrained_base(pretrain, spec, seed=0, cache_dir=tmp_path)
    trained_logps = sequence_logps(first, first_tokenizer, prompts, responses)
    assert (trained_logps > sequence_logps(untrained, tokenizer, prompts, responses)).all()
    calls = []
    monkeypatch.setattr(model_module, "pretrain_model", lambda *args: calls.append(args))
    second, second_tokenizer = pretrained_base(pretrain, spec, seed=0, cache_dir=tmp_path)
    assert calls == []  # loaded from the cache, not trained again
    assert second_tokenizer.chat_template == tokenizer.chat_template
    torch.testing.assert_close(
        sequence_logps(second, second_tokenizer, prompts, responses), trained_logps
    )
    other, _ = pretrained_base(pretrain, spec, seed=1, cache_dir=tmp_path)
    assert len(calls) == 1  # another seed is another base
    assert len(list(tmp_path.glob("base-*"))) == 2


def test_concurrent_requests_for_one_base_train_it_once(tmp_path, monkeypatch):
    """Two callers asking for the same base at once (threads: each opens the lock file itself,
    as two processes would): one trains, the other waits and reuses."""
    import threading
    import time

    import analysis.testbed.model as model_module

    calls = []

    def slow_pretrain(*args):
        calls.append(args)
        time.sleep(1.0)  # the other caller arrives meanwhile

    monkeypatch.setattr(model_module, "pretrain_model", slow_pretrain)
    paths = []

    def ask():
        paths.append(
            model_module.pretrained_base_dir(PretrainSpec.quick(), ModelSpec.tiny(), 0, tmp_path)
        )

    threads = [threading.Thread(target=ask) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert len(paths) == 2 and paths[0] == paths[1] and (paths[0] / "config.json").is_file()
    assert len(calls) == 1


# --------------------------------------------------------------------------- the measures


DATA = {"a": 0.5, "b": 0.25, "c": 0.125, "d": 0.125}
POLICY = {"a": 0.25, "b": 0.25, "c": 0.25, "d": 0.25}


def exact_sample(dist: dict[str, float], size: int) -> list[str]:
    """A sample whose empirical distribution is exactly ``dist`` (probabilities k / size)."""
    sample_ = [key for key, p in dist.items() for _ in range(round(p * size))]
    assert len(sample_) == size
    return sample_


def test_forward_kl_by_enumeration():
    exact = sum(p * math.log(p / POLICY[y]) for y, p in DATA.items())  # = 0.125 log 2 ... > 0
    ys = exact_sample(DATA, 8)
    estimate = forward_kl([math.log(DATA[y]) for y in ys], [math.log(POLICY[y]) for y in ys])
    assert estimate.mean == pytest.approx(exact)
    assert estimate.n == 8 and estimate.low < estimate.mean < estimate.high
    rng = np.random.default_rng(0)
    draws = rng.choice(list(DATA), size=20_000, p=list(DATA.values()))
    sampled = forward_kl([math.log(DATA[y]) for y in draws], [math.log(POLICY[y]) for y in draws])
    assert sampled.low < exact < sampled.high


def test_reverse_kl_separates_the_mass_outside_the_support():
    policy = {"a": 0.5, "b": 0.25, "e": 0.25}  # "e" is outside p_data's support
    inside = {y: p / 0.75 for y, p in policy.items() if y in DATA}
    exact_inside = sum(p * math.log(policy[y] / DATA[y]) for y, p in inside.items())
    ys = exact_sample(policy, 4)
    data_logps = [math.log(DATA[y]) if y in DATA else -math.inf for y in ys]
    result = reverse_kl([math.log(policy[y]) for y in ys], data_logps)
    assert result.outside_mass == pytest.approx(0.25)
    assert result.kl.mean == pytest.approx(exact_inside) and result.kl.n == 3
    # an unterminated sample is outside too, whatever its data log-prob says
    result = reverse_kl([-1.0, -2.0], [-1.5, -1.5], complete=[True, False])
    assert result.outside_mass == 0.5 and result.kl.mean == pytest.approx(0.5)
    # with full support the reverse KL is the plain mean
    ys = exact_sample(POLICY, 4)
    full = reverse_kl([math.log(POLICY[y]) for y in ys], [math.log(DATA[y]) for y in ys])
    assert full.outside_mass == 0.0
    assert full.kl.mean == pytest.approx(sum(p * math.log(p / DATA[y]) for y, p in POLICY.items()))
    nothing = reverse_kl([-1.0], [-math.inf])
    assert nothing.kl is None and nothing.outside_mass == 1.0


def test_entropy_by_enumeration():
    ys = exact_sample(DATA, 8)
    exact = -sum(p * math.log(p) for p in DATA.values())
    assert entropy([math.log(DATA[y]) for y in ys]).mean == pytest.approx(exact)
    logps = [math.log(DATA[y]) for y in ys] + [-100.0]
    assert entropy(logps, complete=[True] * 8 + [False]).mean == pytest.approx(exact)


def test_intervals_against_textbook_values():
    estimate = mean_interval([1, 2, 3, 4, 5])  # sd sqrt(2.5), t_{4, 0.975} = 2.776445
    half = 2.776445 * math.sqrt(2.5) / math.sqrt(5)
    assert (estimate.mean, estimate.low, estimate.high) == pytest.approx((3, 3 - half, 3 + half))
    share = proportion([True] * 8 + [False] * 2)  # Wilson 95%: 0.490 to 0.943
    assert share.mean == 0.8 and share.low == pytest.approx(0.4902, abs=1e-4)
    assert share.high == pytest.approx(0.9433, abs=1e-4)
    assert proportion([True] * 5).high == 1.0 and proportion([False] * 5).low == 0.0
    paired = paired_difference([3, 5, 7], [1, 2, 3])
    assert paired.mean == pytest.approx(3.0)
    with pytest.raises(ValueError, match="finite"):
        mean_interval([1.0, -math.inf])
    with pytest.raises(ValueError, match="differ"):
        paired_difference([1, 2], [1])


def test_classifier_fit():
    target = np.array([-1.0, 0.5, 2.0, 3.0])
    fit = classifier_fit(target + 1.0, target)
    assert fit["rmse"] == pytest.approx(1.0) and fit["mean_difference"] == pytest.approx(1.0)
    assert fit["correlation"] == pytest.approx(1.0)
    assert classifier_fit(-target, target)["correlation"] == pytest.approx(-1.0)
    assert classifier_fit(target, target)["rmse"] == 0.0


@pytest.mark.skipif(
    importlib.util.find_spec("vllm") is None,
    reason="vLLM is not installed here; `make test` runs vLLM tests in .venv-vllm",
)
def test_vllm_generates_what_hf_does_with_the_testbed_tokenizer(tokenizer):
    """The default model and the character tokenizer through the vLLM backend: greedy token ids
    equal to HF's, and the texts decode the same."""
    import os

    from gsil.data import encode_prompt
    from gsil.generation import Decoding, generate_from_ids
    from gsil.generation.vllm_engine import VLLMEngine

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    policy = build_model(ModelSpec(initializer_range=0.2), tokenizer, seed=0)
    prompts = [encode_prompt(tokenizer, p) for p in TaskDistribution(TARGET).prompts(16, 0)]
    greedy = dict(max_new_tokens=12, batch_size=16, seed=0)
    hf = generate_from_ids(
        policy, tokenizer, prompts, Decoding(backend="hf", **greedy), progress=False
    )
    assert sum(result.num_tokens for result in hf) > len(prompts)  # not all empty
    with VLLMEngine(policy, tokenizer, dtype="float32", seed=0, max_model_len=256) as engine:
        vllm = generate_from_ids(
            engine, tokenizer, prompts, Decoding(backend="vllm", **greedy), progress=False
        )
    assert [r.token_ids for r in vllm] == [r.token_ids for r in hf]
    assert [r.text for r in vllm] == [r.text for r in hf]
