import asyncio
import json
import shutil

import pytest

from router import tokenizer as tokenizer_module
from router.adapters import Adapters
from router.errors import ValidationError
from router.grammar.validator import GrammarValidator
from router.limits import Limits
from router.schemas import GenerateParameters, GenerateRequest, Grammar, parse_generate_request
from router.tokenizer import Tokenizer
from router.validation import Validator

LIMITS = Limits(max_best_of=2, max_stop_sequences=4, max_top_n_tokens=5, max_input_tokens=32,
                          max_total_tokens=64)
# 16 tokens with the SmolLM2 tokenizer ("one two ... sixteen": each word is one token).
WORDS = "one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen"


@pytest.fixture(scope="module")
def validator(router_tokenizer):
    return Validator(router_tokenizer, LIMITS)


def validate(validator, inputs="Hello world", stream=False, limits=None, **params):
    """Validate `inputs` with `params` given as a JSON `parameters` object."""
    request = parse_generate_request({"inputs": inputs, "parameters": params, "stream": stream}, compat=True)
    if limits is not None:
        validator = Validator(validator.tokenizer, limits)
    return asyncio.run(validator.validate(request))


def error(validator, inputs="Hello world", stream=False, limits=None, **params) -> str:
    with pytest.raises(ValidationError) as info:
        validate(validator, inputs, stream, limits, **params)
    assert info.value.status == 422 and info.value.error_type == "validation"
    prefix = "Input validation error: "
    assert info.value.message.startswith(prefix)
    return info.value.message[len(prefix):]


def test_words_fixture_length(router_tokenizer):
    assert len(router_tokenizer.encode(WORDS)) == 16


# -------------------------------------------------------------------------- parameter bounds


@pytest.mark.parametrize(
    "params, message",
    [
        ({"temperature": -0.1}, "`temperature` must be strictly positive"),
        ({"repetition_penalty": 0}, "`repetition_penalty` must be strictly positive"),
        ({"repetition_penalty": -1.0}, "`repetition_penalty` must be strictly positive"),
        ({"frequency_penalty": -2.01}, "`frequency_penalty` must be >= -2.0 and <= 2.0"),
        ({"frequency_penalty": 2.01}, "`frequency_penalty` must be >= -2.0 and <= 2.0"),
        ({"presence_penalty": -2.5}, "`presence_penalty` must be >= -2.0 and <= 2.0"),
        ({"presence_penalty": 2.5}, "`presence_penalty` must be >= -2.0 and <= 2.0"),
        ({"min_p": -0.1}, "`min_p` must be >= 0.0 and <= 1.0"),
        ({"min_p": 1.1}, "`min_p` must be >= 0.0 and <= 1.0"),
        ({"top_p": 0}, "`top_p` must be > 0.0 and < 1.0"),
        ({"top_p": -0.5}, "`top_p` must be > 0.0 and < 1.0"),
        ({"top_p": 1.01}, "`top_p` must be > 0.0 and < 1.0"),
        ({"typical_p": 0}, "`typical_p` must be > 0.0 and < 1.0"),
        ({"typical_p": 1.0}, "`typical_p` must be > 0.0 and < 1.0"),
        ({"top_k": 0}, "`top_k` must be strictly positive"),
        ({"top_k": -3}, "`top_k` must be strictly positive"),
        ({"max_new_tokens": 0}, "`max_new_tokens` must be strictly positive"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "`stop` supports up to 4 stop sequences. Given: 5"),
        ({"top_n_tokens": 6}, "`top_n_tokens` must be >= 0 and <= 5. Given: 6"),
        ({"truncate": 0}, "`truncate` must be strictly positive and less than 32. Given: 0"),
        ({"truncate": 33}, "`truncate` must be strictly positive and less than 32. Given: 33"),
    ],
)
def test_parameter_bounds(validator, params, message):
    assert error(validator, **params) == message


