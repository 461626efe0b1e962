"""The pipeline's stages in order: what each needs, which config sections and code it depends on, and how the flow
calls its Prefect task. Each stage returns a small manifest (output locations, hashes, key figures)."""
from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from flows.code_version import code_version
from flows.config import PipelineConfig
from storage import fs
from storage.digests import damaged_units
from storage.tracking import Tracker
from tasks.engine.label_maps import merge_label_manifests
from tasks.eval_cam import eval_cam_task, merge_cam_eval
from tasks.eval_pseudo_labels import eval_pseudo_labels_task, merge_pseudo_label_eval
from tasks.eval_seg import eval_seg_task, merge_seg_eval
from tasks.infer_cams import infer_cams_task, merge_infer_manifests
from tasks.make_ir_labels import make_ir_labels_task
from tasks.make_pseudo_labels import make_pseudo_labels_task
from tasks.prepare_data import prepare_data_task
from tasks.runtime.weights import CAM_WEIGHTS
from tasks.train_cam import train_cam_task
from tasks.train_irn import TrainIrnConfig, train_irn_task
from tasks.train_seg import TrainSegConfig, train_seg_task

Section = TypeVar("Section", TrainIrnConfig, TrainSegConfig)
Arguments = Callable[[PipelineConfig, Mapping[str, dict], Tracker], dict[str, Any]]
Merge = Callable[[list[dict], dict[str, Any]], dict]  # (the shards' manifests, the stage's arguments) -> manifest


def _always(cfg: PipelineConfig) -> bool:
    return True


def _uses_irn(cfg: PipelineConfig) -> bool:
    return cfg.make_pseudo_labels.method == "irn"


@dataclass(frozen=True)
class Stage:
    name: str
    task: Any  # the module's Prefect task
    sections: tuple[str, ...]  # config sections the stage's outputs depend on
    needs: tuple[str, ...]  # stages whose manifests it reads (None for a disabled stage)
    arguments: Arguments
    enabled: Callable[[PipelineConfig], bool] = _always  # e.g. IRN only for make_pseudo_labels.method=irn
    owns: tuple[str, ...] = ()  # run-directory entries only this stage writes: cleared when its inputs change
    merge: Merge | None = None  # set for per-image stages that run as mapped shards

    @property
    def module(self) -> str:
        return self.task.fn.__module__

    def owned_paths(self, cfg: PipelineConfig) -> list[str]:
        return [fs.join(cfg.run_dir, entry) for entry in self.owns]

    def own_outputs(self, manifest: dict, inputs: Mapping[str, dict | None], run_dir: str) -> list[str]:
        """The run-directory locations ``manifest`` names that this stage wrote (not those of its inputs)."""
        read = {p for need in self.needs for p in output_paths(inputs[need] or {}, run_dir)}
        return sorted(set(output_paths(manifest, run_dir)) - read)

    def cache_key(self, cfg: PipelineConfig, inputs: Mapping[str, dict]) -> str:
        """Derived from the stage's config sections, the run's seed/device/directory, the manifests of its
        inputs and its code version: equal keys mean the stage's outputs would be the same."""
        parts = {
            "stage": self.name, "run_dir": cfg.run_dir, "seed": cfg.run.seed, "device": cfg.run.device,
            "sections": {s: getattr(cfg, s).model_dump(mode="json") for s in self.sections},
            "inputs": {name: input_identity(inputs[name]) for name in self.needs}, "code": code_version(self.module),
        }
        text = json.dumps(parts, sort_keys=True, default=str)
        return f"{self.name}-{hashlib.sha256(text.encode()).hexdigest()[:24]}"


def _splits(manifests: Mapping[str, dict]) -> dict[str, str]:
    return manifests["prepare_data"]["splits"]


def _with_cam_weights(section: Section, manifests: Mapping[str, dict]) -> Section:
    """``weights: cam`` takes the backbone from this run's trained CAM network (runs without ImageNet weights,
    such as the synthetic demo): IRN's frozen backbone, the segmenter's initialisation."""
    if section.weights != CAM_WEIGHTS:
        return section
    return section.model_copy(update={"weights": manifests["train_cam"]["checkpoint"]})


def _out(cfg: PipelineConfig, name: str) -> str:
    return fs.join(cfg.run_dir, name)


