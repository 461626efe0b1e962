"""DeepLab segmenters for the segmentation stage (docs/method.md section 9).

``deeplabv2`` is deeplab-pytorch's DeepLabV2-ResNet-101-MSC: a ResNet whose layer3 and layer4 trade their stride for
dilation 2 and 4 (output stride 8), and an ASPP of four parallel 3x3 convolutions with dilation 6, 12, 18 and 24,
each straight to class logits, summed. "MSC" is its multi-scale training (:func:`msc_outputs`): the loss is taken on
the logits of the crop, of its 0.5 and 0.75 copies and of their max fusion. ``deeplabv3`` puts torchvision's
DeepLab-v3 head (ASPP 12/24/36 with image pooling, BatchNorm, dropout) on the same backbone, so both architectures
share the backbone options: any torchvision ResNet, frozen or ordinary BatchNorm, torchvision-format weights.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.segmentation.deeplabv3 import DeepLabHead

from models.backbone import FrozenBatchNorm2d, ResNetBackbone
from models.metrics import IGNORE_INDEX

ARCHS = ("deeplabv2", "deeplabv3")
OUTPUT_STRIDES = (8, 16)
V2_RATES = (6, 12, 18, 24)
V3_RATES = (12, 24, 36)
MSC_SCALES = (0.5, 0.75)


def dilate_stage(stage: nn.Sequential, dilation: int) -> None:
    """Replace a ResNet stage's stride by dilation: stride 1 everywhere, dilation and padding ``dilation`` on every
    3x3 convolution of every block (deeplab-pytorch dilates all blocks of a stage, the first one included)."""
    for module in stage.modules():
        if isinstance(module, nn.Conv2d):
            module.stride = (1, 1)
            if module.kernel_size == (3, 3):
                module.dilation = module.padding = (dilation, dilation)


class ASPPv2(nn.Module):
    """DeepLab-v2's atrous spatial pyramid pooling: parallel dilated 3x3 convolutions to class logits, summed."""

    def __init__(self, in_channels: int, num_classes: int, rates: Sequence[int] = V2_RATES):
        super().__init__()
        convs = [nn.Conv2d(in_channels, num_classes, 3, padding=rate, dilation=rate) for rate in rates]
        for conv in convs:
            nn.init.normal_(conv.weight, std=0.01)
            assert conv.bias is not None
            nn.init.zeros_(conv.bias)
        self.branches = nn.ModuleList(convs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return sum(branch(x) for branch in self.branches)


class DeepLab(nn.Module):
    """ResNet backbone at output stride 8 (or 16) with a DeepLab-v2 or -v3 head; ``forward`` returns logits at the
    backbone's output stride. With ``norm="frozen"`` the BatchNorm layers of the backbone use their running
    statistics and their affine parameters are not trained (deeplab-pytorch); ``"batch"`` trains them.
    ``style="caffe"`` is the backbone of deeplab-pytorch's caffe-converted weights (see :class:`ResNetBackbone`)."""

    def __init__(self, num_classes: int, arch: str = "deeplabv2", backbone: str = "resnet101", norm: str = "frozen",
                 output_stride: int = 8, aspp_rates: Sequence[int] = V2_RATES, style: str = "torchvision"):
        super().__init__()
        if arch not in ARCHS:
            raise ValueError(f"unknown architecture {arch!r}; allowed: {', '.join(ARCHS)}")
        if output_stride not in OUTPUT_STRIDES:
            raise ValueError(f"output_stride must be 8 or 16, got {output_stride}")
        self.backbone = ResNetBackbone(backbone, trainable_from=0, norm=norm, style=style)
        if output_stride == 8:
            dilate_stage(self.backbone.stage3, 2)
        dilate_stage(self.backbone.stage4, 4 if output_stride == 8 else 2)
        for module in self.backbone.modules():
            if isinstance(module, FrozenBatchNorm2d):
                module.requires_grad_(False)
        channels = self.backbone.channels.stage4
        self.head = ASPPv2(channels, num_classes, aspp_rates) if arch == "deeplabv2" else \
            DeepLabHead(channels, num_classes, V3_RATES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x)[-1])

    def parameter_groups(self) -> tuple[list[nn.Parameter], list[nn.Parameter], list[nn.Parameter]]:
        """Trainable parameters as (backbone, head weights, head biases and norm parameters): deeplab-pytorch's
        1x, 10x and 20x learning-rate groups."""
        backbone = [p for p in self.backbone.parameters() if p.requires_grad]
        head = [p for p in self.head.parameters() if p.requires_grad]
        return backbone, [p for p in head if p.ndim > 1], [p for p in head if p.ndim <= 1]


def msc_outputs(model: nn.Module, images: torch.Tensor, scales: Sequence[float] = MSC_SCALES) -> list[torch.Tensor]:
    """Multi-scale training outputs: the logits of ``images``, of each bilinearly down-scaled copy, and the
    element-wise max of all of them at the full logits' size. Without scales, just the logits."""
    full = model(images)
    scaled = [model(F.interpolate(images, scale_factor=s, mode="bilinear", align_corners=False)) for s in scales]
    if not scaled:
        return [full]
    resized = [F.interpolate(logits, size=full.shape[2:], mode="bilinear", align_corners=False) for logits in scaled]
    return [full, *scaled, torch.stack([full, *resized]).amax(dim=0)]


def resize_labels(labels: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Label maps (N, H, W) resized to ``size`` (h, w) by nearest neighbour at cell centres: output cell i takes
    input cell floor((i + 0.5) H / h), as PIL's NEAREST in deeplab-pytorch (PIL rounds some exact ties, centres on
    a cell boundary, down). torch's plain "nearest" takes floor(i H / h), which shifts the labels up-left by about
    half an output cell."""
    return F.interpolate(labels[:, None].float(), size=tuple(size), mode="nearest-exact")[:, 0].long()


def msc_cross_entropy(outputs: Sequence[torch.Tensor], labels: torch.Tensor,
                      upsample_logits: bool = False) -> torch.Tensor:
    """Sum over ``outputs`` of the pixel-mean cross-entropy against ``labels`` (N, H, W) resized to each output's
    size by :func:`resize_labels` (deeplab), or with ``upsample_logits`` against the labels themselves, the logits
    upsampled (bilinear) to their size; pixels labelled 255 are ignored (an all-ignored batch gives 0)."""
    total = labels.new_zeros((), dtype=torch.float32)
    for logits in outputs:
        if upsample_logits:
            logits = F.interpolate(logits, size=labels.shape[1:], mode="bilinear", align_corners=False)
        target = resize_labels(labels, logits.shape[2:])
        loss = F.cross_entropy(logits.float(), target, ignore_index=IGNORE_INDEX, reduction="sum")
        total = total + loss / (target != IGNORE_INDEX).sum().clamp_min(1)
    return total
