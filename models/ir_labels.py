"""Confident inter-pixel-relation (IR) labels from fused CAMs with two dense CRFs (docs/method.md section 7.1)."""
from __future__ import annotations

import numpy as np

from models.crf import CrfParams, crf_from_labels

IGNORE = 255


def ir_label(image: np.ndarray, keys: np.ndarray, cam: np.ndarray, proto_cam: np.ndarray, proto_weight: float = 0.7,
             bg_scale: float = 0.5, gt_prob: float = 0.7, params: CrfParams = CrfParams()) -> np.ndarray:
    """The IR label map (uint8): the foreground CRF's class where it names one, 0 where the CRF of the scores with
    background x ``bg_scale`` also says background, 255 where only that second CRF names a class.

    ``cam`` (K) and ``proto_cam`` (P) hold the kept channels ``keys`` (background first); scores are K + w P.
    """
    if cam.shape != proto_cam.shape or cam.ndim != 3 or cam.shape[0] != len(keys):
        raise ValueError(f"CAMs {cam.shape} / {proto_cam.shape} do not match {len(keys)} keys")
    if len(keys) > IGNORE:
        raise ValueError(f"{len(keys)} kept classes do not fit a uint8 label map")
    keys = np.asarray(keys)
    scores = cam + proto_weight * proto_cam
    fg = keys[crf_from_labels(image, scores.argmax(axis=0), len(keys), gt_prob, params)]
    scores[0] *= bg_scale
    bg = keys[crf_from_labels(image, scores.argmax(axis=0), len(keys), gt_prob, params)]
    label = fg.astype(np.uint8)
    label[fg == 0] = IGNORE
    label[(fg == 0) & (bg == 0)] = 0
    return label
