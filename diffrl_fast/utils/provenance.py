"""Where a result came from: the machine, the library versions and the code's commit, recorded in every result file
(benchmarks/, the built-in worlds' pretraining reports) so a figure can be traced to the code that produced it."""
from __future__ import annotations

import os
import platform
import subprocess
import time
from pathlib import Path

import torch

CHECKOUT = Path(__file__).resolve().parent.parent.parent  # the repository root when installed from a checkout


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo on Linux, else ``platform.processor()``)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def git_commit(root: Path = CHECKOUT) -> str:
    """The checkout's short commit, with ``-dirty`` when tracked files differ from it; "unknown" outside a checkout."""
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root, capture_output=True, text=True).stdout.strip()
        return out + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def machine_info(device: str, commit: str | None = None) -> dict:
    """The machine and versions of a run: device, platform, python, torch (and triton where installed), threads, CPU
    model, cores, the commit (``git_commit()`` unless given) and the date."""
    info = {
        "device": device,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "commit": commit if commit is not None else git_commit(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    return info
