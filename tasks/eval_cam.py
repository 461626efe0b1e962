"""CAM evaluation against ground truth: background-threshold sweep of P, K and fused K + wP."""
from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from prefect import task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel, ConfigDict, Field

from models.cam_eval import DEFAULT_THRESHOLDS, ThresholdSweep
from models.metrics import ConfusionMatrix
from storage import fs
from storage.cam_store import CamStore
from storage.datasets.split_files import load_split_with_masks
from storage.errors import DataError
from storage.images import read_mask, read_rgb
from storage.plots import bar_chart_png, curves_png, overlay_png
from storage.reports import class_metrics, format_table
from storage.tracking import Tracker
from tasks.engine.evaluation import Evaluator, evaluate, merge_shards, publish_pictures
from tasks.engine.shards import shard_items
from tasks.runtime.context import RunContext
from tasks.runtime.manifests import Inputs

log = logging.getLogger(__name__)

RESULTS_NAME = "cam_eval"
RESULTS = f"{RESULTS_NAME}.json"
REFERENCE_RULE = "P (reference rule)"


class EvalCamConfig(BaseModel):
    """CAM evaluation (docs/method.md section 8)."""

    model_config = ConfigDict(extra="forbid")
    proto_weights: list[float] = Field(
        [0.3, 0.7], description="w of the fused K + w P (0.3: random-walk input, 0.7: IR-label input)")
    thresholds: tuple[float, ...] = Field(
        DEFAULT_THRESHOLDS, description="background thresholds of the mIoU sweeps (0.05 .. 0.95)")
    overlays: int = Field(6, ge=0, description="images drawn as image | GT | P | K overlays")


def _foreground(cam: np.ndarray) -> torch.Tensor:
    """Stored CAMs carry the background trick (fg x 2): back to max-normalised foreground scores in [0, 1]."""
    return torch.from_numpy(cam[1:] / 2.0)


CamOutput = tuple[str, np.ndarray, np.ndarray, np.ndarray]
"""(image id, stored keys, prototype CAM P, PCM CAM K) as :meth:`storage.cam_store.CamStore.load` gives them."""


class CamEvaluator(Evaluator[CamOutput]):
    """The threshold sweeps of P, K and each K + wP, and the reference rule's confusion matrix; the overlays of
    those of the processed images among the split's first ``cfg.overlays``."""

    name = RESULTS_NAME

    def __init__(self, cfg: EvalCamConfig, store_url: str, split_url: str, out_dir: str, tracker: Tracker | None):
        self.cfg, self.store_url, self.out_dir, self.tracker = cfg, store_url, out_dir, tracker or Tracker.null()
        self.split = load_split_with_masks(split_url, "CAM evaluation")
        self.variants = ["P", "K", *(f"K+{w}P" for w in cfg.proto_weights)]
        self.drawn = set(self.split.ids[:cfg.overlays])
        self.reset()

    def reset(self) -> None:
        super().reset()
        k, t = len(self.split.class_names), len(self.cfg.thresholds)
        self.state.matrices.update({v: torch.zeros(t, k, k, dtype=torch.int64) for v in self.variants})
        self.state.matrices[REFERENCE_RULE] = torch.zeros(k, k, dtype=torch.int64)

    def outputs(self, shard: str | None) -> Iterator[CamOutput]:
        store = CamStore.open(self.store_url)
        for image_id in shard_items(self.split.ids, shard):
            yield image_id, *store.load(image_id)

    def process(self, output: CamOutput) -> None:
        image_id, keys_np, proto, cam = output
        split, names = self.split, self.split.class_names
        mask = torch.from_numpy(read_mask(split.mask_url(image_id)).astype(np.int64))
        if mask.shape != proto.shape[1:]:
            raise DataError(f"{split.mask_url(image_id)}: mask size {tuple(mask.shape)} differs from the stored "
                            f"CAM size {proto.shape[1:]} of image {image_id!r}")
        keys = torch.from_numpy(keys_np)
        maps = {"P": proto, "K": cam, **{f"K+{w}P": (cam + w * proto) / (1 + w) for w in self.cfg.proto_weights}}
        for variant, values in maps.items():
            sweep = ThresholdSweep(len(names), self.cfg.thresholds)
            sweep.update(mask, _foreground(values), keys)
            self.state.add_matrix(variant, sweep.counts())
        self.state.add_confusion(REFERENCE_RULE, mask, keys[torch.from_numpy(proto).argmax(0)], len(names))
        if image_id in self.drawn:
            labels = {v: keys[torch.from_numpy(maps[v]).argmax(0)].numpy() for v in ("P", "K")}
            self.state.pictures[_overlay_name(image_id)] = overlay_png(
                read_rgb(split.image_url(image_id)), mask.numpy(), [("P", labels["P"]), ("K", labels["K"])])

    def report(self) -> dict:
        names, matrices, out_dir = self.split.class_names, self.state.matrices, self.out_dir
        results = {v: ThresholdSweep.from_counts(matrices[v], self.cfg.thresholds).results(names)
                   for v in self.variants}
        results[REFERENCE_RULE] = {"best": ConfusionMatrix.from_counts(matrices[REFERENCE_RULE]).scores(names)}
        summary = {v: {"miou": r["best"]["miou"], "best_threshold": r.get("best_threshold")}
                   for v, r in results.items()}
        fs.write_text(fs.join(out_dir, RESULTS), json.dumps({"summary": summary, "variants": results}, indent=2))
        overlays = self.state.pictures_of(map(_overlay_name, self.split.ids))
        _log_results(results, summary, self.split.name, out_dir, overlays, self.tracker)
        return {"results": fs.join(out_dir, RESULTS), "split": self.split.name, "summary": summary}