@pytest.mark.parametrize(
    "params",
    [
        {"repetition_penalty": 0.01}, {"frequency_penalty": -2.0}, {"frequency_penalty": 2.0},
        {"presence_penalty": -2.0}, {"presence_penalty": 2.0}, {"min_p": 0.0}, {"min_p": 1.0},
        {"top_p": 0.01}, {"typical_p": 0.99}, {"top_k": 1}, {"max_new_tokens": 1},
        {"stop": ["a", "b", "c", "d"]}, {"top_n_tokens": 5}, {"top_n_tokens": 0}, {"truncate": 1},
        {"truncate": 32},
    ],
)
def test_parameter_bounds_inclusive(validator, params):
    validate(validator, **params)


def test_defaults(validator):
    valid = validate(validator, "Hello world")
    p = valid.parameters
    assert (p.temperature, p.top_k, p.top_p, p.typical_p, p.min_p) == (1.0, 0, 1.0, 1.0, 0.0)
    assert (p.repetition_penalty, p.frequency_penalty, p.presence_penalty) == (1.0, 0.0, 0.0)
    assert p.do_sample is False and p.seed is None and p.watermark is False
    assert p.stop == () and p.return_full_text is False and p.details is False
    assert p.decoder_input_details is False and p.top_n_tokens == 0 and p.best_of == 1
    assert valid.input_text == "Hello world" and valid.truncated is False


def test_parameters_absent_means_sampling(validator):
    valid = asyncio.run(validator.validate(parse_generate_request({"inputs": "Hello"}, compat=False)))
    assert valid.parameters.do_sample is True and valid.parameters.seed is None
    assert valid.parameters.temperature == 1.0


def test_temperature_zero_is_greedy(validator):
    # Accepted (TGI rejects it): argmax, whatever else asks for sampling.
    p = validate(validator, temperature=0, do_sample=True, top_k=5, top_p=0.5, typical_p=0.5, min_p=0.2).parameters
    assert p.do_sample is False
    assert (p.temperature, p.top_k, p.top_p, p.typical_p, p.min_p) == (1.0, 0, 1.0, 1.0, 0.0)
    # Penalties still apply to greedy decoding.
    p = validate(validator, temperature=0.0, repetition_penalty=1.2).parameters
    assert p.do_sample is False and p.repetition_penalty == 1.2


def test_top_p_one_is_off(validator):
    p = validate(validator, top_p=1.0).parameters
    assert p.top_p == 1.0 and p.do_sample is False
    assert validate(validator, top_p=0.9).parameters.do_sample is True


@pytest.mark.parametrize(
    "params, do_sample",
    [
        ({"do_sample": True}, True), ({"temperature": 0.7}, True), ({"temperature": 1.0}, False),
        ({"top_k": 5}, True), ({"typical_p": 0.5}, True), ({"min_p": 0.1}, True), ({"min_p": 0.0}, False),
        ({"repetition_penalty": 1.3}, False), ({"seed": 7}, False),
    ],
)
def test_effective_do_sample(validator, params, do_sample):
    assert validate(validator, **params).parameters.do_sample is do_sample


def test_values_carried_through(validator):
    p = validate(validator, temperature=0.5, top_k=3, top_p=0.8, typical_p=0.9, min_p=0.05, seed=42,
                 repetition_penalty=1.1, frequency_penalty=0.5, presence_penalty=-0.5, watermark=True,
                 max_new_tokens=5, stop=["\n", "END"], return_full_text=True, details=True, top_n_tokens=3).parameters
    assert (p.temperature, p.top_k, p.top_p, p.typical_p, p.min_p, p.seed) == (0.5, 3, 0.8, 0.9, 0.05, 42)
    assert (p.repetition_penalty, p.frequency_penalty, p.presence_penalty) == (1.1, 0.5, -0.5)
    assert p.watermark and p.max_new_tokens == 5 and p.stop == ("\n", "END") and p.return_full_text
    assert p.details and p.top_n_tokens == 3 and p.do_sample


