"""The router's tokenizer: `tokenizers.Tokenizer` plus the facts of tokenizer_config.json.

Encoding follows the model's own configuration the way its transformers tokenizer does:
`add_special_tokens=True` lets the post-processor decide which special tokens (BOS/EOS) wrap the
text. For Llama/Gemma tokenizer classes transformers rebuilds that post-processor at load time
from `add_bos_token` / `add_eos_token` (and TGI's router does the same, `create_post_processor`),
so a tokenizer.json that disagrees with tokenizer_config.json is corrected here too.

Large inputs are encoded off the event loop. `tokenizers.Tokenizer.encode` holds the GIL for
the whole call, so running it in a thread would still stall the loop; `encode_batch` releases
the GIL, so the offloaded path encodes a batch of one. Measured on this machine (SmolLM2's
byte-level BPE, mixed text): ~0.33 µs per character inline (1,000 chars ≈ 0.34 ms, 10,000 chars
≈ 3.5 ms), against ~65 µs for a thread round trip. Below OFFLOAD_CHARS the inline call costs
less than a thread hop costs and stalls the loop by well under a millisecond.

No transformers import here: this is on the request path.
"""

from __future__ import annotations

import asyncio
import functools
import json
import threading
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import tokenizers
from tokenizers.processors import TemplateProcessing

# Inputs longer than this (characters) are encoded on a worker thread.
OFFLOAD_CHARS = 1000

# transformers tokenizer classes whose fast tokenizer rebuilds its post-processor from
# add_bos_token / add_eos_token (LlamaTokenizerFast.update_post_processor and friends).
_BOS_EOS_CLASSES = frozenset({
    "LlamaTokenizer", "LlamaTokenizerFast", "CodeLlamaTokenizer", "CodeLlamaTokenizerFast",
    "GemmaTokenizer", "GemmaTokenizerFast",
})

# transformers' SPECIAL_TOKENS_ATTRIBUTES: `all_special_ids` (what TGI reports as `special`) is
# the ids of these plus `additional_special_tokens`, not every added token flagged special.
_SPECIAL_ROLES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


