"""Distribution coefficients of the MSDW loss (docs/method.md section 5)."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

WEIGHT_MODES = ("voc", "counts", "uniform")

# The reference's constants, keyed by class name: (N_c on VOC train_aug, the undocumented "ben" count).
_VOC_REFERENCE = {
    "person": (4155, 66642), "chair": (1228, 13956), "dog": (1188, 13316), "car": (1150, 12784),
    "cat": (1005, 11044), "bottle": (714, 8134), "bird": (705, 8062), "sofa": (649, 7726),
    "diningtable": (613, 7582), "aeroplane": (590, 7536), "tvmonitor": (567, 7536), "pottedplant": (522, 7626),
    "bicycle": (504, 7698), "train": (503, 7704), "motorbike": (492, 7792), "boat": (468, 8032),
    "horse": (445, 8308), "bus": (393, 9036), "sheep": (300, 10524), "cow": (267, 11118),
}
# The reference's re-sampling correction 660 * 4 * 3 / 20: iterations/epoch x re-sampled images x 3 / classes.
_VOC_ITERS_PER_EPOCH = 660
_VOC_RESAMPLE = 4
_EPOCH_FACTOR = 3


def resample_correction(iters_per_epoch: int, n_resample: int, num_classes: int) -> float:
    """R = iterations/epoch x re-sampled images/iteration x 3 / C (the reference's unexplained factor 3)."""
    return iters_per_epoch * n_resample * _EPOCH_FACTOR / num_classes


def distribution_weights(
    mode: str,
    class_names: Sequence[str],
    counts: np.ndarray,
    iters_per_epoch: int,
    n_resample: int,
) -> np.ndarray:
    """Per-class weights (C,) with mean 1, in the order of ``class_names`` (foreground only).

    - ``voc``: the reference's VOC table, ``ben / (N + 396)`` normalised; needs the 20 VOC class names.
    - ``counts``: option (a) of docs/method.md section 5, ``1 / (N_c + R)`` normalised, from the training-list counts.
    - ``uniform``: all ones (the "without distribution coefficient" ablation).
    """
    if mode == "uniform":
        return np.ones(len(class_names), dtype=np.float32)
    if mode == "voc":
        unknown = [name for name in class_names if name not in _VOC_REFERENCE]
        if unknown or len(class_names) != len(_VOC_REFERENCE):
            raise ValueError(f"class_weights=voc needs the 20 VOC classes; not VOC: {unknown or list(class_names)}")
        n = np.array([_VOC_REFERENCE[c][0] for c in class_names], dtype=np.float32)
        ben = np.array([_VOC_REFERENCE[c][1] for c in class_names], dtype=np.float32)
        r = np.float32(resample_correction(_VOC_ITERS_PER_EPOCH, _VOC_RESAMPLE, len(class_names)))
        weights = ben / (n + r)
    elif mode == "counts":
        counts = np.asarray(counts, dtype=np.float32)
        if counts.shape != (len(class_names),):
            raise ValueError(f"expected {len(class_names)} class counts, got shape {counts.shape}")
        weights = 1.0 / (counts + np.float32(resample_correction(iters_per_epoch, n_resample, len(class_names))))
    else:
        raise ValueError(f"unknown class weight mode {mode!r}; allowed: {', '.join(WEIGHT_MODES)}")
    return (weights / weights.mean()).astype(np.float32)
