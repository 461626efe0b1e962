"""The Prefect flow chaining the stages, with one MLflow parent run and a nested run per stage."""
from __future__ import annotations

import json
import logging
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from prefect import flow
from prefect.runtime import flow_run

from flows.config import PipelineConfig, load_config
from storage import fs
from storage.tracking import Tracker, open_tracker
from tasks.eval_cam import eval_cam_task
from tasks.infer_cams import infer_cams_task
from tasks.prepare_data import prepare_data_task
from tasks.train_cam import MANIFEST as TRAIN_MANIFEST
from tasks.train_cam import train_cam_task

log = logging.getLogger(__name__)

def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def cam_store_url(cfg: PipelineConfig) -> str:
    return fs.join(cfg.run_dir, "cams.zarr")


def stage_inputs(cfg: PipelineConfig) -> tuple[str, list[str]]:
    """The trained checkpoint and the split files of a run whose data and training stages have finished."""
    manifest_url = fs.join(cfg.run_dir, "train_cam", TRAIN_MANIFEST)
    if not fs.exists(manifest_url):
        raise FileNotFoundError(f"{manifest_url} not found: run the pipeline's training stage first")
    checkpoint = json.loads(fs.read_text(manifest_url))["checkpoint"]
    splits = [fs.join(cfg.run_dir, "splits", f"{name}.json") for name in (cfg.data.train_split, cfg.data.val_split)]
    return checkpoint, splits


@contextmanager
def stage_run(parent: Tracker, name: str) -> Iterator[Tracker]:
    """A nested MLflow run for one stage, marked FAILED if the stage raises."""
    child = parent.child(name)
    try:
        yield child
    except BaseException:
        child.finish("FAILED")
        raise
    child.finish()


@flow(name="sfc-pipeline", log_prints=True)
def sfc_pipeline(config: dict) -> dict:
    """Run every stage of the SFC pipeline for a resolved configuration (a ``PipelineConfig`` as a dict)."""
    cfg = PipelineConfig.model_validate(config)
    run_dir = cfg.run_dir
    fs.makedirs(run_dir)
    fs.write_text(fs.join(run_dir, "config.yaml"), cfg.to_yaml())
    tracker = open_tracker(cfg.tracking_uri(), cfg.tracking.experiment, cfg.artifact_root(), cfg.run.name, {
        "git_commit": git_commit(), "config_hash": cfg.digest(), "prefect_flow_run_id": str(flow_run.get_id()),
        "run_dir": run_dir,
    })
    tracker.log_params(cfg.model_dump(mode="json"))
    tracker.log_text(cfg.to_yaml(), "config.yaml")
    manifests: dict[str, dict] = {}
    try:
        with stage_run(tracker, "prepare_data") as t:
            manifests["prepare_data"] = prepare_data_task(cfg.data, run_dir, cfg.cache_dir, t)
        with stage_run(tracker, "train_cam") as t:
            splits = manifests["prepare_data"]["splits"]
            manifests["train_cam"] = train_cam_task(cfg.train_cam, splits["train"], splits["val"],
                                                    fs.join(run_dir, "train_cam"), cfg.run.seed, cfg.run.device, t)
        with stage_run(tracker, "infer_cams") as t:
            manifests["infer_cams"] = infer_cams_task(cfg.infer_cams, manifests["train_cam"]["checkpoint"],
                                                      [splits["train"], splits["val"]], cam_store_url(cfg),
                                                      cfg.run.device, None, t)
        with stage_run(tracker, "eval_cam") as t:
            manifests["eval_cam"] = eval_cam_task(cfg.eval_cam, manifests["infer_cams"]["store"], splits["val"],
                                                  fs.join(run_dir, "metrics"), t)
    except BaseException:
        tracker.finish("FAILED")
        raise
    tracker.finish()
    summary = {"run_dir": run_dir, "mlflow_run_id": tracker.run_id, "stages": manifests}
    fs.write_text(fs.join(run_dir, "pipeline.json"), json.dumps(summary, indent=2, default=str))
    return summary


@flow(name="sfc-pipeline-from-config")
def sfc_pipeline_from_config(config_path: str = "configs/synthetic.yaml", overrides: list[str] | None = None) -> dict:
    """Entry point for deployments: load a YAML config with dotted overrides, then run :func:`sfc_pipeline`."""
    cfg = load_config(config_path, overrides or [])
    return sfc_pipeline(cfg.model_dump(mode="json"))
