"""Batched multi-scale + flip inference of a segmenter on padded canvases (docs/method.md section 9).

Images arrive as a batch of equal canvases (each image at the top-left, padded with the normalised mean, i.e. 0, as
Caffe DeepLab's 513 x 513 test input), or one unpadded image (deeplab-pytorch's ``test``). Per scale the whole
batch is resized once (bilinear, as deeplab-pytorch's MSC) and its horizontal flips are appended, so one forward
covers every image and flip of that scale.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

FUSIONS = ("max", "mean")


@torch.no_grad()
def multiscale_logits(model: nn.Module, canvas: torch.Tensor, scales: Sequence[float], flip: bool = True,
                      fusion: str = "max") -> torch.Tensor:
    """Fused logits (B, C, h, w) of a canvas batch (B, 3, T, T).

    Per scale: one forward of the resized batch plus its flips (2B images); the flipped logits are flipped back and
    averaged with the unflipped ones. The scales' logits are then upsampled (bilinear) to the largest of their sizes
    (the scale-1.0 logits when 1.0 is the largest scale, as deeplab-pytorch) and fused by element-wise ``max``
    (deeplab-pytorch's MSC) or ``mean``.
    """
    if fusion not in FUSIONS:
        raise ValueError(f"unknown fusion {fusion!r}; allowed: {', '.join(FUSIONS)}")
    batch = canvas.shape[0]
    per_scale = []
    for scale in scales:
        x = canvas if scale == 1.0 else F.interpolate(canvas, scale_factor=scale, mode="bilinear",
                                                      align_corners=False)
        if flip:
            x = torch.cat([x, x.flip(-1)])
        logits = model(x).float()
        if flip:
            logits = (logits[:batch] + logits[batch:].flip(-1)) / 2
        per_scale.append(logits)
    size = max((logits.shape[2:] for logits in per_scale), key=lambda s: s[0] * s[1])
    per_scale = [x if x.shape[2:] == size else F.interpolate(x, size=size, mode="bilinear", align_corners=False)
                 for x in per_scale]
    stacked = torch.stack(per_scale)
    return stacked.amax(dim=0) if fusion == "max" else stacked.mean(dim=0)


def canvas_probabilities(logits: torch.Tensor, input_size: Sequence[int], contents: Sequence[tuple[int, int]],
                         sizes: Sequence[tuple[int, int]]) -> list[torch.Tensor]:
    """Per-image class probabilities (C, H, W) from fused logits (B, C, h, w) of inputs of ``input_size`` (a canvas,
    or an unpadded image): upsampled to the input (bilinear), cropped to each image's content (h_i, w_i) at the
    top-left, resized to its original size (H_i, W_i) where the image was shrunk to fit the canvas, softmax over
    classes."""
    full = F.interpolate(logits, size=tuple(input_size), mode="bilinear", align_corners=False)
    out = []
    for index, ((height, width), size) in enumerate(zip(contents, sizes)):
        crop = full[index:index + 1, :, :height, :width]
        if (height, width) != tuple(size):
            crop = F.interpolate(crop, size=tuple(size), mode="bilinear", align_corners=False)
        out.append(torch.softmax(crop[0], dim=0))
    return out
