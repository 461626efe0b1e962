"""The pipeline's stages in order: which stages each reads, when it is part of a run, and how its shards are merged.
A stage is its module in tasks/: the module's function, ``arguments``, Prefect task, config section, output folder,
MLflow run and record all carry the stage's name. Each stage returns a manifest (tasks/runtime/manifests.py)."""
from __future__ import annotations

import hashlib
import json
import types
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, get_args, get_origin, get_type_hints, is_typeddict

from pydantic import BaseModel

from flows.code_version import code_version
from flows.config import PipelineConfig
from flows.records import input_identity, output_paths
from storage.errors import ConfigError
from storage.tracking import Tracker
from tasks import (
    eval_cam,
    eval_pseudo_labels,
    eval_seg,
    infer_cams,
    make_ir_labels,
    make_pseudo_labels,
    prepare_data,
    train_cam,
    train_irn,
    train_seg,
)
from tasks.engine.label_maps import merge_label_manifests
from tasks.runtime.manifests import CONTRACTS

Merge = Callable[[list[dict], dict[str, Any]], dict]  # (the shards' manifests, the stage's arguments) -> manifest


def _always(cfg: PipelineConfig) -> bool:
    return True


def _uses_irn(cfg: PipelineConfig) -> bool:
    return cfg.make_pseudo_labels.method == "irn"


@dataclass(frozen=True)
class Stage:
    module: types.ModuleType  # the stage's module in tasks/, named after the stage
    needs: tuple[str, ...]  # stages whose manifests it reads (None for a disabled stage)
    enabled: Callable[[PipelineConfig], bool] = _always  # e.g. IRN only for make_pseudo_labels.method=irn
    merge: Merge | None = None  # set for per-image stages that run as mapped shards

    @property
    def name(self) -> str:
        return self.module.__name__.rsplit(".", 1)[-1]

    @property
    def task(self) -> Any:
        """The module's Prefect task."""
        return getattr(self.module, f"{self.name}_task")

    def section(self, cfg: PipelineConfig) -> BaseModel | None:
        """The stage's config section (the label evaluation has none)."""
        return getattr(cfg, self.name, None)

    def arguments(self, cfg: PipelineConfig, inputs: Mapping[str, dict | None], tracker: Tracker) -> dict[str, Any]:
        """The keyword arguments of the stage's function in this run."""
        return {**self.module.arguments(self.section(cfg), cfg.run_context(), inputs), "tracker": tracker}

    def owned_paths(self, cfg: PipelineConfig) -> list[str]:
        """What only this stage writes, cleared when its inputs change: its folder in the run directory."""
        return [cfg.run_context().out_dir(self.name)]

    def own_outputs(self, manifest: dict, inputs: Mapping[str, dict | None], run_dir: str) -> list[str]:
        """The run-directory locations ``manifest`` names that this stage wrote (not those of its inputs)."""
        read = {p for need in self.needs for p in output_paths(inputs[need] or {}, run_dir)}
        return sorted(set(output_paths(manifest, run_dir)) - read)

    def cache_key(self, cfg: PipelineConfig, inputs: Mapping[str, dict | None]) -> str:
        """Derived from the stage's config section, the run's seed/device/directory, the manifests of its inputs and
        its code version: equal keys mean the stage's outputs would be the same."""
        section = self.section(cfg)
        parts = {
            "stage": self.name, "run_dir": cfg.run_dir, "seed": cfg.run.seed, "device": cfg.run.device,
            "sections": {self.name: section.model_dump(mode="json")} if section is not None else {},
            "inputs": {name: input_identity(inputs[name]) for name in self.needs},
            "code": code_version(self.module.__name__),
        }
        text = json.dumps(parts, sort_keys=True, default=str)
        return f"{self.name}-{hashlib.sha256(text.encode()).hexdigest()[:24]}"


def _merge_whole(merge: Callable[[list[dict]], dict]) -> Merge:
    return lambda shards, _: merge(shards)


