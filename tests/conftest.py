"""Shared fixtures: the default model's tokenizer, and a tiny random Llama built from a config."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from helpers import make_tiny_model

# The suite tests the HF engine unless a test names vLLM (tests/test_vllm.py): where vLLM is
# installed, `--engine auto` would otherwise take it for every tiny model.
os.environ.setdefault("SELFPLAY_ENGINE", "hf")


@pytest.fixture(scope="session")
def tokenizer():
    from selfplay.models import DEFAULT_MODEL, load_tokenizer
    return load_tokenizer(DEFAULT_MODEL)


@pytest.fixture(scope="session")
def tiny_model(tokenizer):
    return make_tiny_model(tokenizer)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer, tiny_model) -> Path:
    """The tiny model saved as a checkpoint directory, usable as --model."""
    d = tmp_path_factory.mktemp("tiny-llama")
    tiny_model.save_pretrained(d)
    tokenizer.save_pretrained(d)
    return d
