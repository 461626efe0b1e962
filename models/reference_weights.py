"""The reference implementation's SFC weights as shipped with the golden tensors (int8 values + float32 scales)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from models.sfc import SFCNet

BACKBONE_PREFIX = "resnet50."


def dequantize(path: str | Path) -> dict[str, torch.Tensor]:
    """Read ``q/<name>`` int8 and ``scale/<name>`` float32 entries: ``weight = q.astype(float32) * scale``."""
    with np.load(path) as data:
        return {key[2:]: torch.from_numpy(data[key].astype(np.float32) * data["scale/" + key[2:]])
                for key in data.files if key.startswith("q/")}


def load_reference_weights(model: SFCNet, path: str | Path) -> SFCNet:
    """Load the reference ResNet-50 backbone and SFC heads into ``model`` (a ResNet-50 SFCNet)."""
    state = dequantize(path)
    model.backbone.load_torchvision_state_dict(
        {k.removeprefix(BACKBONE_PREFIX): v for k, v in state.items() if k.startswith(BACKBONE_PREFIX)})
    heads = {k: v for k, v in state.items() if not k.startswith(BACKBONE_PREFIX)}
    missing, unexpected = model.load_state_dict(heads, strict=False)
    if unexpected or any(not k.startswith("backbone.") for k in missing):
        raise KeyError(f"{path}: unexpected {unexpected[:5]}, missing heads "
                       f"{[k for k in missing if not k.startswith('backbone.')][:5]}")
    return model
