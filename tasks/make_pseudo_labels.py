"""Pseudo labels for the segmenter from the stored CAMs, one VOC-palette PNG per image.

Methods (``method``): ``irn`` random walk on the boundary map of the trained IRN (the reference's VOC path,
docs/method.md section 7.3), ``crf`` dense CRF on the fused CAM's label map (the reference's COCO path replaces IRN
by a dense CRF), ``none`` the fused CAM's argmax. The IRN network comes from ``tasks.train_irn`` / ``models.irn``.
"""
from __future__ import annotations

import logging
from typing import Any, Literal

from prefect import task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel, ConfigDict, Field, field_validator

from models.irn import EDGE_CANVAS, STRIDE
from models.pseudo_labels import RandomWalkParams
from storage.digests import file_digest
from storage.errors import ConfigError
from storage.tracking import Tracker
from tasks.engine.crf import CrfConfig
from tasks.engine.label_maps import claim_out_dir, open_inputs, write_all
from tasks.engine.parallel import default_workers
from tasks.engine.pseudo_label_worker import PseudoLabelJob
from tasks.runtime.context import RunContext
from tasks.runtime.device import resolve_device
from tasks.runtime.manifests import Inputs

log = logging.getLogger(__name__)


class MakePseudoLabelsConfig(BaseModel):
    """Pseudo labels (docs/method.md section 7.3); random-walk defaults are the reference's ``make_seg_labels``."""

    model_config = ConfigDict(extra="forbid")
    method: Literal["irn", "crf", "none"] = Field(
        "irn", description="irn: random walk on IRN's boundaries (the reference); crf: dense CRF on the CAMs; "
        "none: the CAMs' argmax")
    proto_weight: float = Field(0.3, ge=0, description="scores are K + proto_weight * P")
    beta: float = Field(10, gt=0, description="random walk: affinity exponent")
    exp_times: int = Field(8, ge=0, le=12, description="random walk: 2**exp_times steps")
    radius: int = Field(5, ge=2, description="random walk: neighbourhood radius on the stride-4 grid")
    power: float = Field(1.3, gt=0, description="random walk: scores ** power before walking")
    bg: float = Field(0.25, ge=0, description="random walk: constant background of the foreground-only branch")
    double_power: bool = Field(True, description="random walk: raise the all-channel branch to power twice, as "
                                                 "the reference does (total 1.69); false: once")
    edge_canvas: int = Field(
        EDGE_CANVAS, ge=0, description="random walk: side of the zero-padded square on which IRN computes the "
                                       "boundary map (the reference: 512; a larger image gets its longer side "
                                       "rounded up to a multiple of 16); 0: pad each side to a multiple of 16 only")
    walk_scale: float = Field(
        1, ge=1, le=4, description="random walk: image and CAMs upscaled by this before IRN's boundary map and the "
                                   "walk, the walked scores brought back (the reference: 1; for small images, whose "
                                   "stride-4 grid is coarse, docs/demo.md); edge_canvas is scaled with it")
    bg_threshold: float | None = Field(
        None, ge=0, le=1, description="crf / none: background score against the foreground scores in [0, 1] "
                                      "(tasks.eval_cam's best threshold); null: the stored background channel")
    gt_prob: float = Field(0.7, gt=0, lt=1, description="crf: confidence of the label unary")
    crf: CrfConfig = CrfConfig()
    workers: int | None = Field(None, ge=1, description="worker processes (default one per core); method irn on "
                                                        "a CUDA device runs in one process")

    @field_validator("edge_canvas")
    @classmethod
    def _canvas_multiple_of_stride(cls, canvas: int) -> int:
        if canvas % STRIDE:
            raise ValueError(f"edge_canvas must be 0 or a multiple of {STRIDE} (IRN's stride), got {canvas}")
        return canvas

    def random_walk_params(self) -> RandomWalkParams:
        return RandomWalkParams(self.proto_weight, self.power, self.bg, self.double_power, self.radius, self.beta,
                                self.exp_times)


def make_pseudo_labels(cfg: MakePseudoLabelsConfig, store_url: str, split_url: str, out_dir: str, device: str = "auto",
                       tracker: Tracker | None = None, irn_checkpoint_url: str | None = None,
                       shard: str | None = None) -> dict:
    """Write ``<out_dir>/<id>.png`` for every image of the split (or of its ``shard`` 'i/n') with the configured
    method; images already written are skipped (resume); a directory holding labels of other settings (config,
    CAM store, IRN weights) is refused. ``irn_checkpoint_url`` (the trained IRN) is required by method ``irn``."""
    tracker = tracker or Tracker.null()
    if cfg.method == "irn" and not irn_checkpoint_url:
        raise ConfigError("pseudo-label method 'irn' needs the IRN checkpoint (irn_checkpoint_url); "
                          "use method 'crf' or 'none' without IRN")
    store, split = open_inputs(store_url, split_url)
    digest = claim_out_dir(out_dir, {"stage": "make_pseudo_labels",
                                     "config": cfg.model_dump(mode="json", exclude={"workers"}),
                                     "cam_store": [store.config_hash, store.checkpoint_hash],
                                     "irn": file_digest(irn_checkpoint_url) if cfg.method == "irn" else None})
    torch_device = resolve_device(device)
    on_accelerator = cfg.method == "irn" and torch_device.type != "cpu"
    workers = 1 if on_accelerator else cfg.workers or default_workers()
    job = PseudoLabelJob(store_url, out_dir, cfg.method, cfg.proto_weight, cfg.bg_threshold, cfg.gt_prob,
                         cfg.crf.params(), cfg.random_walk_params(), str(torch_device), irn_checkpoint_url,
                         cfg.edge_canvas, max(1, default_workers() // workers), cfg.walk_scale)
    manifest = write_all(job, split, out_dir, workers, f"make_pseudo_labels[{cfg.method}]", shard)
    manifest.update({"method": cfg.method, "device": str(torch_device), "irn_checkpoint": irn_checkpoint_url,
                     "settings_digest": digest})
    log.info("pseudo labels (%s): %d written, %d skipped in %.1f s", cfg.method, manifest["written"],
             manifest["skipped"], manifest["seconds"])
    tracker.log_params({"make_pseudo_labels": cfg.model_dump(mode="json"), "irn_checkpoint": irn_checkpoint_url})
    tracker.log_metrics({"images": manifest["images"], "written": manifest["written"], "seconds": manifest["seconds"],
                         **{f"fraction/{k}": v for k, v in manifest["label_fractions"].items()}})
    return manifest


def arguments(cfg: MakePseudoLabelsConfig, run: RunContext, inputs: Inputs) -> dict[str, Any]:
    """The stage function's keyword arguments in a pipeline run, less the tracker."""
    irn = inputs.get("train_irn")
    return {"cfg": cfg, "store_url": inputs["infer_cams"]["store"],
            "split_url": inputs["prepare_data"]["splits"]["train"],
            "out_dir": run.out_dir("make_pseudo_labels"), "device": run.device,
            "irn_checkpoint_url": irn["checkpoint"] if irn else None}


make_pseudo_labels_task = task(make_pseudo_labels, name="make_pseudo_labels", cache_policy=NO_CACHE)
