"""OpenAI response shapes: chat completions and (legacy) completions, whole or as SSE chunks.

Shapers turn the router's `TokenEvent`s into OpenAI JSON, built as the typed bodies of
router/openai/models.py (which the OpenAPI document is generated from); they hold the per-request
constants (id, created, model) and the per-choice running state (usage, text offsets). No I/O here.
"""

from __future__ import annotations

import json
import math
import re
import time
import uuid
from dataclasses import dataclass, field
from functools import lru_cache

from router.events import Finish, TokenEvent, TokenInfo
from router.openai.models import (
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatDelta,
    ChatLogprob,
    ChatLogprobs,
    ChatMessage,
    Completion,
    CompletionChoice,
    CompletionChunk,
    CompletionChunkChoice,
    CompletionFinishReason,
    CompletionLogprobs,
    FinishReason,
    FunctionCall,
    FunctionDelta,
    ToolCall,
    ToolCallDelta,
    TopLogprob,
    Usage,
)
from router.openai.reasoning import ReasoningStream, split_reasoning
from router.openai.tool_calls import TOOL_CALL_CLOSE, ToolCallParseError, ToolCallStream, split_tool_calls

_BYTE_FALLBACK = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


def finish_reason(finish: Finish) -> CompletionFinishReason:
    """OpenAI's vocabulary: the model's end (eos) and a stop sequence are both "stop"."""
    return "length" if finish.finish_reason == "length" else "stop"


def _lp(value: float | None) -> float | None:
    # JSON has no -inf; OpenAI reports -9999.0 for a token the model gives no probability.
    return value if value is None or math.isfinite(value) else -9999.0


@lru_cache(maxsize=None)
def _byte_decoder() -> dict[str, int]:
    """GPT-2's bytes_to_unicode, inverted: the byte-level BPE alphabet back to bytes."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


class TokenStrings:
    """A token's text and exact UTF-8 bytes (OpenAI `token` / `bytes`), cached per id.

    A token may hold part of a character (byte-level BPE splits emoji and CJK); its `bytes` are
    then the raw bytes and its `token` text shows U+FFFD, as OpenAI does.
    """

    def __init__(self, tokenizer) -> None:
        backend = tokenizer.backend
        self._backend = backend
        self._added = {i: t.content for i, t in backend.get_added_tokens_decoder().items()}
        decoder = json.loads(backend.decoder.__getstate__()) if backend.decoder is not None else {}
        kinds = {d.get("type") for d in decoder.get("decoders", [decoder])}
        self._byte_level = "ByteLevel" in kinds
        self._cache: dict[int, tuple[str, list[int]]] = {}

    def get(self, token_id: int) -> tuple[str, list[int]]:
        cached = self._cache.get(token_id)
        if cached is None:
            cached = self._cache[token_id] = self._compute(token_id)
        return cached

    def text(self, token_id: int) -> str:
        return self.get(token_id)[0]

    def _compute(self, token_id: int) -> tuple[str, list[int]]:
        if token_id in self._added:
            text = self._added[token_id]
            return text, list(text.encode())
        piece = self._backend.id_to_token(token_id)
        if piece is None:
            return "", []
        match = _BYTE_FALLBACK.match(piece)
        if match:
            raw = bytes([int(match.group(1), 16)])
        else:
            piece = piece.replace("▁", " ")
            if self._byte_level:
                table = _byte_decoder()
                raw = b"".join(bytes([table[c]]) if c in table else c.encode() for c in piece)
            else:
                raw = piece.encode()
        return raw.decode("utf-8", errors="replace"), list(raw)


@dataclass(slots=True)
class Choice:
    """One choice's events, for non-streamed responses."""

    index: int
    prompt_index: int = 0
    events: list[TokenEvent] = field(default_factory=list)
    finish: Finish | None = None


