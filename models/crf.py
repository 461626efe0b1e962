"""Dense CRF (Krähenbühl & Koltun) through pydensecrf: the one CRF implementation of the project.

Used for SFC's inter-pixel-relation labels (unary from hard labels, docs/method.md section 7.1), for the ``crf``
refinement method, and for the segmentation stage's post-processing (unary from probabilities, deeplab-style
parameters). pydensecrf is imported lazily so the rest of ``models`` stays importable with torch + numpy alone.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class CrfParams:
    """Pairwise terms and iterations. The defaults are the reference's ``crf_inference_label`` values."""

    iterations: int = 10
    gaussian_sxy: float = 3.0
    gaussian_compat: float = 3.0
    bilateral_sxy: float = 50.0
    bilateral_srgb: float = 5.0
    bilateral_compat: float = 10.0

    def __post_init__(self) -> None:
        if self.iterations < 1:
            raise ValueError(f"CRF iterations must be >= 1, got {self.iterations}")


DEEPLAB_CRF = CrfParams(iterations=10, gaussian_sxy=1.0, gaussian_compat=3.0, bilateral_sxy=67.0,
                        bilateral_srgb=3.0, bilateral_compat=4.0)
"""deeplab-pytorch's post-processing values (pos_xy 1, pos_w 3, bi_xy 67, bi_rgb 3, bi_w 4, 10 iterations)."""


def _densecrf():
    try:
        import pydensecrf.densecrf as dcrf
        from pydensecrf import utils
    except ImportError as err:
        raise ImportError("the dense CRF needs pydensecrf: pip install pydensecrf2") from err
    return dcrf, utils


def _check_image(image: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"CRF image must be uint8 (H, W, 3), got {image.dtype} {image.shape}")
    if image.shape[:2] != shape:
        raise ValueError(f"CRF image is {image.shape[:2]} but the label/probability map is {shape}")
    return np.require(image, requirements=("C_CONTIGUOUS", "WRITEABLE"))  # pydensecrf rejects read-only buffers


def _infer(image: np.ndarray, unary: np.ndarray, n_labels: int, params: CrfParams) -> np.ndarray:
    dcrf, _ = _densecrf()
    height, width = image.shape[:2]
    crf = dcrf.DenseCRF2D(width, height, n_labels)
    crf.setUnaryEnergy(np.ascontiguousarray(unary, dtype=np.float32))
    crf.addPairwiseGaussian(sxy=params.gaussian_sxy, compat=params.gaussian_compat)
    crf.addPairwiseBilateral(sxy=params.bilateral_sxy, srgb=params.bilateral_srgb, rgbim=image,
                             compat=params.bilateral_compat)
    q = crf.inference(params.iterations)
    return np.asarray(q, dtype=np.float32).reshape(n_labels, height, width)


def crf_from_labels(image: np.ndarray, labels: np.ndarray, n_labels: int, gt_prob: float = 0.7,
                    params: CrfParams = CrfParams()) -> np.ndarray:
    """Refine a hard label map (values in ``0..n_labels-1``) with a dense CRF; returns the argmax labels (int64)."""
    if labels.ndim != 2:
        raise ValueError(f"CRF labels must be (H, W), got {labels.shape}")
    if labels.size and (labels.min() < 0 or labels.max() >= n_labels):
        raise ValueError(f"CRF labels must lie in 0..{n_labels - 1}, got {labels.min()}..{labels.max()}")
    image = _check_image(image, labels.shape)
    _, utils = _densecrf()
    unary = utils.unary_from_labels(labels, n_labels, gt_prob=gt_prob, zero_unsure=False)
    return _infer(image, unary, n_labels, params).argmax(axis=0)


def crf_from_probs(image: np.ndarray, probs: np.ndarray, params: CrfParams = DEEPLAB_CRF) -> np.ndarray:
    """Refine per-class probabilities (C, H, W) with a dense CRF; returns the refined probabilities (C, H, W)."""
    if probs.ndim != 3:
        raise ValueError(f"CRF probabilities must be (C, H, W), got {probs.shape}")
    image = _check_image(image, probs.shape[1:])
    _, utils = _densecrf()
    unary = utils.unary_from_softmax(np.ascontiguousarray(probs, dtype=np.float32))
    return _infer(image, unary, probs.shape[0], params)
