"""Segmentation inference (multi-scale + flip, optional dense CRF) and evaluation against ground truth;
test-split predictions exported for the PASCAL VOC evaluation server (docs/method.md sections 8 and 9).

Two input protocols. ``test_size: null`` is deeplab-pytorch's ``test``: each image whole at its own size, one per
forward (its 513 is never read there); with ``flip: false`` and scales 0.5/0.75/1.0 it is the reference's protocol.
``test_size: N`` is Caffe DeepLab's "test at 513": every image sits at the top-left of an N x N canvas padded with
the mean colour (0 after normalisation; an image with a longer side is first shrunk to fit, VOC never is), so that
one forward per scale covers a whole batch of images and their flips; the padding changes the predictions near it
(docs/segmentation.md).
"""
from __future__ import annotations

import gzip
import io
import json
import logging
import tarfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import fields
from typing import Any, Literal

import numpy as np
import torch
from prefect import task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel, ConfigDict, Field
from tqdm import tqdm

from models.backbone import fold_batchnorm
from models.deeplab import V2_RATES, DeepLab
from models.metrics import ConfusionMatrix
from models.seg_inference import FUSIONS
from storage import checkpoints, fs
from storage.datasets.split_files import load_split_file, load_split_with_masks
from storage.datasets.voc_layout import Split
from storage.digests import file_digest
from storage.errors import CheckpointError, DataError
from storage.images import encode_mask_png, read_rgb
from storage.plots import bar_chart_png, overlay_png
from storage.reports import class_metrics, format_table
from storage.tracking import Tracker
from tasks.engine.crf import crf_labels
from tasks.engine.evaluation import EvalState, Evaluator, evaluate, merge_shards, publish_pictures
from tasks.engine.parallel import parallel_map
from tasks.engine.seg_prediction import SegPrediction, predict_probs, read_target
from tasks.engine.shards import shard_items
from tasks.runtime.context import RunContext
from tasks.runtime.device import resolve_device
from tasks.runtime.manifests import Inputs
from tasks.runtime.settings import Scales

log = logging.getLogger(__name__)

RESULTS_NAME = "seg_eval"
RESULTS = f"{RESULTS_NAME}.json"
ARCHIVE = "seg_test_results.tar.gz"
VOC_RESULTS_DIR = "results/VOC2012/Segmentation/comp6_test_cls"
"""Where the VOC evaluation server expects segmentation results (comp6: trained with data beyond VOC)."""


class EvalSegConfig(BaseModel):
    """Segmentation inference and evaluation; defaults are Caffe DeepLab's 513 canvas plus flip (configs/voc.yaml
    sets deeplab-pytorch's protocol: ``test_size: null``, ``flip: false``)."""

    model_config = ConfigDict(extra="forbid")
    scales: Scales = Field((0.5, 0.75, 1.0), description="input scales (deeplab MSC: 0.5, 0.75, 1.0)")
    fusion: Literal[FUSIONS] = Field(  # type: ignore[valid-type]
        "max", description="how the scales' logits are fused (deeplab MSC: max)")
    flip: bool = Field(True, description="also run each scale's horizontal flip and average the logits")
    test_size: int | None = Field(
        513, ge=16, description="side of the padded square input, larger images shrunk to fit; null: each image "
                                "whole and unpadded, one per forward (deeplab-pytorch's test)")
    batch_size: int = Field(4, ge=1, description="images per forward on canvases (each scale's forward holds 2x with "
                                                 "flip); unpadded images go one at a time")
    crf: bool = Field(True, description="also score after dense-CRF post-processing (deeplab-pytorch's values)")
    crf_workers: int | None = Field(None, ge=1, description="CRF processes; null: one per core")
    crf_chunk: int = Field(64, ge=1, description="images whose probabilities are held for one parallel CRF pass")
    num_workers: int = Field(2, ge=0, description="DataLoader processes decoding images")
    amp: bool = Field(False, description="fp16 autocast + channels_last (CUDA only)")
    overlays: int = Field(6, ge=0, description="validation images drawn as image | GT | no CRF | CRF")

    @property
    def prediction(self) -> SegPrediction:
        """The settings :func:`tasks.engine.seg_prediction.predict_probs` runs with."""
        return SegPrediction(**{f.name: getattr(self, f.name) for f in fields(SegPrediction)})


