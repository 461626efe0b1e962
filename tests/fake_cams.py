"""CAM stores without a network: CAM-like maps made from the ground-truth masks (blurred, noisy, coarse), stored
with the background trick exactly as CAM inference stores them. Fast enough for stage tests and benchmarks."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from storage.cam_store import CamStore
from storage.datasets.voc_layout import Split
from storage.images import read_mask


def fake_cams(mask: np.ndarray, classes: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(P, K), each (1 + len(classes), H, W) float32: per class a blurred, noisy, stride-16-like blob of its mask,
    max-normalised; background 1 - max(foreground); then background + 0.4 and foreground x 2."""
    height, width = mask.shape
    maps = []
    for _ in range(2):
        planes = torch.from_numpy(np.stack([(mask == c) for c in classes]).astype(np.float32))
        coarse = F.adaptive_avg_pool2d(planes[None], (max(1, height // 16), max(1, width // 16)))
        coarse = coarse + 0.15 * torch.from_numpy(rng.random(coarse.shape, dtype=np.float32))
        fg = F.interpolate(coarse, size=(height, width), mode="bilinear", align_corners=False)[0].clamp_min(0)
        fg = fg / (fg.amax(dim=(1, 2), keepdim=True) + 1e-5)
        bg = 1 - fg.max(dim=0, keepdim=True).values
        maps.append(torch.cat([bg + 0.4, 2 * fg]).numpy())
    return maps[0], maps[1]


def fake_cam_store(url: str, split: Split, seed: int = 0, ids: list[str] | None = None,
                   checkpoint_hash: str = "fake") -> CamStore:
    """A CAM store at ``url`` holding fake CAMs (see :func:`fake_cams`) of ``ids`` (default: all) of ``split``."""
    rng = np.random.default_rng(seed)
    store = CamStore.create(url, "fake", checkpoint_hash, split.class_names)
    rows = {image_id: row for row, image_id in enumerate(split.ids)}
    for image_id in ids if ids is not None else split.ids:
        classes = np.flatnonzero(split.labels[rows[image_id]]) + 1
        proto_cam, cam = fake_cams(read_mask(split.mask_url(image_id)), classes, rng)
        store.write(image_id, np.concatenate([[0], classes]), proto_cam, cam)
    return store
