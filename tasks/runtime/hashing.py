"""The settings hash a stage stores beside its outputs to tell whether they were made with the same settings."""
from __future__ import annotations

import hashlib

from pydantic import BaseModel


def config_hash(cfg: BaseModel, *extra: str) -> str:
    """16 hex digits of the settings (and ``extra`` strings): equal hashes mean equal settings."""
    text = cfg.model_dump_json() + "".join(extra)
    return hashlib.sha256(text.encode()).hexdigest()[:16]
