"""Resumable training: one checkpoint dict with everything a killed run needs to continue bit-identically
(model, optimiser, scheduler, grad scaler, step, RNG states, plus what a stage adds), and the finished-stage check."""
from __future__ import annotations

import json
import logging

import numpy as np
import torch

from storage import checkpoints, fs

log = logging.getLogger(__name__)


def finished_manifest(manifest_url: str, cfg_hash: str) -> dict | None:
    """The stage manifest at ``manifest_url`` if it was written under ``cfg_hash`` and its checkpoint exists."""
    if not fs.exists(manifest_url):
        return None
    manifest = json.loads(fs.read_text(manifest_url))
    checkpoint = manifest.get("checkpoint")
    if manifest.get("config_hash") == cfg_hash and checkpoint and fs.exists(checkpoint):
        return manifest
    return None


def training_state(step: int, cfg_hash: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                   scheduler, scaler: torch.amp.GradScaler, **extra) -> dict:
    """The resume checkpoint after ``step`` optimiser steps; ``extra`` entries are stored as they are."""
    rng = {"torch": torch.get_rng_state(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    return {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict(), "step": step, "rng": rng, "config_hash": cfg_hash, **extra}


def save_training_state(ckpt_dir: str, state: dict, keep: int) -> None:
    """Write ``state`` as ``step_<step>.pt`` (atomically) and keep only the ``keep`` newest step checkpoints."""
    checkpoints.save(checkpoints.step_url(ckpt_dir, state["step"]), state)
    checkpoints.prune(ckpt_dir, keep)


def latest_training_state(ckpt_dir: str, cfg_hash: str) -> dict | None:
    """The newest step checkpoint in ``ckpt_dir`` (None if there is none); one written under another config is an
    error naming the file."""
    existing = checkpoints.step_checkpoints(ckpt_dir)
    if not existing:
        return None
    url = existing[-1][1]
    state = checkpoints.load(url, weights_only=False)
    if state.get("config_hash") != cfg_hash:
        raise ValueError(f"{url} was written with another config; remove {ckpt_dir} or use a new run name")
    log.info("resuming from step %d (%s)", state["step"], url)
    return state


def restore_training_state(state: dict, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler,
                           scaler: torch.amp.GradScaler) -> int:
    """Load a :func:`training_state` into the live objects and the global RNGs; returns its step."""
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    scaler.load_state_dict(state["scaler"])
    torch.set_rng_state(state["rng"]["torch"])
    np.random.set_state(state["rng"]["numpy"])
    if "cuda" in state["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])
    return int(state["step"])
