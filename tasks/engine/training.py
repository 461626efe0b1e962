"""The training loop of the training stages (train_cam, train_irn, train_seg), in the manner of detectron2's
``TrainerBase`` and ``HookBase``.

A stage builds its model and a :class:`Solver` (optimiser, scheduler, grad scaler, clipping), makes a
:class:`Trainer`, resumes it from the newest step checkpoint, and hands :meth:`Trainer.train` its loader, its loss
step (batches in, backward done, loss terms out) and its hooks. Each step the trainer zeroes the gradients, runs the
loss step, stops the stage with :class:`~storage.errors.TrainingDivergedError` when a loss term or the gradient norm
is not finite (before the optimiser step: no bad weights are ever saved), steps optimiser and scheduler, and calls
the hooks in order: :class:`StepLogger` (progress bar, MLflow losses and learning rates), :class:`EvalHook`
(validation on rank 0) and :class:`Checkpointer` (step checkpoints, rank-local entries gathered, ranks in step).
"""
from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Container, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from storage import checkpoints, fs
from storage.datasets.cam_training import EpochBatchSampler
from storage.errors import CheckpointError, ConfigError, TrainingDivergedError
from storage.tracking import Tracker
from tasks.engine import distributed
from tasks.engine.distributed import RankBatches, Ranks
from tasks.engine.resume import (
    latest_training_state,
    rank_states,
    restore_rank_state,
    rng_states,
    save_training_state,
    set_rng_states,
)
from tasks.runtime.device import resolve_device


def setup(device: str, tracker: Tracker | None) -> tuple[Ranks, torch.device, Tracker]:
    """This process's ranks and training device (see :func:`distributed.setup`), and the tracker it logs to: the
    given one on rank 0, a null one elsewhere."""
    ranks, torch_device = distributed.setup(resolve_device(device))
    return ranks, torch_device, (tracker or Tracker.null()) if ranks.is_main else Tracker.null()


def steps_per_epoch(num_items: int, batch_size: int, ranks: Ranks, source: str) -> int:
    """Optimiser steps per epoch of ``num_items`` at ``batch_size`` per process; fewer items than one global batch
    is an error naming ``source``."""
    steps = num_items // (batch_size * ranks.world_size)
    if steps == 0:
        raise ConfigError(f"{source}: {num_items} images, fewer than batch_size={batch_size} x {ranks.world_size} "
                          "process(es)")
    return steps


@dataclass
class Solver:
    """What a step updates and a step checkpoint restores. ``scaler`` None: no AMP and no scaler entry;
    ``clip_grad_norm``: gradients clipped to that total norm (unscaled first); ``frozen_prefix``: weights under it are
    left out of step checkpoints (rebuilt identically), the rest stored as ``heads``."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: torch.amp.GradScaler | None = None
    clip_grad_norm: float | None = None
    frozen_prefix: str | None = None

    def state_dict(self) -> dict[str, Any]:
        if self.frozen_prefix is None:
            state = {"model": self.model.state_dict()}
        else:
            state = {"heads": {k: v for k, v in self.model.state_dict().items()
                               if not k.startswith(self.frozen_prefix)}}
        state.update(optimizer=self.optimizer.state_dict(), scheduler=self.scheduler.state_dict())
        if self.scaler is not None:
            state["scaler"] = self.scaler.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.frozen_prefix is None:
            self.model.load_state_dict(state["model"])
        else:
            missing, unexpected = self.model.load_state_dict(state["heads"], strict=False)
            if unexpected or any(not k.startswith(self.frozen_prefix) for k in missing):
                raise CheckpointError(f"step checkpoint does not fit the model: missing {missing[:5]}, unexpected "
                                      f"{unexpected[:5]}")
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None:
            self.scaler.load_state_dict(state["scaler"])

    @property
    def scaled(self) -> bool:
        """Whether gradients pass through an enabled grad scaler (AMP: non-finite ones are then skipped by it)."""
        return self.scaler is not None and self.scaler.is_enabled()


class StepResult(NamedTuple):
    """What a stage's loss step returns: its loss terms (``loss`` the optimised total) and its images."""

    losses: dict[str, float]
    images: int


LossStep = Callable[[Iterator[Any]], StepResult]


class HookBase:
    """Called by :meth:`Trainer.train`: ``before_train``, per step ``before_step`` and ``after_step`` (with
    ``trainer.step`` the steps done), and ``after_train`` (also when training raises)."""

    def before_train(self, trainer: Trainer) -> None:
        pass

    def before_step(self, trainer: Trainer) -> None:
        pass

    def after_step(self, trainer: Trainer) -> None:
        pass

    def after_train(self, trainer: Trainer) -> None:
        pass


