"""deeplab-pytorch's state-dict layout (kazuto1011/deeplab-pytorch, the segmentation code of SFC and its peers).

Its ``DeepLabV2`` is an ``nn.Sequential`` of ``layer1`` (the stem: ``conv1`` = conv + bn + relu, then max pooling),
``layer2``..``layer5`` (``block1``..``blockN`` Bottlenecks of ``reduce`` 1x1, ``conv3x3``, ``increase`` 1x1 and, in
each layer's first block, ``shortcut``; each a ``conv`` and a ``bn``) and ``aspp`` (``c0``..``c3``, 3x3 convolutions
with bias straight to class logits). Its MSC wrapper prefixes every key with ``base.``. The converted caffemodels,
the COCO-pretrained initialisation (``deeplabv1_resnet101-coco.pth``) and the VOC-trained models all have this
layout; they were trained as caffe ResNets (``ResNetBackbone(style="caffe")``).

:func:`split_state` renames such a state dict into a :class:`~models.backbone.ResNetBackbone`'s keys and a
:class:`~models.deeplab.ASPPv2`'s keys, and names what is missing or left over in the file's own names.
"""
from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass

import torch

# deeplab-pytorch's Bottleneck parts -> torchvision's (conv, bn) names
_PARTS = {"reduce": ("conv1", "bn1"), "conv3x3": ("conv2", "bn2"), "increase": ("conv3", "bn3"),
          "shortcut": ("downsample.0", "downsample.1")}
_OURS = {ours: (part, kind) for part, pair in _PARTS.items() for ours, kind in zip(pair, ("conv", "bn"))}
_BLOCK = re.compile(r"^layer([2-5])\.block(\d+)\.(\w+)\.(conv|bn)\.(\w+)$")
_HEAD = re.compile(r"^aspp\.c(\d+)\.(weight|bias)$")
_OUR_STEM = re.compile(r"^stage0\.([01])\.(\w+)$")
_OUR_BLOCK = re.compile(r"^stage([1-4])\.(\d+)\.(conv\d|bn\d|downsample\.[01])\.(\w+)$")
BLOCKS: dict[tuple[int, ...], str] = {(3, 4, 6, 3): "resnet50", (3, 4, 23, 3): "resnet101"}  # layer2..5


def is_deeplab_pytorch(state: dict[str, torch.Tensor]) -> bool:
    """Whether ``state`` has deeplab-pytorch's layout (its stem's convolution, with or without ``base.``)."""
    return any(k.removeprefix("base.") == "layer1.conv1.conv.weight" for k in state)


def deeplab_key(key: str) -> str:
    """deeplab-pytorch's name of a :class:`~models.backbone.ResNetBackbone` state-dict key."""
    if match := _OUR_STEM.match(key):
        return f"layer1.conv1.{'conv' if match.group(1) == '0' else 'bn'}.{match.group(2)}"
    if match := _OUR_BLOCK.match(key):
        stage, block, module, param = match.groups()
        part, kind = _OURS[module]
        return f"layer{int(stage) + 1}.block{int(block) + 1}.{part}.{kind}.{param}"
    raise KeyError(f"{key!r} is not a ResNet backbone key")


def file_blocks(state: dict[str, torch.Tensor]) -> tuple[int, ...]:
    """Bottlenecks per layer (layer2..layer5) in a deeplab-pytorch state dict."""
    counts: Counter[int] = Counter()
    for key in state:
        if (match := _BLOCK.match(key.removeprefix("base."))) and match.group(3) == "reduce" \
                and match.group(4) == "conv":
            counts[int(match.group(1))] += 1
    return tuple(counts[layer] for layer in range(2, 6))


@dataclass
class SplitState:
    """A deeplab-pytorch state dict in our names, and what did not fit (in the file's names)."""

    backbone: dict[str, torch.Tensor]
    head: dict[str, torch.Tensor]  # ASPPv2 keys: branches.<i>.weight / .bias
    missing: list[str]  # backbone keys the file lacks (deeplab-pytorch names)
    unexpected: list[str]  # file keys that are neither the backbone's nor the head's


def split_state(state: dict[str, torch.Tensor], backbone_keys: list[str]) -> SplitState:
    """Rename a deeplab-pytorch state dict into ``backbone_keys`` (a ResNetBackbone's state-dict keys) and ASPP
    head keys. BatchNorm's ``num_batches_tracked`` is optional (older conversions lack it)."""
    wanted = {deeplab_key(k): k for k in backbone_keys}
    backbone, head, unexpected = {}, {}, []
    for key, value in state.items():
        name = key.removeprefix("base.")
        if name in wanted:
            backbone[wanted[name]] = value
        elif match := _HEAD.match(name):
            head[f"branches.{match.group(1)}.{match.group(2)}"] = value
        elif not name.endswith("num_batches_tracked"):
            unexpected.append(key)
    present = {k.removeprefix("base.") for k in state}
    missing = [name for name in wanted if name not in present and not name.endswith("num_batches_tracked")]
    return SplitState(backbone, head, missing, unexpected)
