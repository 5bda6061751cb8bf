"""`--lora-adapters` parsing (pytgi_common/adapters.py): TGI's `id[=path][@revision]` list."""

from __future__ import annotations

import pytest

from pytgi_common.adapters import AdapterSpec, AdapterSpecError, parse_lora_adapters


def test_empty_means_no_adapters():
    assert parse_lora_adapters(None) == () and parse_lora_adapters("") == () and parse_lora_adapters("  ") == ()


def test_hub_ids_revisions_and_local_paths():
    assert parse_lora_adapters("org/a, org/b@v2 ,c=/data/c,d=org/repo@main") == (
        AdapterSpec("org/a", "org/a"),
        AdapterSpec("org/b", "org/b", "v2"),
        AdapterSpec("c", "/data/c"),
        AdapterSpec("d", "org/repo", "main"),
    )
    assert parse_lora_adapters(" x = ./rel/path ") == (AdapterSpec("x", "./rel/path"),)


@pytest.mark.parametrize("text", [
    "a,,b", "a,", "=path", "a=", "a@", "a=b=c", "a@b@c", "a= @v1", "a=p@ ", " @v", "a=p@r=q",
])
def test_malformed_entries_are_one_line(text):
    with pytest.raises(AdapterSpecError, match=r"^Invalid LoRA adapter format: '") as excinfo:
        parse_lora_adapters(text)
    assert "\n" not in str(excinfo.value)


@pytest.mark.parametrize("text", ["tgi", "TGI=/p", "org/a,tgi@v1"])
def test_reserved_ids(text):
    with pytest.raises(AdapterSpecError, match="reserved for the base model"):
        parse_lora_adapters(text)


def test_the_served_models_id_names_the_base_model_only():
    with pytest.raises(AdapterSpecError, match=r"^LoRA adapter id 'org/m' is the served model's id"):
        parse_lora_adapters("org/m=/p", base_model_id="org/m")
    assert parse_lora_adapters("org/m=/p", base_model_id="org/other")[0].id == "org/m"


def test_duplicate_ids():
    with pytest.raises(AdapterSpecError, match="LoRA adapter id 'a' is given twice"):
        parse_lora_adapters("a=/x,a=/y")
