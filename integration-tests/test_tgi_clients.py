"""TGI's own clients, unmodified, against the real launcher."""

from __future__ import annotations

import asyncio

import pytest
from huggingface_hub import InferenceClient
from text_generation import AsyncClient, Client
from text_generation.errors import ValidationError
from text_generation.types import FinishReason

PROMPT = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"


def test_generate_with_details(url):
    response = Client(url, timeout=120).generate(PROMPT, max_new_tokens=12)
    assert "Paris" in response.generated_text
    details = response.details
    assert details.generated_tokens == len(details.tokens) <= 12
    assert details.finish_reason in (FinishReason.Length, FinishReason.EndOfSequenceToken)
    assert "".join(t.text for t in details.tokens).startswith(response.generated_text[:5])
    assert all(t.logprob <= 0 for t in details.tokens)


def test_stream_equals_generate(url):
    client = Client(url, timeout=120)
    full = client.generate(PROMPT, max_new_tokens=16).generated_text
    events = list(client.generate_stream(PROMPT, max_new_tokens=16))
    assert [e.token.text for e in events if e.token.text] and events[-1].generated_text == full
    assert "".join(e.token.text for e in events if not e.token.special) == full
    assert all(e.generated_text is None for e in events[:-1])
    assert events[-1].details.generated_tokens == len(events)


def test_seeded_sampling_is_reproducible(url):
    client = Client(url, timeout=120)
    kwargs = dict(max_new_tokens=16, do_sample=True, temperature=1.3, top_k=50, seed=1234)
    first, second = client.generate(PROMPT, **kwargs), client.generate(PROMPT, **kwargs)
    assert first.generated_text == second.generated_text
    assert first.details.seed == 1234
    other = client.generate(PROMPT, **{**kwargs, "seed": 99})
    assert other.generated_text != first.generated_text


def test_stop_sequences(url):
    client = Client(url, timeout=120)
    free = client.generate("Count: 1, 2, 3,", max_new_tokens=12).generated_text
    stop = free.split(",")[1] + ","  # a stop string that spans what the model writes next
    stopped = client.generate("Count: 1, 2, 3,", max_new_tokens=12, stop_sequences=[stop])
    assert stopped.details.finish_reason == FinishReason.StopSequence
    assert stopped.generated_text.endswith(stop) and free.startswith(stopped.generated_text)


def test_top_n_tokens_and_decoder_input_details(url):
    response = Client(url, timeout=120).generate(PROMPT, max_new_tokens=3, top_n_tokens=3, decoder_input_details=True)
    prefill = response.details.prefill
    assert len(prefill) > 5
    assert prefill[0].logprob is None and all(t.logprob is not None for t in prefill[1:])
    assert len(response.details.top_tokens) == 3
    for token, top in zip(response.details.tokens, response.details.top_tokens):
        assert len(top) == 3 and top[0].id == token.id  # greedy: the chosen token is the top one
        assert top[0].logprob >= top[1].logprob >= top[2].logprob


def test_async_client(url):
    async def run():
        client = AsyncClient(url, timeout=120)
        response = await client.generate(PROMPT, max_new_tokens=8)
        tokens = [event async for event in client.generate_stream(PROMPT, max_new_tokens=8)]
        return response, tokens

    response, tokens = asyncio.run(run())
    assert tokens[-1].generated_text == response.generated_text


def test_validation_error_through_client(url):
    with pytest.raises(ValidationError, match="`max_new_tokens` must be strictly positive"):
        Client(url, timeout=120).generate(PROMPT, max_new_tokens=0)


def test_huggingface_hub_inference_client(url):
    client = InferenceClient(url, timeout=120)
    text = client.text_generation(PROMPT, max_new_tokens=8)
    assert "Paris" in text
    details = client.text_generation(PROMPT, max_new_tokens=8, details=True)
    assert details.generated_text == text and details.details.generated_tokens >= 1
    streamed = "".join(client.text_generation(PROMPT, max_new_tokens=8, stream=True))
    assert streamed.replace("<|im_end|>", "") == text
