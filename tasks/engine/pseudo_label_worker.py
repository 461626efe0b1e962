"""The per-image work of the pseudo-label stage, run in worker processes or in the caller's (imports no prefect)."""
from __future__ import annotations

import math
import multiprocessing
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
from PIL import Image

from models.crf import CrfParams
from models.irn import STRIDE
from models.pseudo_labels import RandomWalkParams, cam_labels, crf_labels, upscaled_walk_labels
from storage.datasets.cam_training import normalized_tensor
from tasks.engine.irn_checkpoint import load_irn
from tasks.engine.label_maps import load_image_and_cams, write_labels


@lru_cache(maxsize=1)
def _irn_model(checkpoint_url: str, device: str):
    """The IRN network of a checkpoint, loaded once per process."""
    return load_irn(checkpoint_url, device)


def edge_map_of(image: np.ndarray, checkpoint_url: str, device: str, canvas: int) -> torch.Tensor:
    """IRN's (h/4, w/4) boundary map in [0, 1] of an RGB uint8 image on a ``canvas`` input
    (:func:`models.irn.edge_map`), on ``device``."""
    from models.irn import edge_map

    tensor = normalized_tensor(Image.fromarray(image)).to(device)
    with torch.no_grad():
        return edge_map(_irn_model(checkpoint_url, device), tensor, canvas)


@dataclass(frozen=True)
class PseudoLabelJob:
    """Picklable callable: ``job((image_id, image_url))`` writes that image's pseudo label, returns its pixel counts.

    In a worker process torch uses ``threads`` threads; in the caller's process its setting is left alone.
    """

    store_url: str
    out_dir: str
    method: str
    proto_weight: float
    bg_threshold: float | None
    gt_prob: float
    crf: CrfParams
    walk: RandomWalkParams
    device: str
    irn_checkpoint: str | None
    edge_canvas: int
    threads: int
    walk_scale: float = 1.0

    def __call__(self, item: tuple[str, str]) -> np.ndarray:
        if multiprocessing.parent_process() is not None and torch.get_num_threads() != self.threads:
            torch.set_num_threads(self.threads)
        image_id, image_url = item
        image, keys, proto_cam, cam = load_image_and_cams(self.store_url, image_id, image_url)
        if self.method == "none":
            labels = cam_labels(keys, proto_cam, cam, self.proto_weight, self.bg_threshold)
        elif self.method == "crf":
            labels = crf_labels(image, keys, proto_cam, cam, self.proto_weight, self.bg_threshold, self.gt_prob,
                                self.crf)
        else:
            with torch.no_grad():
                labels = self._walk_labels(image, keys, proto_cam, cam)
        return write_labels(self.out_dir, image_id, labels)

    def _walk_labels(self, image: np.ndarray, keys: np.ndarray, proto_cam: np.ndarray,
                     cam: np.ndarray) -> np.ndarray:
        """The random walk on IRN's boundaries, on the image and CAMs upscaled by ``walk_scale`` (the canvas too)."""
        canvas = math.ceil(self.edge_canvas * self.walk_scale / STRIDE) * STRIDE

        def edge_at(size: tuple[int, int]) -> torch.Tensor:
            scaled = image if size == image.shape[:2] else np.asarray(
                Image.fromarray(image).resize(size[::-1], Image.BILINEAR))
            return edge_map_of(scaled, self.irn_checkpoint, self.device, canvas).to(torch.float32)

        return upscaled_walk_labels(keys, torch.from_numpy(proto_cam).to(self.device),
                                    torch.from_numpy(cam).to(self.device), edge_at, self.walk, self.walk_scale)
