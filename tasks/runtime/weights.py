"""Backbone weights a stage starts from: a torchvision ResNet file, or this run's CAM network."""
from __future__ import annotations

from typing import TypeVar

from pydantic import BaseModel

from models.backbone import ResNetBackbone
from storage import checkpoints
from storage.errors import CheckpointError, ConfigError
from tasks.runtime.manifests import Inputs

CAM_WEIGHTS = "cam"  # a stage's ``weights``: the backbone of this run's CAM network (filled in by the flow)


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
        raise CheckpointError(f"{url}: its backbone does not fit {backbone.name} ({str(err).splitlines()[0]})") from err


def unresolved_cam_weights(stage: str, url: str | None) -> None:
    """Fail clearly when a stage runs outside the flow with ``weights: cam``."""
    if url == CAM_WEIGHTS:
        raise ConfigError(f"{stage}.weights 'cam' is resolved by the pipeline flow; outside it give the path of the "
                          f"CAM checkpoint")


Section = TypeVar("Section", bound=BaseModel)


def resolve_cam_weights(section: Section, inputs: Inputs) -> Section:
    """``weights: cam`` takes the backbone of this run's trained CAM network (runs without ImageNet weights, such as
    the synthetic demo): IRN's frozen backbone, the segmenter's initialisation."""
    if getattr(section, "weights", None) != CAM_WEIGHTS:
        return section
    return section.model_copy(update={"weights": inputs["train_cam"]["checkpoint"]})
