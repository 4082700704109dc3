"""Facts about the machine and the software a result was measured with, for reports and summaries."""

from __future__ import annotations

import contextlib
import importlib
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from . import __version__


def versions(*extra: str) -> dict[str, str]:
    """Versions of the libraries that shaped a result: the runtime's and ``extra`` modules where installed,
    torch and tensorrt where loaded; plus the machine."""
    out = {"embedseg_deploy": __version__, "python": platform.python_version()}
    for name in ("numpy", "onnxruntime", "tifffile", "numba", "scipy", *extra, "tensorrt", "torch"):
        mod = sys.modules.get(name)
        if mod is None and name not in ("tensorrt", "torch"):
            with contextlib.suppress(ImportError):
                mod = importlib.import_module(name)
        if mod is not None:
            out[name] = str(getattr(mod, "__version__", "?"))
    out["machine"] = f"{platform.system()} {platform.machine()} ({os.cpu_count()} cpus)"
    return out


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def gpu_status() -> tuple[list[str], str | None]:
    """(GPU names, None) or ([], why there is none)."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        dev = "present" if Path("/dev/nvidia0").exists() else "absent"
        return [], f"no NVIDIA GPU found: nvidia-smi is not installed and /dev/nvidia0 is {dev}"
    try:
        out = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError) as exc:
        return [], f"nvidia-smi failed: {exc}"
    names = [line.strip() for line in out.stdout.splitlines() if line.strip().startswith("GPU")]
    if out.returncode or not names:
        return [], f"nvidia-smi lists no GPU ({(out.stderr or out.stdout).strip()[:200]})"
    return names, None


def machine_info() -> dict[str, Any]:
    """Host, CPU model and count, memory, GPUs, load average: what shaped the numbers."""
    mem = None
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem = round(int(line.split()[1]) / 2**20, 1)
    gpus, why = gpu_status()
    return {
        "hostname": platform.node(),
        "platform": platform.platform(),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "affinity_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "memory_gib": mem,
        "gpus": gpus,
        "gpu_note": why,
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }


def package_versions() -> dict[str, str]:
    """embedseg_deploy's :func:`versions` plus onnx, torch and matplotlib when they are loaded."""
    out = versions()
    for name in ("onnx", "torch", "matplotlib"):
        mod = sys.modules.get(name)
        if mod is not None:
            out[name] = str(getattr(mod, "__version__", "?"))
    return out
