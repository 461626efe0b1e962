"""Resumable training: the parts of a step checkpoint (written by :mod:`tasks.engine.training`) that let a killed
run continue bit-identically (RNG states, per-rank entries), finding and writing step checkpoints, the
finished-stage check and the loss summary of a training manifest."""
from __future__ import annotations

import json
import logging

import numpy as np
import torch

from storage import checkpoints, fs
from storage.errors import CheckpointError, ConfigError
from tasks.engine.distributed import Ranks

log = logging.getLogger(__name__)


def finished_manifest(manifest_url: str, cfg_hash: str, what: str = "the stage") -> dict | None:
    """The stage manifest at ``manifest_url`` if it was written under ``cfg_hash`` and its checkpoint exists (logged
    as ``<what> already finished``)."""
    if not fs.exists(manifest_url):
        return None
    manifest = json.loads(fs.read_text(manifest_url))
    checkpoint = manifest.get("checkpoint")
    if manifest.get("config_hash") == cfg_hash and checkpoint and fs.exists(checkpoint):
        log.info("%s already finished: %s", what, checkpoint)
        return manifest
    return None


def rng_states() -> dict:
    """The global torch (and CUDA) and numpy RNG states."""
    rng = {"torch": torch.get_rng_state(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    return rng


def set_rng_states(rng: dict) -> None:
    """Restore what :func:`rng_states` returned."""
    torch.set_rng_state(rng["torch"])
    np.random.set_state(rng["numpy"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])


def rank_states(ranks: Ranks, **local) -> dict:
    """Checkpoint entries of a distributed run: the world size and, per rank, its RNG states and ``local``
    entries (a collective call: every rank makes it). Nothing for a single process."""
    if not ranks.active:
        return {}
    return {"world_size": ranks.world_size, "ranks": ranks.gather({"rng": rng_states(), **local})}


def restore_rank_state(state: dict, ranks: Ranks) -> dict:
    """This rank's part of a step checkpoint, its RNG states restored: the whole checkpoint for a single process,
    else the rank's entry of :func:`rank_states`. A checkpoint of another number of processes is an error."""
    saved = state.get("world_size", 1)
    if saved != ranks.world_size:
        raise ConfigError(f"the step checkpoint at step {state['step']} was written by {saved} training "
                          f"process(es), this run has {ranks.world_size}: resume with {saved}, or remove the "
                          "checkpoints to start over")
    if not ranks.active:
        return state
    local = state["ranks"][ranks.rank]
    set_rng_states(local["rng"])
    return local


LOSS_WINDOW = 20  # steps averaged for the first/last losses of a training manifest


def loss_summary(history: list[dict[str, float]], window: int = LOSS_WINDOW) -> dict[str, dict[str, float] | None]:
    """The mean of each loss term over the first and the last ``window`` steps (single steps are noisy)."""
    def mean(values: list[dict[str, float]]) -> dict[str, float] | None:
        return {key: float(np.mean([v[key] for v in values])) for key in values[0]} if values else None

    return {"first_losses": mean(history[:window]), "last_losses": mean(history[-window:])}


def save_training_state(ckpt_dir: str, state: dict, keep: int) -> None:
    """Write ``state`` as ``step_<step>.pt`` (atomically) and keep only the ``keep`` newest step checkpoints."""
    checkpoints.save(checkpoints.step_url(ckpt_dir, state["step"]), state)
    checkpoints.prune(ckpt_dir, keep)


def latest_training_state(ckpt_dir: str, cfg_hash: str) -> dict | None:
    """The newest readable step checkpoint in ``ckpt_dir`` (None if there is none). An unreadable one (corrupted
    on disk) is set aside as ``*.corrupt`` with a warning naming it and the next older one is used, so the stage is
    redone from there rather than trusted; one written under another config is an error naming the file."""
    for _, url in reversed(checkpoints.step_checkpoints(ckpt_dir)):
        try:
            state = checkpoints.load(url, weights_only=False)
        except ValueError as err:
            log.warning("%s; set aside as %s.corrupt, resuming from an older checkpoint", err, url)
            fs.write_bytes(f"{url}.corrupt", fs.read_bytes(url))
            fs.remove(url)
            continue
        break
    else:
        return None
    if state.get("config_hash") != cfg_hash:
        raise CheckpointError(f"{url} was written with another config; remove {ckpt_dir} or use a new run name")
    log.info("resuming from step %d (%s)", state["step"], url)
    return state