def eval_cam(cfg: EvalCamConfig, store_url: str, split_url: str, out_dir: str, tracker: Tracker | None = None,
             shard: str | None = None) -> dict:
    """Sweep the background threshold for P, K and each K + wP over the split's masks in one pass; also score
    the reference's own rule (argmax of P with its background channel). Writes ``cam_eval.json``, plots and
    overlays; returns the manifest. With ``shard='i/n'`` only every n-th image from i is scored and the counts are
    saved for :func:`merge_cam_eval`."""
    return evaluate(CamEvaluator(cfg, store_url, split_url, out_dir, tracker), shard)


def merge_cam_eval(shards: list[dict], cfg: EvalCamConfig, store_url: str, split_url: str, out_dir: str,
                   tracker: Tracker | None = None) -> dict:
    """The results of a sharded CAM evaluation (``shards``: the shards' manifests), as one unsharded pass gives."""
    return merge_shards(CamEvaluator(cfg, store_url, split_url, out_dir, tracker), shards)


def _overlay_name(image_id: str) -> str:
    return f"overlays/{image_id}.png"


def _log_results(results: dict, summary: dict, split_name: str, out_dir: str, overlays: dict[str, bytes],
                 tracker: Tracker) -> None:
    for variant, r in results.items():
        tag = variant.replace(" ", "_").replace("(", "").replace(")", "").replace("+", "_plus_")
        tracker.log_metrics(class_metrics(r["best"], f"cam_eval/{tag}"))
        tracker.log_text(format_table(r["best"]), f"cam_eval/{tag}.txt")
        log.info("\n%s", format_table(r["best"], f"{variant} on {split_name}, threshold {r.get('best_threshold')}"))
    sweeps = {v: r for v, r in results.items() if "thresholds" in r}
    pictures = {
        "miou_vs_threshold.png": curves_png({v: (r["thresholds"], r["miou"]) for v, r in sweeps.items()},
                                            "background threshold", "mIoU", f"CAM mIoU on {split_name}"),
        "per_class_iou.png": bar_chart_png(
            {v: {c: s["iou"] for c, s in r["best"]["per_class"].items()} for v, r in sweeps.items()},
            f"per-class IoU at the best threshold ({split_name})"),
    }
    pictures.update(overlays)
    publish_pictures(pictures, out_dir, tracker, "cam_eval")
    tracker.log_dict(summary, "cam_eval/summary.json")


def arguments(cfg: EvalCamConfig, run: RunContext, inputs: Inputs) -> dict[str, Any]:
    """The stage function's keyword arguments in a pipeline run, less the tracker."""
    return {"cfg": cfg, "store_url": inputs["infer_cams"]["store"],
            "split_url": inputs["prepare_data"]["splits"]["seed"],
            "out_dir": run.out_dir("eval_cam")}


eval_cam_task = task(eval_cam, name="eval_cam", cache_policy=NO_CACHE)
