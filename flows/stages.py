"""The pipeline's stages in order: what each needs, which config sections and code it depends on, and how the flow
calls its Prefect task. Each stage returns a small manifest (output locations, hashes, key figures)."""
from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from flows.code_version import code_version
from flows.config import PipelineConfig
from storage import fs
from storage.tracking import Tracker
from tasks.eval_cam import eval_cam_task
from tasks.infer_cams import infer_cams_task
from tasks.prepare_data import prepare_data_task
from tasks.train_cam import train_cam_task

Arguments = Callable[[PipelineConfig, Mapping[str, dict], Tracker], dict[str, Any]]


@dataclass(frozen=True)
class Stage:
    name: str
    task: Any  # the module's Prefect task
    sections: tuple[str, ...]  # config sections the stage's outputs depend on
    needs: tuple[str, ...]  # stages whose manifests it reads
    arguments: Arguments

    @property
    def module(self) -> str:
        return self.task.fn.__module__

    def cache_key(self, cfg: PipelineConfig, inputs: Mapping[str, dict]) -> str:
        """Derived from the stage's config sections, the run's seed/device/directory, the manifests of its
        inputs and its code version: equal keys mean the stage's outputs would be the same."""
        parts = {
            "stage": self.name, "run_dir": cfg.run_dir, "seed": cfg.run.seed, "device": cfg.run.device,
            "sections": {s: getattr(cfg, s).model_dump(mode="json") for s in self.sections},
            "inputs": {name: inputs[name] for name in self.needs}, "code": code_version(self.module),
        }
        text = json.dumps(parts, sort_keys=True, default=str)
        return f"{self.name}-{hashlib.sha256(text.encode()).hexdigest()[:24]}"


def _splits(manifests: Mapping[str, dict]) -> dict[str, str]:
    return manifests["prepare_data"]["splits"]


STAGES: tuple[Stage, ...] = (
    Stage("prepare_data", prepare_data_task, ("data",), (),
          lambda cfg, m, t: {"cfg": cfg.data, "run_dir": cfg.run_dir, "cache_dir": cfg.cache_dir, "tracker": t}),
    Stage("train_cam", train_cam_task, ("train_cam",), ("prepare_data",),
          lambda cfg, m, t: {"cfg": cfg.train_cam, "train_split_url": _splits(m)["train"],
                             "val_split_url": _splits(m)["val"], "out_dir": fs.join(cfg.run_dir, "train_cam"),
                             "seed": cfg.run.seed, "device": cfg.run.device, "tracker": t}),
    Stage("infer_cams", infer_cams_task, ("infer_cams",), ("prepare_data", "train_cam"),
          lambda cfg, m, t: {"cfg": cfg.infer_cams, "checkpoint_url": m["train_cam"]["checkpoint"],
                             "split_urls": [_splits(m)["train"], _splits(m)["val"]],
                             "store_url": cam_store_url(cfg), "device": cfg.run.device, "tracker": t}),
    Stage("eval_cam", eval_cam_task, ("eval_cam",), ("prepare_data", "infer_cams"),
          lambda cfg, m, t: {"cfg": cfg.eval_cam, "store_url": m["infer_cams"]["store"],
                             "split_url": _splits(m)["val"], "out_dir": fs.join(cfg.run_dir, "metrics"),
                             "tracker": t}),
)
STAGE_NAMES = tuple(stage.name for stage in STAGES)


def cam_store_url(cfg: PipelineConfig) -> str:
    return fs.join(cfg.run_dir, "cams.zarr")


def manifest_url(run_dir: str, stage: str) -> str:
    return fs.join(run_dir, "manifests", f"{stage}.json")


def select_stages(only: list[str] | None = None, start: str | None = None) -> list[Stage]:
    """The stages to run: all, the named ones (``--stages``), or one and all after it (``--from``)."""
    unknown = [n for n in [*(only or []), *([start] if start else [])] if n not in STAGE_NAMES]
    if unknown:
        raise ValueError(f"unknown stage(s) {', '.join(unknown)}; stages: {', '.join(STAGE_NAMES)}")
    if only and start:
        raise ValueError("give either --stages or --from, not both")
    if only:
        return [s for s in STAGES if s.name in only]
    if start:
        return list(STAGES[STAGE_NAMES.index(start):])
    return list(STAGES)


def output_paths(manifest: Any, run_dir: str) -> list[str]:
    """Every location inside the run directory that a manifest names (checked before a cached result is trusted)."""
    if isinstance(manifest, Mapping):
        return [p for value in manifest.values() for p in output_paths(value, run_dir)]
    if isinstance(manifest, (list, tuple)):
        return [p for value in manifest for p in output_paths(value, run_dir)]
    if isinstance(manifest, str) and manifest.startswith(run_dir.rstrip("/") + "/"):
        return [manifest]
    return []


def missing_outputs(manifest: dict, run_dir: str) -> list[str]:
    return [p for p in output_paths(manifest, run_dir) if not fs.exists(p)]
