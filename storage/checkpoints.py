"""Checkpoints and pretrained weights: torch state dicts read and written through fsspec, atomically."""
from __future__ import annotations

import hashlib
import io
import re

import torch

from storage import fs
from storage.errors import CheckpointError

_STEP_FILE = re.compile(r"^step_(\d+)\.pt$")


def save(url: str, state: dict) -> None:
    """Serialise ``state`` with torch.save and write it atomically to ``url``."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    fs.write_bytes(url, buffer.getvalue())


def load(url: str, weights_only: bool = True) -> dict:
    return load_with_digest(url, weights_only)[0]


def load_with_digest(url: str, weights_only: bool = True) -> tuple[dict, str]:
    """The checkpoint at ``url`` and a short SHA-256 of its bytes (to tie outputs to the exact weights)."""
    if not fs.exists(url):
        raise FileNotFoundError(f"checkpoint {url} not found")
    data = fs.read_bytes(url)
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=weights_only)
    except Exception as err:  # torch raises many types for corrupt files
        raise CheckpointError(f"{url}: not a readable torch checkpoint ({err})") from err
    return state, hashlib.sha256(data).hexdigest()[:16]


def step_url(directory: str, step: int) -> str:
    return fs.join(directory, f"step_{step:07d}.pt")


def step_checkpoints(directory: str) -> list[tuple[int, str]]:
    """(step, url) of the periodic checkpoints in ``directory``, oldest first."""
    if not fs.isdir(directory):
        return []
    found = [(int(m.group(1)), fs.join(directory, name)) for name in fs.listdir(directory)
             if (m := _STEP_FILE.match(name))]
    return sorted(found)


def prune(directory: str, keep: int) -> None:
    """Delete all but the ``keep`` newest periodic checkpoints."""
    for _, url in step_checkpoints(directory)[:-keep]:
        fs.remove(url)


def load_pretrained(url: str) -> dict[str, torch.Tensor]:
    """A state dict from a local path or fsspec URL; accepts a bare state dict or one under 'state_dict'/'model'."""
    state = load(url)
    for key in ("state_dict", "model"):
        if isinstance(state.get(key), dict):
            state = state[key]
    if not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{url}: does not hold a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in state.items()}
