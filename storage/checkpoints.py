"""Checkpoints and pretrained weights: torch state dicts read and written through fsspec, atomically."""
from __future__ import annotations

import hashlib
import io
import re

import torch

from storage import fs
from storage.errors import CheckpointError

_STEP_FILE = re.compile(r"^step_(\d+)\.pt$")
# torch.hub's convention: a published weights file is named <name>-<first hex digits of its SHA-256>.<ext>
_HASH_NAME = re.compile(r"-([0-9a-f]{8,64})\.pth?$")


def save(url: str, state: dict) -> None:
    """Serialise ``state`` with torch.save and write it atomically to ``url``."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    fs.write_bytes(url, buffer.getvalue())


def load(url: str, weights_only: bool = True) -> dict:
    return load_with_digest(url, weights_only)[0]


def load_with_digest(url: str, weights_only: bool = True) -> tuple[dict, str]:
    """The checkpoint at ``url`` and a short SHA-256 of its bytes (to tie outputs to the exact weights). A file
    named as torch.hub names published weights (``resnet50-19c8e357.pth``) must match the digest in its name."""
    if not fs.exists(url):
        raise FileNotFoundError(f"checkpoint {url} not found")
    data = fs.read_bytes(url)
    digest = hashlib.sha256(data).hexdigest()
    if (named := _HASH_NAME.search(url)) and not digest.startswith(named.group(1)):
        raise CheckpointError(f"{url}: SHA-256 {digest[:len(named.group(1))]}... differs from the {named.group(1)} "
                              f"in its name ({len(data)} bytes): a truncated or altered download")
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=weights_only)
    except Exception as err:  # torch raises many types for corrupt files
        raise CheckpointError(f"{url}: not a readable torch checkpoint ({err})") from err
    return state, digest[:16]


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