class _Shaper:
    object_name = ""  # of the chunks
    id_prefix = ""
    chunk_type: type[ChatCompletionChunk] | type[CompletionChunk]

    def __init__(self, model: str, fingerprint: str, tokens: TokenStrings,
                 include_usage: bool = False) -> None:
        self.id = f"{self.id_prefix}{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.model = model
        self.fingerprint = fingerprint
        self.tokens = tokens
        self.include_usage = include_usage
        self.prompt_tokens = 0
        self.completion_tokens = 0

    def _chunk(self, choices: list) -> ChatCompletionChunk | CompletionChunk:
        chunk = self.chunk_type(id=self.id, object=self.object_name, created=self.created, model=self.model,
                                system_fingerprint=self.fingerprint, choices=choices)
        if self.include_usage:
            chunk["usage"] = None  # OpenAI: on every chunk when the last one carries the totals
        return chunk

    def usage(self) -> Usage:
        return Usage(prompt_tokens=self.prompt_tokens, completion_tokens=self.completion_tokens,
                     total_tokens=self.prompt_tokens + self.completion_tokens)

    def usage_chunk(self) -> ChatCompletionChunk | CompletionChunk:
        """The last chunk when `stream_options.include_usage`: no choices, the totals."""
        chunk = self._chunk([])
        chunk["usage"] = self.usage()
        return chunk


