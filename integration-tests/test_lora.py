"""LoRA adapters through the launched server (`--lora-adapters`), against transformers + peft over
the same fp32 weights: two real PEFT adapters built here for the bundled model (different ranks,
targets, rsLoRA on one). Greedy tokens with the TGI `adapter_id` and the OpenAI `model` equal the
reference's, alone and in one concurrent batch that mixes both adapters and the base model with
chunked prefill, again on prefix-cache hits (never across adapters), and on three shards; unknown
adapters are refused (422 / 404); /info, /v1/models, the metrics and the access log name them;
every KV block comes back."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from benchmarks.lora_adapters import bundled_model_folder, make_adapter
from conftest import assert_kv_returned, metric, start_launcher, stop_launcher

NEW_TOKENS = 12
PROMPTS = [
    "<|im_start|>user\nWhat is the capital of France? Answer in one sentence.<|im_end|>\n<|im_start|>assistant\n",
    "<|im_start|>user\nList three colours of the rainbow, separated by commas.<|im_end|>\n<|im_start|>assistant\n",
    "<|im_start|>user\nWrite one short sentence about a cat sleeping in the sun.<|im_end|>\n<|im_start|>assistant\n",
]
# (name in requests, rank, targets, rsLoRA)
ADAPTERS = (("sql", 8, ("q_proj", "v_proj", "o_proj", "down_proj"), False),
            ("org/chat", 4, ("k_proj", "gate_proj", "up_proj"), True))
# A step's prompt budget (64 tokens) below the three prompts together (~90): the concurrent batch
# prefills in chunks, next to rows that already decode.
FLAGS = ("--max-input-tokens", "64", "--max-total-tokens", "96", "--max-batch-prefill-tokens", "64")


@pytest.fixture(scope="module")
def adapter_dirs(tmp_path_factory) -> dict[str, str]:
    base = bundled_model_folder()
    root = tmp_path_factory.mktemp("adapters")
    return {name: str(make_adapter(base, root / str(i), r=rank, targets=targets, seed=i, rslora=rslora))
            for i, (name, rank, targets, rslora) in enumerate(ADAPTERS)}


@pytest.fixture(scope="module")
def lora_args(adapter_dirs) -> tuple[str, ...]:
    spec = ",".join(f"{name}={path}" for name, path in adapter_dirs.items())
    return ("--lora-adapters", spec, *FLAGS)


@pytest.fixture(scope="module")
def lora(lora_args):
    server = start_launcher(*lora_args)
    yield server
    stop_launcher(server)


def prompt_ids(url: str, prompt: str) -> list[int]:
    response = requests.post(f"{url}/tokenize", json={"inputs": prompt}, timeout=30)
    assert response.status_code == 200, response.text
    return [token["id"] for token in response.json()]


@pytest.fixture(scope="module")
def expected(lora, adapter_dirs) -> dict[tuple[str, int], list[int]]:
    """transformers + peft, greedy, fp32: {(adapter or "", prompt index): generated ids}."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    ids = [prompt_ids(lora.url, prompt) for prompt in PROMPTS]
    folder = bundled_model_folder()
    out = {}
    for name in ("", *adapter_dirs):
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        if name:
            model = PeftModel.from_pretrained(model, adapter_dirs[name])
        model.eval()
        for index, prompt in enumerate(ids):
            with torch.inference_mode():
                tokens = model.generate(torch.tensor([prompt]), max_new_tokens=NEW_TOKENS, do_sample=False,
                                        pad_token_id=0)
            out[(name, index)] = tokens[0, len(prompt):].tolist()
    return out


def generate(url: str, prompt: str, adapter: str | None) -> list[int]:
    parameters = {"max_new_tokens": NEW_TOKENS, "details": True, **({"adapter_id": adapter} if adapter else {})}
    response = requests.post(f"{url}/generate", json={"inputs": prompt, "parameters": parameters}, timeout=300)
    assert response.status_code == 200, response.text
    return [token["id"] for token in response.json()["details"]["tokens"]]


def cases() -> list[tuple[str, int]]:
    return [(name, index) for name in ("", *(a[0] for a in ADAPTERS)) for index in range(len(PROMPTS))]


def test_adapters_are_listed(lora):
    info = requests.get(f"{lora.url}/info", timeout=10).json()
    assert info["lora_adapters"] == ["sql", "org/chat"]
    models = requests.get(f"{lora.url}/v1/models", timeout=10).json()["data"]
    assert [m["id"] for m in models][1:] == ["sql", "org/chat"]
    assert all(m["parent"] == models[0]["id"] for m in models[1:])


def test_greedy_tokens_equal_transformers_peft_in_a_mixed_batch(lora, expected):
    # Each adapter changes some answer: otherwise equality would prove nothing.
    for name, *_ in ADAPTERS:
        assert any(expected[(name, i)] != expected[("", i)] for i in range(len(PROMPTS))), name
    for name, index in cases():  # alone
        assert generate(lora.url, PROMPTS[index], name or None) == expected[(name, index)], (name, index)
    hits = metric(lora.url, "pytgi_prefix_cache_hits")
    for _ in range(2):  # one batch of all nine, chunked prefill; the second time on prefix-cache hits
        with ThreadPoolExecutor(len(cases())) as pool:
            got = list(pool.map(lambda case: generate(lora.url, PROMPTS[case[1]], case[0] or None), cases()))
        assert got == [expected[case] for case in cases()]
    assert metric(lora.url, "pytgi_prefix_cache_hits") > hits
    assert metric(lora.url, 'pytgi_adapter_request_success{adapter_id="sql"}') >= 9
    assert "adapter='org/chat'" in lora.log()
    assert_kv_returned(lora.url)


def test_openai_model_field_selects_the_adapter(lora):
    """The same generation as `adapter_id` (proven equal to the reference above): same text."""
    for name, index in cases():
        body = {"model": name or "tgi", "prompt": PROMPTS[index], "max_tokens": NEW_TOKENS, "temperature": 0}
        response = requests.post(f"{lora.url}/v1/completions", json=body, timeout=300)
        assert response.status_code == 200, response.text
        native = requests.post(f"{lora.url}/generate", timeout=300, json={"inputs": PROMPTS[index], "parameters": {
            "max_new_tokens": NEW_TOKENS, **({"adapter_id": name} if name else {})}})
        assert response.json()["choices"][0]["text"] == native.json()["generated_text"], (name, index)
        assert response.json()["model"] == (name or "tgi")


def test_unknown_adapters_are_refused(lora):
    response = requests.post(f"{lora.url}/generate", json={"inputs": "Hi", "parameters": {"adapter_id": "sq1"}},
                             timeout=30)
    assert response.status_code == 422
    assert response.json()["error_type"] == "validation" and "`sq1`" in response.json()["error"]
    response = requests.post(f"{lora.url}/v1/chat/completions", timeout=30,
                             json={"model": "org/chatt", "messages": [{"role": "user", "content": "Hi"}]})
    assert response.status_code == 404 and response.json()["error"]["code"] == "model_not_found"


def test_three_shards_equal_one(lora_args, expected):
    # The bundled model's 9 attention heads split over 3 shards, not 2; tests/shard/test_lora.py
    # checks 2 shards against 1 on a tiny model, in the engine.
    server = start_launcher("--num-shard", "3", *lora_args)
    try:
        with ThreadPoolExecutor(len(cases())) as pool:
            got = list(pool.map(lambda case: generate(server.url, PROMPTS[case[1]], case[0] or None), cases()))
        assert got == [expected[case] for case in cases()]
    finally:
        stop_launcher(server)
