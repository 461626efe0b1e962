"""Access to the reference implementation's golden tensors (copied from shared/golden into tests/golden)."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from models.sfc import SFCNet

GOLDEN_DIR = Path(os.environ.get("SFC_GOLDEN_DIR", Path(__file__).parent / "golden"))
RTOL, ATOL = 1e-4, 1e-5


def load_golden(name: str) -> dict[str, np.ndarray]:
    path = GOLDEN_DIR / f"{name}.npz"
    if not path.exists():
        raise FileNotFoundError(f"golden file {path} is missing (set SFC_GOLDEN_DIR to shared/golden)")
    with np.load(path) as data:
        return {key: data[key] for key in data.files}


def golden_state_dict() -> dict[str, torch.Tensor]:
    """The reference weights, dequantised: ``q.astype(float32) * scale``."""
    data = load_golden("sfc_weights")
    return {
        key[2:]: torch.from_numpy(data[key].astype(np.float32) * data["scale/" + key[2:]])
        for key in data if key.startswith("q/")
    }


def golden_model() -> SFCNet:
    """A ResNet-50 SFC network holding the reference weights, in float32 on CPU."""
    state = golden_state_dict()
    model = SFCNet(num_classes=20, backbone="resnet50")
    model.backbone.load_torchvision_state_dict(
        {key.removeprefix("resnet50."): value for key, value in state.items() if key.startswith("resnet50.")}
    )
    heads = {key: value for key, value in state.items() if not key.startswith("resnet50.")}
    missing, unexpected = model.load_state_dict(heads, strict=False)
    assert not unexpected and all(k.startswith("backbone.") for k in missing)
    return model
