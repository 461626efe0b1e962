"""What a stage knows of the run it is part of, beside its own config section and its inputs' manifests."""
from __future__ import annotations

from dataclasses import dataclass

from storage import fs


@dataclass(frozen=True)
class RunContext:
    run_dir: str  # the run directory (path or fsspec URL); each stage writes under <run_dir>/<stage>/
    cache_dir: str  # what runs of one runs folder share (the dataset's label cache)
    seed: int
    device: str  # auto, cpu, cuda, cuda:N or mps

    def out_dir(self, stage: str) -> str:
        """The folder a stage writes its outputs to: named after the stage."""
        return fs.join(self.run_dir, stage)
