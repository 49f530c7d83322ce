"""The machine a figure came from: cores, load average, torch threads, GPU, source revision."""

from __future__ import annotations

import os
import platform
import subprocess
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def load_average() -> list[float]:
    """1, 5 and 15 minute load averages (empty where the OS has none)."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return []


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


def memory_total_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 1024 / 1024, 1)
    except OSError:
        pass
    return None


def git_revision(tree: Path = ROOT) -> str:
    """HEAD of ``tree`` plus ``+dirty`` when tracked files differ from it ('?' outside git)."""
    try:
        head = subprocess.run(["git", "-C", str(tree), "rev-parse", "--short=12", "HEAD"], capture_output=True,
                              text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(tree), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "?"
    return (head + ("+dirty" if dirty else "")) if head else "?"


def gpu_info() -> dict:
    """Whether torch sees CUDA, and which device."""
    try:
        import torch
    except ImportError:
        return {"available": False, "reason": "torch not importable"}
    if not torch.cuda.is_available():
        return {"available": False, "reason": "torch.cuda.is_available() is False (no GPU lent)"}
    return {"available": True, "name": torch.cuda.get_device_name(0), "count": torch.cuda.device_count(),
            "torch_cuda": torch.version.cuda}


def machine_info() -> dict:
    """Everything a reader needs to judge a figure from this machine."""
    import torch

    return {
        "hostname": platform.node(),
        "cpu_model": cpu_model(),
        "logical_cpus": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "memory_gib": memory_total_gib(),
        "load_average_at_start": load_average(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "gpu": gpu_info(),
        "source_revision": git_revision(),
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
