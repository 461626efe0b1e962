"""The inference dataset: one decoded image, resized (bicubic) to every scale, each paired with its flip."""
from __future__ import annotations

from collections.abc import Sequence

import torch
from PIL import Image
from torch.utils.data import Dataset

from storage.datasets.cam_training import normalized_tensor
from storage.datasets.voc_layout import Split
from storage.images import read_pil_rgb


def scaled_pair(image: Image.Image, scale: float) -> torch.Tensor:
    """(2, 3, round(H*s), round(W*s)): the bicubic-resized, normalised image and its horizontal flip."""
    width, height = image.size
    if scale != 1.0:
        image = image.resize((round(width * scale), round(height * scale)), Image.Resampling.BICUBIC)
    array = normalized_tensor(image)
    return torch.stack([array, array.flip(-1)])


class MultiScaleSet(Dataset):
    """Items: image id, (C,) label, (H, W) size and the per-scale flip pairs of the listed images of ``split``."""

    def __init__(self, split: Split, ids: Sequence[str], scales: Sequence[float]):
        self.split = split
        self.ids = list(ids)
        self.rows = {image_id: row for row, image_id in enumerate(split.ids)}
        self.scales = tuple(scales)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> dict:
        image_id = self.ids[index]
        image = read_pil_rgb(self.split.image_url(image_id))
        return {
            "id": image_id,
            "label": torch.from_numpy(self.split.labels[self.rows[image_id]]),
            "size": (image.size[1], image.size[0]),
            "pairs": [scaled_pair(image, s) for s in self.scales],
        }