def load_segmenter(url: str, class_names: Sequence[str]) -> DeepLab:
    """The segmenter of a ``train_seg`` checkpoint (eval mode). A checkpoint that is not a segmenter, or was
    trained for other classes, is an error naming the file."""
    state = checkpoints.load(url)
    meta = state.get("meta")
    if not isinstance(meta, dict) or meta.get("kind") != "segmenter" or "model" not in state:
        raise CheckpointError(f"{url}: not a segmentation checkpoint (no 'model' and segmenter 'meta')")
    if tuple(meta["class_names"]) != tuple(class_names):
        raise CheckpointError(f"{url} was trained for {len(meta['class_names'])} classes "
                              f"({_names(meta['class_names'])}); the split has {len(class_names)} "
                              f"({_names(class_names)})")
    model = DeepLab(len(class_names), meta["arch"], meta["backbone"], meta["norm"], meta["output_stride"],
                    meta.get("aspp_rates", V2_RATES), meta.get("style", "torchvision"))
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as err:
        raise CheckpointError(f"{url} does not match a {meta['arch']} {meta['backbone']} segmenter: {err}") from None
    return model.eval()


def _names(names: Sequence[str]) -> str:
    return ", ".join(names[:4]) + (", ..." if len(names) > 4 else "")


def segment(model: torch.nn.Module, split: Split, ids: Sequence[str], cfg: EvalSegConfig,
            device: torch.device) -> Iterator[tuple[str, np.ndarray, np.ndarray | None]]:
    """(id, class map without CRF, class map with CRF or None) for each of ``ids`` of ``split``, in order. The CRF
    (``models.crf.DEEPLAB_CRF``) runs in ``crf_workers`` processes over chunks of ``crf_chunk`` images, whose
    probabilities are kept as float16 meanwhile."""
    pending: list[tuple[str, np.ndarray, np.ndarray]] = []

    def flush() -> Iterator[tuple[str, np.ndarray, np.ndarray | None]]:
        items = [(split.image_url(image_id), probs) for image_id, _, probs in pending]
        refined = parallel_map(crf_labels, items, cfg.crf_workers, chunksize=1)
        yield from ((image_id, plain, labels) for (image_id, plain, _), labels in zip(pending, refined))
        pending.clear()

    progress = tqdm(predict_probs(model, split, ids, cfg.prediction, device), total=len(ids),
                    desc=f"eval_seg {split.name}", unit="img", dynamic_ncols=True)
    for image_id, probs in progress:
        plain = probs.argmax(axis=0).astype(np.uint8)
        if not cfg.crf:
            yield image_id, plain, None
            continue
        pending.append((image_id, plain, probs.astype(np.float16)))
        if len(pending) >= cfg.crf_chunk:
            yield from flush()
    if pending:
        yield from flush()

SegOutput = tuple[str, str, np.ndarray, np.ndarray | None]
"""(split key ``val`` or ``test``, image id, class map without CRF, class map with CRF or None)."""


