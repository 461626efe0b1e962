"""Helpers every stage may use: device choice, mixed precision, settings hashes and backbone weights (a neutral
module, so that a stage's code version does not depend on another stage's module)."""
from __future__ import annotations

import hashlib
import logging

import torch
from pydantic import BaseModel

from models.backbone import ResNetBackbone
from storage import checkpoints

log = logging.getLogger(__name__)

CAM_WEIGHTS = "cam"  # a stage's ``weights``: the backbone of this run's CAM network (filled in by the flow)


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


def load_backbone_weights(backbone: ResNetBackbone, url: str) -> None:
    """Load a torchvision ResNet state dict, or the backbone of a CAM checkpoint (keys ``backbone.*``)."""
    state = checkpoints.load_pretrained(url)
    if not any(key.startswith("backbone.") for key in state):
        backbone.load_torchvision_state_dict(state)
        return
    weights = {k.removeprefix("backbone."): v for k, v in state.items() if k.startswith("backbone.")}
    try:
        backbone.load_state_dict(weights)
    except RuntimeError as err:
        raise ValueError(f"{url}: its backbone does not fit {backbone.name} ({str(err).splitlines()[0]})") from err


def unresolved_cam_weights(stage: str, url: str | None) -> None:
    """Fail clearly when a stage runs outside the flow with ``weights: cam``."""
    if url == CAM_WEIGHTS:
        raise ValueError(f"{stage}.weights 'cam' is resolved by the pipeline flow; outside it give the path of the "
                         f"CAM checkpoint")
