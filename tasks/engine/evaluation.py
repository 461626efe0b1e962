"""The evaluator protocol of the evaluation stages (``eval_cam``, ``eval_pseudo_labels``, ``eval_seg``), after
detectron2's ``DatasetEvaluator``: an :class:`Evaluator` is ``reset`` to an empty :class:`EvalState`, ``process``-es
the outputs of its images one by one into that state, ``merge``-s states other processes accumulated, and
``report``-s the results of its state (files, tracker, manifest).

Two drivers run any evaluator: :func:`evaluate` over the whole split (then reports), or over one shard ``i/n`` (then
saves the shard's state as a partial under ``<out_dir>/shards/<name>/``); :func:`merge_shards` merges the saved
partials of all shards and reports once, exactly as one pass over all images would.
"""
from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

import numpy as np
import torch

from models.metrics import ConfusionMatrix
from storage import fs
from storage.tracking import Tracker
from tasks.engine.shards import load_partials, remove_partials, save_partial

Output = TypeVar("Output")


@dataclass
class EvalState:
    """What an evaluator accumulated over some images, and what a shard saves as its partial.

    ``matrices``: confusion-matrix counts by name ((K, K), or (T, K, K) for a threshold sweep), added up by a
    merge; ``counts``: counters (images, pixels), added up; ``seconds``: timings, the slowest shard's after a
    merge; ``pictures``: PNG bytes by output path (overlays, exported predictions), united.
    """

    matrices: dict[str, torch.Tensor] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    pictures: dict[str, bytes] = field(default_factory=dict)

    def add_matrix(self, name: str, counts: torch.Tensor) -> None:
        self.matrices[name] = self.matrices[name] + counts if name in self.matrices else counts.clone()

    def add_confusion(self, name: str, target: torch.Tensor | np.ndarray, prediction: torch.Tensor | np.ndarray,
                      num_classes: int) -> None:
        """Add one image's (K, K) confusion matrix (:class:`models.metrics.ConfusionMatrix` rules) to ``name``."""
        matrix = ConfusionMatrix(num_classes)
        matrix.update(target, prediction)
        self.add_matrix(name, matrix.matrix)

    def add_count(self, name: str, value: int) -> None:
        self.counts[name] = self.counts.get(name, 0) + value

    def merge(self, other: EvalState) -> None:
        """Add ``other`` (another shard's state) to this one."""
        for name, counts in other.matrices.items():
            self.add_matrix(name, counts)
        for name, value in other.counts.items():
            self.add_count(name, value)
        for name, seconds in other.seconds.items():
            self.seconds[name] = max(self.seconds.get(name, 0.0), seconds)
        self.pictures.update(other.pictures)

    def pictures_of(self, names: Iterable[str]) -> dict[str, bytes]:
        """The pictures among ``names`` that were drawn, in the order of ``names`` (e.g. the split's image order,
        whichever shards drew them)."""
        return {name: self.pictures[name] for name in names if name in self.pictures}

    def to_dict(self) -> dict:
        """Plain containers of tensors, numbers and bytes: what a partial saves (and ``weights_only`` loads)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, saved: dict) -> EvalState:
        return cls(**saved)


class Evaluator(ABC, Generic[Output]):
    """One evaluation: ``name`` names its partials (``<out_dir>/shards/<name>/``); ``state`` is what it has
    accumulated since the last :meth:`reset`."""

    name: str
    out_dir: str
    state: EvalState

    def reset(self) -> None:
        """Start from an empty state (subclasses may add zero matrices, so that a shard without images still
        contributes, and an empty split still reports)."""
        self.state = EvalState()

    @abstractmethod
    def outputs(self, shard: str | None) -> Iterable[Output]:
        """What :meth:`process` takes, one item per image of ``shard`` (None: every image), in order: the image id
        alone, or what was read or predicted for it."""

    @abstractmethod
    def process(self, output: Output) -> None:
        """Accumulate one image's output into ``state``."""

    def merge(self, state: EvalState) -> None:
        """Accumulate a state another evaluator of the same evaluation built (a shard's partial)."""
        self.state.merge(state)

    @abstractmethod
    def report(self) -> dict:
        """Write and log the results of ``state``; return the stage's manifest."""


def accumulate(evaluator: Evaluator, shard: str | None = None) -> EvalState:
    """Reset ``evaluator`` and process the outputs of the images of ``shard`` (None: all); returns its state."""
    evaluator.reset()
    for output in evaluator.outputs(shard):
        evaluator.process(output)
    return evaluator.state


def evaluate(evaluator: Evaluator, shard: str | None = None) -> dict:
    """Run ``evaluator`` over the whole split and report (``shard=None``), or over one shard ``i/n`` and save its
    state for :func:`merge_shards` (kept from an earlier attempt that saved it); returns the manifest."""
    if shard is None:
        accumulate(evaluator)
        return evaluator.report()
    return save_partial(evaluator.out_dir, evaluator.name, shard, lambda: accumulate(evaluator, shard).to_dict())


def merge_shards(evaluator: Evaluator, manifests: Sequence[dict]) -> dict:
    """The manifest of a sharded evaluation (``manifests``: its shards'): ``evaluator`` reports the merge of the
    shards' saved states, which are removed afterwards."""
    evaluator.reset()
    for saved in load_partials(manifests):
        evaluator.merge(EvalState.from_dict(saved))
    manifest = {**evaluator.report(), "shards": len(manifests)}
    remove_partials(evaluator.out_dir, evaluator.name)
    return manifest


def publish_pictures(pictures: dict[str, bytes], out_dir: str, tracker: Tracker, prefix: str) -> None:
    """Write each picture to ``<out_dir>/<name>`` and log it to the tracker as ``<prefix>/<name>``."""
    for name, png in pictures.items():
        fs.write_bytes(fs.join(out_dir, name), png)
        tracker.log_bytes(png, f"{prefix}/{name}")