def test_decoder_input_details_forces_details(validator):
    p = validate(validator, decoder_input_details=True).parameters
    assert p.decoder_input_details and p.details


# ------------------------------------------------------------------------------ best_of


def test_best_of_rules(validator):
    assert error(validator, best_of=3, do_sample=True) == "`best_of` must be > 0 and <= 2. Given: 3"
    assert error(validator, best_of=0, do_sample=True) == "`best_of` must be > 0 and <= 2. Given: 0"
    assert error(validator, best_of=2) == "you must use sampling when `best_of` is > 1"
    assert error(validator, best_of=2, temperature=0) == "you must use sampling when `best_of` is > 1"
    assert error(validator, best_of=2, do_sample=True, seed=1) == "`seed` must not be set when `best_of` > 1"
    disabled = Limits(max_best_of=1, max_stop_sequences=4, max_top_n_tokens=5, max_input_tokens=32,
                      max_total_tokens=64)
    assert error(validator, limits=disabled, best_of=2, do_sample=True) == (
        "`best_of` != 1 is not allowed for this endpoint")
    assert error(validator, limits=disabled, best_of=0) == "`best_of` != 1 is not allowed for this endpoint"
    validate(validator, limits=disabled, best_of=1)


@pytest.mark.parametrize("params", [{"do_sample": True}, {"temperature": 1.0}, {"top_k": 4}, {"top_p": 0.9},
                                    {"typical_p": 0.9}, {"min_p": 0.1}])
def test_best_of_with_sampling(validator, params):
    # TGI's rule: any sampling field present counts, even temperature == 1.0.
    assert validate(validator, best_of=2, **params).parameters.best_of == 2


def test_stream_rules(validator):
    assert error(validator, stream=True, best_of=2, do_sample=True) == (
        "`best_of` != 1 is not supported when streaming tokens")
    assert error(validator, stream=True, best_of=0) == "`best_of` != 1 is not supported when streaming tokens"
    assert error(validator, stream=True, decoder_input_details=True) == (
        "`decoder_input_details` == true is not supported when streaming tokens")
    assert validate(validator, stream=True, best_of=1, details=True).parameters.details


def test_rule_order(validator):
    # Stream checks come first, then best_of, then the parameters in TGI's order.
    assert error(validator, stream=True, best_of=3, decoder_input_details=True, temperature=-1) == (
        "`best_of` != 1 is not supported when streaming tokens")
    assert error(validator, best_of=3, temperature=-1) == "`best_of` must be > 0 and <= 2. Given: 3"
    assert error(validator, best_of=2, temperature=-1) == "`temperature` must be strictly positive"
    assert error(validator, temperature=-1, top_k=0) == "`temperature` must be strictly positive"
    assert error(validator, top_p=2, top_k=0) == "`top_p` must be > 0.0 and < 1.0"
    assert error(validator, "", top_n_tokens=9) == "`top_n_tokens` must be >= 0 and <= 5. Given: 9"
    assert error(validator, "", truncate=0) == "`inputs` cannot be empty"
    assert error(validator, "", grammar={"type": "regex", "value": "a"}) == "`inputs` cannot be empty"


# -------------------------------------------------------------------------------- inputs


def test_empty_inputs(validator):
    assert error(validator, "") == "`inputs` cannot be empty"
    validate(validator, " ")


def test_input_too_long(validator):
    text = f"{WORDS} {WORDS} {WORDS}"  # 48 tokens, fits max_total with 1 new token
    assert error(validator, text, max_new_tokens=1) == "`inputs` must have less than 32 tokens. Given: 48"


def test_input_plus_max_new_tokens(validator):
    assert error(validator, WORDS, max_new_tokens=49) == (
        "`inputs` tokens + `max_new_tokens` must be <= 64. Given: 16 `inputs` tokens and 49 `max_new_tokens`")
    assert validate(validator, WORDS, max_new_tokens=48).parameters.max_new_tokens == 48


