"""Device choice and the run's environment record."""

from __future__ import annotations

import platform
import resource
import sys

import torch

from fedlt.errors import FedLTError


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` -> cuda if available, else mps, else cpu."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    return torch.device(name)


def host_to_device(t: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """``t`` on ``device`` without the host waiting for the device. A copy from pageable host memory to a CUDA
    device waits for the stream's queued work (``memcpy_and_sync``), so the host could not queue the next
    training step while the device runs this one; from pinned memory, non-blocking, it is queued like a kernel
    (PyTorch's caching host allocator keeps the pinned block until the copy has run). A tensor already on a
    CUDA device, and any copy elsewhere: a plain ``t.to(device)``."""
    device = torch.device(device)
    if device.type != "cuda" or t.device.type != "cpu":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def check_device(name: str) -> None:
    """A one-line :class:`FedLTError` unless the device ``name`` (config key ``device``) is on this machine:
    checked before any data is built or run directory made (torch would fail mid-run)."""
    if name in ("auto", "cpu"):
        return
    if name == "mps":
        if getattr(torch.backends, "mps", None) is None or not torch.backends.mps.is_available():
            raise FedLTError("device=mps, but this machine has no MPS device: use device=auto or device=cpu")
        return
    if not torch.cuda.is_available():
        raise FedLTError(f"device={name}, but this machine has no CUDA device (torch {torch.__version__}): use "
                         f"device=auto or device=cpu")
    count, index = torch.cuda.device_count(), int(name.partition(":")[2] or 0)
    if index >= count:
        raise FedLTError(f"device={name}, but this machine has {count} CUDA device(s): cuda:0 to cuda:{count - 1}")


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


def peak_memory(device: torch.device) -> dict:
    """Memory used at peak by this process so far, in MiB: on CUDA the tensors' peak
    (``torch.cuda.max_memory_allocated``), elsewhere the process's peak resident set size
    (``resource.getrusage(RUSAGE_SELF).ru_maxrss``: KiB on Linux, bytes on macOS). Under Flower's simulation
    engine this is the server's process; the clients' Ray actors are other processes and not counted."""
    if device.type == "cuda":
        return {"peak_memory_mib": torch.cuda.max_memory_allocated(device) / 2**20,
                "peak_memory_of": "cuda max_memory_allocated"}
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"peak_memory_mib": rss / (2**20 if sys.platform == "darwin" else 2**10),
            "peak_memory_of": "process peak RSS"}
