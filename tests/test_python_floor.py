"""The Python floor that pyproject (and the README) claim is true: vermin finds no standard-library
API or syntax newer than it in the packages pip installs (e.g. asyncio.timeout is 3.11's)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_code_needs_no_newer_python_than_requires_python():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    floor = re.fullmatch(r">=\s*(\d+\.\d+)", project["project"]["requires-python"]).group(1)
    assert f"Python {floor}+" in (ROOT / "README.md").read_text()
    included = project["tool"]["setuptools"]["packages"]["find"]["include"]  # what pip installs
    packages = [pattern.rstrip("*") for pattern in included]
    folders = [str(ROOT / name) for name in packages if (ROOT / name).is_dir()]
    vermin = os.path.join(os.path.dirname(sys.executable), "vermin")  # the test extra's console script
    result = subprocess.run([vermin, "--no-tips", "--no-parse-comments", "--violations", f"-t={floor}-",
                             *folders], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    analyzed = re.search(r"Analyzing (\d+) files", result.stdout)
    assert analyzed and int(analyzed.group(1)) > 50, result.stdout  # it did look at the code
