"""Where a stage computes: the device and whether mixed precision is on."""
from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)


def resolve_device(name: str) -> torch.device:
    """``auto``: CUDA when available, else the CPU; any other name as torch reads it."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def amp_enabled(requested: bool, device: torch.device) -> bool:
    """Mixed precision where asked for and available (CUDA); elsewhere training stays in fp32, with a warning."""
    if requested and device.type != "cuda":
        log.warning("amp requested but the device is %s; training in fp32", device)
    return requested and device.type == "cuda"
