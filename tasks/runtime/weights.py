"""Weights a stage starts from: a torchvision ResNet file, this run's CAM network, or (segmentation) a
deeplab-pytorch checkpoint such as its COCO-pretrained initialisation.

:func:`fit_weights` checks a state dict against a network's keys and shapes without loading it (the dry run uses it
on a network built on the ``meta`` device); :func:`load_backbone_weights` and :func:`load_segmenter_weights` load.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TypeVar

import torch
from pydantic import BaseModel
from torch import nn

from models import deeplab_pytorch
from models.backbone import ResNetBackbone
from models.deeplab import DeepLab
from storage import checkpoints
from storage.errors import CheckpointError, ConfigError
from tasks.runtime.manifests import Inputs

CAM_WEIGHTS = "cam"  # a stage's ``weights``: the backbone of this run's CAM network (filled in by the flow)
WEIGHTS_FORMATS = ("torchvision", "deeplab-pytorch")
_SHOWN = 4  # keys named in an error


@dataclass
class FittedWeights:
    """A weights file renamed into a network's keys, checked against its shapes."""

    backbone: dict[str, torch.Tensor]
    head: dict[str, torch.Tensor]  # empty: the head keeps its random initialisation
    summary: str  # what the file is and what of it is used, for logs and the dry run


def _examples(keys: list[str]) -> str:
    return ", ".join(keys[:_SHOWN]) + (f" and {len(keys) - _SHOWN} more" if len(keys) > _SHOWN else "")


def _key_problems(missing: list[str], unexpected: list[str]) -> str:
    return "; ".join(f"{len(keys)} {label} keys ({_examples(keys)})" for label, keys in
                     (("missing", missing), ("unexpected", unexpected)) if keys)


def _check_shapes(url: str, given: dict[str, torch.Tensor], module: nn.Module, what: str) -> None:
    expected = module.state_dict()
    wrong = [f"{k} {tuple(v.shape)} (expected {tuple(expected[k].shape)})" for k, v in given.items()
             if k in expected and v.shape != expected[k].shape]
    if wrong:
        raise CheckpointError(f"{url}: {len(wrong)} tensors do not fit {what}: {_examples(wrong)}")


def _torchvision_or_cam(url: str, state: dict[str, torch.Tensor], backbone: ResNetBackbone) -> FittedWeights:
    if deeplab_pytorch.is_deeplab_pytorch(state):
        raise CheckpointError(f"{url}: a deeplab-pytorch (caffe ResNet) checkpoint where a torchvision-format "
                              f"ResNet is expected; for train_seg set weights_format: deeplab-pytorch")
    if any(key.startswith("backbone.") for key in state):
        renamed = {k.removeprefix("backbone."): v for k, v in state.items() if k.startswith("backbone.")}
        kind, theirs = "the backbone of a CAM checkpoint", lambda key: f"backbone.{key}"
    else:
        renamed = {}
        for key, value in state.items():
            if key.startswith("fc."):
                continue
            try:
                renamed[ResNetBackbone.from_torchvision_key(key)] = value
            except KeyError:
                raise CheckpointError(f"{url}: not a torchvision ResNet state dict (unexpected key {key!r})") \
                    from None
        kind, theirs = "a torchvision ResNet", ResNetBackbone.to_torchvision_key
    wanted = [k for k in backbone.state_dict() if not k.endswith("num_batches_tracked")]
    missing = [theirs(k) for k in wanted if k not in renamed]
    unexpected = [theirs(k) for k in renamed if k not in backbone.state_dict()]
    if missing or unexpected:
        raise CheckpointError(f"{url}: {kind} that does not fit {backbone.name}: "
                              f"{_key_problems(missing, unexpected)}")
    _check_shapes(url, renamed, backbone, backbone.name)
    return FittedWeights(renamed, {}, f"{kind}, loads into {backbone.name}")


def _deeplab_pytorch(url: str, state: dict[str, torch.Tensor], model: DeepLab) -> FittedWeights:
    backbone = model.backbone
    if not deeplab_pytorch.is_deeplab_pytorch(state):
        raise CheckpointError(f"{url}: weights_format is deeplab-pytorch, but the file lacks its keys "
                              f"(layer1.conv1.conv.weight); a torchvision-format file needs weights_format: "
                              f"torchvision")
    split = deeplab_pytorch.split_state(state, list(backbone.state_dict()))
    if split.missing or split.unexpected:
        blocks = deeplab_pytorch.file_blocks(state)
        arch = deeplab_pytorch.BLOCKS.get(blocks, f"a ResNet with {blocks} blocks in layer2..5")
        raise CheckpointError(f"{url}: a deeplab-pytorch checkpoint of {arch} that does not fit {backbone.name}: "
                              f"{_key_problems(split.missing, split.unexpected)}")
    _check_shapes(url, split.backbone, backbone, backbone.name)
    head_state = model.head.state_dict()
    fits = set(split.head) == set(head_state) and all(v.shape == head_state[k].shape for k, v in split.head.items())
    if fits:
        return FittedWeights(split.backbone, split.head, f"deeplab-pytorch {backbone.name}, backbone and ASPP head")
    classes = {v.shape[0] for k, v in split.head.items() if k.endswith("weight")}
    found = f"its ASPP ({len(split.head) // 2} convs, {'/'.join(map(str, sorted(classes)))} classes)" \
        if split.head else "no ASPP head in the file"
    return FittedWeights(split.backbone, {}, f"deeplab-pytorch {backbone.name} backbone; {found} not used, head "
                                             f"initialised at random")


def fit_weights(url: str, state: dict[str, torch.Tensor], model: nn.Module, weights_format: str = "torchvision",
                ) -> FittedWeights:
    """``state`` renamed into ``model``'s keys (a ResNetBackbone, or a DeepLab for the segmenter's formats), or a
    :class:`CheckpointError` naming the missing, unexpected and misshapen keys."""
    if weights_format not in WEIGHTS_FORMATS:
        raise ConfigError(f"unknown weights_format {weights_format!r}; allowed: {', '.join(WEIGHTS_FORMATS)}")
    if weights_format == "deeplab-pytorch":
        if not isinstance(model, DeepLab):
            raise ConfigError("weights_format deeplab-pytorch is for train_seg's segmenter only")
        return _deeplab_pytorch(url, state, model)
    backbone = model.backbone if isinstance(model, DeepLab) else model
    assert isinstance(backbone, ResNetBackbone), type(model)
    return _torchvision_or_cam(url, state, backbone)


def _load(model: nn.Module, fitted: FittedWeights) -> None:
    backbone = model.backbone if isinstance(model, DeepLab) else model
    assert isinstance(backbone, ResNetBackbone)
    backbone.load_state_dict(fitted.backbone, strict=False)  # only num_batches_tracked may be absent
    if fitted.head:
        assert isinstance(model, DeepLab)
        model.head.load_state_dict(fitted.head)


def load_backbone_weights(backbone: ResNetBackbone, url: str) -> str:
    """Load a torchvision ResNet state dict, or the backbone of a CAM checkpoint (keys ``backbone.*``); returns
    what was loaded."""
    fitted = fit_weights(url, checkpoints.load_pretrained(url), backbone)
    _load(backbone, fitted)
    return fitted.summary


def load_segmenter_weights(model: DeepLab, url: str, weights_format: str) -> str:
    """Load the segmenter's initialisation in ``weights_format``; returns what was loaded."""
    fitted = fit_weights(url, checkpoints.load_pretrained(url), model, weights_format)
    _load(model, fitted)
    return fitted.summary


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
