"""LoRA adapters (`--lora-adapters`): read a PEFT adapter folder, check that pytgi applies it
exactly as PEFT would, and check that it fits the base model.

An adapter is `adapter_config.json` + `adapter_model.safetensors` as PEFT's `save_pretrained`
writes them. What it changes is read from the tensors themselves (`base_model.model.<module>.
lora_A.weight` / `lora_B.weight`), so `target_modules` given as a list, a regex or "all-linear",
and `layers_to_transform`, need no matching of our own: the file holds exactly the modules PEFT
adapted. The config gives each module's rank and alpha (`rank_pattern` / `alpha_pattern`, matched
as PEFT matches them) and the scaling: alpha / r, or alpha / sqrt(r) with `use_rslora`.

Anything that would make PEFT compute something other than `W x + scale * B A x` on the seven
linear projections of a decoder layer is refused with one line naming the adapter (DoRA, biases,
embedding or LM-head targets, modules_to_save, ...): serving it silently without that part would
answer with a different model.

The tensors stay as the file has them (CPU, its dtype) and whole: each model layer takes its
tensor-parallel part and converts it to the activations' dtype (shard/layers/lora.py).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from pytgi_common.adapters import AdapterSpec
from shard.model_source import ADAPTER_CONFIG, ADAPTER_WEIGHTS, resolve_adapter

# The projections LoRA may target, with the sub-module of a decoder layer that holds each.
TARGETS = {
    "q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
    "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp",
}
_KEY = re.compile(r"^base_model\.model\.(model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+))\.lora_(A|B)\.weight$")

# adapter_config.json fields that change what PEFT computes beyond `W x + scale * B A x` on the
# targeted projections (or that adapt something else): refused when set. The value is the reason.
_REFUSED = {
    "use_dora": "DoRA (use_dora) rescales the adapted weight by a learned magnitude",
    "modules_to_save": "modules_to_save replaces whole modules with trained copies",
    "fan_in_fan_out": "fan_in_fan_out (Conv1D-style weights) is not a Llama-family layout",
    "layer_replication": "layer_replication changes the model's layer stack",
    "lora_bias": "lora_bias adds a bias to lora_B",
    "use_qalora": "QA-LoRA (use_qalora) pools the inputs of lora_A",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens) applies only after its invocation tokens",
    "trainable_token_indices": "trainable_token_indices changes embedding rows",
    "target_parameters": "target_parameters adapts raw parameters, not linear layers",
    "use_bdlora": "block-diagonal LoRA (use_bdlora)",
    "arrow_config": "Arrow routing (arrow_config) mixes several LoRAs per token",
    "kasa_config": "KaSA (kasa_config) adds a singular-value term",
    "velora_config": "VeLoRA (velora_config)",
    "monteclora_config": "MonteCLoRA (monteclora_config)",
}


class LoraAdapterError(ValueError):
    """One line for the user, naming the adapter (the shard's CLI prints it and exits 1)."""


@dataclass(frozen=True, slots=True)
class LoraModule:
    """One adapted projection: W x + scale * B (A x)."""

    key: str  # the file's tensor prefix, e.g. base_model.model.model.layers.0.self_attn.q_proj
    a: torch.Tensor  # lora_A [r, in_features]
    b: torch.Tensor  # lora_B [out_features, r]
    scale: float


@dataclass(frozen=True, slots=True)
class LoraAdapter:
    id: str  # the name requests use (`Request.adapter_id`)
    path: Path
    modules: Mapping[tuple[int, str], LoraModule]  # (layer, projection name) -> its LoRA

    def module(self, layer: int, name: str) -> LoraModule | None:
        return self.modules.get((layer, name))

    def describe(self) -> str:
        """One phrase for the start-up log: ranks and targets."""
        names = sorted({name for _, name in self.modules}, key=list(TARGETS).index)
        ranks = sorted({m.a.shape[0] for m in self.modules.values()})
        layers = len({layer for layer, _ in self.modules})
        return f"{self.id} (r={'/'.join(map(str, ranks))}, {','.join(names)} in {layers} layers, {self.path})"


def load_adapters(specs: tuple[AdapterSpec, ...], *, hub_cache_dir: Path | None, offline: bool,
                  progress: Callable[[str], None] = print) -> tuple[LoraAdapter, ...]:
    """Resolve and read every `--lora-adapters` entry, in the order given."""
    return tuple(read_adapter(spec.id, resolve_adapter(spec.source, revision=spec.revision, hub_cache_dir=hub_cache_dir,
                                                       offline=offline, progress=progress))
                 for spec in specs)


def read_adapter(adapter_id: str, folder: Path) -> LoraAdapter:
    """Read and check a PEFT LoRA folder (see the module docstring for what is refused)."""
    try:
        config = json.loads((folder / ADAPTER_CONFIG).read_text())
    except (OSError, ValueError) as error:
        raise LoraAdapterError(f"adapter {adapter_id}: cannot read {folder / ADAPTER_CONFIG} ({error})") from error
    if not isinstance(config, dict):
        raise LoraAdapterError(f"adapter {adapter_id}: {folder / ADAPTER_CONFIG} is not a JSON object")
    _check_config(adapter_id, config)
    tensors: dict[str, torch.Tensor] = {}
    try:
        with safe_open(folder / ADAPTER_WEIGHTS, framework="pt") as handle:
            for name in handle.keys():
                tensors[name] = handle.get_tensor(name)
    except Exception as error:  # safetensors' own error type (a truncated or foreign file) is not public
        raise LoraAdapterError(f"adapter {adapter_id}: cannot read {folder / ADAPTER_WEIGHTS} ({error})") from error
    pairs: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    keys: dict[tuple[int, str], str] = {}
    for name, tensor in tensors.items():
        match = _KEY.match(name)
        if match is None or TARGETS.get(match.group(4)) != match.group(3):
            raise LoraAdapterError(f"adapter {adapter_id}: {_foreign(name)}")
        module, layer, _, projection, which = match.groups()
        pairs.setdefault((int(layer), projection), {})[which] = tensor
        keys[(int(layer), projection)] = f"base_model.model.{module}"
    if not pairs:
        raise LoraAdapterError(f"adapter {adapter_id}: {folder / ADAPTER_WEIGHTS} holds no LoRA weights")
    modules = {}
    for (layer, projection), pair in sorted(pairs.items()):
        key = keys[(layer, projection)]
        if set(pair) != {"A", "B"}:
            missing = "lora_B" if "A" in pair else "lora_A"
            raise LoraAdapterError(f"adapter {adapter_id}: {key} has no {missing}.weight")
        a, b = pair["A"], pair["B"]
        module_name = key.removeprefix("base_model.model.")
        rank, alpha = _rank_and_alpha(config, module_name)
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != rank or b.shape[1] != rank:
            raise LoraAdapterError(
                f"adapter {adapter_id}: {key} has lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)}, "
                f"but adapter_config.json gives it rank {rank}")
        scale = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
        modules[(layer, projection)] = LoraModule(key, a, b, scale)
    return LoraAdapter(adapter_id, folder, modules)


def check_fit(adapter: LoraAdapter, shapes: Mapping[str, tuple[int, int]], num_layers: int) -> None:
    """Refuse an adapter made for another model: `shapes` is each projection's full weight shape
    (out_features, in_features) in the base model."""
    for (layer, name), module in adapter.modules.items():
        if layer >= num_layers:
            raise LoraAdapterError(f"adapter {adapter.id} does not fit the base model: {module.key} is in layer "
                                   f"{layer}, the model has {num_layers} layers")
        out_features, in_features = shapes[name]
        rank = module.a.shape[0]
        for which, tensor, expected in (("A", module.a, (rank, in_features)), ("B", module.b, (out_features, rank))):
            if tuple(tensor.shape) != expected:
                raise LoraAdapterError(f"adapter {adapter.id} does not fit the base model: {module.key}.lora_{which}"
                                       f".weight has shape {tuple(tensor.shape)}, expected {expected}")


def _check_config(adapter_id: str, config: dict) -> None:
    peft_type = config.get("peft_type")
    if peft_type != "LORA":
        raise LoraAdapterError(f"adapter {adapter_id}: peft_type {peft_type!r} is not supported; pytgi serves LORA "
                               "adapters only")
    for field, reason in _REFUSED.items():
        if config.get(field):
            raise LoraAdapterError(f"adapter {adapter_id}: {reason}; pytgi does not support it")
    bias = config.get("bias", "none")
    if bias != "none":
        raise LoraAdapterError(f"adapter {adapter_id}: bias={bias!r} trains the base model's biases; pytgi "
                               "supports bias=\"none\" only")
    targets = config.get("target_modules")
    # A regex or "all-linear" is checked through the tensors the file holds (read_adapter).
    if isinstance(targets, list):
        other = [t for t in targets if t.rsplit(".", 1)[-1] not in TARGETS]
        if other:
            raise LoraAdapterError(f"adapter {adapter_id} targets {', '.join(other)}; pytgi applies LoRA to "
                                   f"{', '.join(TARGETS)} only")
    for field in ("rank_pattern", "alpha_pattern"):
        pattern = config.get(field) or {}
        if not isinstance(pattern, dict) or not all(isinstance(v, (int, float)) for v in pattern.values()):
            raise LoraAdapterError(f"adapter {adapter_id}: {field} must map module patterns to numbers")


def _rank_and_alpha(config: dict, module_name: str) -> tuple[int, float]:
    """The module's rank and alpha: `rank_pattern` / `alpha_pattern` entries override `r` /
    `lora_alpha`, the first key that matches the end of the module's name winning, as in PEFT
    (`peft.utils.other.get_pattern_key`)."""
    rank = _pattern_value(config.get("rank_pattern") or {}, module_name, config.get("r", 8))
    alpha = _pattern_value(config.get("alpha_pattern") or {}, module_name, config.get("lora_alpha", 8))
    return int(rank), float(alpha)


def _pattern_value(pattern: dict, module_name: str, default):
    for key, value in pattern.items():
        if re.match(rf"(.*\.)?({key})$", module_name):
            return value
    return default


def _foreign(name: str) -> str:
    """Why a tensor that is not a LoRA weight of the seven projections is refused."""
    if "lora_magnitude_vector" in name:
        return f"{name} is a DoRA magnitude; pytgi does not support DoRA"
    for module in ("embed_tokens", "lm_head"):
        if module in name:
            return f"targets {module} ({name}); pytgi applies LoRA to {', '.join(TARGETS)} only"
    return f"{name} is not a LoRA weight of {', '.join(TARGETS)}; pytgi adapts those projections only"