def test_total_checked_before_input_length(validator):
    text = f"{WORDS} {WORDS} {WORDS}"  # 48 > max_input 32, and 48 + 20 > 64: TGI reports the total
    assert error(validator, text, max_new_tokens=20) == (
        "`inputs` tokens + `max_new_tokens` must be <= 64. Given: 48 `inputs` tokens and 20 `max_new_tokens`")
    text = " ".join([WORDS] * 5)  # 80 tokens and no max_new_tokens: 0 new tokens fit
    assert error(validator, text) == (
        "`inputs` tokens + `max_new_tokens` must be <= 64. Given: 80 `inputs` tokens and 0 `max_new_tokens`")


def test_max_new_tokens_default(validator):
    valid = validate(validator, WORDS)
    assert valid.input_length == 16 and valid.parameters.max_new_tokens == 64 - 16


def test_truncate_keeps_last_tokens(validator, router_tokenizer):
    text = f"{WORDS} {WORDS} {WORDS}"
    ids = router_tokenizer.encode(text)
    valid = validate(validator, text, truncate=5, max_new_tokens=10)
    assert valid.input_ids == tuple(ids[-5:]) and valid.input_length == 5 and valid.truncated
    assert router_tokenizer.decode(valid.input_ids) == " twelve thirteen fourteen fifteen sixteen"
    assert valid.input_text == text  # return_full_text prepends the untruncated inputs
    # truncate also bounds the default max_new_tokens and the length checks
    assert validate(validator, text, truncate=32).parameters.max_new_tokens == 64 - 32


def test_truncate_longer_than_input(validator, router_tokenizer):
    valid = validate(validator, WORDS, truncate=20)
    assert valid.input_ids == tuple(router_tokenizer.encode(WORDS)) and not valid.truncated
    assert valid.input_length == 16


def test_grammar_rejected_when_disabled(validator):
    disabled = Validator(validator.tokenizer, LIMITS, GrammarValidator(validator.tokenizer, disabled=True))
    for grammar in ({"type": "regex", "value": "[a-z]+"}, {"type": "json", "value": {"properties": {}}}):
        assert error(disabled, **{"grammar": grammar}) == "grammar is not supported"
    # ...also when built directly: never silently ignored
    request = GenerateRequest("hi", GenerateParameters(grammar=Grammar("regex", "a")))
    with pytest.raises(ValidationError, match="^Input validation error: grammar is not supported$"):
        asyncio.run(disabled.validate(request))


def test_grammar_is_validated_and_passed_on(validator):
    valid = validate(validator, grammar={"type": "regex", "value": "[a-z]+"})
    assert valid.parameters.grammar == "[a-z]+" and valid.parameters.grammar_type == 2
    assert error(validator, grammar={"type": "regex", "value": "[a-z"}).startswith("grammar is not valid: ")
    # (tests/router/grammar/test_grammar.py covers the grammar machinery itself)


def test_add_special_tokens_false(validator):
    request = GenerateRequest("<|im_start|>user\nhi<|im_end|>\n", GenerateParameters(), add_special_tokens=False)
    valid = asyncio.run(validator.validate(request))
    assert valid.input_ids[0] == 1


def test_limits_check():
    with pytest.raises(ValueError, match="max_input_tokens"):
        Limits(max_input_tokens=64, max_total_tokens=64)


def test_valid_request_is_frozen(validator):
    valid = validate(validator)
    with pytest.raises(AttributeError):
        valid.input_length = 3  # type: ignore[misc]
    with pytest.raises(AttributeError):
        valid.parameters.top_k = 3  # type: ignore[misc]


# ------------------------------------------------------------------------------ tokenizer

