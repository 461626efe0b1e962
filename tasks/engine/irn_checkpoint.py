"""The trained IRN as later stages load it: the checkpoint ``train_irn`` writes, read back (the random walk of
``make_pseudo_labels`` runs it in its worker processes)."""
from __future__ import annotations

import torch

from models.irn import IRNet
from storage import checkpoints
from storage.errors import CheckpointError

KIND = "irn"  # meta["kind"] of an IRN checkpoint


def load_irn(checkpoint: str, device: str | torch.device = "cpu", backbone: str | None = None) -> IRNet:
    """The trained IRN of ``checkpoint`` in eval mode; a file that is not an IRN checkpoint, or one on another
    backbone than ``backbone`` (when given), is a CheckpointError naming it."""
    state = checkpoints.load(checkpoint)
    meta = state.get("meta") if isinstance(state, dict) else None
    if not isinstance(meta, dict) or meta.get("kind") != KIND or not isinstance(state.get("model"), dict):
        raise CheckpointError(f"{checkpoint}: not an IRN checkpoint (written by train_irn)")
    if backbone is not None and meta.get("backbone") != backbone:
        raise CheckpointError(f"{checkpoint}: an IRN on {meta.get('backbone')}, expected {backbone}")
    model = IRNet(meta["backbone"])
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as err:
        raise CheckpointError(f"{checkpoint}: weights do not fit an IRN on {meta['backbone']} "
                              f"({str(err).splitlines()[0]})") from err
    return model.to(device).eval()
