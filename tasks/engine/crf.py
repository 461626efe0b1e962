"""Dense-CRF settings of the label stages, and the per-image CRF job of the segmentation evaluation, in a module
light enough for pool workers to import (torch, Prefect and MLflow stay out of the workers)."""
from __future__ import annotations

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from models.crf import DEEPLAB_CRF, CrfParams, crf_from_probs
from storage.images import read_rgb


class CrfConfig(BaseModel):
    """Dense-CRF pairwise terms; defaults are the reference's ``crf_inference_label`` values."""

    model_config = ConfigDict(extra="forbid")
    iterations: int = Field(10, ge=1, description="mean-field iterations")
    gaussian_sxy: float = Field(3.0, gt=0, description="smoothness kernel: spatial standard deviation in pixels")
    gaussian_compat: float = Field(3.0, ge=0, description="smoothness kernel: weight")
    bilateral_sxy: float = Field(50.0, gt=0, description="appearance kernel: spatial standard deviation in pixels")
    bilateral_srgb: float = Field(5.0, gt=0, description="appearance kernel: colour standard deviation (0..255)")
    bilateral_compat: float = Field(10.0, ge=0, description="appearance kernel: weight")

    def params(self) -> CrfParams:
        return CrfParams(**self.model_dump())



def crf_labels(item: tuple[str, np.ndarray], params: CrfParams = DEEPLAB_CRF) -> np.ndarray:
    """Class map (H, W) uint8 of the dense CRF on (image URL, probabilities (C, H, W) of that image)."""
    image_url, probs = item
    image = np.array(read_rgb(image_url))  # pydensecrf needs a writable buffer
    return crf_from_probs(image, probs.astype(np.float32), params).argmax(axis=0).astype(np.uint8)