TEXTS = [
    "Hello world",
    "  leading spaces\n\n\ttabs and 🤗 emoji, naïve café, 中文 and Ελληνικά",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    "text with <repo_name> and <|endoftext|> special tokens inside",
    "",
]


@pytest.fixture(scope="module")
def hf_tokenizer(smollm2_folder):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_folder)


@pytest.mark.parametrize("text", TEXTS)
def test_encode_matches_transformers(router_tokenizer, hf_tokenizer, text):
    assert router_tokenizer.encode(text) == hf_tokenizer(text).input_ids
    assert router_tokenizer.encode(text, add_special_tokens=False) == hf_tokenizer(
        text, add_special_tokens=False).input_ids


def test_encode_chat_template_text_matches_transformers(router_tokenizer, hf_tokenizer):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there 👋"}]
    text = hf_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text.startswith("<|im_start|>system\nBe brief.<|im_end|>")
    ids = router_tokenizer.encode(text, add_special_tokens=False)
    assert ids == hf_tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
    assert ids == hf_tokenizer(text).input_ids
    assert ids.count(1) == 3 and ids.count(2) == 2  # <|im_start|> / <|im_end|> are single tokens


def test_tokenizer_facts(router_tokenizer, hf_tokenizer, smollm2_folder):
    tok = router_tokenizer
    assert (tok.bos_token, tok.eos_token) == (hf_tokenizer.bos_token, hf_tokenizer.eos_token)
    assert tok.eos_token_id == hf_tokenizer.eos_token_id
    assert tok.special_ids == frozenset(hf_tokenizer.all_special_ids)
    assert tok.is_special(2) and not tok.is_special(3) and not tok.is_special(905)
    assert tok.chat_template == (smollm2_folder / "chat_template.jinja").read_text()
    assert tok.vocab_size == len(hf_tokenizer)
    ids = tok.encode("Hi<|im_end|>")
    assert tok.decode(ids) == "Hi<|im_end|>" and tok.decode(ids, skip_special_tokens=True) == "Hi"


def test_encode_with_offsets_are_char_offsets(router_tokenizer):
    text = "héllo 🤗 wörld, 中文!"
    tokens = router_tokenizer.encode_with_offsets(text)
    assert [t[0] for t in tokens] == router_tokenizer.encode(text)
    assert all(0 <= start <= stop <= len(text) for _, start, stop in tokens)
    # Token boundaries fall inside characters for multi-byte text, so pieces overlap there;
    # the union of spans still covers the text in order.
    assert tokens[0][1] == 0 and tokens[-1][2] == len(text)
    assert all(a[1] <= b[1] for a, b in zip(tokens, tokens[1:]))
    assert text[tokens[0][1]:tokens[0][2]] == "h"


def test_large_inputs_offloaded_with_same_result(router_tokenizer):
    text = ("The quick brown fox 🦊 jumps over the lazy dog. " * 200)
    assert len(text) > tokenizer_module.OFFLOAD_CHARS
    assert asyncio.run(router_tokenizer.aencode(text)) == router_tokenizer.encode(text)
    assert asyncio.run(router_tokenizer.aencode_with_offsets(text)) == router_tokenizer.encode_with_offsets(text)
    short = "short text"
    assert asyncio.run(router_tokenizer.aencode(short)) == router_tokenizer.encode(short)


def test_offloaded_encode_leaves_event_loop_free(router_tokenizer):
    text = "word " * 200_000  # ~0.2 s of tokenization

    async def main():
        ticks = 0
        task = asyncio.create_task(router_tokenizer.aencode(text))
        while not task.done():
            ticks += 1
            await asyncio.sleep(0.001)
        return ticks, await task

    ticks, ids = asyncio.run(main())
    assert len(ids) > 100_000
    assert ticks > 10, "the event loop was blocked while tokenizing"


