"""Confident inter-pixel-relation (IR) labels from the stored CAMs with two dense CRFs (docs/method.md
section 7.1), one palette PNG per image (0 background, c foreground, 255 ignore), the training labels of IRN."""
from __future__ import annotations

import logging
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel, ConfigDict, Field

from storage.tracking import Tracker
from tasks.engine.crf import CrfConfig
from tasks.engine.ir_label_worker import IrLabelJob
from tasks.engine.label_maps import claim_out_dir, open_inputs, write_all
from tasks.runtime.context import RunContext
from tasks.runtime.manifests import Inputs

log = logging.getLogger(__name__)


class MakeIrLabelsConfig(BaseModel):
    """IR labels (docs/method.md section 7.1)."""

    model_config = ConfigDict(extra="forbid")
    proto_weight: float = Field(0.7, ge=0, description="scores are K + proto_weight * P")
    bg_scale: float = Field(0.5, ge=0, description="background x bg_scale for the second (background) CRF")
    gt_prob: float = Field(0.7, gt=0, lt=1, description="confidence of the CRF's label unary")
    crf: CrfConfig = CrfConfig()
    workers: int | None = Field(None, ge=1, description="worker processes; default: one per core")


def make_ir_labels(cfg: MakeIrLabelsConfig, store_url: str, split_url: str, out_dir: str,
                   tracker: Tracker | None = None, shard: str | None = None) -> dict:
    """Write ``<out_dir>/<id>.png`` for every image of the split (or of its ``shard`` 'i/n') from its CAMs in the
    store; images already written are skipped (resume); a directory holding labels of other settings (config, CAM
    store) is refused. Returns the manifest (counts, timing, background / foreground / ignore fractions)."""
    tracker = tracker or Tracker.null()
    store, split = open_inputs(store_url, split_url)
    settings = cfg.model_dump(mode="json", exclude={"workers"})
    digest = claim_out_dir(out_dir, {"stage": "make_ir_labels", "config": settings,
                                     "cam_store": [store.config_hash, store.checkpoint_hash]})
    job = IrLabelJob(store_url, out_dir, cfg.proto_weight, cfg.bg_scale, cfg.gt_prob, cfg.crf.params())
    manifest = write_all(job, split, out_dir, cfg.workers, "make_ir_labels", shard)
    manifest["settings_digest"] = digest
    log.info("IR labels: %d written, %d skipped, fractions %s", manifest["written"], manifest["skipped"],
             manifest["label_fractions"])
    tracker.log_params({"make_ir_labels": cfg.model_dump(mode="json")})
    tracker.log_metrics({"images": manifest["images"], "written": manifest["written"], "seconds": manifest["seconds"],
                         **{f"fraction/{k}": v for k, v in manifest["label_fractions"].items()}})
    return manifest


def arguments(cfg: MakeIrLabelsConfig, run: RunContext, inputs: Inputs) -> dict[str, Any]:
    """The stage function's keyword arguments in a pipeline run, less the tracker."""
    return {"cfg": cfg, "store_url": inputs["infer_cams"]["store"],
            "split_url": inputs["prepare_data"]["splits"]["train"],
            "out_dir": run.out_dir("make_ir_labels")}


make_ir_labels_task = task(make_ir_labels, name="make_ir_labels", cache_policy=NO_CACHE)
