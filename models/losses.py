"""SFC's training objective: classification + MSDW consistency losses (docs/method.md section 4)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from models.sfc import SFCNet, SFCOutput, max_normalize


@dataclass(frozen=True)
class LossWeights:
    """Weights of the two consistency terms (reference: 1.6 and 0.8)."""

    proto: float = 1.6
    scale: float = 0.8


@dataclass
class SFCLosses:
    cls: torch.Tensor
    proto: torch.Tensor
    scale: torch.Tensor

    @property
    def total(self) -> torch.Tensor:
        return self.cls + self.proto + self.scale

    def as_floats(self) -> dict[str, float]:
        values = {"loss_cls": self.cls, "loss_proto": self.proto, "loss_scale": self.scale, "loss": self.total}
        return {key: value.detach().item() for key, value in values.items()}


def cam_size(image_size: int) -> int:
    """Spatial size of the stride-16 CAM for an input side of ``image_size`` pixels."""
    return -(-image_size // 16)


def label_valid_mask(valid: torch.Tensor, labels: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(N, 1 + C, h, w) mask at CAM ``size``: channel 0 = valid pixels, channel c = valid x label_c."""
    valid = valid[:, :1]
    mask = torch.cat([valid, valid * labels[:, :, None, None]], dim=1)
    return F.interpolate(mask, size=size, mode="nearest")


def sfc_losses(
    out1: SFCOutput,
    out2: SFCOutput,
    labels: torch.Tensor,
    class_weights: torch.Tensor,
    weights: LossWeights = LossWeights(),
) -> SFCLosses:
    """The three loss terms for outputs at scale 1 (``out1``) and scale 0.5 (``out2``).

    ``labels`` is (N, C) multi-hot, ``class_weights`` the (C,) distribution coefficients (background weight 1).
    """
    loss_cls = (
        F.multilabel_soft_margin_loss(out1.score.flatten(1), labels)
        + F.multilabel_soft_margin_loss(out2.score.flatten(1), labels)
    ) / 2
    channel_weights = torch.cat([class_weights.new_ones(1), class_weights]).view(1, -1, 1, 1)
    proto = max_normalize(out1.proto_cam)
    loss_proto = weights.proto * torch.mean(torch.abs(out1.cam - proto) * channel_weights)
    labels_bg = torch.cat([labels.new_ones(labels.shape[0], 1), labels], dim=1)[:, :, None, None]
    half = F.interpolate(out1.cam, scale_factor=0.5, mode="bilinear", align_corners=True) * labels_bg
    small = out2.cam * labels_bg
    if half.shape != small.shape:
        raise ValueError(f"CAM sizes of the two scales differ: {tuple(half.shape)} vs {tuple(small.shape)}; "
                         "the crop size must be a multiple of 32")
    diff = torch.abs(half[:, 1:] - small[:, 1:]) * class_weights.view(1, -1, 1, 1)
    loss_scale = weights.scale * torch.mean(diff)
    return SFCLosses(cls=loss_cls, proto=loss_proto, scale=loss_scale)


def sfc_step_losses(
    model: SFCNet,
    images: torch.Tensor,
    valid: torch.Tensor,
    labels: torch.Tensor,
    class_weights: torch.Tensor,
    weights: LossWeights = LossWeights(),
) -> SFCLosses:
    """Forward ``images`` (N, 3, S, S) at scales 1 and 0.5 and compute the losses.

    ``valid`` is the crop's valid-pixel mask (N, >=1, S, S) before label masking; only channel 0 is used.
    """
    half_images = F.interpolate(images, scale_factor=0.5, mode="bilinear", align_corners=True)
    sizes = [(cam_size(t.shape[2]), cam_size(t.shape[3])) for t in (images, half_images)]
    out1 = model(images, label_valid_mask(valid, labels, sizes[0]))
    out2 = model(half_images, label_valid_mask(valid, labels, sizes[1]))
    return sfc_losses(out1, out2, labels, class_weights, weights)