def test_llama_post_processor_follows_tokenizer_config(smollm2_folder, tmp_path):
    """Like transformers (LlamaTokenizerFast) and TGI's router: add_bos_token in
    tokenizer_config.json decides the BOS, whatever tokenizer.json's post-processor says."""
    from transformers import AutoTokenizer

    for name in ("tokenizer.json", "special_tokens_map.json"):
        shutil.copy(smollm2_folder / name, tmp_path / name)
    config = json.loads((smollm2_folder / "tokenizer_config.json").read_text())
    config.update(add_bos_token=True, add_eos_token=True)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    tok = Tokenizer.from_folder(tmp_path)
    hf = AutoTokenizer.from_pretrained(tmp_path)
    for text in TEXTS:
        assert tok.encode(text) == hf(text).input_ids
        assert tok.encode(text, add_special_tokens=False) == hf(text, add_special_tokens=False).input_ids
    assert tok.encode("Hi")[0] == 1 and tok.encode("Hi")[-1] == 2


def test_chat_template_from_tokenizer_config(smollm2_folder, tmp_path):
    shutil.copy(smollm2_folder / "tokenizer.json", tmp_path / "tokenizer.json")
    config = {"chat_template": [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    assert Tokenizer.from_folder(tmp_path).chat_template == "D"
    (tmp_path / "chat_template.json").write_text(json.dumps({"chat_template": "J"}))
    assert Tokenizer.from_folder(tmp_path).chat_template == "J"
    (tmp_path / "chat_template.jinja").write_text("JINJA")
    assert Tokenizer.from_folder(tmp_path).chat_template == "JINJA"
    # --tokenizer-config-path replaces the folder's tokenizer_config.json
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"eos_token": {"content": "<|im_end|>"}}))
    tok = Tokenizer.from_folder(tmp_path, other)
    assert tok.eos_token == "<|im_end|>" and tok.eos_token_id == 2


def test_missing_tokenizer_json(tmp_path):
    with pytest.raises(FileNotFoundError):
        Tokenizer.from_folder(tmp_path)


def test_concurrent_validation(validator):
    async def main():
        texts = [f"request {i} " + "x y " * (600 * (i % 3)) for i in range(12)]
        requests = [GenerateRequest(t, GenerateParameters(max_new_tokens=1, truncate=8)) for t in texts]
        return await asyncio.gather(*(validator.validate(r) for r in requests)), texts

    results, texts = asyncio.run(main())
    for valid, text in zip(results, texts):
        assert valid.input_text == text and valid.input_length == min(8, len(validator.tokenizer.encode(text)))



@pytest.mark.parametrize("adapter_id,expected", [(None, ""), ("", ""), ("tgi", ""), ("served/model", ""),
                                                 ("org/sql", "org/sql"), ("chat", "chat")])
def test_adapter_id_names_a_loaded_adapter(validator, adapter_id, expected):
    with_adapters = Validator(validator.tokenizer, LIMITS, adapters=Adapters("served/model", ("org/sql", "chat")))
    request = parse_generate_request({"inputs": "Hello", "parameters": {"adapter_id": adapter_id}}, compat=False)
    assert asyncio.run(with_adapters.validate(request)).adapter_id == expected


def test_unknown_adapter_id_is_a_422(validator):
    with_adapters = Validator(validator.tokenizer, LIMITS, adapters=Adapters("served/model", ("org/sql",)))
    request = parse_generate_request({"inputs": "Hello", "parameters": {"adapter_id": "org/sq"}}, compat=False)
    with pytest.raises(ValidationError) as info:
        asyncio.run(with_adapters.validate(request))
    assert info.value.status == 422 and info.value.param == "adapter_id"
    assert info.value.message == ("Input validation error: `adapter_id`: `org/sq` is neither the base model "
                                  "(`served/model`) nor a loaded LoRA adapter (loaded: `org/sql`)")
    # Without adapters every id but the base model's names nothing.
    assert "(loaded: none)" in error(validator, adapter_id="org/sql")
