"""Loading models: hub ids offline, bad paths, local checkpoints, the default model, fingerprint."""

import time

import pytest

from selfplay import models
from selfplay.errors import SelfplayError


def test_uncached_hub_id_offline_is_one_sentence(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    t = time.perf_counter()
    with pytest.raises(SelfplayError) as e:
        models.load_model("someorg/not-a-cached-model")
    msg = str(e.value)
    assert "not in the local Hugging Face cache" in msg and "--model" in msg
    assert time.perf_counter() - t < 10           # no retry loop against an absent network


def test_bad_paths():
    with pytest.raises(SelfplayError, match="does not exist"):
        models.resolve("./no/such/checkpoint")
    with pytest.raises(SelfplayError, match="GGUF file .* does not exist"):
        models.resolve("missing.gguf")


def test_directory_without_config(tmp_path):
    with pytest.raises(SelfplayError, match="no config.json"):
        models.resolve(str(tmp_path))


def test_local_checkpoint_dir(tiny_model_dir):
    model, tok = models.load_model(str(tiny_model_dir), device="cpu")
    assert model.config.hidden_size == 64 and tok.chat_template


@pytest.mark.real_model
def test_default_model_loads_from_cache_renders_and_generates():
    from selfplay.engines.hf import SamplingSettings, generate
    from selfplay.rendering import prompt_text

    models.ensure_default_model()
    t = time.perf_counter()
    model, tok = models.load_model(models.DEFAULT_MODEL, device="cpu")
    assert time.perf_counter() - t < 15           # a cached checkpoint, not a GGUF conversion
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    text = prompt_text(tok, msgs)
    assert text.startswith("<|im_start|>system") and text.endswith("<|im_start|>assistant\n")
    out = generate(model, tok, [msgs], SamplingSettings(max_new_tokens=24, batch_size=1))[0]
    assert out.text.strip() and "Paris" in out.text


def test_fingerprint_follows_the_weights_not_the_name(tiny_model_dir, tmp_path, tokenizer):
    import shutil

    from helpers import make_tiny_model
    copy = tmp_path / "copy"
    shutil.copytree(tiny_model_dir, copy)
    assert models.fingerprint(str(copy)) == models.fingerprint(str(tiny_model_dir))
    make_tiny_model(tokenizer, seed=3).save_pretrained(copy)
    assert models.fingerprint(str(copy)) != models.fingerprint(str(tiny_model_dir))
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text("{}")
    with pytest.raises(SelfplayError, match="no weight files"):
        models.fingerprint(str(tmp_path / "empty"))