class SegEvaluator(Evaluator[SegOutput]):
    """Scores the segmenter of ``checkpoint_url`` on the validation split without and with CRF, and on the test
    split if given (if it has masks), whose predictions it also keeps as VOC-palette PNGs for the server archive.
    The state holds per split key the confusion matrices ``<key>/no_crf`` and ``<key>/crf`` (when the split has
    masks), ``<key>/images`` and the seconds; its pictures are the validation overlays and the test predictions."""

    name = RESULTS_NAME

    def __init__(self, cfg: EvalSegConfig, checkpoint_url: str, val_split_url: str, test_split_url: str | None,
                 device: str, out_dir: str, tracker: Tracker | None):
        val = load_split_with_masks(val_split_url, "segmentation evaluation")
        test = load_split_file(test_split_url) if test_split_url else None
        if test is not None and test.class_names != val.class_names:
            raise DataError(f"{test_split_url}: classes differ from those of the validation split {val_split_url}")
        self.cfg, self.checkpoint_url, self.device = cfg, checkpoint_url, device
        self.splits = {"val": val, **({"test": test} if test is not None else {})}
        self.out_dir, self.tracker = out_dir, tracker or Tracker.null()
        self.drawn = set(val.ids[:cfg.overlays])
        self.reset()

    def reset(self) -> None:
        super().reset()
        variants = ("no_crf", "crf") if self.cfg.crf else ("no_crf",)
        for key, split in self.splits.items():
            self.state.add_count(f"{key}/images", 0)
            self.state.seconds[key] = 0.0
            k = len(split.class_names)
            if split.has_masks:
                self.state.matrices.update({f"{key}/{v}": torch.zeros(k, k, dtype=torch.int64) for v in variants})

    def outputs(self, shard: str | None) -> Iterator[SegOutput]:
        """The splits' shard segmented in turn (the model loaded first), each split timed."""
        model = load_segmenter(self.checkpoint_url, self.splits["val"].class_names)
        device = resolve_device(self.device)
        fold_batchnorm(model.backbone)  # eval mode: same outputs, faster
        model.to(device)
        if self.cfg.amp and device.type == "cuda":
            model = model.to(memory_format=torch.channels_last)
        for key, split in self.splits.items():
            ids = shard_items(split.ids, shard)
            started = time.perf_counter()
            for image_id, plain, refined in segment(model, split, ids, self.cfg, device):
                yield key, image_id, plain, refined
            self.state.seconds[key] = time.perf_counter() - started
            self.state.add_count(f"{key}/images", len(ids))

    def process(self, output: SegOutput) -> None:
        key, image_id, plain, refined = output
        split = self.splits[key]
        if key == "test":
            self.state.pictures[_prediction_name(image_id)] = encode_mask_png(refined if refined is not None else plain)
        if not split.has_masks:
            return
        target = read_target(split, image_id, plain.shape)
        self.state.add_confusion(f"{key}/no_crf", target, plain, len(split.class_names))
        if refined is not None:
            self.state.add_confusion(f"{key}/crf", target, refined, len(split.class_names))
        if key == "val" and image_id in self.drawn:
            shown = [("no CRF", plain)] + ([("CRF", refined)] if refined is not None else [])
            self.state.pictures[_overlay_name(image_id)] = overlay_png(read_rgb(split.image_url(image_id)), target,
                                                                       shown)

    def report(self) -> dict:
        val, test, state = self.splits["val"], self.splits.get("test"), self.state
        results: dict = {"checkpoint": self.checkpoint_url, "checkpoint_hash": file_digest(self.checkpoint_url),
                         "config": self.cfg.model_dump(mode="json"), "val": _split_results(val, "val", state)}
        archive_url = None
        if test is not None:
            results["test"] = _split_results(test, "test", state)
            buffer = io.BytesIO()
            with gzip.GzipFile(fileobj=buffer, mode="wb", mtime=0) as gz, \
                    tarfile.open(fileobj=gz, mode="w") as archive:
                for image_id in test.ids:
                    _add_png(archive, _prediction_name(image_id), state.pictures[_prediction_name(image_id)])
            archive_url = fs.join(self.out_dir, ARCHIVE)
            fs.write_bytes(archive_url, buffer.getvalue())
            results["test"]["archive"] = archive_url
            self.tracker.log_bytes(buffer.getvalue(), f"eval_seg/{ARCHIVE}")
        summary = _summary(results)
        results["summary"] = summary
        fs.write_text(fs.join(self.out_dir, RESULTS), json.dumps(results, indent=2))
        overlays = state.pictures_of(map(_overlay_name, val.ids))
        _log_results(results, summary, self.out_dir, overlays, self.tracker)
        return {"results": fs.join(self.out_dir, RESULTS), "summary": summary, "archive": archive_url}


def _prediction_name(image_id: str) -> str:
    return f"{VOC_RESULTS_DIR}/{image_id}.png"


def _overlay_name(image_id: str) -> str:
    return f"seg_overlays/{image_id}.png"


def _split_results(split: Split, key: str, state: EvalState) -> dict:
    """What one split's accumulated state scores: mIoU etc. without and with CRF, images, seconds, throughput."""
    images, seconds = state.counts[f"{key}/images"], state.seconds[key]
    result: dict = {"split": split.name, "images": images, "seconds": seconds,
                    "images_per_second": images / seconds if seconds > 0 else None}
    for variant in ("no_crf", "crf"):
        if (counts := state.matrices.get(f"{key}/{variant}")) is not None:
            result[variant] = ConfusionMatrix.from_counts(counts).scores(split.class_names)
    return result


