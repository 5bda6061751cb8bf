"""Chat templates, rendered exactly the way transformers' `apply_chat_template` renders them.

The rendering is transformers' own (`transformers.utils.chat_template_utils.render_jinja_template`:
its sandboxed jinja environment, `tojson`, `raise_exception`, `strftime_now`, the
`{% generation %}` tag, and its continue-final-message cut), called with what
`apply_chat_template` passes: `messages`, `tools`, `add_generation_prompt` and the tokenizer's
`special_tokens_map` (`bos_token`, `eos_token`, …). A tokenizer_config that lists several named
templates gets the "tool_use" one when the request has tools, else "default" (transformers'
`get_chat_template`).

Tool turns (an assistant message with `tool_calls`, `tool` results) reach a template that handles
`tool_calls` as transformers passes them (arguments parsed to a dict, content possibly None). A
template that never mentions `tool_calls` (SmolLM2's ChatML) gets them as the text the model was
told to write (router.openai.constraints.tool_prompt): the assistant's content followed by its calls,
`<tool_call>\n{"name": …, "arguments": …}\n</tool_call>` each; and each run of `tool` results as
one user turn of `<tool_response>\n…\n</tool_response>` blocks, as the Hermes / Qwen templates do
(a user turn: templates that refuse unknown roles or insist that roles alternate accept it).

A request's `chat_template_kwargs` (vLLM's name, e.g. `{"enable_thinking": false}` for Qwen3)
become extra template variables; the schema refuses names that collide with `RESERVED_KWARGS`.

The request decides the mode: when the last message is the assistant's (with text), the model
continues it (`continue_final_message`: the prompt is cut right after that text, no generation
prompt); otherwise `add_generation_prompt=True`.

Importing transformers takes a while, so it happens once, lazily (`ChatTemplate.warm_up` runs it
off the event loop at startup); the router's CLI sets `USE_TORCH=0` so that it does not pull in
torch (0.8 s and ~5 MB instead of 2.3 s and ~250 MB). Rendering is pure Python; large
conversations render on a worker thread so that one request does not stall the others.
"""

from __future__ import annotations

import asyncio
import functools
import json
from typing import Any

from router.errors import TemplateError
from router.openai.tool_calls import CALL_SEPARATOR, TOOL_RESPONSE_CLOSE, TOOL_RESPONSE_OPEN, call_text

# Template variables a request's `chat_template_kwargs` may not set: the renderer's own arguments and
# the special tokens passed beside them.
RESERVED_KWARGS = frozenset({
    "conversations", "messages", "tools", "documents", "chat_template", "return_assistant_tokens_mask",
    "continue_final_message", "add_generation_prompt", "bos_token", "eos_token", "unk_token", "sep_token",
    "pad_token", "cls_token", "mask_token", "additional_special_tokens",
})
# Conversations longer than this (characters, tools included) render on a worker thread.
OFFLOAD_CHARS = 4000


def _render_jinja_template():
    from transformers.utils.chat_template_utils import render_jinja_template

    return render_jinja_template


