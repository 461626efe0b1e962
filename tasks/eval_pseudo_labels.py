"""Scoring label PNGs (pseudo labels, or IR labels) against the split's ground-truth masks.

As the reference's ``eval_sem_seg.py`` does, a predicted 255 (ignore) counts as background: the main score is
the mIoU over all classes, background included, from :class:`models.metrics.ConfusionMatrix` (which maps
predictions outside the classes to 0). When the labels hold ignore pixels (IR labels), the score on the
confident pixels only (predicted 255 left out) is reported as well.
"""
from __future__ import annotations

import json
import logging
from typing import Any

import numpy as np
import torch
from prefect import task
from prefect.cache_policies import NO_CACHE

from models.metrics import IGNORE_INDEX, ConfusionMatrix
from storage import fs
from storage.datasets.split_files import load_split_with_masks
from storage.errors import DataError
from storage.images import read_mask, read_rgb
from storage.plots import bar_chart_png, overlay_png
from storage.reports import class_metrics, format_table
from storage.tracking import Tracker
from tasks.engine.evaluation import Evaluator, evaluate, merge_shards, publish_pictures
from tasks.engine.label_maps import label_url
from tasks.engine.shards import shard_items
from tasks.runtime.context import RunContext
from tasks.runtime.manifests import Inputs

log = logging.getLogger(__name__)

PSEUDO_LABEL_EVAL = "pseudo_label_eval"


class LabelEvaluator(Evaluator[str]):
    """Confusion matrices over all and over the confident pixels (``all``, ``confident``), the ignored and total
    pixel counts, and the overlays of those of the processed images among the split's first ``overlays``."""

    def __init__(self, split_url: str, label_dir: str, out_dir: str, tracker: Tracker | None, name: str,
                 overlays: int):
        self.split = load_split_with_masks(split_url, "label evaluation")
        self.label_dir, self.out_dir, self.tracker, self.name = label_dir, out_dir, tracker or Tracker.null(), name
        self.drawn = set(self.split.ids[:overlays])
        self.reset()

    def reset(self) -> None:
        super().reset()
        k = len(self.split.class_names)
        self.state.matrices.update({m: torch.zeros(k, k, dtype=torch.int64) for m in ("all", "confident")})
        self.state.counts.update(ignored=0, total=0)

    def outputs(self, shard: str | None) -> list[str]:
        return shard_items(self.split.ids, shard)

    def process(self, output: str) -> None:
        image_id, split, k = output, self.split, len(self.split.class_names)
        url = label_url(self.label_dir, image_id)
        if not fs.exists(url):
            raise DataError(f"no label for image {image_id!r} at {url} (run the labelling stage on split "
                            f"{split.name!r} first)")
        labels, mask = read_mask(url), read_mask(split.mask_url(image_id))
        if labels.shape != mask.shape:
            raise DataError(f"{url}: label size {labels.shape} differs from the mask size {mask.shape} of image "
                            f"{image_id!r}")
        unsure = labels == IGNORE_INDEX
        self.state.add_confusion("all", mask, labels, k)
        self.state.add_confusion("confident", np.where(unsure, IGNORE_INDEX, mask), labels, k)
        self.state.add_count("ignored", int(unsure.sum()))
        self.state.add_count("total", labels.size)
        if image_id in self.drawn:
            image = read_rgb(split.image_url(image_id))
            self.state.pictures[_overlay_name(self.name, image_id)] = overlay_png(image, mask, [("labels", labels)])

    def report(self) -> dict:
        split, state, name, label_dir, tracker = self.split, self.state, self.name, self.label_dir, self.tracker
        names = split.class_names
        ignored, total = state.counts["ignored"], state.counts["total"]
        scores = ConfusionMatrix.from_counts(state.matrices["all"]).scores(names)
        confident = ConfusionMatrix.from_counts(state.matrices["confident"]).scores(names) if ignored else None
        results: dict = {
            "split": split.name, "label_dir": label_dir, "images": len(split.ids),
            "rule": "predicted 255 (ignore) counts as background", "ignored_fraction": ignored / max(1, total),
            "scores": scores, "confident_pixels": confident}
        result_url = fs.join(self.out_dir, f"{name}.json")
        fs.write_text(result_url, json.dumps(results, indent=2))
        bars = {"all pixels": {c: s["iou"] for c, s in scores["per_class"].items()}}
        if confident:
            bars["confident pixels"] = {c: s["iou"] for c, s in confident["per_class"].items()}
        pictures = state.pictures_of(_overlay_name(name, i) for i in split.ids)
        pictures[f"{name}_iou.png"] = bar_chart_png(bars, f"per-class IoU of {label_dir} on {split.name}")
        publish_pictures(pictures, self.out_dir, tracker, name)
        table = format_table(scores, f"{name}: {label_dir} on {split.name}")
        log.info("\n%s", table)
        tracker.log_text(table, f"{name}/{name}.txt")
        tracker.log_metrics({**class_metrics(scores, name), f"{name}/ignored_fraction": results["ignored_fraction"]})
        if confident:
            tracker.log_metrics(class_metrics(confident, f"{name}/confident"))
        return {"results": result_url, "split": split.name, "miou": scores["miou"],
                "confident_miou": confident["miou"] if confident else None}


def eval_pseudo_labels(split_url: str, label_dir: str, out_dir: str, tracker: Tracker | None = None,
                       name: str = PSEUDO_LABEL_EVAL, overlays: int = 4, shard: str | None = None) -> dict:
    """Score ``<label_dir>/<id>.png`` for every image of the split (which must have masks). Writes
    ``<out_dir>/<name>.json`` (mIoU, per-class IoU / precision / recall), ``<name>_iou.png`` (per-class bars) and
    ``<name>_overlays/<id>.png`` for the first ``overlays`` images; logs them to the tracker. Returns the manifest.
    With ``shard='i/n'`` only every n-th image from i is scored and the counts are saved for
    :func:`merge_pseudo_label_eval`."""
    return evaluate(LabelEvaluator(split_url, label_dir, out_dir, tracker, name, overlays), shard)


def merge_pseudo_label_eval(shards: list[dict], split_url: str, label_dir: str, out_dir: str,
                            tracker: Tracker | None = None, name: str = PSEUDO_LABEL_EVAL) -> dict:
    """The results of a sharded label evaluation (``shards``: the shards' manifests), as one unsharded pass gives."""
    return merge_shards(LabelEvaluator(split_url, label_dir, out_dir, tracker, name, 0), shards)


def _overlay_name(name: str, image_id: str) -> str:
    return f"{name}_overlays/{image_id}.png"


def arguments(cfg: None, run: RunContext, inputs: Inputs) -> dict[str, Any]:
    """The stage function's keyword arguments in a pipeline run, less the tracker."""
    return {"split_url": inputs["prepare_data"]["splits"]["seed"],
            "label_dir": inputs["make_pseudo_labels"]["out_dir"],
            "out_dir": run.out_dir("eval_pseudo_labels")}


eval_pseudo_labels_task = task(eval_pseudo_labels, name="eval_pseudo_labels", cache_policy=NO_CACHE)
