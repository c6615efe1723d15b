"""The machine a result was measured on: device, CPU count, versions, date
and the exact command, recorded with every number the bench writes
(STYLE.md: "states the hardware and versions with every number"), and the
results folder's name (`bench/results/<device_slug>/`)."""
from __future__ import annotations

import datetime
import os
import platform
import re
import shlex
from pathlib import Path

import numpy as np
import torch


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def device_slug(device: torch.device) -> str:
    """'cpu-2core', 'nvidia-h100', 'nvidia-a100-sxm4': the results folder."""
    if device.type != "cuda":
        return f"cpu-{cpu_count()}core"
    words = re.split(r"[^a-z0-9]+", torch.cuda.get_device_name(device).lower())
    kept = []
    for w in words:
        if re.fullmatch(r"\d+gb", w) or w in ("pcie", "hbm3", "hbm2e", "nvl"):
            break  # memory size and packaging do not name the chip
        if w:
            kept.append(w)
    return "-".join(kept) or "cuda"


def versions() -> dict:
    out = {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__}
    for name, module in [("torchvision", "torchvision"), ("dali", "nvidia.dali"), ("numba", "numba"),
                         ("pillow", "PIL"), ("accimage", "accimage"), ("ffcv", "ffcv")]:
        try:
            out[name] = __import__(module, fromlist=["__version__"]).__version__
        except Exception:  # not installed, or no version
            out[name] = None
    return out


def environment(device: torch.device, argv: list, script: str = "bench/throughput.py") -> dict:
    return {
        "device": str(device), "device_name": device_name(device), "slug": device_slug(device),
        "cpu_count": cpu_count(), "cpu_model": device_name(torch.device("cpu")),
        "torch_threads": torch.get_num_threads(), "gpu_count": torch.cuda.device_count(),
        "versions": versions(), "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": f"python {script} " + " ".join(shlex.quote(a) for a in argv),
        "host": platform.node(),
    }
