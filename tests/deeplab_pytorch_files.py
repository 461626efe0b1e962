"""deeplab-pytorch's DeepLabV2 state dict with random values, written from its model definition (``_Stem``,
``_ResLayer`` of ``_Bottleneck`` with ``reduce`` / ``conv3x3`` / ``increase`` / ``shortcut``, each ``_ConvBnReLU`` of
``conv`` and ``bn``; ``_ASPP`` of ``c0``..``c3``), independently of models/deeplab_pytorch.py."""
from __future__ import annotations

import torch

LAYER_CHANNELS = ((64, 256), (128, 512), (256, 1024), (512, 2048))  # (mid, out) of layer2..layer5


def _conv_bn(prefix: str, out_ch: int, in_ch: int, k: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    return {f"{prefix}.conv.weight": torch.randn(out_ch, in_ch, k, k, generator=gen) * (2 / (in_ch * k * k)) ** 0.5,
            f"{prefix}.bn.weight": 1 + 0.1 * torch.randn(out_ch, generator=gen),
            f"{prefix}.bn.bias": 0.1 * torch.randn(out_ch, generator=gen),
            f"{prefix}.bn.running_mean": 0.1 * torch.randn(out_ch, generator=gen),
            f"{prefix}.bn.running_var": 0.5 + torch.rand(out_ch, generator=gen),
            f"{prefix}.bn.num_batches_tracked": torch.tensor(0)}


def deeplab_pytorch_state(blocks: tuple[int, ...] = (3, 4, 23, 3), n_classes: int | None = 91,
                          prefix: str = "") -> dict[str, torch.Tensor]:
    """deeplab-pytorch's DeepLabV2 state dict (ResNet-101 by default, ASPP for ``n_classes``), random values."""
    gen = torch.Generator().manual_seed(0)
    state = _conv_bn("layer1.conv1", 64, 3, 7, gen)
    in_ch = 64
    for layer, (n, (mid, out)) in enumerate(zip(blocks, LAYER_CHANNELS), start=2):
        for b in range(1, n + 1):
            name = f"layer{layer}.block{b}"
            state |= _conv_bn(f"{name}.reduce", mid, in_ch if b == 1 else out, 1, gen)
            state |= _conv_bn(f"{name}.conv3x3", mid, mid, 3, gen)
            state |= _conv_bn(f"{name}.increase", out, mid, 1, gen)
            if b == 1:
                state |= _conv_bn(f"{name}.shortcut", out, in_ch, 1, gen)
        in_ch = out
    for i in range(4 if n_classes else 0):
        state[f"aspp.c{i}.weight"] = 0.01 * torch.randn(n_classes, 2048, 3, 3, generator=gen)
        state[f"aspp.c{i}.bias"] = torch.zeros(n_classes)
    return {prefix + k: v for k, v in state.items()}