class Trainer:
    """One stage's training loop from its resumed step to ``total_steps``; see the module docstring."""

    def __init__(self, stage: str, solver: Solver, ranks: Ranks, device: torch.device, tracker: Tracker,
                 total_steps: int, out_dir: str, cfg_hash: str):
        self.stage, self.solver, self.ranks, self.device, self.tracker = stage, solver, ranks, device, tracker
        self.total_steps, self.cfg_hash = total_steps, cfg_hash
        self.ckpt_dir = fs.join(out_dir, "checkpoints")
        self.start_step = self.step = 0
        self.losses: dict[str, float] = {}
        self.lrs: list[float] = []
        self.history: list[dict[str, float]] = []
        self.images_seen = 0
        self.seconds = 0.0

    def resume(self) -> tuple[dict, dict]:
        """Restore solver, step and RNGs from the newest step checkpoint; returns it and this rank's part of it
        (the same dict for a single process), or two empty dicts when there is none."""
        state = latest_training_state(self.ckpt_dir, self.cfg_hash)
        if state is None:
            return {}, {}
        self.solver.load_state_dict(state)
        set_rng_states(state["rng"])
        self.start_step = self.step = int(state["step"])
        return state, restore_rank_state(state, self.ranks)

    def loader(self, dataset: Dataset, seed: int, batch_size: int, num_workers: int, per_step: int = 1,
               repeats: np.ndarray | None = None, generator: torch.Generator | None = None) -> DataLoader:
        """The rank's batches of ``batch_size`` for the remaining steps, ``per_step`` batches a step, in the seeded
        epoch order of all ranks' global batches (see :class:`EpochBatchSampler`)."""
        sampler = RankBatches(EpochBatchSampler(len(dataset), batch_size * self.ranks.world_size, seed,
                                                self.total_steps * per_step, self.start_step * per_step, repeats),
                              self.ranks)
        return DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers,
                          pin_memory=self.device.type == "cuda", generator=generator)

    def backward(self, loss: torch.Tensor) -> None:
        """Backpropagate ``loss`` (scaled under AMP)."""
        scaler = self.solver.scaler
        (loss if scaler is None else scaler.scale(loss)).backward()

    def train(self, loader: DataLoader, loss_step: LossStep, hooks: Sequence[HookBase]) -> None:
        """Run the steps left, calling ``hooks`` around each; ``self.seconds`` is then the time it took."""
        started = time.perf_counter()
        batches = iter(loader)
        for hook in hooks:
            hook.before_train(self)
        try:
            for step in range(self.start_step, self.total_steps):
                for hook in hooks:
                    hook.before_step(self)
                self.run_step(batches, loss_step)
                self.step = step + 1
                for hook in hooks:
                    hook.after_step(self)
            self.check_weights()
        finally:
            for hook in hooks:
                hook.after_train(self)
        self.seconds = time.perf_counter() - started

    def run_step(self, batches: Iterator[Any], loss_step: LossStep) -> None:
        """One optimiser step: gradients zeroed, the stage's forward and backward, clipping, the finiteness check,
        optimiser, grad scaler and scheduler steps."""
        solver, optimizer = self.solver, self.solver.optimizer
        optimizer.zero_grad(set_to_none=True)
        result = loss_step(batches)
        grad_norm = None
        if solver.clip_grad_norm is not None:
            if solver.scaler is not None:
                solver.scaler.unscale_(optimizer)
            grad_norm = float(torch.nn.utils.clip_grad_norm_(solver.model.parameters(), solver.clip_grad_norm))
        elif not solver.scaled:
            grad_norm = total_grad_norm(solver.model.parameters())
        self._check_step(result.losses, None if solver.scaled else grad_norm)
        self.lrs = [group["lr"] for group in optimizer.param_groups]
        if solver.scaler is None:
            optimizer.step()
        else:
            solver.scaler.step(optimizer)
            solver.scaler.update()
        solver.scheduler.step()
        self.losses = result.losses
        self.history.append(result.losses)
        self.images_seen += result.images * self.ranks.world_size

    def _check_step(self, losses: dict[str, float], grad_norm: float | None) -> None:
        """Raise :class:`TrainingDivergedError` (on every rank) when a loss term or the gradient norm of any rank
        is not finite."""
        if self.ranks.all_true(_finite(losses, grad_norm), self.device):
            return
        reports = self.ranks.gather((losses, grad_norm))
        bad = [rank for rank, (values, norm) in enumerate(reports) if not _finite(values, norm)]
        rank = next((rank for rank in bad if not _finite(reports[rank][0], None)), bad[0])  # a bad loss first
        self._diverged(self.step + 1, _describe(*reports[rank]), rank)

    def check_weights(self) -> None:
        """Raise :class:`TrainingDivergedError` (on every rank) when a weight or buffer of the model is not finite
        (checked before the weights are saved)."""
        tensors = {k: v for k, v in self.solver.model.state_dict().items() if v.is_floating_point()}
        finite = torch.stack([torch.isfinite(v).all() for v in tensors.values()]).tolist() if tensors else []
        bad = [key for key, ok in zip(tensors, finite) if not ok]
        if self.ranks.all_true(not bad, self.device):
            return
        reports = self.ranks.gather(bad)
        rank = next(rank for rank, names in enumerate(reports) if names)
        shown = ", ".join(reports[rank][:5]) + (", ..." if len(reports[rank]) > 5 else "")
        self._diverged(self.step, f"non-finite weights ({shown}) after {_describe(self.losses, None)}", rank)

    def _diverged(self, step: int, what: str, rank: int) -> None:
        where = f" (rank {rank})" if self.ranks.active else ""
        saved = checkpoints.step_checkpoints(self.ckpt_dir)
        last = f"the last good checkpoint is {saved[-1][1]}" if saved else \
            "no step checkpoint was written yet: a rerun starts from step 0"
        raise TrainingDivergedError(f"{self.stage} diverged at step {step}{where}: {what}; {last}")

    def state(self, **extra: Any) -> dict[str, Any]:
        """The step checkpoint after ``self.step`` steps: solver, step, global RNG states, config hash, ``extra``."""
        return {**self.solver.state_dict(), "step": self.step, "rng": rng_states(), "config_hash": self.cfg_hash,
                **extra}

    @property
    def images_per_second(self) -> float | None:
        return self.images_seen / self.seconds if self.seconds > 0 and self.images_seen else None

    def publish(self, manifest_url: str, manifest: dict) -> dict:
        """Write the stage manifest (rank 0) and log it; returns it on every rank."""
        fs.write_text(manifest_url, json.dumps(manifest, indent=2))
        self.tracker.log_dict(manifest, f"{self.stage}/manifest.json")
        return self.ranks.broadcast(manifest)