def _merge_with_arguments(merge: Callable[..., dict]) -> Merge:
    return lambda shards, arguments: merge(shards, **arguments)


STAGES: tuple[Stage, ...] = (
    Stage(prepare_data, ()),
    Stage(train_cam, ("prepare_data",)),
    Stage(infer_cams, ("prepare_data", "train_cam"), merge=_merge_whole(infer_cams.merge_infer_manifests)),
    Stage(eval_cam, ("prepare_data", "infer_cams"), merge=_merge_with_arguments(eval_cam.merge_cam_eval)),
    Stage(make_ir_labels, ("prepare_data", "infer_cams"), enabled=_uses_irn,
          merge=_merge_whole(merge_label_manifests)),
    Stage(train_irn, ("prepare_data", "train_cam", "make_ir_labels"), enabled=_uses_irn),
    Stage(make_pseudo_labels, ("prepare_data", "infer_cams", "train_irn"), merge=_merge_whole(merge_label_manifests)),
    Stage(eval_pseudo_labels, ("prepare_data", "make_pseudo_labels"),
          merge=_merge_with_arguments(eval_pseudo_labels.merge_pseudo_label_eval)),
    Stage(train_seg, ("prepare_data", "train_cam", "make_pseudo_labels")),
    Stage(eval_seg, ("prepare_data", "train_seg"), merge=_merge_with_arguments(eval_seg.merge_seg_eval)),
)
STAGE_NAMES = tuple(stage.name for stage in STAGES)
TRAINING_STAGES = ("train_cam", "train_irn", "train_seg")  # final weights go to MLflow; runnable under torchrun
STAGE_BY_NAME = {stage.name: stage for stage in STAGES}


def example_manifest(stage: str) -> dict:
    """A manifest with every key of the stage's contract, for :func:`check_wiring`."""
    return _example(CONTRACTS[stage], stage)


def _example(contract: Any, label: str) -> Any:
    if is_typeddict(contract):
        return {key: _example(kind, f"{label}.{key}") for key, kind in get_type_hints(contract).items()}
    if isinstance(contract, types.UnionType):
        return _example(next(arg for arg in get_args(contract) if arg is not type(None)), label)
    kind = get_origin(contract) or contract
    return f"<{label}>" if kind is str else kind()


def check_wiring(stages: list[Stage], cfg: PipelineConfig) -> None:
    """Have each stage read its inputs from example manifests of their contracts: a stage that reads a stage it does
    not list in ``needs``, or a key that stage's manifest does not declare, fails here, before any work."""
    for stage in stages:
        inputs = {need: example_manifest(need) for need in stage.needs}
        try:
            stage.arguments(cfg, inputs, Tracker.null())
        except (KeyError, TypeError) as err:
            raise RuntimeError(f"stage {stage.name} reads {err} from its inputs ({', '.join(stage.needs)}), which "
                               f"their manifests do not declare (tasks/runtime/manifests.py)") from err


def check_manifest(stage: str, manifest: dict) -> None:
    """A stage's manifest must hold the keys of its contract."""
    if missing := sorted(CONTRACTS[stage].__required_keys__ - manifest.keys()):
        raise RuntimeError(f"stage {stage} returned a manifest without {', '.join(missing)}")


def select_stages(only: list[str] | None = None, start: str | None = None) -> list[Stage]:
    """The stages to run: all, the named ones (``--stages``), or one and all after it (``--from``)."""
    unknown = [n for n in [*(only or []), *([start] if start else [])] if n not in STAGE_NAMES]
    if unknown:
        raise ConfigError(f"unknown stage(s) {', '.join(unknown)}; stages: {', '.join(STAGE_NAMES)}")
    if only and start:
        raise ConfigError("give either --stages or --from, not both")
    if only:
        return [s for s in STAGES if s.name in only]
    if start:
        return list(STAGES[STAGE_NAMES.index(start):])
    return list(STAGES)
