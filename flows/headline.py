"""The headline figures of a pipeline run, from its run records: what its MLflow parent run carries, what `sfc
compare` and the run's report show first. Metric names are stable (users sort and chart by them); scores are
fractions in [0, 1] as in the stage runs; the names are listed in docs/operations.md."""
from __future__ import annotations

import json
from dataclasses import dataclass, field

from flows import records
from flows.config import PipelineConfig
from flows.stages import STAGES
from storage import fs
from storage.tracking import Tracker

CAM_SEED = "cam_seed_miou"  # best CAM variant at its best background threshold (eval_cam)
CAM_SEED_THRESHOLD = "cam_seed_threshold"
PSEUDO_LABELS = "pseudo_label_miou"  # eval_pseudo_labels
SEGMENTATION = ("seg_val_miou", "seg_val_miou_crf", "seg_test_miou", "seg_test_miou_crf")  # eval_seg
CEILING = ("ceiling_ratio", "ceiling_ratio_crf")  # seg val mIoU / the fully supervised one (tracking.ceiling_*)
TOTAL_SECONDS = "seconds/total"
CAM_SEED_VARIANT_TAG = "cam_seed_variant"

# The runs table's columns of the experiment's headline view, in order.
COLUMNS = (CAM_SEED, PSEUDO_LABELS, *SEGMENTATION, CEILING[0], TOTAL_SECONDS)
LABELS = {
    CAM_SEED: "CAM seeds: best variant at its best threshold (eval_cam)",
    PSEUDO_LABELS: "pseudo labels (eval_pseudo_labels)",
    "seg_val_miou": "segmentation val (eval_seg)", "seg_val_miou_crf": "segmentation val, with CRF",
    "seg_test_miou": "segmentation test", "seg_test_miou_crf": "segmentation test, with CRF",
    "ceiling_ratio": "seg val / fully supervised val", "ceiling_ratio_crf": "the same with CRF",
    TOTAL_SECONDS: "seconds of all stages",
}
# The figure of each evaluation stage, and the per-class table it comes with.
STAGE_FIGURES = {"eval_cam": CAM_SEED, "eval_pseudo_labels": PSEUDO_LABELS, "eval_seg": "seg_val_miou"}


def seconds_metric(stage: str) -> str:
    return f"seconds/{stage}"


@dataclass
class Headline:
    """A run's headline ``metrics`` and ``tags``, the enabled stages that have not finished (``missing``) and each
    finished evaluation's per-class IoU by its figure's name (``per_class``)."""

    metrics: dict[str, float] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)
    per_class: dict[str, dict[str, float]] = field(default_factory=dict)


def finished_records(cfg: PipelineConfig) -> dict[str, dict]:
    """The finished records of the run's enabled stages, by stage."""
    found = {}
    for stage in STAGES:
        if stage.enabled(cfg) and (record := records.read_record(cfg.run_dir, stage.name)) is not None:
            found[stage.name] = record
    return found


def headline(cfg: PipelineConfig, finished: dict[str, dict] | None = None, per_class: bool = False) -> Headline:
    """The run's headline from its finished stages' records (``finished``, read from the run directory when not
    given); with ``per_class``, the evaluations' per-class IoU too (read from their small results files)."""
    finished = finished_records(cfg) if finished is None else finished
    result = Headline(missing=[s.name for s in STAGES if s.enabled(cfg) and s.name not in finished])
    if (cam := finished.get("eval_cam")) is not None:
        variant, best = max(cam["manifest"]["summary"].items(), key=lambda item: item[1]["miou"])
        result.metrics[CAM_SEED] = best["miou"]
        result.tags[CAM_SEED_VARIANT_TAG] = variant
        if best.get("best_threshold") is not None:
            result.metrics[CAM_SEED_THRESHOLD] = best["best_threshold"]
    if (labels := finished.get("eval_pseudo_labels")) is not None:
        result.metrics[PSEUDO_LABELS] = labels["manifest"]["miou"]
    if (seg := finished.get("eval_seg")) is not None:
        summary = seg["manifest"]["summary"]
        result.metrics.update({name: summary[name.removeprefix("seg_")] for name in SEGMENTATION
                               if summary.get(name.removeprefix("seg_")) is not None})
    ceilings = (cfg.tracking.ceiling_val_miou, cfg.tracking.ceiling_val_miou_crf)
    for ratio, score, ceiling in zip(CEILING, SEGMENTATION[:2], ceilings):
        if ceiling and score in result.metrics:
            result.metrics[ratio] = result.metrics[score] / ceiling
    seconds = {name: record["seconds"] for name, record in finished.items() if record.get("seconds") is not None}
    result.metrics.update({seconds_metric(name): value for name, value in seconds.items()})
    if seconds:
        result.metrics[TOTAL_SECONDS] = sum(seconds.values())
    if per_class:
        result.per_class = _per_class(finished, result.tags.get(CAM_SEED_VARIANT_TAG))
    return result


def publish_headline(cfg: PipelineConfig, tracker: Tracker) -> Headline:
    """Give the run's MLflow parent run its headline figures as they stand (each finished stage updates them)."""
    summary = headline(cfg)
    tracker.log_metrics(summary.metrics)
    tracker.set_tags(summary.tags)
    return summary


def _per_class(finished: dict[str, dict], cam_variant: str | None) -> dict[str, dict[str, float]]:
    """Per-class IoU of each finished evaluation: the best CAM variant, the pseudo labels, segmentation val."""
    tables: dict[str, dict[str, float]] = {}
    for stage, figure in STAGE_FIGURES.items():
        if stage not in finished:
            continue
        results = json.loads(fs.read_text(finished[stage]["manifest"]["results"]))
        if stage == "eval_cam":
            rows = results["variants"][cam_variant]["best"]["per_class"]
        elif stage == "eval_pseudo_labels":
            rows = results["scores"]["per_class"]
        else:
            rows = results["val"]["no_crf"]["per_class"]
        tables[figure] = {name: row["iou"] for name, row in rows.items()}
    return tables


def headline_view() -> dict:
    """The experiment's shared runs-table view (MLflow's ``mlflow.sharedViewState.<key>`` experiment tag): the
    pipeline runs only, with the headline columns, best segmentation first."""
    return {"selectedColumns": ["attributes.`Dataset`", "attributes.`Models`",
                                *(f"metrics.`{name}`" for name in COLUMNS)],
            "orderByKey": f"metrics.`{SEGMENTATION[0]}`", "orderByAsc": False,
            "searchFilter": "tags.`sfc.kind` = 'pipeline'"}


VIEW_KEY = "sfc-headline"
VIEW_TAG = f"mlflow.sharedViewState.{VIEW_KEY}"


def experiment_tags() -> dict[str, str]:
    return {VIEW_TAG: json.dumps(headline_view())}


def runs_table_url(base_url: str, experiment_id: str) -> str:
    """The MLflow UI page of the experiment's runs table in the headline view (MLflow 3.17 opens experiments on
    its GenAI pages unless the URL asks for the model-training workflow)."""
    return (f"{base_url.rstrip('/')}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"
            f"&viewStateShareKey={VIEW_KEY}")
