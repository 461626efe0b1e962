"""Turning CAMs into label maps with a background threshold, and sweeping that threshold in one pass."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from models.metrics import ConfusionMatrix, stacked_confusion

DEFAULT_THRESHOLDS = tuple(round(0.05 * i, 2) for i in range(1, 20))


def threshold_labels(foreground: torch.Tensor, threshold: float) -> torch.Tensor:
    """(C, H, W) foreground scores -> (H, W) labels: argmax class + 1 where its score beats ``threshold``, else 0.

    This is ``argmax(cat([threshold, foreground]))`` with ties going to background.
    """
    best, index = foreground.max(dim=0)
    return torch.where(best > threshold, index + 1, torch.zeros_like(index))


class ThresholdSweep:
    """Confusion matrices of threshold-labelled CAMs for many background thresholds, accumulated together."""

    def __init__(self, num_classes: int, thresholds: Sequence[float] = DEFAULT_THRESHOLDS):
        self.thresholds = tuple(thresholds)
        self.matrices = [ConfusionMatrix(num_classes) for _ in self.thresholds]

    @classmethod
    def from_counts(cls, counts: torch.Tensor, thresholds: Sequence[float]) -> ThresholdSweep:
        """A sweep holding already accumulated (T, K, K) counts, one matrix per threshold."""
        if counts.shape[0] != len(thresholds):
            raise ValueError(f"{counts.shape[0]} confusion matrices for {len(thresholds)} thresholds")
        sweep = cls(counts.shape[1], thresholds)
        sweep.matrices = [ConfusionMatrix.from_counts(matrix) for matrix in counts]
        return sweep

    def counts(self) -> torch.Tensor:
        """The (T, K, K) counts accumulated so far (what :meth:`from_counts` takes back)."""
        return torch.stack([m.matrix for m in self.matrices])

    def update(self, target: torch.Tensor, foreground: torch.Tensor, keys: torch.Tensor | None = None) -> None:
        """``target`` (H, W) ground truth; ``foreground`` (C', H, W) scores. Without ``keys`` channel c is class
        c + 1; with ``keys`` (background + the classes of the channels, as stored CAMs have) channel c is class
        ``keys[c + 1]``."""
        best, index = foreground.max(dim=0)
        thresholds = torch.tensor(self.thresholds, dtype=best.dtype).view(-1, 1, 1)
        labels = torch.where(best[None] > thresholds, index[None] + 1, 0)  # threshold_labels for every threshold
        counts = stacked_confusion(target, labels if keys is None else keys[labels], self.matrices[0].num_classes)
        for matrix, count in zip(self.matrices, counts):
            matrix.matrix += count

    def results(self, class_names: Sequence[str]) -> dict:
        """The mIoU curve, the best threshold and the full scores at that threshold."""
        curve = [m.scores(class_names)["miou"] for m in self.matrices]
        best = int(np.nanargmax(curve))
        return {
            "thresholds": list(self.thresholds),
            "miou": curve,
            "best_threshold": self.thresholds[best],
            "best": self.matrices[best].scores(class_names),
        }