STAGES: tuple[Stage, ...] = (
    Stage("prepare_data", prepare_data_task, ("prepare_data",), (),
          lambda cfg, m, t: {"cfg": cfg.prepare_data, "out_dir": _out(cfg, "prepare_data"),
                             "cache_dir": cfg.cache_dir, "tracker": t}, owns=("prepare_data",)),
    Stage("train_cam", train_cam_task, ("train_cam",), ("prepare_data",),
          lambda cfg, m, t: {"cfg": cfg.train_cam, "train_split_url": _splits(m)["train"],
                             "val_split_url": _splits(m)["val"], "out_dir": _out(cfg, "train_cam"),
                             "seed": cfg.run.seed, "device": cfg.run.device, "tracker": t,
                             "seed_split_url": _splits(m).get("seed")}, owns=("train_cam",)),
    Stage("infer_cams", infer_cams_task, ("infer_cams",), ("prepare_data", "train_cam"),
          lambda cfg, m, t: {"cfg": cfg.infer_cams, "checkpoint_url": m["train_cam"]["checkpoint"],
                             "split_urls": [_splits(m)["train"]], "store_url": cam_store_url(cfg),
                             "device": cfg.run.device, "tracker": t},
          owns=("infer_cams",), merge=lambda shards, _: merge_infer_manifests(shards)),
    Stage("eval_cam", eval_cam_task, ("eval_cam",), ("prepare_data", "infer_cams"),
          lambda cfg, m, t: {"cfg": cfg.eval_cam, "store_url": m["infer_cams"]["store"],
                             "split_url": _splits(m)["seed"], "out_dir": _out(cfg, "eval_cam"), "tracker": t},
          owns=("eval_cam",), merge=lambda shards, arguments: merge_cam_eval(shards, **arguments)),
    Stage("make_ir_labels", make_ir_labels_task, ("make_ir_labels",), ("prepare_data", "infer_cams"),
          lambda cfg, m, t: {"cfg": cfg.make_ir_labels, "store_url": m["infer_cams"]["store"],
                             "split_url": _splits(m)["train"], "out_dir": _out(cfg, "make_ir_labels"), "tracker": t},
          enabled=_uses_irn, owns=("make_ir_labels",), merge=lambda shards, _: merge_label_manifests(shards)),
    Stage("train_irn", train_irn_task, ("train_irn",), ("prepare_data", "train_cam", "make_ir_labels"),
          lambda cfg, m, t: {"cfg": _with_cam_weights(cfg.train_irn, m), "ir_label_dir": m["make_ir_labels"]["out_dir"],
                             "split_url": _splits(m)["train"], "out_dir": _out(cfg, "train_irn"),
                             "seed": cfg.run.seed, "device": cfg.run.device, "tracker": t},
          enabled=_uses_irn, owns=("train_irn",)),
    Stage("make_pseudo_labels", make_pseudo_labels_task, ("make_pseudo_labels",),
          ("prepare_data", "infer_cams", "train_irn"),
          lambda cfg, m, t: {"cfg": cfg.make_pseudo_labels, "store_url": m["infer_cams"]["store"],
                             "split_url": _splits(m)["train"], "out_dir": _out(cfg, "make_pseudo_labels"),
                             "device": cfg.run.device, "tracker": t,
                             "irn_checkpoint_url": (m["train_irn"] or {}).get("checkpoint")},
          owns=("make_pseudo_labels",), merge=lambda shards, _: merge_label_manifests(shards)),
    Stage("eval_pseudo_labels", eval_pseudo_labels_task, (), ("prepare_data", "make_pseudo_labels"),
          lambda cfg, m, t: {"split_url": _splits(m)["seed"], "label_dir": m["make_pseudo_labels"]["out_dir"],
                             "out_dir": _out(cfg, "eval_pseudo_labels"), "tracker": t},
          owns=("eval_pseudo_labels",),
          merge=lambda shards, arguments: merge_pseudo_label_eval(shards, **arguments)),
    Stage("train_seg", train_seg_task, ("train_seg",), ("prepare_data", "train_cam", "make_pseudo_labels"),
          lambda cfg, m, t: {"cfg": _with_cam_weights(cfg.train_seg, m), "train_split_url": _splits(m)["train"],
                             "pseudo_label_dir": m["make_pseudo_labels"]["out_dir"],
                             "val_split_url": _splits(m)["val"], "out_dir": _out(cfg, "train_seg"),
                             "seed": cfg.run.seed, "device": cfg.run.device, "tracker": t}, owns=("train_seg",)),
    Stage("eval_seg", eval_seg_task, ("eval_seg",), ("prepare_data", "train_seg"),
          lambda cfg, m, t: {"cfg": cfg.eval_seg, "checkpoint_url": m["train_seg"]["checkpoint"],
                             "val_split_url": _splits(m)["val"], "out_dir": _out(cfg, "eval_seg"),
                             "device": cfg.run.device, "tracker": t, "test_split_url": _splits(m).get("test")},
          owns=("eval_seg",), merge=lambda shards, arguments: merge_seg_eval(shards, **arguments)),
)
STAGE_NAMES = tuple(stage.name for stage in STAGES)
STAGE_BY_NAME = {stage.name: stage for stage in STAGES}


def cam_store_url(cfg: PipelineConfig) -> str:
    return fs.join(cfg.run_dir, "infer_cams", "cams.zarr")


def manifest_url(run_dir: str, stage: str) -> str:
    return fs.join(run_dir, "manifests", f"{stage}.json")


def started_url(run_dir: str, stage: str) -> str:
    """The cache key a stage is running under, kept until it finishes: what an interrupted stage left belongs to it."""
    return fs.join(run_dir, "manifests", f"{stage}.started.json")


def failure_url(run_dir: str, stage: str) -> str:
    """Where a stage's last error is kept until it finishes."""
    return fs.join(run_dir, "manifests", f"{stage}.failed.json")


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


def damaged_outputs(record: dict, cfg: PipelineConfig) -> list[str]:
    """A finished stage's recorded outputs that are gone or, with ``run.verify_outputs``, whose content changed."""
    if cfg.run.verify_outputs and "outputs" in record:
        return damaged_units(record["outputs"])
    return missing_outputs(record["manifest"], cfg.run_dir)


def input_identity(manifest: dict | None) -> Any:
    """What a stage's cache key takes from an input's manifest: its content hash and its strings (locations, names,
    ids), not its figures (counts, timings, scores), which differ between equal reruns and which the content hash
    covers. A manifest without content hash (``run.verify_outputs: false``) counts as a whole."""
    if not manifest or "content_hash" not in manifest:
        return manifest
    return {"content_hash": manifest["content_hash"], "strings": sorted(_strings(manifest))}


def _strings(value: Any, prefix: str = "") -> list[str]:
    if isinstance(value, Mapping):
        return [s for key, item in value.items() for s in _strings(item, f"{prefix}{key}.")]
    if isinstance(value, (list, tuple)):
        return [s for i, item in enumerate(value) for s in _strings(item, f"{prefix}{i}.")]
    return [f"{prefix}{value}"] if isinstance(value, str) else []
