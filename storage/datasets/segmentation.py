"""Datasets of the segmentation stage: augmented (image, pseudo label) crops for training, and whole images on a
padded canvas for inference (docs/method.md section 9)."""
from __future__ import annotations

import hashlib
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from torch.utils.data import Dataset

from storage import fs
from storage.datasets.cam_training import Item, normalized_tensor
from storage.datasets.voc_layout import Split
from storage.errors import DataError
from storage.images import IGNORE_INDEX, read_mask, read_pil_rgb, values_outside
from storage.transforms import SegScaling, augment_for_segmentation, fit_long_side

SHOWN_IDS = 5


def pseudo_label_urls(split: Split, label_dir: str) -> dict[str, str]:
    """``<label_dir>/<id>.png`` for every image of ``split``; a missing folder or label is an error that names the
    folder and the first missing ids."""
    if not fs.isdir(label_dir):
        raise DataError(f"pseudo-label folder {label_dir} does not exist (run the pseudo-label stage first)")
    present = set(fs.listdir(label_dir))
    missing = [image_id for image_id in split.ids if f"{image_id}.png" not in present]
    if missing:
        more = ", ..." if len(missing) > SHOWN_IDS else ""
        raise DataError(f"{label_dir}: no pseudo label for {len(missing)} of the {len(split.ids)} images of split "
                        f"{split.name!r}: {', '.join(missing[:SHOWN_IDS])}{more}")
    return {image_id: fs.join(label_dir, f"{image_id}.png") for image_id in split.ids}


def check_label_maps(urls: Sequence[str], num_labels: int, workers: int = 8) -> str:
    """Decode every label map; each value must be a class index (< ``num_labels``) or 255, else an error naming the
    file. Returns a digest of the decoded maps (independent of PNG encoding), to tie a training to its labels."""
    def digest(url: str) -> bytes:
        mask = read_mask(url)
        bad = values_outside(mask, num_labels)
        if bad:
            raise DataError(f"{url}: label values {bad} outside the {num_labels} classes (0..{num_labels - 1}) "
                            f"and {IGNORE_INDEX}")
        return hashlib.sha256(f"{mask.shape}".encode() + mask.tobytes()).digest()

    total = hashlib.sha256()
    with ThreadPoolExecutor(workers) as pool:
        for value in pool.map(digest, urls):
            total.update(value)
    return total.hexdigest()[:16]


class SegTrainingSet(Dataset):
    """Augmented crops of the split's images with their pseudo labels (``storage.transforms.augment_for_segmentation``).

    Items are ``(index, (seed, epoch, position))`` from :class:`~storage.datasets.cam_training.EpochBatchSampler`:
    the augmentation depends only on the sample's place in the schedule.
    """

    def __init__(self, split: Split, label_urls: dict[str, str], crop: int, scaling: SegScaling = SegScaling()):
        self.split = split
        self.label_urls = label_urls
        self.crop = crop
        self.scaling = scaling

    def __len__(self) -> int:
        return len(self.split.ids)

    def __getitem__(self, item: Item) -> dict[str, torch.Tensor]:
        index, seed = item
        image_id = self.split.ids[index]
        image_url, label_url = self.split.image_url(image_id), self.label_urls[image_id]
        image, label = read_pil_rgb(image_url), read_mask(label_url)
        if label.shape != (image.height, image.width):
            raise DataError(f"{label_url}: pseudo label is {label.shape[0]}x{label.shape[1]} but image {image_url} "
                            f"is {image.height}x{image.width}")
        rng = np.random.default_rng(list(seed))
        array, labels = augment_for_segmentation(image, label, self.crop, self.scaling, rng, IGNORE_INDEX)
        return {"image": torch.from_numpy(array), "label": torch.from_numpy(labels)}


class CanvasSet(Dataset):
    """Whole images for inference, each on a ``canvas`` x ``canvas`` input: shrunk to fit when its long side is
    larger (bilinear), normalised, and padded bottom/right with 0 (the mean colour), as Caffe DeepLab's 513 x 513
    test input; ``canvas`` None: each image normalised at its own size, unpadded (deeplab-pytorch's ``test``).
    Items: id, image (3, h', w'), content (h, w) on it, original size (H, W)."""

    def __init__(self, split: Split, ids: Sequence[str], canvas: int | None):
        self.split = split
        self.ids = list(ids)
        self.canvas = canvas

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> dict:
        image_id = self.ids[index]
        image = read_pil_rgb(self.split.image_url(image_id))
        size = (image.height, image.width)
        if self.canvas is None:
            return {"id": image_id, "image": normalized_tensor(image), "content": size, "size": size}
        fitted = normalized_tensor(fit_long_side(image, self.canvas))
        height, width = fitted.shape[1:]
        padded = torch.zeros(3, self.canvas, self.canvas)
        padded[:, :height, :width] = fitted
        return {"id": image_id, "image": padded, "content": (height, width), "size": size}


def collate_canvases(items: list[dict]) -> dict:
    """Stack the inputs (equal sizes: canvases, or one unpadded image); keep ids, contents and sizes as lists."""
    return {"image": torch.stack([item["image"] for item in items]),
            **{key: [item[key] for item in items] for key in ("id", "content", "size")}}
