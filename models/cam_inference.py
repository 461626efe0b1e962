"""Multi-scale + flip CAM inference and fusion (method doc section 6)."""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from models.sfc import SFCNet

DEFAULT_SCALES = (1.0, 0.5, 1.5, 2.0)
BACKGROUND_OFFSET = 0.4


def fuse_scales(maps: Sequence[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
    """Upsample per-scale (1 + C, h, w) maps to ``size`` (bilinear), sum, max-normalise each channel, and apply
    the background trick: background + 0.4, foreground x 2."""
    total = sum(F.interpolate(m[None], size, mode="bilinear", align_corners=False)[0] for m in maps)
    total = total / (total.flatten(1).max(dim=1)[0][:, None, None] + 1e-5)
    return total + F.pad(total[1:], (0, 0, 0, 0, 1, 0), value=BACKGROUND_OFFSET)


@torch.no_grad()
def multiscale_cams(
    model: SFCNet, pairs: Sequence[torch.Tensor], label: torch.Tensor, size: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """CAMs of one image from its per-scale [image, hflip(image)] pairs (2, 3, h_s, w_s).

    ``label`` is the (C,) multi-hot foreground label. Returns ``keys`` (background + present classes), and the
    fused prototype CAM P and PCM classifier CAM K restricted to ``keys``, each (len(keys), H, W).
    """
    label_bg = torch.cat([label.new_ones(1), label])
    protos, cams = [], []
    for pair in pairs:
        out = model.forward_cams(pair, label_bg)
        protos.append(out.proto_cam)
        cams.append(out.cam)
    keys = torch.cat([torch.zeros(1, dtype=torch.long, device=label.device),
                      torch.nonzero(label).flatten() + 1])
    return keys, fuse_scales(protos, size)[keys], fuse_scales(cams, size)[keys]
