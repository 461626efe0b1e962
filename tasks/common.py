"""Helpers every stage may use: device choice and settings hashes (a neutral module, so that a stage's code
version does not depend on another stage's module)."""
from __future__ import annotations

import hashlib
import logging

import torch
from pydantic import BaseModel

log = logging.getLogger(__name__)


def resolve_device(name: str) -> torch.device:
    """``auto``: CUDA when available, else the CPU; any other name as torch reads it."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def config_hash(cfg: BaseModel, *extra: str) -> str:
    """16 hex digits of the settings (and ``extra`` strings): equal hashes mean equal settings."""
    text = cfg.model_dump_json() + "".join(extra)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def amp_enabled(requested: bool, device: torch.device) -> bool:
    """Mixed precision where asked for and available (CUDA); elsewhere training stays in fp32, with a warning."""
    if requested and device.type != "cuda":
        log.warning("amp requested but the device is %s; training in fp32", device)
    return requested and device.type == "cuda"

