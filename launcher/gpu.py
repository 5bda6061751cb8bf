"""Count visible CUDA devices without importing torch (the launcher must start fast).

Mirrors TGI's launcher: CUDA_VISIBLE_DEVICES, then NVIDIA_VISIBLE_DEVICES (where `all` means
"ask nvidia-smi" and `void`/`none` means no GPU), then `nvidia-smi -L`; no driver means 0.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Mapping


def count_visible_gpus(env: Mapping[str, str]) -> int:
    for var in ("CUDA_VISIBLE_DEVICES", "NVIDIA_VISIBLE_DEVICES"):
        value = env.get(var)
        if value is None:
            continue
        value = value.strip()
        if value.lower() == "all":
            return nvidia_smi_count(env)
        if value.lower() in {"", "void", "none", "nodevfiles"}:
            return 0
        return _count_device_list(value)
    return nvidia_smi_count(env)


def _count_device_list(value: str) -> int:
    """Entries of a comma list; like CUDA, stop at the first invalid entry (e.g. `-1`)."""
    count = 0
    for entry in value.split(","):
        entry = entry.strip()
        if not entry or entry.startswith("-"):
            break
        count += 1
    return count


def nvidia_smi_count(env: Mapping[str, str]) -> int:
    exe = shutil.which("nvidia-smi", path=env.get("PATH"))
    if exe is None:
        return 0
    try:
        result = subprocess.run([exe, "-L"], capture_output=True, text=True, timeout=15, check=False)
    except (OSError, subprocess.SubprocessError):
        return 0
    if result.returncode != 0:
        return 0
    return sum(1 for line in result.stdout.splitlines() if line.startswith("GPU "))
