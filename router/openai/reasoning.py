"""Reasoning parsers: a thinking model's `<think>…</think>` section → `reasoning_content`.

Models whose chat template emits `<think>` (Qwen3, DeepSeek-R1 distills, SmolLM3) write their
reasoning first, then `</think>`, then the answer. `ReasoningStream` splits the generated text as
it comes: what precedes `</think>` is reasoning, what follows is content. The output is inside the
reasoning from its first character when the prompt ends with an open `<think>` (templates that
put it in the generation prompt), or when it opens with `<think>` itself; otherwise it is all
content (e.g. Qwen3 with `enable_thinking: false`, whose prompt ends with an empty, closed
`<think>\n\n</think>`). A generation cut before `</think>` (max_tokens) is all reasoning.

Streaming holds back text that may be the start of a tag, so a tag split across tokens never
leaks into either field; leading whitespace of each part is dropped (the template's newlines
around the tags). `split_reasoning` runs the same parser over a whole text: streamed and
non-streamed responses agree.
"""

from __future__ import annotations

from dataclasses import dataclass

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"
# --reasoning-parser values: "auto" detects from the chat template; the names are vLLM's.
PARSERS = ("think", "deepseek_r1", "qwen3")
CHOICES = ("auto", "none", *PARSERS)


def resolve(option: str, template: str | None) -> bool:
    """Whether `--reasoning-parser option` parses reasoning, for a model with this chat template
    (all of its named templates joined, when it has several)."""
    if option == "none":
        return False
    if option == "auto":
        return bool(template) and THINK_OPEN in template and THINK_CLOSE in template
    assert option in PARSERS, option
    return True


def starts_inside(prompt: str) -> bool:
    """Whether generation starts inside the reasoning: the prompt ends with an open `<think>`."""
    return prompt.rstrip().endswith(THINK_OPEN)


@dataclass(slots=True)
class Split:
    reasoning: str = ""
    content: str = ""


class ReasoningStream:
    """Feeds of generated text → (reasoning, content) increments."""

    def __init__(self, inside: bool = False) -> None:
        # "start": before the first non-space character (an optional `<think>`); "reasoning"; "content".
        self._state = "reasoning" if inside else "start"
        self._held = ""
        self._skip_space = True  # drop whitespace at the start of the current part
        self.has_reasoning = inside

    def feed(self, text: str) -> Split:
        out = Split()
        self._held += text
        while self._held:
            if self._state == "start":
                stripped = self._held.lstrip()
                if not stripped or (len(stripped) < len(THINK_OPEN) and THINK_OPEN.startswith(stripped)):
                    break  # maybe `<think>`: wait
                if stripped.startswith(THINK_OPEN):
                    self._held = stripped[len(THINK_OPEN):]
                    self._state, self._skip_space, self.has_reasoning = "reasoning", True, True
                else:
                    self._state, self._skip_space = "content", False
            elif self._state == "reasoning":
                if self._skip_space:
                    self._held = self._held.lstrip()
                    if not self._held:
                        break
                    self._skip_space = False
                end = self._held.find(THINK_CLOSE)
                if end >= 0:
                    out.reasoning += self._held[:end]
                    self._held = self._held[end + len(THINK_CLOSE):]
                    self._state, self._skip_space = "content", True
                    continue
                keep = _partial_suffix(self._held, THINK_CLOSE)
                out.reasoning += self._held[:len(self._held) - keep]
                self._held = self._held[len(self._held) - keep:]
                break
            else:
                if self._skip_space:
                    self._held = self._held.lstrip()
                    if not self._held:
                        break
                    self._skip_space = False
                out.content += self._held
                self._held = ""
        return out

    def finish(self) -> Split:
        """The text held back at the end of the generation."""
        held, self._held = self._held, ""  # only "start" and "reasoning" hold text back
        return Split(reasoning=held) if self._state == "reasoning" else Split(content=held)


def split_reasoning(text: str, inside: bool = False) -> tuple[str | None, str]:
    """A whole generation → (reasoning, or None when there is none, content)."""
    stream = ReasoningStream(inside)
    first, last = stream.feed(text), stream.finish()
    reasoning = first.reasoning + last.reasoning
    return (reasoning if stream.has_reasoning else None), first.content + last.content


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `tag`."""
    for size in range(min(len(text), len(tag) - 1), 0, -1):
        if tag.startswith(text[-size:]):
            return size
    return 0
