"""Segmentation prediction for the stages that score a segmenter: the evaluation (``eval_seg``, multi-scale, flip,
CRF) and the training's periodic validation (``train_seg``, single scale)."""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader

from models.seg_inference import canvas_probabilities, multiscale_logits
from storage.datasets.segmentation import CanvasSet, collate_canvases
from storage.datasets.voc_layout import Split
from storage.errors import DataError
from storage.images import read_mask


@dataclass(frozen=True)
class SegPrediction:
    """How :func:`predict_probs` runs the model (``eval_seg``'s config section documents each setting)."""

    scales: tuple[float, ...]
    flip: bool
    test_size: int | None  # None: each image whole and unpadded, one per forward
    batch_size: int
    num_workers: int
    amp: bool
    fusion: str = "max"


@torch.no_grad()
def predict_probs(model: torch.nn.Module, split: Split, ids: Sequence[str], settings: SegPrediction,
                  device: torch.device) -> Iterator[tuple[str, np.ndarray]]:
    """(id, class probabilities (C, H, W) float32 at the image's size) for each id, in order: batches of padded
    canvases, or single unpadded images, through :func:`models.seg_inference.multiscale_logits`."""
    use_amp = settings.amp and device.type == "cuda"
    batch_size = settings.batch_size if settings.test_size else 1
    loader = DataLoader(CanvasSet(split, ids, settings.test_size), batch_size=batch_size,
                        num_workers=settings.num_workers, collate_fn=collate_canvases,
                        pin_memory=device.type == "cuda",
                        generator=torch.Generator())  # leaves the global RNG of a calling training untouched
    for batch in loader:
        images = batch["image"].to(device, non_blocking=True)
        if use_amp:
            images = images.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, enabled=use_amp):
            logits = multiscale_logits(model, images, settings.scales, settings.flip, settings.fusion)
        probs = canvas_probabilities(logits, images.shape[2:], batch["content"], batch["size"])
        for image_id, p in zip(batch["id"], probs):
            yield image_id, p.cpu().numpy()


def read_target(split: Split, image_id: str, shape: tuple[int, ...]) -> np.ndarray:
    """The ground-truth mask of ``image_id``; a size other than the prediction's is an error naming the file."""
    url = split.mask_url(image_id)
    mask = read_mask(url).astype(np.int64)
    if mask.shape != tuple(shape):
        raise DataError(f"{url}: mask is {mask.shape[0]}x{mask.shape[1]} but image {split.image_url(image_id)} is "
                        f"{shape[0]}x{shape[1]}")
    return mask
