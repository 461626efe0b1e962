"""Image Bank Re-sampling (IBR, docs/method.md section 4): one slot per class holding the most recent training crop
that contains the class; each step a few uniformly drawn slots are appended to the batch."""
from __future__ import annotations

import torch


class ImageBank:
    """Per-class slots of (image, valid mask, multi-hot label), kept on the CPU.

    The valid mask is stored with one channel (all channels of the reference's 21-channel mask are equal before
    label masking), which keeps an 80-class COCO bank small.
    """

    def __init__(self, num_classes: int, crop: int, n_resample: int = 4, skip_empty: bool = False, seed: int = 0):
        self.num_classes = num_classes
        self.n_resample = n_resample
        self.skip_empty = skip_empty
        self.images = torch.zeros(num_classes, 3, crop, crop)
        self.valid = torch.zeros(num_classes, 1, crop, crop)
        self.labels = torch.zeros(num_classes, num_classes)
        self.filled = torch.zeros(num_classes, dtype=torch.bool)
        self.generator = torch.Generator().manual_seed(seed)

    def update(self, images: torch.Tensor, valid: torch.Tensor, labels: torch.Tensor) -> None:
        """Store, for every class present in the batch, the last image (in batch order) that contains it."""
        present = labels.detach().cpu() > 0
        for c in torch.nonzero(present.any(dim=0)).flatten().tolist():
            last = int(torch.nonzero(present[:, c]).max())
            self.images[c] = images[last].detach().cpu()
            self.valid[c] = valid[last, :1].detach().cpu()
            self.labels[c] = labels[last].detach().cpu()
            self.filled[c] = True

    def sample(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``n_resample`` slots drawn uniformly over classes with replacement (over filled slots if
        ``skip_empty``; the reference also draws slots not yet filled, which hold zeros)."""
        if self.skip_empty:
            candidates = torch.nonzero(self.filled).flatten()
            picks = candidates[torch.randint(0, len(candidates), (self.n_resample,), generator=self.generator)]
        else:
            picks = torch.randint(0, self.num_classes, (self.n_resample,), generator=self.generator)
        return self.images[picks], self.valid[picks], self.labels[picks]

    def extend_batch(
        self, images: torch.Tensor, valid: torch.Tensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One IBR step: permute the batch, update the bank with it, append the re-sampled slots."""
        order = torch.randperm(images.shape[0], generator=self.generator)
        images, valid, labels = images[order], valid[order], labels[order]
        self.update(images, valid, labels)
        bank_images, bank_valid, bank_labels = self.sample()
        device = images.device
        return (torch.cat([images, bank_images.to(device)]), torch.cat([valid, bank_valid.to(device)]),
                torch.cat([labels, bank_labels.to(device)]))

    def state_dict(self) -> dict:
        return {"images": self.images, "valid": self.valid, "labels": self.labels, "filled": self.filled,
                "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        for key in ("images", "valid", "labels", "filled"):
            if getattr(self, key).shape != state[key].shape:
                raise ValueError(f"image bank {key}: checkpoint shape {tuple(state[key].shape)} does not match "
                                 f"{tuple(getattr(self, key).shape)} (another class set or crop size?)")
            setattr(self, key, state[key].clone())
        self.generator.set_state(state["generator"])
