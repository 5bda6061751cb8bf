"""Chat templates render exactly as transformers' `apply_chat_template` (SmolLM2's ChatML template
with its default system prompt, and templates that use `tools`)."""

from __future__ import annotations

import asyncio

import pytest

from router.errors import TemplateError
from router.limits import Limits
from router.openai.chat_template import ChatTemplate
from router.openai.requests import parse_chat_request

LIMITS = Limits(max_stop_sequences=4, max_top_n_tokens=5, max_client_batch_size=4, vocab_size=49152,
                      max_input_tokens=4096, max_total_tokens=8192)

TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]

# A Qwen/Hermes-style template: tools in the system block, tool calls with `tojson`.
TOOL_TEMPLATE = (
    "{%- if tools %}<|im_start|>system\n# Tools\n{%- for tool in tools %}\n{{ tool | tojson }}{%- endfor %}"
    "<|im_end|>\n{%- endif %}"
    "{%- for message in messages %}<|im_start|>{{ message.role }}\n"
    "{%- if message.content %}{{ message.content }}{%- endif %}"
    "{%- if message.tool_calls %}{%- for call in message.tool_calls %}\n<tool_call>{{ call.function | tojson }}"
    "</tool_call>{%- endfor %}{%- endif %}<|im_end|>\n{%- endfor %}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n{%- endif %}"
)


@pytest.fixture(scope="module")
def hf_tokenizer(smollm2_folder):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_folder)


@pytest.fixture(scope="module")
def template(router_tokenizer):
    return ChatTemplate.from_tokenizer(router_tokenizer)


def messages_of(body_messages):
    """Messages as the OpenAI layer normalizes them (content parts joined, …)."""
    return parse_chat_request({"messages": body_messages}, LIMITS).messages


