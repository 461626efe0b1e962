"""The per-image CRF job of the segmentation evaluation, in a module light enough for pool workers to import
(torch, Prefect and MLflow stay out of the workers)."""
from __future__ import annotations

import numpy as np

from models.crf import DEEPLAB_CRF, CrfParams, crf_from_probs
from storage.images import read_rgb


def crf_labels(item: tuple[str, np.ndarray], params: CrfParams = DEEPLAB_CRF) -> np.ndarray:
    """Class map (H, W) uint8 of the dense CRF on (image URL, probabilities (C, H, W) of that image)."""
    image_url, probs = item
    image = np.array(read_rgb(image_url))  # pydensecrf needs a writable buffer
    return crf_from_probs(image, probs.astype(np.float32), params).argmax(axis=0).astype(np.uint8)
