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
STYLES = ("torchvision", "caffe")
# The normalisation every dataset applies (storage/transforms.py): RGB in [0, 1], ImageNet mean and std
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# The input of caffe-trained ResNets (DeepLab's caffemodels, deeplab-pytorch): BGR on 0..255 minus this RGB mean
CAFFE_MEAN = (122.675, 116.669, 104.008)
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


class CaffeInput(nn.Module):
    """The pipeline's normalised RGB input turned into the input of a caffe-trained ResNet: BGR on 0..255 minus
    :data:`CAFFE_MEAN` (exact, padding included, as the conversion happens before the first convolution)."""

    scale: torch.Tensor
    offset: torch.Tensor

    def __init__(self) -> None:
        super().__init__()
        std, mean = torch.tensor(IMAGENET_STD), torch.tensor(IMAGENET_MEAN)
        self.register_buffer("scale", (255 * std).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("offset", (255 * mean - torch.tensor(CAFFE_MEAN)).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x * self.scale + self.offset).flip(1)


class ResNetBackbone(nn.Module):
    """A torchvision ResNet cut into five stages with strides (2+2, 1, 2, 2, 1): output stride 16, no dilation.

    ``norm="frozen"`` (the reference) normalises with running statistics only; ``norm="batch"`` uses ordinary
    BatchNorm, which a randomly initialised backbone needs to train quickly (the CPU demo).
    Stages before ``trainable_from`` are frozen (no gradient, computed without autograd): with the default 3 the
    stem, layer1 and layer2 stay at their initial weights, which is what the reference's ``x2.detach()`` and
    ``requires_grad=False`` on conv1/bn1 amount to.
    ``style="caffe"`` is the ResNet of caffe-trained weights (DeepLab's caffemodels as deeplab-pytorch converts
    them): the stride of a stage's first Bottleneck on its first 1x1 convolution instead of the 3x3 one, the stem's
    max pooling rounding up (``ceil_mode``), and :class:`CaffeInput` before the stem. Its state dict has the same
    keys as the torchvision style.
    """

    def __init__(self, name: str = "resnet50", trainable_from: int = 3, norm: str = "frozen",
                 style: str = "torchvision"):
        super().__init__()
        if name not in BACKBONES:
            raise ValueError(f"unknown backbone {name!r}; allowed: {', '.join(BACKBONES)}")
        if norm not in NORMS:
            raise ValueError(f"unknown norm {norm!r}; allowed: {', '.join(NORMS)}")
        if not 0 <= trainable_from <= 4:
            raise ValueError(f"trainable_from must be in 0..4, got {trainable_from}")
        if style not in STYLES:
            raise ValueError(f"unknown style {style!r}; allowed: {', '.join(STYLES)}")
        if style == "caffe" and name not in ("resnet50", "resnet101"):
            raise ValueError(f"style 'caffe' is a Bottleneck ResNet (resnet50, resnet101), not {name}")
        norm_layer = FrozenBatchNorm2d if norm == "frozen" else nn.BatchNorm2d
        net = resnet_mini(norm_layer) if name == "resnet_mini" else getattr(resnet, name)(weights=None,
                                                                                           norm_layer=norm_layer)
        if style == "caffe":
            for layer in (net.layer2, net.layer3, net.layer4):
                layer[0].conv1.stride, layer[0].conv2.stride = layer[0].conv2.stride, (1, 1)
            net.maxpool.ceil_mode = True
        _set_last_stage_stride_one(net.layer4)
        self.name = name
        self.style = style
        self.trainable_from = trainable_from
        self.input_adapter: nn.Module = CaffeInput() if style == "caffe" else nn.Identity()
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
        x = self.input_adapter(x)
        for index, stage in enumerate(self.stages):
            with torch.set_grad_enabled(torch.is_grad_enabled() and index >= self.trainable_from):
                x = stage(x)
            if index > 0:
                outputs.append(x)
        return outputs

    @staticmethod
    def from_torchvision_key(key: str) -> str:
        """Our name of a torchvision ResNet state-dict key (``conv1.*``, ``bn1.*``, ``layer<i>.*``)."""
        head, _, rest = key.partition(".")
        if head in ("conv1", "bn1"):
            return f"stage0.{'0' if head == 'conv1' else '1'}.{rest}"
        if head.startswith("layer") and head[5:].isdigit():
            return f"stage{head[5:]}.{rest}"
        raise KeyError(f"unexpected key {key!r} in a torchvision ResNet state dict")

    @staticmethod
    def to_torchvision_key(key: str) -> str:
        """torchvision's name of one of our state-dict keys (the inverse of :meth:`from_torchvision_key`)."""
        head, _, rest = key.partition(".")
        if head == "stage0":
            index, _, param = rest.partition(".")
            return f"{'conv1' if index == '0' else 'bn1'}.{param}"
        return f"layer{head.removeprefix('stage')}.{rest}"

    def load_torchvision_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Load a torchvision ResNet state dict (``conv1.*``, ``layer1.*`` ...; ``fc.*`` is ignored)."""
        renamed = {self.from_torchvision_key(k): v for k, v in state.items() if not k.startswith("fc.")}
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
    for module in block.modules():
        if isinstance(module, nn.Conv2d):
            module.stride = (1, 1)
