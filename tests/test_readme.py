"""The README's flag table is the launcher CLI's own (regenerate it when this fails)."""

from __future__ import annotations

import re
from pathlib import Path

from launcher.cli import flag_table

README = Path(__file__).resolve().parent.parent / "README.md"


def readme_section(name: str) -> str:
    text = README.read_text()
    match = re.search(rf"<!-- {name}:start[^>]*-->\n(.*?)<!-- {name}:end -->", text, re.S)
    assert match, f"README has no {name} markers"
    return match.group(1).strip()


def test_flag_table_matches_the_cli():
    assert readme_section("flag-table") == flag_table().strip(), (
        "README flag table drifted from the CLI: run `python scripts/update_readme.py`"
    )
