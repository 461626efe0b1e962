"""Datasets of IRN training (docs/method.md section 7.2): augmented crops with their IR labels at stride 4, and
top-left crops for the mean displacement.

IR labels are PNGs ``<label_dir>/<image_id>.png`` of the image's size: 0 background, c the dataset class index,
255 ignore.
"""
from __future__ import annotations

import hashlib

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from storage import fs
from storage.datasets.cam_training import Item
from storage.datasets.voc_layout import Split
from storage.errors import ConfigError, DataError
from storage.images import IGNORE_INDEX, BadImageError, read_mask, read_pil_rgb
from storage.transforms import normalize, random_crop_pair

LABEL_STRIDE = 4


def ir_label_url(label_dir: str, image_id: str) -> str:
    return fs.join(label_dir, f"{image_id}.png")


def ir_label_digest(label_dir: str, ids: list[str]) -> str:
    """A short SHA-256 over the IR label files of ``ids`` (ties a trained IRN to its labels); a missing file is a
    DataError naming it."""
    present = set(fs.listdir(label_dir)) if fs.isdir(label_dir) else set()
    missing = [i for i in ids if f"{i}.png" not in present]
    if missing:
        raise DataError(f"{label_dir}: no IR label for {len(missing)} of {len(ids)} images, e.g. image "
                        f"{missing[0]!r} (expected {ir_label_url(label_dir, missing[0])})")
    digest = hashlib.sha256()
    for image_id in ids:
        digest.update(image_id.encode())
        digest.update(hashlib.sha256(fs.read_bytes(ir_label_url(label_dir, image_id))).digest())
    return digest.hexdigest()[:16]


def read_ir_label(label_dir: str, image_id: str, size: tuple[int, int], num_labels: int) -> np.ndarray:
    """The (H, W) uint8 IR label of an image of ``size`` (H, W); values must be < ``num_labels`` or 255."""
    url = ir_label_url(label_dir, image_id)
    try:
        label = read_mask(url)
    except BadImageError as err:
        raise DataError(f"IR label of image {image_id!r}: {err}") from err
    if label.shape != size:
        raise DataError(f"IR label of image {image_id!r}: {url} is {label.shape[1]}x{label.shape[0]}, the image is "
                        f"{size[1]}x{size[0]}")
    bad = (label >= num_labels) & (label != IGNORE_INDEX)
    if bad.any():
        raise DataError(f"IR label of image {image_id!r}: {url} holds value {int(label[bad][0])}, not a class index "
                        f"below {num_labels} or {IGNORE_INDEX}")
    return label


def augment_for_irn(image: Image.Image, label: np.ndarray, crop: int, scale_range: tuple[float, float],
                    rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """IRN's order: rescale by U[scale_range] (image bicubic, label nearest), normalise, flip (p=0.5), random crop
    (image padded with 0, label with 255), label downsampled x1/4 (nearest).

    Returns (3, crop, crop) float32 and (crop/4, crop/4) uint8.
    """
    low, high = scale_range
    scale = low + rng.random() * (high - low)
    width, height = image.size
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    array = normalize(np.asarray(image.resize(size, Image.Resampling.BICUBIC)))
    label = np.asarray(Image.fromarray(label).resize(size, Image.Resampling.NEAREST))
    if rng.random() < 0.5:
        array, label = array[:, ::-1], label[:, ::-1]
    array, label = random_crop_pair(array, label, crop, IGNORE_INDEX, rng)
    small = crop // LABEL_STRIDE
    label = np.array(Image.fromarray(label).resize((small, small), Image.Resampling.NEAREST))
    return np.ascontiguousarray(array.transpose(2, 0, 1)), label


class IRNTrainingSet(Dataset):
    """Augmented crops of a split with their IR labels at stride 4; items come from an EpochBatchSampler."""

    def __init__(self, split: Split, label_dir: str, crop: int, scale_range: tuple[float, float]):
        if crop % LABEL_STRIDE:
            raise ConfigError(f"crop must be a multiple of {LABEL_STRIDE}, got {crop}")
        self.split = split
        self.label_dir = label_dir
        self.crop = crop
        self.scale_range = scale_range

    def __len__(self) -> int:
        return len(self.split.ids)

    def __getitem__(self, item: Item) -> dict[str, torch.Tensor]:
        index, seed = item
        image_id = self.split.ids[index]
        image = read_pil_rgb(self.split.image_url(image_id))
        label = read_ir_label(self.label_dir, image_id, (image.height, image.width), len(self.split.class_names))
        array, small = augment_for_irn(image, label, self.crop, self.scale_range, np.random.default_rng(list(seed)))
        return {"image": torch.from_numpy(array), "label": torch.from_numpy(small)}


class TopLeftCropSet(Dataset):
    """Normalised images placed at the top left of a zero ``crop`` x ``crop`` canvas (cut if larger)."""

    def __init__(self, split: Split, crop: int):
        self.split = split
        self.crop = crop

    def __len__(self) -> int:
        return len(self.split.ids)

    def __getitem__(self, index: int) -> torch.Tensor:
        array = normalize(np.asarray(read_pil_rgb(self.split.image_url(self.split.ids[index]))))
        canvas = np.zeros((3, self.crop, self.crop), dtype=np.float32)
        height, width = min(array.shape[0], self.crop), min(array.shape[1], self.crop)
        canvas[:, :height, :width] = array[:height, :width].transpose(2, 0, 1)
        return torch.from_numpy(canvas)
