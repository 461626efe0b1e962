"""Stage 2b: CAM evaluation against ground truth: background-threshold sweep of P, K and fused K + wP."""
from __future__ import annotations

import json
import logging
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
from storage.datasets.voc_layout import Split
from storage.errors import DataError
from storage.images import read_mask, read_rgb
from storage.plots import bar_chart_png, curves_png, overlay_png
from storage.reports import class_metrics, format_table
from storage.tracking import Tracker
from tasks.engine.shards import empty_partial, merge_partials, save_partial, shard_items
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
    thresholds: tuple[float, ...] = DEFAULT_THRESHOLDS
    overlays: int = Field(6, ge=0, description="images drawn as image | GT | P | K overlays")


def _foreground(cam: np.ndarray) -> torch.Tensor:
    """Stored CAMs carry the background trick (fg x 2): back to max-normalised foreground scores in [0, 1]."""
    return torch.from_numpy(cam[1:] / 2.0)


def eval_cam(cfg: EvalCamConfig, store_url: str, split_url: str, out_dir: str, tracker: Tracker | None = None,
             shard: str | None = None) -> dict:
    """Sweep the background threshold for P, K and each K + wP over the split's masks in one pass; also score
    the reference's own rule (argmax of P with its background channel). Writes ``cam_eval.json``, plots and
    overlays; returns the manifest. With ``shard='i/n'`` only every n-th image from i is scored and the counts are
    saved for :func:`merge_cam_eval`."""
    split = load_split_with_masks(split_url, "CAM evaluation")
    if shard is not None:
        return save_partial(out_dir, RESULTS_NAME, shard,
                            lambda: _accumulate(cfg, store_url, split, shard_items(split.ids, shard)))
    return _report(cfg, split, _accumulate(cfg, store_url, split, split.ids), out_dir, tracker or Tracker.null())


def merge_cam_eval(shards: list[dict], cfg: EvalCamConfig, store_url: str, split_url: str, out_dir: str,
                   tracker: Tracker | None = None) -> dict:
    """The results of a sharded CAM evaluation (``shards``: the shards' manifests), as one unsharded pass gives."""
    split = load_split_with_masks(split_url, "CAM evaluation")
    return merge_partials(shards, out_dir, RESULTS_NAME,
                          lambda state: _report(cfg, split, state, out_dir, tracker or Tracker.null()))


def _variants(cfg: EvalCamConfig) -> list[str]:
    return ["P", "K", *(f"K+{w}P" for w in cfg.proto_weights)]


def _accumulate(cfg: EvalCamConfig, store_url: str, split: Split, ids: list[str]) -> dict:
    """The sweeps' and the reference rule's confusion matrices over ``ids``, and the overlays of those among the
    split's first ``cfg.overlays`` images."""
    store = CamStore.open(store_url)
    names = split.class_names
    sweeps = {v: ThresholdSweep(len(names), cfg.thresholds) for v in _variants(cfg)}
    reference = ConfusionMatrix(len(names))
    drawn = set(split.ids[:cfg.overlays])
    state = empty_partial()
    for image_id in ids:
        keys_np, proto, cam = store.load(image_id)
        mask = torch.from_numpy(read_mask(split.mask_url(image_id)).astype(np.int64))
        if mask.shape != proto.shape[1:]:
            raise DataError(f"{split.mask_url(image_id)}: mask size {tuple(mask.shape)} differs from the stored "
                            f"CAM size {proto.shape[1:]} of image {image_id!r}")
        keys = torch.from_numpy(keys_np)
        maps = {"P": proto, "K": cam, **{f"K+{w}P": (cam + w * proto) / (1 + w) for w in cfg.proto_weights}}
        for variant, values in maps.items():
            sweeps[variant].update(mask, _foreground(values), keys)
        reference.update(mask, keys[torch.from_numpy(proto).argmax(0)])
        if image_id in drawn:
            labels = {v: keys[torch.from_numpy(maps[v]).argmax(0)].numpy() for v in ("P", "K")}
            state["pictures"][_overlay_name(image_id)] = overlay_png(
                read_rgb(split.image_url(image_id)), mask.numpy(), [("P", labels["P"]), ("K", labels["K"])])
    state["matrices"] = {**{v: sweep.counts() for v, sweep in sweeps.items()}, REFERENCE_RULE: reference.matrix}
    return state


def _overlay_name(image_id: str) -> str:
    return f"overlays/{image_id}.png"


def _report(cfg: EvalCamConfig, split: Split, state: dict, out_dir: str, tracker: Tracker) -> dict:
    names = split.class_names
    results = {v: ThresholdSweep.from_counts(state["matrices"][v], cfg.thresholds).results(names)
               for v in _variants(cfg)}
    results[REFERENCE_RULE] = {"best": ConfusionMatrix.from_counts(state["matrices"][REFERENCE_RULE]).scores(names)}
    summary = {v: {"miou": r["best"]["miou"], "best_threshold": r.get("best_threshold")} for v, r in results.items()}
    fs.write_text(fs.join(out_dir, RESULTS), json.dumps({"summary": summary, "variants": results}, indent=2))
    overlays = {name: state["pictures"][name] for name in map(_overlay_name, split.ids) if name in state["pictures"]}
    _log_results(results, summary, split.name, out_dir, overlays, tracker)
    return {"results": fs.join(out_dir, RESULTS), "split": split.name, "summary": summary}


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
    for name, png in pictures.items():
        fs.write_bytes(fs.join(out_dir, name), png)
        tracker.log_bytes(png, f"cam_eval/{name}")
    tracker.log_dict(summary, "cam_eval/summary.json")


def arguments(cfg: EvalCamConfig, run: RunContext, inputs: Inputs) -> dict[str, Any]:
    """The stage function's arguments in a pipeline run (less the tracker): its config section, its folder in the run
    directory and what it reads of its inputs' manifests."""
    return {"cfg": cfg, "store_url": inputs["infer_cams"]["store"],
            "split_url": inputs["prepare_data"]["splits"]["seed"],
            "out_dir": run.out_dir("eval_cam")}

eval_cam_task = task(eval_cam, name="eval_cam", cache_policy=NO_CACHE)