def _add_png(archive: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode = len(data), 0o644
    archive.addfile(info, io.BytesIO(data))


def eval_seg(cfg: EvalSegConfig, checkpoint_url: str, val_split_url: str, out_dir: str, device: str = "auto",
             tracker: Tracker | None = None, test_split_url: str | None = None, shard: str | None = None) -> dict:
    """Evaluate a ``train_seg`` checkpoint on the validation split without and with CRF: ``<out_dir>/seg_eval.json``
    (mIoU, pixel accuracy and per-class IoU/precision/recall by class name), MLflow metrics, a per-class IoU bar
    chart and overlays. With ``test_split_url``, its predictions are written as VOC-palette PNGs under
    ``results/VOC2012/Segmentation/comp6_test_cls/`` in ``<out_dir>/seg_test_results.tar.gz`` (logged to MLflow);
    a test split with masks is scored too. Returns the manifest. With ``shard='i/n'`` only every n-th image from i
    of each split is segmented, and the counts and PNGs are saved for :func:`merge_seg_eval`."""
    return evaluate(SegEvaluator(cfg, checkpoint_url, val_split_url, test_split_url, device, out_dir, tracker), shard)


def merge_seg_eval(shards: list[dict], cfg: EvalSegConfig, checkpoint_url: str, val_split_url: str, out_dir: str,
                   device: str = "auto", tracker: Tracker | None = None, test_split_url: str | None = None) -> dict:
    """The results of a sharded segmentation evaluation (``shards``: the shards' manifests), as one unsharded pass
    gives (the test archive included, byte for byte)."""
    return merge_shards(SegEvaluator(cfg, checkpoint_url, val_split_url, test_split_url, device, out_dir, tracker),
                        shards)


def _summary(results: dict) -> dict:
    summary = {}
    for split in ("val", "test"):
        for variant, suffix in (("no_crf", ""), ("crf", "_crf")):
            if variant in results.get(split, {}):
                summary[f"{split}_miou{suffix}"] = results[split][variant]["miou"]
    summary["val_images_per_second"] = results["val"]["images_per_second"]
    return summary


def _log_results(results: dict, summary: dict, out_dir: str, overlays: dict[str, bytes], tracker: Tracker) -> None:
    tracker.log_params({"eval_seg": results["config"], "checkpoint": results["checkpoint"]})
    tracker.log_metrics({k: v for k, v in summary.items() if v is not None})
    bars = {}
    for split in ("val", "test"):
        for variant in ("no_crf", "crf"):
            scores = results.get(split, {}).get(variant)
            if scores is None:
                continue
            name = f"{split}_{variant}"
            tracker.log_metrics(class_metrics(scores, f"eval_seg/{name}"))
            tracker.log_text(format_table(scores), f"eval_seg/{name}.txt")
            log.info("\n%s", format_table(scores, f"segmentation, {results[split]['split']}, {variant}"))
            if split == "val":
                bars["no CRF" if variant == "no_crf" else "CRF"] = {c: s["iou"] for c, s in
                                                                   scores["per_class"].items()}
    pictures = {"seg_per_class_iou.png": bar_chart_png(bars, f"per-class IoU ({results['val']['split']})")}
    pictures.update(overlays)
    publish_pictures(pictures, out_dir, tracker, "eval_seg")
    tracker.log_dict(summary, "eval_seg/summary.json")


def arguments(cfg: EvalSegConfig, run: RunContext, inputs: Inputs) -> dict[str, Any]:
    """The stage function's keyword arguments in a pipeline run, less the tracker."""
    splits = inputs["prepare_data"]["splits"]
    return {"cfg": cfg, "checkpoint_url": inputs["train_seg"]["checkpoint"], "val_split_url": splits["val"],
            "test_split_url": splits.get("test"), "out_dir": run.out_dir("eval_seg"), "device": run.device}


eval_seg_task = task(eval_seg, name="eval_seg", cache_policy=NO_CACHE)