def _describe(losses: dict[str, float], grad_norm: float | None) -> str:
    """``loss=<total> (<term>=<value>, ...), gradient norm=<norm>``."""
    terms = ", ".join(f"{key}={value:.6g}" for key, value in losses.items() if key != "loss")
    text = f"loss={losses.get('loss', math.nan):.6g}" + (f" ({terms})" if terms else "")
    return text if grad_norm is None else f"{text}, gradient norm={grad_norm:.6g}"


def _finite(losses: dict[str, float], grad_norm: float | None) -> bool:
    return all(map(math.isfinite, losses.values())) and (grad_norm is None or math.isfinite(grad_norm))


def total_grad_norm(parameters: Iterator[torch.nn.Parameter]) -> float:
    """The 2-norm of all gradients together (0 without any)."""
    norms = [torch.linalg.vector_norm(p.grad) for p in parameters if p.grad is not None]
    return float(torch.linalg.vector_norm(torch.stack(norms))) if norms else 0.0


class StepLogger(HookBase):
    """The progress bar (rank 0) with the step's loss, and the loss terms and learning rates (named ``lr_names``
    in the order of the optimiser's parameter groups) in MLflow every ``log_every`` steps and at the last."""

    def __init__(self, lr_names: Sequence[str], log_every: int):
        self.lr_names, self.log_every = lr_names, log_every
        self.progress: tqdm | None = None

    def before_train(self, trainer: Trainer) -> None:
        self.progress = tqdm(total=trainer.total_steps, initial=trainer.start_step, desc=trainer.stage, unit="step",
                             dynamic_ncols=True, disable=not trainer.ranks.is_main)

    def after_step(self, trainer: Trainer) -> None:
        assert self.progress is not None
        self.progress.update(1)
        self.progress.set_postfix(loss=f"{trainer.losses['loss']:.4f}")
        if trainer.step % self.log_every == 0 or trainer.step == trainer.total_steps:
            trainer.tracker.log_metrics({**trainer.losses, **dict(zip(self.lr_names, trainer.lrs))}, step=trainer.step)

    def after_train(self, trainer: Trainer) -> None:
        if self.progress is not None:
            self.progress.close()


class EvalHook(HookBase):
    """``evaluate(step)`` on rank 0 after each step in ``steps``."""

    def __init__(self, steps: Container[int], evaluate: Callable[[int], Any]):
        self.steps, self.evaluate = steps, evaluate

    def after_step(self, trainer: Trainer) -> None:
        if trainer.ranks.is_main and trainer.step in self.steps:
            self.evaluate(trainer.step)


class Checkpointer(HookBase):
    """A step checkpoint (:meth:`Trainer.state`) after every ``every`` steps but the last (``at_end``: and after
    the last), the ``keep`` newest kept. ``extra(step)`` adds stage entries; those named in ``per_rank`` are also
    stored per rank under torchrun, with each rank's RNG states (a collective call; rank 0 writes)."""

    def __init__(self, every: int, keep: int, at_end: bool = False,
                 extra: Callable[[int], dict[str, Any]] | None = None, per_rank: Sequence[str] = ()):
        self.every, self.keep, self.at_end, self.extra, self.per_rank = every, keep, at_end, extra, per_rank

    def after_step(self, trainer: Trainer) -> None:
        last = trainer.step == trainer.total_steps
        if not (last and self.at_end or trainer.step % self.every == 0 and not last):
            return
        trainer.check_weights()
        extra = self.extra(trainer.step) if self.extra is not None else {}
        per_rank = rank_states(trainer.ranks, **{key: extra[key] for key in self.per_rank})
        if trainer.ranks.is_main:
            save_training_state(trainer.ckpt_dir, trainer.state(**extra, **per_rank), self.keep)
        trainer.ranks.barrier()
