"""The SFC network: classifier CAM refined by PCM, and the prototype CAM (docs/method.md section 3)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from models.backbone import ResNetBackbone

# Side-head widths of the reference (ResNet-50 stage widths 256, 512, 1024, 2048 -> 128, 128, 256, 256).
_REFERENCE_STAGE_CHANNELS = (256, 512, 1024, 2048)
_REFERENCE_SIDE_CHANNELS = (128, 128, 256, 256)
_EPS = 1e-5


@dataclass
class SFCOutput:
    """One forward pass. CAM tensors are (N, 1 + C, h, w) with background at channel 0."""

    score: torch.Tensor
    cam: torch.Tensor
    proto_cam: torch.Tensor
    raw_cam: torch.Tensor


@dataclass
class CAMPair:
    """Inference output for one image: PCM classifier CAM K, prototype CAM P and the raw CAM, each (1 + C, h, w)."""

    cam: torch.Tensor
    proto_cam: torch.Tensor
    raw_cam: torch.Tensor


def side_channels_for(stage_channels: tuple[int, int, int, int]) -> tuple[int, ...]:
    """Side-head widths: the reference's for ResNet-50, scaled by stage width for other backbones."""
    return tuple(
        max(8, side * stage // ref)
        for side, stage, ref in zip(_REFERENCE_SIDE_CHANNELS, stage_channels, _REFERENCE_STAGE_CHANNELS)
    )


def l2_normalize(x: torch.Tensor, dim: int = 1) -> torch.Tensor:
    return x / (torch.norm(x, p=2, dim=dim, keepdim=True) + _EPS)


def max_normalize(cam: torch.Tensor) -> torch.Tensor:
    """Divide each (N, C) plane by its spatial maximum (+1e-5)."""
    return cam / (F.adaptive_max_pool2d(cam, (1, 1)) + _EPS)


class SFCNet(nn.Module):
    """SFC's CAM network on a ResNet backbone with output stride 16.

    ``num_classes`` counts foreground classes only (20 for VOC); CAMs have ``num_classes + 1`` channels.
    """

    def __init__(
        self,
        num_classes: int,
        backbone: str = "resnet50",
        trainable_from: int = 3,
        bg_seed_scale: float = 0.3,
        norm: str = "frozen",
    ):
        super().__init__()
        self.num_classes = num_classes
        self.bg_seed_scale = bg_seed_scale
        self.backbone = ResNetBackbone(backbone, trainable_from, norm)
        stage_channels = self.backbone.channels.as_tuple()
        sides = side_channels_for(stage_channels)
        self.side1, self.side2, self.side3, self.side4 = (
            nn.Conv2d(c_in, c_out, 1, bias=False) for c_in, c_out in zip(stage_channels, sides)
        )
        c4 = stage_channels[3]
        self.classifier = nn.Conv2d(c4, num_classes, 1, bias=False)
        self.f9 = nn.Conv2d(3 + c4, c4, 1, bias=False)  # new layers keep PyTorch's default init, as the reference

    def new_layers(self) -> list[nn.Module]:
        """The layers SFC adds to the backbone (the 10x learning-rate group)."""
        return [self.classifier, self.f9, self.side1, self.side2, self.side3, self.side4]

    def parameter_groups(self) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        """Trainable parameters as (backbone, new layers)."""
        backbone = [p for p in self.backbone.parameters() if p.requires_grad]
        new = [p for layer in self.new_layers() for p in layer.parameters() if p.requires_grad]
        return backbone, new

    def _features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Backbone features: (x4, hierarchical side features of 768 ch at the stride-16 size)."""
        x1, x2, x3, x4 = self.backbone(x)
        sides = [
            side(feature.detach())
            for side, feature in zip((self.side1, self.side2, self.side3, self.side4), (x1, x2, x3, x4))
        ]
        size = sides[2].shape[2:]
        hie = torch.cat(
            [F.interpolate(l2_normalize(s), size, mode="bilinear", align_corners=False) for s in sides], dim=1
        )
        return x4, hie

    def _classifier_cam(self, cam: torch.Tensor) -> torch.Tensor:
        """Max-normalised ReLU CAM with background ``1 - max_c`` prepended (over all classes)."""
        fg = max_normalize(F.relu(cam))
        bg = 1 - torch.max(fg, dim=1, keepdim=True)[0]
        return torch.cat([bg, fg], dim=1)

    def _pcm(self, cam: torch.Tensor, image: torch.Tensor, x4: torch.Tensor) -> torch.Tensor:
        """Pixel correlation module: two propagation steps over a column-normalised feature affinity."""
        n, c, h, w = cam.shape
        image = F.interpolate(image, (h, w), mode="bilinear", align_corners=True)
        f = self.f9(torch.cat([image, x4], dim=1)).flatten(2)
        f = f / (torch.norm(f, dim=1, keepdim=True) + _EPS)
        affinity = F.relu(torch.bmm(f.transpose(1, 2), f))
        affinity = affinity / (affinity.sum(dim=1, keepdim=True) + _EPS)
        refined = torch.bmm(torch.bmm(cam.flatten(2), affinity), affinity)
        return refined.view(n, c, h, w)

    def _prototype_cam(self, cam: torch.Tensor, feature: torch.Tensor, valid_mask: torch.Tensor) -> torch.Tensor:
        """Cosine similarity of every pixel to class prototypes pooled from argmax seeds of ``cam``."""
        cam = cam.detach().clone()
        cam[:, 0] *= self.bg_seed_scale
        seeds = F.one_hot(cam.argmax(dim=1), cam.shape[1]).permute(0, 3, 1, 2).to(feature.dtype) * valid_mask
        h, w = feature.shape[2:]
        prototypes = torch.einsum("nkhw,nchw->nkc", seeds, feature) / (h * w)
        feature_unit = feature / torch.norm(feature, dim=1, keepdim=True).clamp_min(1e-8)
        proto_unit = prototypes / torch.norm(prototypes, dim=2, keepdim=True).clamp_min(1e-8)
        return F.relu(torch.einsum("nchw,nkc->nkhw", feature_unit, proto_unit))

    def forward(self, x: torch.Tensor, valid_mask: torch.Tensor) -> SFCOutput:
        """Training forward pass. ``valid_mask`` is (N, 1 + C, h, w) at the CAM size: channel 0 the valid
        pixels, channel c the valid pixels times the image label of class c."""
        x4, hie = self._features(x)
        logits = self.classifier(x4)
        score = F.adaptive_avg_pool2d(logits, 1)
        raw_cam = self._classifier_cam(logits) * valid_mask
        cam = self._pcm(raw_cam, x, x4)
        proto_cam = self._prototype_cam(cam, hie, valid_mask)
        return SFCOutput(score=score, cam=cam, proto_cam=proto_cam, raw_cam=raw_cam)

    def classify(self, x: torch.Tensor) -> torch.Tensor:
        """Image-level class logits (N, C) of the foreground classes: the classifier averaged over the map."""
        return F.adaptive_avg_pool2d(self.classifier(self.backbone(x)[-1]), 1).flatten(1)

    def forward_cams(self, pair: torch.Tensor, label: torch.Tensor) -> CAMPair:
        """Inference on ``pair`` = [image, hflip(image)] (2, 3, H, W) with ``label`` (1 + C,) incl. background.

        The flip pair is fused by summing logits, side features, images and x4 before the CAMs are formed; the
        classifier CAM is not label-masked before PCM, and ``label`` is the prototype seeds' valid mask, as in the
        reference.
        """
        x4, hie = self._features(pair)
        logits = self.classifier(x4)
        logits, hie, image, x4 = (_fuse_flip_pair(t) for t in (logits, hie, pair, x4))
        raw_cam = self._classifier_cam(logits)
        cam = self._pcm(raw_cam, image, x4)
        proto_cam = self._prototype_cam(cam, hie, label.view(1, -1, 1, 1).to(cam.dtype))
        return CAMPair(cam=cam[0], proto_cam=proto_cam[0], raw_cam=raw_cam[0])


def _fuse_flip_pair(t: torch.Tensor) -> torch.Tensor:
    """(2, C, h, w) [x, hflip(x')] -> (1, C, h, w) x + hflip(x')."""
    return (t[0] + t[1].flip(-1)).unsqueeze(0)
