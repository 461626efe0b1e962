"""Torch datasets and the deterministic, resumable batch sampler of CAM training."""
from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, Sampler

from storage.datasets.voc_layout import Split
from storage.errors import ConfigError
from storage.images import read_mask, read_pil_rgb
from storage.transforms import augment_for_cam_training, normalize

# An item is (image index, (seed, epoch, position)): the augmentation RNG of a sample depends only on where it
# sits in the schedule, so results do not depend on worker count and a resumed run sees the same samples.
Item = tuple[int, tuple[int, int, int]]


def normalized_tensor(image: Image.Image) -> torch.Tensor:
    """An RGB image as an ImageNet-normalised (3, H, W) float32 tensor."""
    return torch.from_numpy(np.ascontiguousarray(normalize(np.asarray(image)).transpose(2, 0, 1)))


class CAMTrainingSet(Dataset):
    """Augmented crops of a split with their valid mask and multi-hot label."""

    def __init__(self, split: Split, crop: int, resize_long: tuple[int, int]):
        self.split = split
        self.crop = crop
        self.resize_long = resize_long

    def __len__(self) -> int:
        return len(self.split.ids)

    def __getitem__(self, item: Item) -> dict[str, torch.Tensor]:
        index, seed = item
        rng = np.random.default_rng(list(seed))
        image = read_pil_rgb(self.split.image_url(self.split.ids[index]))
        array, valid = augment_for_cam_training(image, self.crop, self.resize_long, rng)
        return {
            "image": torch.from_numpy(array),
            "valid": torch.from_numpy(valid),
            "label": torch.from_numpy(self.split.labels[index]),
        }


def repeat_factors(labels: np.ndarray, threshold: float) -> np.ndarray:
    """Repeat-factor sampling (LVIS): image i appears ``max(1, round(max_c sqrt(threshold / f_c)))`` times per epoch,
    c over its image-level classes, f_c the fraction of images holding class c. Rare classes are seen more often;
    classes in more than ``threshold`` of the images are not repeated."""
    frequency = labels.mean(axis=0)
    per_class = np.sqrt(threshold / np.maximum(frequency, 1e-12))
    factors = np.where(labels > 0, per_class[None, :], 1.0).max(axis=1, initial=1.0)
    return np.maximum(1, np.round(factors)).astype(np.int64)


class EpochBatchSampler(Sampler[list[Item]]):
    """Batches for steps ``start_step .. total_steps - 1``: each epoch a seeded permutation, ``drop_last``.

    With ``repeats``, item i takes ``repeats[i]`` places in every epoch's permutation (see :func:`repeat_factors`).
    """

    def __init__(self, num_items: int, batch_size: int, seed: int, total_steps: int, start_step: int = 0,
                 repeats: np.ndarray | None = None):
        self.items = np.repeat(np.arange(num_items), repeats) if repeats is not None else np.arange(num_items)
        num_items = len(self.items)
        if num_items < batch_size:
            raise ConfigError(f"the training split has {num_items} images, fewer than batch_size={batch_size}")
        self.num_items = num_items
        self.batch_size = batch_size
        self.seed = seed
        self.total_steps = total_steps
        self.start_step = start_step

    @property
    def steps_per_epoch(self) -> int:
        return self.num_items // self.batch_size

    def __len__(self) -> int:
        return max(0, self.total_steps - self.start_step)

    def __iter__(self) -> Iterator[list[Item]]:
        for step in range(self.start_step, self.total_steps):
            epoch, offset = divmod(step, self.steps_per_epoch)
            order = np.random.default_rng([self.seed, epoch]).permutation(self.num_items)
            positions = range(offset * self.batch_size, (offset + 1) * self.batch_size)
            yield [(int(self.items[order[p]]), (self.seed, epoch, p)) for p in positions]


class FullImageSet(Dataset):
    """Whole normalised images (no augmentation) with label and mask, for single-scale CAM validation."""

    def __init__(self, split: Split):
        self.split = split

    def __len__(self) -> int:
        return len(self.split.ids)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        image_id = self.split.ids[index]
        return {
            "image": normalized_tensor(read_pil_rgb(self.split.image_url(image_id))),
            "label": torch.from_numpy(self.split.labels[index]),
            "mask": torch.from_numpy(read_mask(self.split.mask_url(image_id)).astype(np.int64)),
        }
