"""Description of the machine and software a sweep ran on (recorded in every CSV row)."""

from __future__ import annotations

import datetime
import importlib.metadata
import os
import platform
import subprocess

import torch


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _ram_gb() -> float:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        return float("nan")


def _git_commit() -> str:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        sha = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=root,
                             capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=root, capture_output=True, text=True,
                               timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (sha or "unknown") + ("+dirty" if dirty else "")


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "none"


def environment(device: torch.device) -> dict:
    cpu = f"{_cpu_model()} ({os.cpu_count()} cores, {_ram_gb():.0f} GiB RAM)"
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        machine = f"{props.name} ({props.total_memory / 2**30:.0f} GiB); host {cpu}"
    else:
        machine = cpu
    return {
        "machine": machine,
        "device": device.type,
        "torch": torch.__version__,
        "triton": _version("triton"),
        "liger": _version("liger-kernel"),
        "python": platform.python_version(),
        "commit": _git_commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "torch_threads": torch.get_num_threads(),
        "load_average": " ".join(f"{x:.2f}" for x in os.getloadavg()),
    }


def machine_markdown(env: dict, command: str) -> str:
    lines = ["# Machine of these results", ""]
    lines += [f"- {k}: {v}" for k, v in env.items()]
    lines += ["", "Command:", "", "```", command, "```", ""]
    return "\n".join(lines)
