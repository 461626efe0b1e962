"""Poly learning-rate decay, and the reference's PolyOptimizerSGD: two learning-rate groups and its momentum quirk."""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


def poly_sgd(
    groups: tuple[list[nn.Parameter], list[nn.Parameter]],
    lr: float,
    new_layer_lr_mult: float,
    weight_decay: float,
    momentum: float,
    max_steps: int,
    power: float = 0.9,
    extra_groups: Sequence[tuple[list[nn.Parameter], float]] = (),
) -> tuple[torch.optim.SGD, torch.optim.lr_scheduler.LambdaLR]:
    """SGD over (backbone, new layers) with lr and ``new_layer_lr_mult`` x lr, decayed by (1 - step/max)^power;
    ``extra_groups`` adds (parameters, lr multiplier) groups.

    The reference passes weight decay positionally as SGD's momentum, so it runs with momentum = 1e-4 (in effect
    plain SGD); ``momentum`` makes that choice explicit (reference default 1e-4).
    """
    backbone, new = groups
    optimizer = torch.optim.SGD(
        [{"params": backbone, "lr": lr}, {"params": new, "lr": lr * new_layer_lr_mult},
         *({"params": params, "lr": lr * mult} for params, mult in extra_groups)],
        lr=lr, momentum=momentum, weight_decay=weight_decay,
    )
    return optimizer, poly_schedule(optimizer, max_steps, power)


def poly_schedule(optimizer: torch.optim.Optimizer, max_steps: int,
                  power: float = 0.9) -> torch.optim.lr_scheduler.LambdaLR:
    """Every group's initial lr x (1 - step/max_steps)^power, stepped once per optimiser step."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: (1 - min(step, max_steps) / max_steps) ** power)
