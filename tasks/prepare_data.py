"""Dataset preparation and validation, and the statistics later stages need (N_c, coefficients)."""
from __future__ import annotations

import hashlib
import json
import logging
from typing import Any, Literal

import numpy as np
from prefect import task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel, ConfigDict, Field

from models.class_weights import WEIGHT_MODES, distribution_weights
from storage import fs
from storage.datasets.catalog import DATASET_KINDS
from storage.datasets.split_files import save_split
from storage.datasets.synthetic import generate_synthetic
from storage.datasets.voc_layout import Split, VOCLayoutDataset
from storage.errors import DataError
from storage.tracking import Tracker
from tasks.runtime.context import RunContext
from tasks.runtime.manifests import Inputs

log = logging.getLogger(__name__)

STATS = "dataset_stats.json"
SYNTHETIC_MARKER = "synthetic.json"
# The reference schedule used to report the coefficients (batch 16 over VOC, 4 re-sampled images per step).
_REFERENCE_BATCH, _REFERENCE_RESAMPLE = 16, 4


class SyntheticConfig(BaseModel):
    """Generation parameters used when ``kind: synthetic`` and the root holds no dataset yet."""

    model_config = ConfigDict(extra="forbid")
    num_images: int = Field(800, ge=10, description="images generated (train, val and test together)")
    seed: int = Field(0, description="seed of the generated images (the dataset, not the run)")
    min_size: int = Field(96, ge=16, description="smallest image side in pixels")
    max_size: int = Field(128, ge=16, description="largest image side in pixels")
    val_fraction: float = Field(0.15, gt=0, lt=1, description="share of the images in val")
    test_fraction: float = Field(0.15, gt=0, lt=1, description="share of the images in test")


class PrepareDataConfig(BaseModel):
    """Which dataset, where, and which splits the stages use."""

    model_config = ConfigDict(extra="forbid")
    kind: Literal[DATASET_KINDS] = Field(  # type: ignore[valid-type]
        description="voc, coco (converted to the VOC layout) or synthetic (generated at root on first use)")
    root: str = Field(description="dataset root in VOC layout (path or fsspec URL)")
    train_split: str = Field("train_aug", description="split the CAM network, IRN and the segmenter train on")
    val_split: str = Field("val", description="split with ground-truth masks: validation and segmentation scores")
    seed_split: str = Field("train", description="split with ground-truth masks inside train_split where CAMs and "
                            "pseudo labels are scored (VOC: the 1464 train images)")
    test_split: str | None = Field(None, description="split without masks whose segmentation predictions are "
                                   "exported in the VOC evaluation-server layout")
    on_bad_data: Literal["error", "skip"] = Field(
        "error", description="error: stop on the first bad image, mask or label naming the file; skip: drop it and "
        "log the count")
    check_files: bool = Field(True, description="decode every image and mask of the used splits")
    synthetic: SyntheticConfig = SyntheticConfig()


def ensure_synthetic(cfg: PrepareDataConfig) -> None:
    """Generate the synthetic dataset at ``cfg.root`` unless a complete one with the same parameters is there."""
    if cfg.kind != "synthetic":
        return
    wanted = cfg.synthetic.model_dump()
    marker = fs.join(cfg.root, SYNTHETIC_MARKER)
    if fs.exists(marker):
        arguments = json.loads(fs.read_text(marker)).get("arguments", {})
        if all(arguments.get(key) == value for key, value in wanted.items()):
            return
        log.info("the synthetic dataset at %s was generated with other parameters; generating it again", cfg.root)
    log.info("generating the synthetic dataset (%d images) at %s", cfg.synthetic.num_images, cfg.root)
    generate_synthetic(cfg.root, **wanted)


def _checked(dataset: VOCLayoutDataset, split: Split, cfg: PrepareDataConfig) -> Split:
    problems = dataset.validate_split_files(split) if cfg.check_files else {}
    if not problems:
        return split
    first = next(iter(problems.values()))
    if cfg.on_bad_data == "error":
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise DataError(first + more)
    bad = set(problems)
    log.warning("split %s: skipped %d bad files (first: %s)", split.name, len(bad), first)
    keep = [k for k, i in enumerate(split.ids) if i not in bad]
    if not keep:
        raise DataError(f"split {split.name!r} of {split.root} has no usable images")
    return Split(split.root, split.name, split.class_names, [split.ids[k] for k in keep], split.labels[keep],
                 {i: u for i, u in split.mask_urls.items() if i not in bad})