def _token_text(value: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or a serialized AddedToken."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def _load_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    data = json.loads(path.read_text(encoding="utf-8"))
    return data if isinstance(data, dict) else {}


def _pick_template(value: Any) -> str | None:
    """tokenizer_config's chat_template: a string, or a list of {name, template} (use "default")."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        for item in value:
            if isinstance(item, dict) and item.get("name") == "default":
                return item.get("template")
    return None


class Tokenizer:
    """Thread-safe for encode/decode (the Rust tokenizer is immutable once built)."""

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        *,
        bos_token: str | None = None,
        eos_token: str | None = None,
        chat_template: str | None = None,
        special_tokens: Iterable[str] = (),
        workers: int = 2,
        special_tokens_map: dict[str, Any] | None = None,
        chat_templates: dict[str, str] | None = None,
    ) -> None:
        self._backend = backend
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.chat_template = chat_template
        # transformers' `special_tokens_map` (passed to chat templates) and the named templates of
        # a tokenizer_config that lists several (e.g. "tool_use").
        self.special_tokens_map = dict(special_tokens_map or {})
        if not special_tokens_map:
            pairs = (("bos_token", bos_token), ("eos_token", eos_token))
            self.special_tokens_map.update({k: v for k, v in pairs if v is not None})
        self.chat_templates = dict(chat_templates or {})
        self.eos_token_id = backend.token_to_id(eos_token) if eos_token else None
        ids = (backend.token_to_id(token) for token in special_tokens)
        self.special_ids: frozenset[int] = frozenset(i for i in ids if i is not None)
        self._workers = max(1, workers)
        self._executor: ThreadPoolExecutor | None = None
        self._executor_lock = threading.Lock()

    # ----------------------------------------------------------------------------- loading

    @classmethod
    def from_folder(
        cls, path: str | Path, tokenizer_config_path: str | Path | None = None, *, workers: int = 2
    ) -> "Tokenizer":
        """Load tokenizer.json and the tokenizer_config facts from a model folder.

        `tokenizer_config_path` replaces the folder's tokenizer_config.json (TGI's
        `--tokenizer-config-path`); `workers` threads encode large inputs (TGI's
        `--validation-workers`).
        """
        folder = Path(path)
        tokenizer_file = folder / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise FileNotFoundError(f"no tokenizer.json in {folder}")
        backend = tokenizers.Tokenizer.from_file(str(tokenizer_file))
        config = _load_json(Path(tokenizer_config_path) if tokenizer_config_path else folder / "tokenizer_config.json")
        tokens_map = _load_json(folder / "special_tokens_map.json")

        def role(name: str) -> str | None:
            text = _token_text(config.get(name))
            return text if text is not None else _token_text(tokens_map.get(name))

        if config.get("tokenizer_class") in _BOS_EOS_CLASSES:
            processor = _bos_eos_post_processor(
                backend,
                bos=role("bos_token"),
                eos=role("eos_token"),
                add_bos=bool(config.get("add_bos_token", True)),
                add_eos=bool(config.get("add_eos_token", False)),
            )
            backend.post_processor = processor

        special = [text for name in _SPECIAL_ROLES if (text := role(name)) is not None]
        additional = config.get("additional_special_tokens") or tokens_map.get("additional_special_tokens") or []
        additional_texts = [text for item in additional if (text := _token_text(item)) is not None]
        special += additional_texts
        special_tokens_map: dict[str, Any] = {
            name: text for name in _SPECIAL_ROLES if (text := role(name)) is not None}
        if additional_texts:
            special_tokens_map["additional_special_tokens"] = additional_texts

        return cls(
            backend,
            bos_token=role("bos_token"),
            eos_token=role("eos_token"),
            chat_template=_load_chat_template(folder, config),
            special_tokens=special,
            workers=workers,
            special_tokens_map=special_tokens_map,
            chat_templates=_named_templates(folder, config),
        )

    # ---------------------------------------------------------------------------- encoding

    @property
    def backend(self) -> tokenizers.Tokenizer:
        return self._backend

    @property
    def vocab_size(self) -> int:
        return self._backend.get_vocab_size(with_added_tokens=True)

    @functools.cached_property
    def max_token_chars(self) -> int:
        """The longest vocabulary entry in characters. Raw entries are never shorter than the
        text they stand for (byte-level BPE spells one byte per character, WordPiece adds `##`)."""
        return max(map(len, self._backend.get_vocab(with_added_tokens=True)), default=1)

    def min_num_tokens(self, text: str) -> int:
        """A lower bound on len(encode(text)) that costs a string scan instead of a tokenization.

        Each token covers at most `max_token_chars` characters. Only non-whitespace characters
        are counted (some pre-tokenizers drop whitespace), and the bound is halved for
        normalizers that shrink text (NFKC composition, accent stripping)."""
        return sum(map(len, text.split())) // (2 * self.max_token_chars)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._backend.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_with_offsets(self, text: str, add_special_tokens: bool = True) -> list[tuple[int, int, int]]:
        """(id, start, stop) per token; start/stop are character offsets into `text` (special
        tokens added by the post-processor get (0, 0))."""
        encoding = self._backend.encode(text, add_special_tokens=add_special_tokens)
        return [(i, start, stop) for i, (start, stop) in zip(encoding.ids, encoding.offsets)]

    async def aencode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if len(text) <= OFFLOAD_CHARS:
            return self.encode(text, add_special_tokens)
        encoding = await self._encode_offloaded(text, add_special_tokens)
        return encoding.ids

    async def aencode_with_offsets(
        self, text: str, add_special_tokens: bool = True
    ) -> list[tuple[int, int, int]]:
        if len(text) <= OFFLOAD_CHARS:
            return self.encode_with_offsets(text, add_special_tokens)
        encoding = await self._encode_offloaded(text, add_special_tokens)
        return [(i, start, stop) for i, (start, stop) in zip(encoding.ids, encoding.offsets)]

    async def _encode_offloaded(self, text: str, add_special_tokens: bool) -> tokenizers.Encoding:
        loop = asyncio.get_running_loop()
        # encode_batch (not encode) releases the GIL while the Rust code runs.
        encode = functools.partial(self._backend.encode_batch, [text], add_special_tokens=add_special_tokens)
        batch = await loop.run_in_executor(self._get_executor(), encode)
        return batch[0]

    def _get_executor(self) -> ThreadPoolExecutor:
        if self._executor is None:
            with self._executor_lock:
                if self._executor is None:
                    self._executor = ThreadPoolExecutor(self._workers, thread_name_prefix="tokenizer")
        return self._executor

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None

    # ---------------------------------------------------------------------------- decoding

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return self._backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def is_special(self, token_id: int) -> bool:
        """Whether TGI would flag the token `special` (transformers' `all_special_ids`)."""
        return token_id in self.special_ids

    def token_to_id(self, token: str) -> int | None:
        return self._backend.token_to_id(token)


def _load_chat_template(folder: Path, config: dict[str, Any]) -> str | None:
    """chat_template.jinja > chat_template.json > tokenizer_config.json's `chat_template`
    (transformers' precedence: the standalone files override the config entry)."""
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    template = _pick_template(_load_json(folder / "chat_template.json").get("chat_template"))
    if template is not None:
        return template
    return _pick_template(config.get("chat_template"))


def _named_templates(folder: Path, config: dict[str, Any]) -> dict[str, str]:
    """Every named template of a config that lists several ({name, template} entries)."""
    standalone = _load_json(folder / "chat_template.json").get("chat_template")
    for value in (standalone, config.get("chat_template")):
        if isinstance(value, list):
            return {item["name"]: item["template"] for item in value
                    if isinstance(item, dict) and isinstance(item.get("name"), str)
                    and isinstance(item.get("template"), str)}
    return {}


def _bos_eos_post_processor(
    backend: tokenizers.Tokenizer, *, bos: str | None, eos: str | None, add_bos: bool, add_eos: bool
) -> TemplateProcessing:
    """LlamaTokenizerFast.update_post_processor / TGI's create_post_processor."""
    if add_bos and bos is None:
        raise ValueError("add_bos_token = true but bos_token is None")
    if add_eos and eos is None:
        raise ValueError("add_eos_token = true but eos_token is None")
    single: list[str] = []
    pair: list[str] = []
    special: list[tuple[str, int]] = []
    for token, wanted in ((bos, add_bos), (eos, add_eos)):
        if wanted:
            token_id = backend.token_to_id(token)
            if token_id is None:
                raise ValueError(f"special token {token!r} is not in the vocabulary")
            special.append((token, token_id))
    if add_bos:
        single.append(f"{bos}:0")
        pair.append(f"{bos}:0")
    single.append("$A:0")
    pair.append("$A:0")
    if add_eos:
        single.append(f"{eos}:0")
        pair.append(f"{eos}:0")
    if add_bos:
        pair.append(f"{bos}:1")
    pair.append("$B:1")
    if add_eos:
        pair.append(f"{eos}:1")
    return TemplateProcessing(single=single, pair=pair, special_tokens=special)
