"""Stage 3d: scoring label PNGs (pseudo labels, or IR labels) against the split's ground-truth masks.

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
from prefect import task
from prefect.cache_policies import NO_CACHE

from models.metrics import IGNORE_INDEX, ConfusionMatrix
from storage import fs
from storage.datasets.split_files import load_split_with_masks
from storage.datasets.voc_layout import Split
from storage.errors import DataError
from storage.images import read_mask, read_rgb
from storage.plots import bar_chart_png, overlay_png
from storage.reports import class_metrics, format_table
from storage.tracking import Tracker
from tasks.engine.label_maps import label_url
from tasks.engine.shards import empty_partial, merge_partials, save_partial, shard_items
from tasks.runtime.context import RunContext
from tasks.runtime.manifests import Inputs

log = logging.getLogger(__name__)

PSEUDO_LABEL_EVAL = "pseudo_label_eval"


def eval_pseudo_labels(split_url: str, label_dir: str, out_dir: str, tracker: Tracker | None = None,
                           name: str = PSEUDO_LABEL_EVAL, overlays: int = 4, shard: str | None = None) -> dict:
    """Score ``<label_dir>/<id>.png`` for every image of the split (which must have masks). Writes
    ``<out_dir>/<name>.json`` (mIoU, per-class IoU / precision / recall), ``<name>_iou.png`` (per-class bars) and
    ``<name>_overlays/<id>.png`` for the first ``overlays`` images; logs them to the tracker. Returns the manifest.
    With ``shard='i/n'`` only every n-th image from i is scored and the counts are saved for
    :func:`merge_pseudo_label_eval`."""
    split = load_split_with_masks(split_url, "label evaluation")
    if shard is not None:
        return save_partial(out_dir, name, shard, lambda: _accumulate(split, shard_items(split.ids, shard),
                                                                       label_dir, name, overlays))
    state = _accumulate(split, split.ids, label_dir, name, overlays)
    return _report(split, state, label_dir, out_dir, tracker or Tracker.null(), name)


def merge_pseudo_label_eval(shards: list[dict], split_url: str, label_dir: str, out_dir: str,
                            tracker: Tracker | None = None, name: str = PSEUDO_LABEL_EVAL) -> dict:
    """The results of a sharded label evaluation (``shards``: the shards' manifests), as one unsharded pass gives."""
    split = load_split_with_masks(split_url, "label evaluation")
    return merge_partials(shards, out_dir, name,
                          lambda state: _report(split, state, label_dir, out_dir, tracker or Tracker.null(), name))


def _accumulate(split: Split, ids: list[str], label_dir: str, name: str, overlays: int) -> dict:
    """Confusion matrices over all and over the confident pixels of ``ids``, the ignored and total pixel counts,
    and the overlays of those among the split's first ``overlays`` images."""
    k = len(split.class_names)
    scores_all, scores_confident = ConfusionMatrix(k), ConfusionMatrix(k)
    drawn = set(split.ids[:overlays])
    state = empty_partial()
    state["counts"] = {"ignored": 0, "total": 0}
    for image_id in ids:
        url = label_url(label_dir, image_id)
        if not fs.exists(url):
            raise DataError(f"no label for image {image_id!r} at {url} (run the labelling stage on split "
                            f"{split.name!r} first)")
        labels, mask = read_mask(url), read_mask(split.mask_url(image_id))
        if labels.shape != mask.shape:
            raise DataError(f"{url}: label size {labels.shape} differs from the mask size {mask.shape} of image "
                            f"{image_id!r}")
        unsure = labels == IGNORE_INDEX
        scores_all.update(mask, labels)
        scores_confident.update(np.where(unsure, IGNORE_INDEX, mask), labels)
        state["counts"]["ignored"] += int(unsure.sum())
        state["counts"]["total"] += labels.size
        if image_id in drawn:
            image = read_rgb(split.image_url(image_id))
            state["pictures"][_overlay_name(name, image_id)] = overlay_png(image, mask, [("labels", labels)])
    state["matrices"] = {"all": scores_all.matrix, "confident": scores_confident.matrix}
    return state


def _overlay_name(name: str, image_id: str) -> str:
    return f"{name}_overlays/{image_id}.png"


def _report(split: Split, state: dict, label_dir: str, out_dir: str, tracker: Tracker, name: str) -> dict:
    names = split.class_names
    ignored, total = state["counts"]["ignored"], state["counts"]["total"]
    scores = ConfusionMatrix.from_counts(state["matrices"]["all"]).scores(names)
    confident = ConfusionMatrix.from_counts(state["matrices"]["confident"]).scores(names) if ignored else None
    results = {"split": split.name, "label_dir": label_dir, "images": len(split.ids),
               "rule": "predicted 255 (ignore) counts as background", "ignored_fraction": ignored / max(1, total),
               "scores": scores, "confident_pixels": confident}
    result_url = fs.join(out_dir, f"{name}.json")
    fs.write_text(result_url, json.dumps(results, indent=2))
    bars = {"all pixels": {c: s["iou"] for c, s in scores["per_class"].items()}}
    if confident:
        bars["confident pixels"] = {c: s["iou"] for c, s in confident["per_class"].items()}
    pictures = {p: state["pictures"][p] for p in (_overlay_name(name, i) for i in split.ids) if p in state["pictures"]}
    pictures[f"{name}_iou.png"] = bar_chart_png(bars, f"per-class IoU of {label_dir} on {split.name}")
    for picture, png in pictures.items():
        fs.write_bytes(fs.join(out_dir, picture), png)
        tracker.log_bytes(png, f"{name}/{picture}")
    table = format_table(scores, f"{name}: {label_dir} on {split.name}")
    log.info("\n%s", table)
    tracker.log_text(table, f"{name}/{name}.txt")
    tracker.log_metrics({**class_metrics(scores, name), f"{name}/ignored_fraction": results["ignored_fraction"]})
    if confident:
        tracker.log_metrics(class_metrics(confident, f"{name}/confident"))
    return {"results": result_url, "split": split.name, "miou": scores["miou"],
            "confident_miou": confident["miou"] if confident else None}


def arguments(cfg: None, run: RunContext, inputs: Inputs) -> dict[str, Any]:
    """The stage function's arguments in a pipeline run (less the tracker): its config section, its folder in the run
    directory and what it reads of its inputs' manifests."""
    return {"split_url": inputs["prepare_data"]["splits"]["seed"],
            "label_dir": inputs["make_pseudo_labels"]["out_dir"],
            "out_dir": run.out_dir("eval_pseudo_labels")}

eval_pseudo_labels_task = task(eval_pseudo_labels, name="eval_pseudo_labels", cache_policy=NO_CACHE)
