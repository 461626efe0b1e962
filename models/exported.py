"""The trained networks as self-contained predictors, what the pipeline logs as MLflow models: each takes RGB
images as a float32 tensor (N, 3, H, W) with values in [0, 255] and normalises them itself."""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from models.sfc import SFCNet


class _Normalized(nn.Module):
    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        return (images / 255.0 - self.mean) / self.std


class SegmentationPredictor(_Normalized):
    """A segmenter's class logits (N, K, H, W) at the input size (background is class 0): ``.argmax(1)`` is the
    label map."""

    def __init__(self, segmenter: nn.Module, class_names: Sequence[str], mean: Sequence[float],
                 std: Sequence[float]):
        super().__init__(mean, std)
        self.segmenter = segmenter.eval()
        self.class_names = list(class_names)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        logits = self.segmenter(self.normalize(images))
        return F.interpolate(logits, images.shape[2:], mode="bilinear", align_corners=False)


class ImageClassifier(_Normalized):
    """A CAM network's image-level class probabilities (N, C) of the foreground classes ``class_names``."""

    def __init__(self, network: SFCNet, class_names: Sequence[str], mean: Sequence[float],
                 std: Sequence[float]):
        super().__init__(mean, std)
        self.network = network.eval()
        self.class_names = list(class_names)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.network.classify(self.normalize(images)))
