"""A tiny training run through :class:`tasks.engine.training.Trainer` (a linear model on the numbers 0..7), whose
loss turns NaN on one rank at one step; light to import, for the ranks that tests spawn."""
from __future__ import annotations

import json
import os
from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path

import torch

from storage.errors import TrainingDivergedError
from storage.tracking import Tracker
from tasks.engine import distributed
from tasks.engine.training import Checkpointer, HookBase, Solver, StepResult, Trainer

NAN = float("nan")


class Numbers(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 8

    def __getitem__(self, item) -> torch.Tensor:
        return torch.tensor([float(item[0])])


def tiny_training(out_dir: str, ranks: distributed.Ranks, nan_step: int = 0, nan_rank: int = 0,
                  hooks: Sequence[HookBase] = ()) -> None:
    """4 steps (checkpoints after 2), the loss NaN on ``nan_rank`` at ``nan_step`` (1-based); ``hooks`` run before
    the checkpointer."""
    torch.manual_seed(0)
    model = torch.nn.Linear(1, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    trainer = Trainer("tiny", Solver(model, optimizer, scheduler), ranks, torch.device("cpu"), Tracker.null(), 4,
                      out_dir, "hash")
    trainer.resume()
    wrapped = ranks.wrap(model, torch.device("cpu"))

    def loss_step(batches) -> StepResult:
        x = next(batches)
        loss = wrapped(x).pow(2).mean()
        if trainer.step + 1 == nan_step and ranks.rank == nan_rank:
            loss = loss * NAN
        trainer.backward(loss)
        return StepResult({"loss": loss.item()}, len(x))

    loader = trainer.loader(Numbers(), seed=0, batch_size=2, num_workers=0)
    trainer.train(loader, loss_step, [*hooks, Checkpointer(2, 5)])


def rank_worker(rank: int, port: int, out_dir: str, report_dir: str) -> None:
    """One of two torchrun-like gloo ranks: the tiny training with rank 1's loss NaN at step 3; writes the error
    message (or "no error") to ``<report_dir>/rank<rank>.json``."""
    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": str(port)})
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2, timeout=timedelta(seconds=60))
    ranks, _ = distributed.setup(torch.device("cpu"))
    try:
        tiny_training(out_dir, ranks, nan_step=3, nan_rank=1)
        message = "no error"
    except TrainingDivergedError as err:
        message = str(err)
    Path(report_dir, f"rank{rank}.json").write_text(json.dumps(message))
    torch.distributed.barrier()  # both ranks are past the training before either destroys the process group
    distributed.cleanup()
