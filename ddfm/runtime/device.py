"""One device vocabulary for every command: ``auto`` (the default), ``cpu``, ``cuda``, ``cuda:N``, ``mps``.

``auto`` takes CUDA when torch sees a GPU, then Apple's MPS, else the CPU. Under ``torchrun``
a bare ``cuda`` (or ``auto`` on a GPU machine) becomes ``cuda:LOCAL_RANK``, so each rank of one
job takes its own GPU. A device this torch cannot use is an error that names the flag, not a
crash deep inside a stage.
"""

from __future__ import annotations

import os
import re

DEVICE_HELP = "torch device: auto (cuda if available, then mps, else cpu), cpu, cuda, cuda:N or mps"
_SPELLING = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


def check_device(device: str, flag: str = "--device") -> str:
    """Validate the spelling of a device (no torch import: configs call this in ``__post_init__``)."""
    if not isinstance(device, str) or not _SPELLING.match(device):
        raise ValueError(f"{flag} must be auto, cpu, cuda, cuda:N or mps, got {device!r}")
    return device


def resolve_device(device: str = "auto", flag: str = "--device") -> str:
    """The torch device string a stage runs on, checked against what this torch can use."""
    import torch

    check_device(device, flag)
    if device == "auto":
        if torch.cuda.is_available():
            device = "cuda"
        elif _mps_available(torch):
            device = "mps"
        else:
            device = "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(f"{flag} {device!r}: this torch has no usable CUDA; use --device cpu "
                             "(or install a CUDA build of torch)")
        index = int(device.split(":")[1]) if ":" in device else int(os.environ.get("LOCAL_RANK", "0"))
        if index >= torch.cuda.device_count():
            raise ValueError(f"{flag} {device!r}: only {torch.cuda.device_count()} CUDA device(s) visible")
        return f"cuda:{index}" if (":" in device or "LOCAL_RANK" in os.environ) else "cuda"
    if device == "mps" and not _mps_available(torch):
        raise ValueError(f"{flag} 'mps': this torch has no usable MPS backend; use --device cpu")
    return device


def _mps_available(torch) -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())
