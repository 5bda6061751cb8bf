"""Streaming detokenization and text-level stop sequences.

`IncrementalDetokenizer` turns one token id at a time into the text it adds, the way TGI's
`Model.decode_token` (and vLLM) do: decode a short window of ids with and without the new token and
emit the difference. Decoding a single token in isolation is wrong for byte-level BPE: an emoji or a
CJK character is often split over several tokens, each of which decodes alone to U+FFFD, and some
tokenizers change a token's leading space depending on what precedes it. A few tokens of context
(the prefix) fix the latter; holding the text back while it ends with U+FFFD fixes the former.

`StopSequenceMatcher` applies user stop strings to the streamed text. Stop strings are text, not
tokens, so they can start in one token's text and end in another's.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from tokenizers import Tokenizer

_REPLACEMENT = "\ufffd"
# Prompt tokens kept as decoding context before the first generated token (TGI and vLLM use 5).
_PROMPT_CONTEXT = 5


class IncrementalDetokenizer:
    """Per-request streaming decoder.

    Only the decoding context is kept (the ids of the last emitted text, then the ids not emitted
    yet): everything before it has been emitted and is no longer needed, so memory stays bounded
    by the tokens since the last emitted text.
    """

    __slots__ = ("_tokenizer", "_skip_special", "_ids", "_read_offset", "_prefix_text")

    def __init__(
        self, tokenizer: Tokenizer, prompt_ids: Sequence[int], skip_special_tokens: bool = False
    ) -> None:
        self._tokenizer = tokenizer
        self._skip_special = skip_special_tokens
        context = list(prompt_ids[max(len(prompt_ids) - _PROMPT_CONTEXT, 0) :])
        self._ids: list[int] = context  # the decoding context, then the ids not emitted yet
        self._read_offset = len(context)  # first id whose text has not been emitted yet
        # decode(ids[:read]) only changes when the offset moves; caching it halves the decode
        # calls per token.
        self._prefix_text = self._decode(context)

    def add(self, token_id: int) -> str:
        """Text added by `token_id`, or "" while it cannot be emitted yet (incomplete UTF-8)."""
        self._ids.append(token_id)
        return self._advance(final=False)

    def flush(self) -> str:
        """Whatever is still held back (e.g. a dangling partial character) at the end of generation."""
        if self._read_offset == len(self._ids):
            return ""
        return self._advance(final=True)

    def _advance(self, final: bool) -> str:
        new_text = self._decode(self._ids)
        if len(new_text) <= len(self._prefix_text) or (not final and new_text.endswith(_REPLACEMENT)):
            # Nothing visible yet (a skipped special token) or a multi-byte character is still
            # incomplete: keep the offset so the next token is decoded together with this one.
            return ""
        piece = new_text[len(self._prefix_text) :]
        # The just-emitted tokens become the next context; drop ids that are no longer needed.
        del self._ids[: self._read_offset]
        self._read_offset = len(self._ids)
        self._prefix_text = self._decode(self._ids)
        return piece

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip_special) if ids else ""


@dataclass(slots=True)
class StopResult:
    text_to_emit: str
    stopped: bool
    matched: str | None


class StopSequenceMatcher:
    """Detects stop sequences in streamed text.

    include_stop=True (TGI): each piece is emitted whole, stop text included, and the matcher reports
    `stopped` as soon as a stop sequence appears in the text. Pieces are token texts and TGI's
    `generated_text` is the decode of all generated tokens, so the piece is not cut.

    include_stop=False (OpenAI): the output ends right before the stop sequence. A tail that could
    still grow into a stop sequence is held back until it either completes one (dropped) or cannot
    any more (emitted); `flush()` releases it when generation ends for another reason.

    When several stops match in one piece, the one that completes first (earliest end, then earliest
    start) wins, which is what feeding the text one character at a time would give: the result does
    not depend on how the text was split into pieces.
    """

    __slots__ = ("_stops", "_include_stop", "_keep", "_tail", "_held", "_stopped", "_matched")

    def __init__(self, stop: Sequence[str], include_stop: bool = True) -> None:
        self._stops = [s for s in dict.fromkeys(stop) if s]  # "" would match everything: ignore
        self._include_stop = include_stop
        # A match completing in the next piece starts at most max_len-1 chars before it.
        self._keep = max((len(s) for s in self._stops), default=1) - 1
        self._tail = ""  # last `_keep` chars of all text fed so far (bounded search window)
        self._held = 0  # OpenAI mode: how many chars at the end of `_tail` are not emitted yet
        self._stopped = False
        self._matched: str | None = None

    @property
    def stopped(self) -> bool:
        return self._stopped

    def feed(self, piece: str) -> StopResult:
        if self._stopped:
            return StopResult("", True, self._matched)
        if not self._stops:
            return StopResult(piece, False, None)
        window = self._tail + piece
        emit_from = len(self._tail) - self._held
        found = self._find(window, len(self._tail))
        if found is not None:
            start, stop = found
            self._stopped, self._matched = True, stop
            self._tail, self._held = "", 0
            text = piece if self._include_stop else window[emit_from:start]
            return StopResult(text, True, stop)
        hold = 0 if self._include_stop else self._partial_suffix(window)
        self._tail = window[max(len(window) - self._keep, 0) :] if self._keep else ""
        self._held = hold
        return StopResult(window[emit_from : len(window) - hold], False, None)

    def flush(self) -> str:
        """Held-back text (OpenAI mode) once generation ended for another reason than a stop."""
        if self._stopped or not self._held:
            return ""
        text = self._tail[len(self._tail) - self._held :]
        self._held = 0
        return text

    def _find(self, window: str, new_from: int) -> tuple[int, str] | None:
        """(start, stop) of the first stop to complete in `window[new_from:]`, else None."""
        best: tuple[int, int, str] | None = None  # (end, start, stop)
        for stop in self._stops:
            # Earlier matches, wholly inside the old tail, were already checked by earlier feeds.
            start = window.find(stop, max(new_from - len(stop) + 1, 0))
            if start < 0:
                continue
            candidate = (start + len(stop), start, stop)
            if best is None or candidate[:2] < best[:2]:
                best = candidate
        return None if best is None else (best[1], best[2])

    def _partial_suffix(self, window: str) -> int:
        """Length of the longest suffix of `window` that is a proper prefix of some stop sequence."""
        best = 0
        for stop in self._stops:
            for k in range(min(len(stop) - 1, len(window)), best, -1):
                if window.endswith(stop[:k]):
                    best = k
                    break
        return best
