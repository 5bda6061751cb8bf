"""How requests name a LoRA adapter: the one rule for the native `adapter_id` and the OpenAI
`model` field.

The shards load the adapters (`--lora-adapters`, shard/lora.py) and report their ids in
`Info.adapter_ids`; the router only maps names to those ids. The base model is named by nothing,
by its own id (the router's `--model-id`) or by `tgi` (TGI's placeholder that clients send).
"""

from __future__ import annotations

from dataclasses import dataclass

from pytgi_common.adapters import RESERVED_IDS


@dataclass(frozen=True, slots=True)
class Adapters:
    base_model_id: str
    ids: tuple[str, ...] = ()  # Info.adapter_ids, in launch order

    def resolve(self, name: str | None) -> str | None:
        """The adapter id to run `name` with: "" for the base model, None when nothing loaded has
        that name."""
        if name is None or name.lower() in RESERVED_IDS or name == self.base_model_id:
            return ""
        return name if name in self.ids else None

    def unknown(self, name: str) -> str:
        """The end of an error message for a name that resolves to nothing."""
        loaded = ", ".join(f"`{i}`" for i in self.ids) or "none"
        return (f"`{name}` is neither the base model (`{self.base_model_id}`) nor a loaded LoRA adapter "
                f"(loaded: {loaded})")
