"""Confusion-matrix segmentation metrics (label 255 ignored): IoU, precision, recall, pixel accuracy."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

IGNORE_INDEX = 255


class ConfusionMatrix:
    """Accumulates a (K, K) confusion matrix, rows = ground truth, columns = prediction.

    Pixels whose ground truth is 255 (or outside 0..K-1) are ignored; a prediction outside 0..K-1 (e.g. 255) is
    counted as background, as the reference's evaluation does for pseudo masks.
    """

    def __init__(self, num_classes: int):
        self.num_classes = num_classes
        self.matrix = torch.zeros(num_classes, num_classes, dtype=torch.int64)

    @classmethod
    def from_counts(cls, matrix: torch.Tensor) -> ConfusionMatrix:
        """A confusion matrix holding already accumulated (K, K) counts (e.g. the sum of several shards')."""
        confusion = cls(matrix.shape[0])
        confusion.matrix = matrix.to(torch.int64).clone()
        return confusion

    def update(self, target: torch.Tensor | np.ndarray, prediction: torch.Tensor | np.ndarray) -> None:
        self.matrix += stacked_confusion(target, _as_long(prediction)[None], self.num_classes)[0]

    def scores(self, class_names: Sequence[str]) -> dict:
        """mIoU, pixel accuracy, and per-class IoU / precision / recall keyed by class name.

        Classes absent from both ground truth and prediction get NaN IoU and are left out of the mean.
        """
        if len(class_names) != self.num_classes:
            raise ValueError(f"{len(class_names)} class names for {self.num_classes} classes")
        m = self.matrix.double()
        tp = m.diag()
        gt, pred = m.sum(1), m.sum(0)
        union = gt + pred - tp
        iou = torch.where(union > 0, tp / union.clamp_min(1), torch.full_like(tp, float("nan")))
        precision = torch.where(pred > 0, tp / pred.clamp_min(1), torch.full_like(tp, float("nan")))
        recall = torch.where(gt > 0, tp / gt.clamp_min(1), torch.full_like(tp, float("nan")))
        total = m.sum()
        return {
            "miou": float(np.nanmean(iou.numpy())) if torch.isfinite(iou).any() else float("nan"),
            "pixel_accuracy": float(tp.sum() / total) if total > 0 else float("nan"),
            "per_class": {
                name: {"iou": float(iou[i]), "precision": float(precision[i]), "recall": float(recall[i])}
                for i, name in enumerate(class_names)
            },
        }


def stacked_confusion(target: torch.Tensor | np.ndarray, predictions: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(T, K, K) confusion counts of T predictions (T, ...) of one ``target`` (...) in one ``bincount``, each
    counted as :meth:`ConfusionMatrix.update` counts it."""
    flat_target = _as_long(target)
    flat = predictions.reshape(predictions.shape[0], -1).long()
    if flat.shape[1] != flat_target.numel():
        raise ValueError(f"target and prediction sizes differ: {flat_target.numel()} vs {flat.shape[1]}")
    k, count = num_classes, flat.shape[0]
    keep = (flat_target >= 0) & (flat_target < k)
    flat = torch.where((flat >= 0) & (flat < k), flat, torch.zeros_like(flat))[:, keep]
    index = torch.arange(count, device=flat.device)[:, None] * (k * k) + flat_target[keep][None] * k + flat
    return torch.bincount(index.flatten().cpu(), minlength=count * k * k).view(count, k, k)


def _as_long(values: torch.Tensor | np.ndarray) -> torch.Tensor:
    """A flat int64 tensor (numpy arrays, read-only ones included, are converted to int64 first: a copy)."""
    if isinstance(values, np.ndarray):
        return torch.from_numpy(values.astype(np.int64).ravel())
    return torch.as_tensor(values).flatten().long()