def dataset_statistics(train: Split) -> dict:
    """N_c, co-occurrence, labels per image, and the distribution coefficients of every mode."""
    names = train.class_names[1:]
    counts = train.class_counts()
    steps = max(1, len(train.ids) // _REFERENCE_BATCH)
    coefficients = {}
    for mode in WEIGHT_MODES:
        try:
            w = distribution_weights(mode, names, counts, steps, _REFERENCE_RESAMPLE)
            coefficients[mode] = dict(zip(names, np.round(w, 6).tolist()))
        except ValueError:
            continue
    cooccurrence = (train.labels.T @ train.labels).astype(np.int64)
    return {
        "class_names": list(train.class_names),
        "train_images": len(train.ids),
        "class_counts": dict(zip(names, counts.tolist())),
        "labels_per_image": float(train.labels.sum(1).mean()),
        "cooccurrence": cooccurrence.tolist(),
        "distribution_coefficients": coefficients,
    }


def prepare_data(cfg: PrepareDataConfig, out_dir: str, cache_dir: str, tracker: Tracker | None = None) -> dict:
    """Validate the dataset, write the checked split files of every role (train, val, seed, test) and the
    statistics; return the manifest."""
    tracker = tracker or Tracker.null()
    ensure_synthetic(cfg)
    root_key = hashlib.sha256(cfg.root.encode()).hexdigest()[:12]
    cache = fs.join(cache_dir, f"labels-{cfg.kind}-{root_key}.json")
    dataset = VOCLayoutDataset(cfg.root, cfg.kind, label_cache=cache)
    split_urls = {}
    splits = {}
    roles = {"train": cfg.train_split, "val": cfg.val_split, "seed": cfg.seed_split, "test": cfg.test_split}
    for role, name in roles.items():
        if name is None:
            continue
        split = _checked(dataset, dataset.load_split(name, cfg.on_bad_data, labels_required=role != "test"), cfg)
        if role in ("val", "seed") and not split.has_masks:
            missing = next(i for i in split.ids if i not in split.mask_urls)
            raise DataError(f"{role} split {name!r} needs masks; none for {missing!r} under {cfg.root}")
        splits[role] = split
        split_urls[role] = fs.join(out_dir, f"{name}.json")
        save_split(split_urls[role], split)
    outside = sorted(set(splits["seed"].ids) - set(splits["train"].ids))
    if outside:
        raise DataError(f"seed split {cfg.seed_split!r} must lie inside train split {cfg.train_split!r} (CAMs and "
                        f"pseudo labels are made for the training images); {outside[0]!r} and {len(outside) - 1} "
                        f"more are not")
    stats = dataset_statistics(splits["train"])
    stats["splits"] = {role: {"name": s.name, "images": len(s.ids), "with_masks": len(s.mask_urls)}
                       for role, s in splits.items()}
    stats_url = fs.join(out_dir, STATS)
    fs.write_text(stats_url, json.dumps(stats, indent=2))
    tracker.log_params({"prepare_data": cfg.model_dump()})
    tracker.log_metrics({"train_images": stats["train_images"], "val_images": len(splits["val"].ids),
                         **{f"class_count/{k}": v for k, v in stats["class_counts"].items()}})
    tracker.log_dict(stats, "data/dataset_stats.json")
    log.info("data: %d train images, %d val images", len(splits["train"].ids), len(splits["val"].ids))
    return {"stats": stats_url, "splits": split_urls, "class_names": stats["class_names"],
            "class_counts": stats["class_counts"]}


def arguments(cfg: PrepareDataConfig, run: RunContext, inputs: Inputs) -> dict[str, Any]:
    """The stage function's keyword arguments in a pipeline run, less the tracker."""
    return {"cfg": cfg, "out_dir": run.out_dir("prepare_data"), "cache_dir": run.cache_dir}


prepare_data_task = task(prepare_data, name="prepare_data", cache_policy=NO_CACHE)
