"""What the settings shared by the three training stages (train_cam, train_irn, train_seg) mean: one description
per setting, used by each stage's config section."""
from __future__ import annotations

LOOP_SETTINGS = {
    "backbone": "ResNet of the network: resnet_mini (the CPU demo's), resnet18, resnet34, resnet50, resnet101",
    "crop": "side of the square training crops in pixels",
    "epochs": "passes over the training split (max_steps, when set, overrides it)",
    "lr": "base learning rate of the poly schedule",
    "weight_decay": "SGD weight decay",
    "poly_power": "lr at step t = lr x (1 - t / steps) ^ poly_power",
    "num_workers": "DataLoader worker processes (0: load in the main process); never changes the data order",
    "checkpoint_every": "save a resumable checkpoint every N steps",
    "keep_checkpoints": "periodic checkpoints kept (older ones are deleted)",
    "log_every": "log the losses to MLflow every N steps",
    "channels_last": "channels-last memory format for the network and its inputs (faster convolutions on "
                     "many CPUs and GPUs; results equal up to float rounding)",
}
