"""The per-image work of the IR-label stage, run in worker processes (imports neither prefect nor torch)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from models.crf import CrfParams
from models.ir_labels import ir_label
from tasks.engine.label_maps import load_image_and_cams, write_labels


@dataclass(frozen=True)
class IrLabelJob:
    """Picklable callable: ``job((image_id, image_url))`` writes that image's IR label, returns its pixel counts."""

    store_url: str
    out_dir: str
    proto_weight: float
    bg_scale: float
    gt_prob: float
    crf: CrfParams

    def __call__(self, item: tuple[str, str]) -> np.ndarray:
        image_id, image_url = item
        image, keys, proto_cam, cam = load_image_and_cams(self.store_url, image_id, image_url)
        labels = ir_label(image, keys, cam, proto_cam, self.proto_weight, self.bg_scale, self.gt_prob, self.crf)
        return write_labels(self.out_dir, image_id, labels)