class ChatTemplate:
    def __init__(self, template: str | None, special_tokens_map: dict[str, Any] | None = None,
                 named: dict[str, str] | None = None) -> None:
        self.template = template
        self.named = dict(named or {})
        self.special_tokens_map = dict(special_tokens_map or {})

    @classmethod
    def from_tokenizer(cls, tokenizer) -> "ChatTemplate":
        return cls(tokenizer.chat_template, tokenizer.special_tokens_map, tokenizer.chat_templates)

    def warm_up(self) -> None:
        """Import transformers' renderer and compile the template (blocking: run it in a thread)."""
        render = _render_jinja_template()
        if self.template:
            try:
                render([[{"role": "user", "content": "hi"}]], chat_template=self.template,
                       add_generation_prompt=True, **self.special_tokens_map)
            except Exception:  # noqa: BLE001 - a template that fails here fails per request, with its message
                pass

    def uses_tools(self, tools: list | None) -> bool:
        """Whether the template that would render this request mentions `tools` at all."""
        return "tools" in self.pick(tools)

    def pick(self, tools: list | None) -> str:
        """transformers' `get_chat_template`: the "tool_use" template for requests with tools."""
        if self.named:
            if tools and "tool_use" in self.named:
                return self.named["tool_use"]
            if "default" in self.named:
                return self.named["default"]
        if self.template:
            return self.template
        raise TemplateError("the model has no chat template (use /v1/completions, or give one with "
                            "--tokenizer-config-path)")

    def render(self, messages: list[dict[str, Any]], tools: list | None = None,
               continue_final_message: bool | None = None,
               template_kwargs: dict[str, Any] | None = None) -> str:
        """The prompt for `messages`. `continue_final_message=None` decides from the messages."""
        if continue_final_message is None:
            continue_final_message = continues(messages)
        template = self.pick(tools)
        if not handles_tool_calls(template):
            messages = plain_tool_turns(messages)
        render = _render_jinja_template()
        try:
            rendered, _ = render(
                conversations=[messages], tools=tools or None, chat_template=template,
                continue_final_message=continue_final_message,
                add_generation_prompt=not continue_final_message,
                **{**(template_kwargs or {}), **self.special_tokens_map},
            )
        except TemplateError:
            raise
        except Exception as error:  # jinja's TemplateError (raise_exception), TypeError, ValueError …
            raise TemplateError(str(error) or type(error).__name__) from error
        return rendered[0]

    async def arender(self, messages: list[dict[str, Any]], tools: list | None = None,
                      template_kwargs: dict[str, Any] | None = None) -> str:
        if _size(messages) + _size(tools) + _size(template_kwargs) <= OFFLOAD_CHARS:
            return self.render(messages, tools, template_kwargs=template_kwargs)
        loop = asyncio.get_running_loop()
        render = functools.partial(self.render, messages, tools, template_kwargs=template_kwargs)
        return await loop.run_in_executor(None, render)


def handles_tool_calls(template: str) -> bool:
    """Whether the template renders assistant `tool_calls` itself (else: `plain_tool_turns`)."""
    return "tool_calls" in template


def plain_tool_turns(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """`messages` with tool calls and tool results written as text (see the module docstring)."""
    out: list[dict[str, Any]] = []
    results = False  # the last message of `out` is a user turn of tool results
    for message in messages:
        role = message.get("role")
        if role == "tool":
            block = f"{TOOL_RESPONSE_OPEN}\n{message.get('content') or ''}\n{TOOL_RESPONSE_CLOSE}"
            if results:
                out[-1]["content"] += f"\n{block}"
            else:
                out.append({"role": "user", "content": block})
            results = True
            continue
        results = False
        if role == "assistant" and message.get("tool_calls"):
            calls = CALL_SEPARATOR.join(_call_text(call) for call in message["tool_calls"])
            text = message.get("content") or ""
            message = {"role": "assistant", "content": f"{text}\n{calls}" if text else calls}
        elif message.get("content") is None:
            message = {**message, "content": ""}
        out.append(message)
    return out


def _call_text(call: dict[str, Any]) -> str:
    function = call.get("function") or {}
    arguments = function.get("arguments")
    if arguments is None:
        arguments = {}
    if not isinstance(arguments, str):  # parsed by chat_fields.py: written back as json.dumps does
        arguments = json.dumps(arguments, ensure_ascii=False)
    return call_text(function.get("name", ""), arguments)


def continues(messages: list[dict[str, Any]]) -> bool:
    """Continue the final message: it is the assistant's and has text to continue."""
    last = messages[-1] if messages else None
    return bool(last and last.get("role") == "assistant" and isinstance(last.get("content"), str)
                and last["content"])


def _size(value: Any) -> int:
    """A cheap upper-bound-ish size of a JSON-like value, in characters."""
    if value is None:
        return 0
    if isinstance(value, str):
        return len(value)
    if isinstance(value, dict):
        return sum(len(str(k)) + _size(v) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return sum(_size(v) for v in value)
    return 8
