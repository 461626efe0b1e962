"""Access to the reference implementation's golden tensors in tests/golden (``SFC_GOLDEN_DIR`` overrides the folder)."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from models.reference_weights import load_reference_weights
from models.sfc import SFCNet

GOLDEN_DIR = Path(os.environ.get("SFC_GOLDEN_DIR", Path(__file__).parent / "golden"))
RTOL, ATOL = 1e-4, 1e-5


def load_golden(name: str) -> dict[str, np.ndarray]:
    path = GOLDEN_DIR / f"{name}.npz"
    if not path.exists():
        raise FileNotFoundError(f"golden file {path} is missing (SFC_GOLDEN_DIR names the golden folder)")
    with np.load(path) as data:
        return {key: data[key] for key in data.files}


def golden_model() -> SFCNet:
    """A ResNet-50 SFC network holding the reference weights, float32 on CPU."""
    return load_reference_weights(SFCNet(num_classes=20, backbone="resnet50"), GOLDEN_DIR / "sfc_weights.npz")
