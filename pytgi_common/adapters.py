"""`--lora-adapters` / `LORA_ADAPTERS`: the one parser, used by the launcher (to refuse a bad list
before anything starts) and by the shards (to load it). Torch-free.

TGI's syntax: a comma-separated list of `id[=path][@revision]`.
- `org/name`, `org/name@revision`: a hub adapter (read from the local HF cache when offline, as
  for base models); requests name it `org/name`.
- `name=/local/path` (or `name=org/repo@revision`): requests name it `name`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# What requests use to mean "no adapter": TGI's placeholder model name. The base model's own id
# means the same (router/adapters.py); neither can name an adapter.
RESERVED_IDS = frozenset({"", "tgi"})

_SPEC = re.compile(r"^([^=@]+)(?:=([^@]+))?(?:@(.+))?$")


class AdapterSpecError(ValueError):
    pass


@dataclass(frozen=True, slots=True)
class AdapterSpec:
    id: str  # the name requests use (`adapter_id`, the OpenAI `model` field)
    source: str  # a local folder or a hub repository id
    revision: str | None = None


def parse_lora_adapters(text: str | None, base_model_id: str | None = None) -> tuple[AdapterSpec, ...]:
    """Empty or None: no adapters. Raises AdapterSpecError with a one-line message. An adapter may
    not take the served model's id (`base_model_id`, where known): requests naming it get the base
    model (router/adapters.py)."""
    if not text or not text.strip():
        return ()
    specs: list[AdapterSpec] = []
    for item in (part.strip() for part in text.split(",")):
        match = _SPEC.match(item) if item.count("=") <= 1 and item.count("@") <= 1 else None
        # A part given but blank (`a= /p`, `a@ `) is as malformed as a missing one.
        parts = None if match is None else [None if group is None else group.strip() for group in match.groups()]
        if parts is None or any(part == "" for part in parts):
            raise AdapterSpecError(f"Invalid LoRA adapter format: {item!r} (expected id, id@revision or id=path)")
        adapter_id, path, revision = parts
        if adapter_id.lower() in RESERVED_IDS:
            raise AdapterSpecError(f"Invalid LoRA adapter id {adapter_id!r}: it is reserved for the base model")
        if adapter_id == base_model_id:
            raise AdapterSpecError(f"LoRA adapter id {adapter_id!r} is the served model's id, which names the base "
                                   f"model: give the adapter its own name ({adapter_id}-lora=PATH)")
        if any(spec.id == adapter_id for spec in specs):
            raise AdapterSpecError(f"LoRA adapter id {adapter_id!r} is given twice")
        specs.append(AdapterSpec(adapter_id, path or adapter_id, revision))
    return tuple(specs)