CONVERSATIONS = {
    "user only (default system prompt)": [{"role": "user", "content": "Hello!"}],
    "system + user": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
    "multi-turn": [
        {"role": "system", "content": "You are a pirate."}, {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Ahoy!"}, {"role": "user", "content": "Where is the treasure?"},
    ],
    "unicode": [{"role": "user", "content": "Ça va ? 😀 日本語"}],
}


@pytest.mark.parametrize("name", list(CONVERSATIONS))
def test_render_equals_apply_chat_template(name, template, hf_tokenizer, router_tokenizer):
    messages = CONVERSATIONS[name]
    expected = hf_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    prompt = template.render(messages_of(messages))
    assert prompt == expected
    # Tokenized without adding special tokens (the template has them) = transformers' ids.
    ids = hf_tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
    assert router_tokenizer.encode(prompt, add_special_tokens=False) == list(ids)


def test_content_parts_are_joined_for_every_role(template, hf_tokenizer):
    parts = [
        {"role": "system", "content": [{"type": "text", "text": "Be"}, {"type": "text", "text": "brief."}]},
        {"role": "user", "content": [{"type": "text", "text": "Hi"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "Hello"}, {"type": "text", "text": "there"}]},
        {"role": "user", "content": [{"type": "text", "text": "Bye"}]},
    ]
    joined = [{"role": "system", "content": "Be\nbrief."}, {"role": "user", "content": "Hi"},
              {"role": "assistant", "content": "Hello\nthere"}, {"role": "user", "content": "Bye"}]
    assert template.render(messages_of(parts)) == hf_tokenizer.apply_chat_template(
        joined, tokenize=False, add_generation_prompt=True)


def test_continue_final_assistant_message(template, hf_tokenizer):
    messages = [{"role": "user", "content": "Write a haiku."}, {"role": "assistant", "content": "Autumn moonlight"}]
    expected = hf_tokenizer.apply_chat_template(messages, tokenize=False, continue_final_message=True)
    prompt = template.render(messages_of(messages))
    assert prompt == expected
    assert prompt.endswith("Autumn moonlight") and not prompt.endswith("<|im_start|>assistant\n")


def test_template_with_tools(router_tokenizer, hf_tokenizer):
    template = ChatTemplate(TOOL_TEMPLATE, router_tokenizer.special_tokens_map)
    messages = [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "22 C"},
    ]
    normalized = messages_of(messages)
    # Tool-call arguments reach the template parsed (as vLLM does), so `tojson` prints an object.
    hf_messages = [dict(m) for m in messages]
    hf_messages[1] = {**messages[1], "tool_calls": [{**messages[1]["tool_calls"][0],
                                                     "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]}
    expected = hf_tokenizer.apply_chat_template(hf_messages, tools=TOOLS, chat_template=TOOL_TEMPLATE, tokenize=False,
                                                add_generation_prompt=True)
    prompt = template.render(normalized, TOOLS)
    assert prompt == expected
    assert '"name": "get_weather"' in prompt and '{"city": "Paris"}' in prompt
    assert "# Tools" not in template.render(normalized[:1])  # no tools: the template skips the block


def test_named_tool_use_template_is_picked_with_tools(router_tokenizer):
    template = ChatTemplate(None, router_tokenizer.special_tokens_map,
                            {"default": "{{ 'D' }}", "tool_use": "{{ 'T' ~ (tools | length) }}"})
    messages = [{"role": "user", "content": "x"}]
    assert template.render(messages) == "D"
    assert template.render(messages, TOOLS) == "T1"


def test_special_tokens_reach_the_template(router_tokenizer):
    template = ChatTemplate("{{ bos_token }}|{{ eos_token }}|{{ messages[0].content }}", router_tokenizer.special_tokens_map)
    assert template.render([{"role": "user", "content": "x"}]) == "<|im_start|>|<|im_end|>|x"


def test_template_errors_are_template_errors(router_tokenizer):
    raising = ChatTemplate("{{ raise_exception('Conversation roles must alternate') }}", {})
    with pytest.raises(TemplateError) as info:
        raising.render([{"role": "user", "content": "x"}])
    assert info.value.message == "Template error: Conversation roles must alternate"
    with pytest.raises(TemplateError, match="no chat template"):
        ChatTemplate(None, {}).render([{"role": "user", "content": "x"}])
    broken = ChatTemplate("{% for %}", {})
    with pytest.raises(TemplateError):
        broken.render([{"role": "user", "content": "x"}])


def test_large_conversations_render_off_the_loop_identically(template):
    messages = [{"role": "user", "content": "word " * 2000}]
    assert asyncio.run(template.arender(messages)) == template.render(messages)


# ------------------------------------------------------------------------------ tool turns

CALL = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
CALL_TEXT = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
# What `ChatCompletionMessage.model_dump()` of the openai SDK sends back: extra keys, content null.
SDK_CALL_MESSAGE = {"content": None, "refusal": None, "role": "assistant", "annotations": [], "audio": None,
                    "function_call": None, "tool_calls": [CALL]}
TOOL_TURN = [{"role": "user", "content": "Weather in Paris?"}, SDK_CALL_MESSAGE,
             {"role": "tool", "tool_call_id": "call_1", "name": "get_weather", "content": "22 C"}]


def test_tool_turns_for_a_template_without_tool_calls(template, hf_tokenizer):
    """SmolLM2's template knows no tool calls: the call is the text the model was told to write,
    the result a user turn of <tool_response> (the Hermes / Qwen convention)."""
    prompt = template.render(messages_of(TOOL_TURN), TOOLS)
    plain = [{"role": "user", "content": "Weather in Paris?"}, {"role": "assistant", "content": CALL_TEXT},
             {"role": "user", "content": "<tool_response>\n22 C\n</tool_response>"}]
    assert prompt == hf_tokenizer.apply_chat_template(plain, tokenize=False, add_generation_prompt=True)
    assert prompt.endswith(f"<|im_start|>assistant\n{CALL_TEXT}<|im_end|>\n<|im_start|>user\n<tool_response>\n"
                           "22 C\n</tool_response><|im_end|>\n<|im_start|>assistant\n")


@pytest.mark.parametrize("content", [None, "absent", "", [], [{"type": "text", "text": ""}]])
def test_empty_content_beside_tool_calls(template, content):
    message = {"role": "assistant", "tool_calls": [CALL]}
    if content != "absent":
        message["content"] = content
    prompt = template.render(messages_of([TOOL_TURN[0], message, TOOL_TURN[2]]))
    assert f"<|im_start|>assistant\n{CALL_TEXT}<|im_end|>" in prompt


def test_text_and_several_calls_and_results(template):
    second = {"id": "call_2", "type": "function", "function": {"name": "now", "arguments": "{}"}}
    messages = [TOOL_TURN[0],
                {"role": "assistant", "content": [{"type": "text", "text": "Checking."}], "tool_calls": [CALL, second]},
                {"role": "tool", "tool_call_id": "call_1", "content": "22 C"},
                {"role": "tool", "tool_call_id": "call_2", "content": [{"type": "text", "text": "noon"}]},
                {"role": "assistant", "content": "22 C at noon."}, {"role": "user", "content": "Thanks"}]
    prompt = template.render(messages_of(messages))
    now_text = '<tool_call>\n{"name": "now", "arguments": {}}\n</tool_call>'
    assert f"<|im_start|>assistant\nChecking.\n{CALL_TEXT}{now_text}<|im_end|>" in prompt
    # Consecutive results are one user turn, as Qwen's template writes them.
    assert ("<|im_start|>user\n<tool_response>\n22 C\n</tool_response>\n<tool_response>\nnoon\n"
            "</tool_response><|im_end|>\n<|im_start|>assistant\n22 C at noon.<|im_end|>") in prompt
    assert prompt.endswith("<|im_start|>user\nThanks<|im_end|>\n<|im_start|>assistant\n")


def test_rendered_call_is_what_the_grammar_accepts():
    """The text a past call is rendered as is the text a tool constraint makes the model write."""
    from xgrammar import Grammar
    from xgrammar.testing import _is_grammar_accept_string as accepts

    request = parse_chat_request({"messages": [{"role": "user", "content": "hi"}], "tools": TOOLS,
                                  "tool_choice": "required"}, LIMITS)
    grammar = Grammar.from_structural_tag(request.constraint.grammar)
    assert accepts(grammar, CALL_TEXT) and accepts(grammar, CALL_TEXT + CALL_TEXT)


def test_tool_turns_reach_a_tool_template_as_transformers_passes_them(router_tokenizer, hf_tokenizer):
    """A template that handles `tool_calls` gets them (arguments as a dict), content None kept."""
    template = ChatTemplate(TOOL_TEMPLATE, router_tokenizer.special_tokens_map)
    hf_messages = [TOOL_TURN[0], {**SDK_CALL_MESSAGE, "tool_calls": [
        {**CALL, "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]}, TOOL_TURN[2]]
    expected = hf_tokenizer.apply_chat_template(hf_messages, tools=TOOLS, chat_template=TOOL_TEMPLATE,
                                                tokenize=False, add_generation_prompt=True)
    assert template.render(messages_of(TOOL_TURN), TOOLS) == expected
    assert '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>' in expected
