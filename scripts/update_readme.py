"""Regenerate the README's generated sections: the launcher flag table, and (with
`--bench FILE`) the benchmark table from `text-generation-benchmark --json-out FILE`."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from launcher.cli import flag_table

README = Path(__file__).resolve().parent.parent / "README.md"


def replace_section(text: str, name: str, body: str) -> str:
    pattern = re.compile(rf"(<!-- {name}:start[^>]*-->\n).*?(<!-- {name}:end -->)", re.S)
    if not pattern.search(text):
        raise SystemExit(f"README has no {name} markers")
    return pattern.sub(lambda m: m.group(1) + body.strip() + "\n" + m.group(2), text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--bench-table", type=Path, help="a text file holding the benchmark table to embed")
    args = parser.parse_args()
    text = replace_section(README.read_text(), "flag-table", flag_table())
    if args.bench_table:
        text = replace_section(text, "bench", "```\n" + args.bench_table.read_text().strip() + "\n```")
    README.write_text(text)


if __name__ == "__main__":
    main()