class ChatShaper(_Shaper):
    """`/v1/chat/completions`. With `tool_calls` (the request's constraint allows tool calls),
    the generated `<tool_call>` blocks become `message.tool_calls` / `delta.tool_calls` (id, type
    and name on a call's first fragment, argument fragments after) and `finish_reason` is
    "tool_calls"; text outside the calls stays `content`. With `reasoning` (router.openai.reasoning), the
    `<think>` section becomes `message.reasoning_content` / `delta.reasoning_content` and only the
    text after it is content (and read for tool calls); `inside`: the prompt left the output
    inside `<think>`."""

    object_name = "chat.completion.chunk"
    id_prefix = "chatcmpl-"
    chunk_type = ChatCompletionChunk

    def __init__(self, *args, logprobs: bool = False, tool_calls: bool = False, reasoning: bool = False,
                 inside: bool = False, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.logprobs = logprobs
        self.tool_calls = tool_calls
        self.reasoning = reasoning
        self.inside = inside
        self._streams: dict[int, ToolCallStream] = {}  # per choice, streaming tool calls only
        self._thoughts: dict[int, ReasoningStream] = {}  # per choice, streaming reasoning only

    def logprob_entry(self, token: TokenInfo, top: tuple[TokenInfo, ...]) -> ChatLogprob:
        text, raw = self.tokens.get(token.id)
        return ChatLogprob(token=text, logprob=_lp(token.logprob), bytes=raw,
                           top_logprobs=[self._top(t) for t in top])

    def _top(self, token: TokenInfo) -> TopLogprob:
        text, raw = self.tokens.get(token.id)
        return TopLogprob(token=text, logprob=_lp(token.logprob), bytes=raw)

    @staticmethod
    def _delta(content: str | None, tool_calls: list[ToolCallDelta] | None = None) -> ChatDelta:
        return ChatDelta(role="assistant", content=content, tool_calls=tool_calls)

    @staticmethod
    def _reasoning_delta(reasoning: str) -> ChatDelta:
        return ChatDelta(role="assistant", content=None, reasoning_content=reasoning, tool_calls=None)

    def role_chunk(self, index: int) -> ChatCompletionChunk:
        return self._chunk([ChatChunkChoice(index=index, delta=self._delta(""), logprobs=None,
                                            finish_reason=None)])

    def chunks(self, index: int, event: TokenEvent) -> list[ChatCompletionChunk]:
        """The chunks for one token (none when it adds nothing: text held back, no logprobs)."""
        logprobs = None
        if self.logprobs:
            logprobs = ChatLogprobs(content=[self.logprob_entry(event.token, event.top_tokens)])
        if event.finish is not None:
            self.completion_tokens += event.finish.generated_tokens
        thought, text = self._reasoning_split(index, event) if self.reasoning else ("", event.text)
        deltas = [self._reasoning_delta(thought)] if thought else []
        if self.tool_calls:
            deltas += self._tool_deltas(index, text, event.finish is not None)
        elif text:
            deltas.append(self._delta(text))
        if not deltas and (logprobs is not None or event.finish is not None):
            deltas = [self._delta("")]  # carries the logprobs or the finish reason
        reason = self._finish_reason(index, event.finish) if event.finish is not None else None
        return [self._chunk([ChatChunkChoice(index=index, delta=delta, logprobs=logprobs if i == 0 else None,
                                             finish_reason=reason if i == len(deltas) - 1 else None)])
                for i, delta in enumerate(deltas)]

    def _reasoning_split(self, index: int, event: TokenEvent) -> tuple[str, str]:
        stream = self._thoughts.setdefault(index, ReasoningStream(self.inside))
        split = stream.feed(event.text)
        if event.finish is not None:
            last = stream.finish()
            return split.reasoning + last.reasoning, split.content + last.content
        return split.reasoning, split.content

    def _tool_deltas(self, index: int, text: str, finished: bool) -> list[ChatDelta]:
        stream = self._streams.setdefault(index, ToolCallStream())
        pieces = stream.feed(text)
        if finished:
            try:
                pieces += stream.finish()
            except ToolCallParseError:
                pass  # cut inside a call (e.g. max_tokens): finish_reason says "length"
        deltas = []
        for piece in pieces:
            if piece.content is not None:
                if piece.content:
                    deltas.append(self._delta(piece.content))
            elif piece.name is not None:
                deltas.append(self._delta(None, [ToolCallDelta(
                    index=piece.index, id=_call_id(), type="function",
                    function=FunctionDelta(name=piece.name, arguments=""))]))
            else:
                deltas.append(self._delta(None, [ToolCallDelta(
                    index=piece.index, function=FunctionDelta(arguments=piece.arguments))]))
        return deltas

    def _finish_reason(self, index: int, finish: Finish) -> FinishReason:
        stream = self._streams.get(index)
        if stream is not None and stream.calls and finish.finish_reason != "length":
            return "tool_calls"
        return finish_reason(finish)

    def response(self, choices: list[Choice]) -> ChatCompletion:
        out = []
        for choice in choices:
            finish = choice.finish
            logprobs = None
            if self.logprobs:
                logprobs = ChatLogprobs(content=[self.logprob_entry(e.token, e.top_tokens)
                                                 for e in choice.events])
            self.completion_tokens += finish.generated_tokens
            message, reason = self._message(finish)
            out.append(ChatChoice(index=choice.index, message=message, logprobs=logprobs,
                                  finish_reason=reason))
        return ChatCompletion(id=self.id, object="chat.completion", created=self.created, model=self.model,
                              system_fingerprint=self.fingerprint, choices=out, usage=self.usage())

    def _message(self, finish: Finish) -> tuple[ChatMessage, FinishReason]:
        text, reasoning = finish.generated_text, None
        if self.reasoning:
            reasoning, text = split_reasoning(text, self.inside)
        message, reason = self._content_message(text, finish)
        if self.reasoning:
            message["reasoning_content"] = reasoning
            if reasoning is not None and not message["content"]:
                message["content"] = None
        return message, reason

    def _content_message(self, text: str, finish: Finish) -> tuple[ChatMessage, FinishReason]:
        if self.tool_calls:
            try:
                content, calls = split_tool_calls(text)
            except ToolCallParseError:
                # Cut inside a call (max_tokens): keep the calls that are complete.
                complete = text[: text.rfind(TOOL_CALL_CLOSE) + len(TOOL_CALL_CLOSE)] if TOOL_CALL_CLOSE in text else ""
                content, calls = split_tool_calls(complete) if complete else (text, None)
            if calls:
                message = ChatMessage(role="assistant", content=content or None, tool_calls=[
                    ToolCall(id=_call_id(), type="function",
                             function=FunctionCall(name=call["name"], arguments=call["arguments"]))
                    for call in calls])
                return message, "tool_calls" if finish.finish_reason != "length" else "length"
        return ChatMessage(role="assistant", content=text), finish_reason(finish)


def _call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


class CompletionShaper(_Shaper):
    """`/v1/completions`. Choices are prompt-major (index = prompt_index * n + j). `echo` puts the
    prompt before the completion; `logprobs` (int) uses the legacy shape `{tokens,
    token_logprobs, top_logprobs: [{token: logprob}], text_offset}`, with the prompt's tokens first
    when echoing (the first prompt token has no logprob: null). `score_only` (max_tokens 0 with
    echo) drops the one token generated to get the prompt's logprobs."""

    object_name = "text_completion"
    id_prefix = "cmpl-"
    chunk_type = CompletionChunk

    def __init__(self, *args, prompts: list[str], echo: bool = False, logprobs: int | None = None,
                 score_only: bool = False, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.prompts = prompts
        self.echo = echo
        self.logprobs = logprobs
        self.score_only = score_only
        self._offsets: dict[int, int] = {}  # stream: text offset reached per choice

    def _logprobs(self, items, offset: int,
                  into: CompletionLogprobs | None = None) -> tuple[CompletionLogprobs, int]:
        """items: (token, top tokens, length of its text in the output); appended to `into`, when
        given."""
        out = into
        if out is None:
            out = CompletionLogprobs(tokens=[], token_logprobs=[], top_logprobs=[], text_offset=[])
        for token, top, length in items:
            text = self.tokens.text(token.id)
            out["tokens"].append(text)
            out["token_logprobs"].append(_lp(token.logprob))
            if token.logprob is None:
                out["top_logprobs"].append(None)
            else:
                alternatives = {self.tokens.text(t.id): _lp(t.logprob) for t in top}
                alternatives.setdefault(text, _lp(token.logprob))  # OpenAI: the sampled token is always there
                out["top_logprobs"].append(alternatives)
            out["text_offset"].append(offset)
            offset += length
        return out, offset

    def _prompt_items(self, prefill: tuple[TokenInfo, ...]):
        return [(t, (), len(self.tokens.text(t.id))) for t in prefill]

    def _generated(self, events: list[TokenEvent]) -> list[TokenEvent]:
        return [] if self.score_only else events

    def _choice(self, index: int, text: str, logprobs: CompletionLogprobs | None,
                finish: Finish | None) -> CompletionChunkChoice:
        return CompletionChunkChoice(index=index, text=text, logprobs=logprobs,
                                     finish_reason=finish_reason(finish) if finish is not None else None)

    def _completion_count(self, finish: Finish) -> int:
        return 0 if self.score_only else finish.generated_tokens

    def response(self, choices: list[Choice]) -> Completion:
        out = []
        for choice in choices:
            finish = choice.finish
            prompt = self.prompts[choice.prompt_index] if self.echo else ""
            events = self._generated(choice.events)
            text = prompt + ("" if self.score_only else finish.generated_text)
            logprobs = None
            if self.logprobs is not None:
                logprobs, _ = self._logprobs(self._prompt_items(finish.prefill) if self.echo else [], 0)
                self._logprobs([(e.token, e.top_tokens, len(e.token.text)) for e in events], len(prompt),
                               into=logprobs)
            self.completion_tokens += self._completion_count(finish)
            out.append(CompletionChoice(index=choice.index, text=text, logprobs=logprobs,
                                        finish_reason=finish_reason(finish)))
        return Completion(id=self.id, object="text_completion", created=self.created, model=self.model,
                          system_fingerprint=self.fingerprint, choices=out, usage=self.usage())

    def chunks(self, index: int, prompt_index: int, event: TokenEvent) -> list[CompletionChunk]:
        """The chunks for one token: the echoed prompt first (with the first token), then the
        token's text."""
        chunks = []
        if index not in self._offsets:
            self._offsets[index] = 0
            if self.echo:
                prompt = self.prompts[prompt_index]
                logprobs = None
                if self.logprobs is not None:
                    logprobs, _ = self._logprobs(self._prompt_items(event.prefill), 0)
                self._offsets[index] = len(prompt)
                chunks.append(self._chunk([self._choice(index, prompt, logprobs, None)]))
        finish = event.finish
        if finish is not None:
            self.completion_tokens += self._completion_count(finish)
        if self.score_only:
            if finish is not None:
                chunks.append(self._chunk([self._choice(index, "", None, finish)]))
            return chunks
        logprobs = None
        if self.logprobs is not None:
            logprobs, self._offsets[index] = self._logprobs(
                [(event.token, event.top_tokens, len(event.token.text))], self._offsets[index])
        if event.text or logprobs is not None or finish is not None:
            chunks.append(self._chunk([self._choice(index, event.text, logprobs, finish)]))
        return chunks
