"""ResNet backbones for SFC: output stride 16, frozen BatchNorm, frozen early stages (docs/method.md section 3)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval
from torchvision.models import resnet

BACKBONES = ("resnet_mini", "resnet18", "resnet34", "resnet50", "resnet101")
MINI_WIDTHS = (32, 64, 128, 128)  # stage1..stage4 of resnet_mini: one BasicBlock each
NORMS = ("frozen", "batch")
_BLOCKS = (resnet.BasicBlock, resnet.Bottleneck)  # the residual blocks of torchvision's ResNets


class FrozenBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm that always normalises with its running statistics (the reference's ``FixedBatchNorm``).

    The affine parameters stay ordinary parameters, so they are trained whenever their stage is trainable.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)


@dataclass(frozen=True)
class StageChannels:
    """Output channels of stage1..stage4 (stage0 is the stem)."""

    stage1: int
    stage2: int
    stage3: int
    stage4: int

    def as_tuple(self) -> tuple[int, int, int, int]:
        return (self.stage1, self.stage2, self.stage3, self.stage4)


class ResNetBackbone(nn.Module):
    """A torchvision ResNet cut into five stages with strides (2+2, 1, 2, 2, 1): output stride 16, no dilation.

    ``norm="frozen"`` (the reference) normalises with running statistics only; ``norm="batch"`` uses ordinary
    BatchNorm, which a randomly initialised backbone needs to train quickly (the CPU demo).
    Stages before ``trainable_from`` are frozen (no gradient, computed without autograd): with the default 3 the
    stem, layer1 and layer2 stay at their initial weights, which is what the reference's ``x2.detach()`` and
    ``requires_grad=False`` on conv1/bn1 amount to.
    """

    def __init__(self, name: str = "resnet50", trainable_from: int = 3, norm: str = "frozen"):
        super().__init__()
        if name not in BACKBONES:
            raise ValueError(f"unknown backbone {name!r}; allowed: {', '.join(BACKBONES)}")
        if norm not in NORMS:
            raise ValueError(f"unknown norm {norm!r}; allowed: {', '.join(NORMS)}")
        if not 0 <= trainable_from <= 4:
            raise ValueError(f"trainable_from must be in 0..4, got {trainable_from}")
        norm_layer = FrozenBatchNorm2d if norm == "frozen" else nn.BatchNorm2d
        net = resnet_mini(norm_layer) if name == "resnet_mini" else getattr(resnet, name)(weights=None,
                                                                                           norm_layer=norm_layer)
        _set_last_stage_stride_one(net.layer4)
        self.name = name
        self.trainable_from = trainable_from
        self.stage0 = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool)
        self.stage1, self.stage2, self.stage3, self.stage4 = net.layer1, net.layer2, net.layer3, net.layer4
        self.channels = StageChannels(*(block_out_channels(layer) for layer in (net.layer1, net.layer2, net.layer3,
                                                                                 net.layer4)))
        for stage in self.stages[:trainable_from]:
            stage.requires_grad_(False)

    @property
    def stages(self) -> list[nn.Sequential]:
        return [self.stage0, self.stage1, self.stage2, self.stage3, self.stage4]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Return the outputs of stage1..stage4 (strides 4, 8, 16, 16)."""
        outputs = []
        for index, stage in enumerate(self.stages):
            with torch.set_grad_enabled(torch.is_grad_enabled() and index >= self.trainable_from):
                x = stage(x)
            if index > 0:
                outputs.append(x)
        return outputs

    def load_torchvision_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Load a torchvision ResNet state dict (``conv1.*``, ``layer1.*`` ...; ``fc.*`` is ignored)."""
        renamed = {}
        for key, value in state.items():
            head, _, rest = key.partition(".")
            if head == "fc":
                continue
            if head in ("conv1", "bn1"):
                renamed[f"stage0.{'0' if head == 'conv1' else '1'}.{rest}"] = value
            elif head.startswith("layer") and head[5:].isdigit():
                renamed[f"stage{head[5:]}.{rest}"] = value
            else:
                raise KeyError(f"unexpected key {key!r} in a torchvision ResNet state dict")
        missing, unexpected = self.load_state_dict(renamed, strict=False)
        missing = [k for k in missing if not k.endswith("num_batches_tracked")]
        if missing or unexpected:
            raise KeyError(f"backbone {self.name}: missing keys {missing[:5]}, unexpected keys {unexpected[:5]}")


def resnet_mini(norm_layer: type[nn.Module] = nn.BatchNorm2d) -> resnet.ResNet:
    """A small torchvision-style ResNet for CPU runs: one BasicBlock per stage, widths :data:`MINI_WIDTHS` and a 3x3
    stem. As SFC's backbone a training step takes about a tenth of ResNet-18's on a 2-core CPU (docs/demo.md). The
    module names (conv1, bn1, layer1..4, fc) are torchvision's, so its weights load and save as a torchvision-format
    state dict.
    """
    net = resnet.ResNet(resnet.BasicBlock, [1, 1, 1, 1], norm_layer=norm_layer)
    net.conv1 = nn.Conv2d(3, MINI_WIDTHS[0], 3, stride=2, padding=1, bias=False)
    net.bn1 = norm_layer(MINI_WIDTHS[0])
    in_channels = MINI_WIDTHS[0]
    for index, (width, stride) in enumerate(zip(MINI_WIDTHS, (1, 2, 2, 2)), start=1):
        downsample = None
        if stride != 1 or in_channels != width:
            downsample = nn.Sequential(nn.Conv2d(in_channels, width, 1, stride=stride, bias=False), norm_layer(width))
        block = resnet.BasicBlock(in_channels, width, stride, downsample, norm_layer=norm_layer)
        setattr(net, f"layer{index}", nn.Sequential(block))
        in_channels = width
    net.fc = nn.Linear(in_channels, 1000)
    for module in net.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
    return net


def block_out_channels(layer: nn.Sequential) -> int:
    """Output channels of a ResNet stage (its last block's last BatchNorm)."""
    last = layer[-1]
    assert isinstance(last, _BLOCKS), last
    return (last.bn3 if isinstance(last, resnet.Bottleneck) else last.bn2).num_features


def fold_batchnorm(backbone: ResNetBackbone) -> ResNetBackbone:
    """Fold every (conv, BatchNorm) pair into one conv with bias, for inference (BN must use running statistics:
    frozen BN, or any BN in eval mode). Same outputs up to float rounding, ~15% faster on CPU."""
    def fold_pair(parent: nn.Module, conv_name: str, bn_name: str) -> None:
        conv, bn = getattr(parent, conv_name), getattr(parent, bn_name)
        setattr(parent, conv_name, fuse_conv_bn_eval(conv, bn))
        setattr(parent, bn_name, nn.Identity())

    fold_pair(backbone.stage0, "0", "1")
    for stage in backbone.stages[1:]:
        for block in stage:
            assert isinstance(block, _BLOCKS), block
            for index in (1, 2, 3):
                if hasattr(block, f"bn{index}"):
                    fold_pair(block, f"conv{index}", f"bn{index}")
            if block.downsample is not None:
                fold_pair(block.downsample, "0", "1")
    return backbone


def _set_last_stage_stride_one(layer: nn.Sequential) -> None:
    block = layer[0]
    assert isinstance(block, _BLOCKS), block
    strided = block.conv2 if isinstance(block, resnet.Bottleneck) else block.conv1
    strided.stride = (1, 1)
    if block.downsample is not None:
        block.downsample[0].stride = (1, 1)
