"""Data-parallel training under torchrun: the process's rank, the process group, batch sharding and DDP wrapping.

Outside torchrun (no ``WORLD_SIZE`` > 1 in the environment) every helper is a no-op for a single process, so a
plain run trains exactly as without this module. Under torchrun each process owns one device (``cuda:LOCAL_RANK``,
or the CPU with the gloo backend), takes its slice of every global batch and averages gradients through DDP.
"""
from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import Sampler

from storage.errors import ConfigError

T = TypeVar("T")


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None:
        return default
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"environment variable {name}={value!r} is not an integer") from None


@dataclass(frozen=True)
class Ranks:
    """This process's place among the training processes; the default is a single process."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @classmethod
    def from_env(cls) -> Ranks:
        """Read torchrun's ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` (a single process when they are unset)."""
        ranks = cls(_env_int("RANK", 0), _env_int("WORLD_SIZE", 1), _env_int("LOCAL_RANK", 0))
        if ranks.world_size < 1 or not 0 <= ranks.rank < ranks.world_size:
            raise ConfigError(f"RANK={ranks.rank} is not in [0, WORLD_SIZE={ranks.world_size})")
        return ranks

    @property
    def active(self) -> bool:
        """Whether several processes train together."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0 writes checkpoints and manifests and logs to MLflow."""
        return self.rank == 0

    def rank_seed(self, seed: int) -> int:
        """The seed of this rank's own random draws (dropout, image bank): ``seed + rank``."""
        return seed + self.rank

    def seed_rank_rngs(self, seed: int) -> None:
        """After an identical model init on every rank, give the global torch/numpy RNGs per-rank streams (a
        single process keeps its stream unchanged)."""
        if self.active:
            torch.manual_seed(self.rank_seed(seed))
            np.random.seed(self.rank_seed(seed))

    def shard(self, batch: Sequence[T]) -> list[T]:
        """This rank's contiguous slice of a global batch of ``world_size`` x per-process size."""
        if len(batch) % self.world_size:
            raise ValueError(f"global batch of {len(batch)} does not split over {self.world_size} processes")
        size = len(batch) // self.world_size
        return list(batch[self.rank * size:(self.rank + 1) * size])

    def wrap(self, model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
        """The model in DDP (gradients averaged over ranks, rank 0's weights broadcast), or itself."""
        if not self.active:
            return model
        device_ids = [device.index] if device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=device_ids)

    def barrier(self) -> None:
        """Wait for every rank (nothing to wait for alone, or before :func:`setup` connected the ranks)."""
        if self.active and dist.is_initialized():
            dist.barrier()

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj`` in rank order (a collective call); ``[obj]`` for a single process."""
        if not self.active:
            return [obj]
        gathered: list[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, obj)
        return gathered

    def all_true(self, flag: bool, device: torch.device) -> bool:
        """Whether ``flag`` holds on every rank (a collective call: one all-reduce of a scalar on ``device``);
        ``flag`` itself for a single process."""
        if not self.active:
            return flag
        value = torch.tensor(int(flag), device=device)
        dist.all_reduce(value, op=dist.ReduceOp.MIN)
        return bool(value.item())

    def broadcast(self, obj: T) -> T:
        """Rank 0's ``obj`` on every rank (a collective call)."""
        if not self.active:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]


def sync_grads(model: torch.nn.Module, sync: bool) -> AbstractContextManager:
    """Context for one backward of gradient accumulation: DDP's all-reduce only when ``sync``."""
    if sync or not isinstance(model, DistributedDataParallel):
        return nullcontext()
    return model.no_sync()


def setup(device: torch.device) -> tuple[Ranks, torch.device]:
    """This process's ranks and training device (``device`` itself outside torchrun). Under torchrun, also the
    process group (nccl on CUDA, gloo on the CPU), initialised once per process; each rank of a CUDA run trains
    on ``cuda:LOCAL_RANK``."""
    ranks = Ranks.from_env()
    if not ranks.active:
        return ranks, device
    if device.type == "cuda":
        count = torch.cuda.device_count()
        if ranks.local_rank >= count:
            raise RuntimeError(
                f"LOCAL_RANK={ranks.local_rank} needs CUDA device {ranks.local_rank}, but this node has {count} "
                f"CUDA device(s): start at most {count} processes per node (torchrun --nproc_per_node {count})")
        device = torch.device("cuda", ranks.local_rank)
        torch.cuda.set_device(device)
    elif device.type != "cpu":
        raise ConfigError(f"distributed training runs on CUDA or the CPU, not on {device}")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=ranks.rank,
                                world_size=ranks.world_size)
    elif dist.get_world_size() != ranks.world_size:
        raise RuntimeError(f"the process group has {dist.get_world_size()} processes, WORLD_SIZE says "
                           f"{ranks.world_size}")
    return ranks, device


def seeded_model(build: Callable[[], torch.nn.Module], seed: int, device: torch.device, ranks: Ranks,
                 channels_last: bool = False) -> torch.nn.Module:
    """The model ``build`` makes under ``seed`` (the same initial weights on every rank), on ``device`` in training
    mode; each rank's RNGs are then seeded apart (its own augmentation and sampling)."""
    torch.manual_seed(seed)
    model = build().to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    ranks.seed_rank_rngs(seed)
    return model.train()


def cleanup() -> None:
    """Destroy the process group, if any (the training functions end with a collective, so ranks are in step)."""
    if dist.is_initialized():
        dist.destroy_process_group()


class RankBatches(Sampler[list]):
    """This rank's slice of each batch of a batch sampler that yields global batches (``world_size`` x the
    per-process batch size): ranks see disjoint items in the global order, which stays the sampler's."""

    def __init__(self, batches: Sampler[list], ranks: Ranks):
        self.batches = batches
        self.ranks = ranks

    def __len__(self) -> int:
        return len(self.batches)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[list]:
        for batch in self.batches:
            yield self.ranks.shard(batch)
