"""Device choice and the run's environment record."""

from __future__ import annotations

import platform
import sys

import torch


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` -> cuda if available, else mps, else cpu."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    return torch.device(name)


def environment(device: torch.device) -> dict:
    """Versions and hardware, for ``env.json``."""
    import flwr
    import numpy
    import torchvision

    import fedlt

    env = {
        "fedlt": fedlt.__version__, "python": sys.version.split()[0], "platform": platform.platform(),
        "torch": torch.__version__, "torchvision": torchvision.__version__, "flwr": flwr.__version__,
        "numpy": numpy.__version__, "device": str(device), "cpu_threads": torch.get_num_threads(),
    }
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        env["cuda"] = torch.version.cuda
    return env
