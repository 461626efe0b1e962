"""What each stage's manifest holds for the stages after it (the manifest is what a stage function returns, recorded
in ``manifests/<stage>.json``). A manifest may carry more figures; these keys are the contract the flow checks when
a stage finishes and the stages' ``arguments`` read."""
from __future__ import annotations

from typing import TypedDict


class Splits(TypedDict, total=False):
    train: str  # split file URLs, by role
    val: str
    seed: str
    test: str


class PrepareDataManifest(TypedDict):
    stats: str
    splits: Splits
    class_names: list[str]
    class_counts: dict[str, int]


class TrainingManifest(TypedDict):
    """train_cam, train_irn and train_seg."""

    checkpoint: str  # the weights later stages use
    config_hash: str
    steps: int


class InferCamsManifest(TypedDict):
    store: str  # the CAM store
    images: int


class LabelMapsManifest(TypedDict):
    """make_ir_labels and make_pseudo_labels."""

    out_dir: str  # one PNG per image
    split: str
    images: int
    settings_digest: str


class EvaluationManifest(TypedDict):
    """eval_cam, eval_pseudo_labels and eval_seg."""

    results: str  # the results JSON


class Inputs(TypedDict, total=False):
    """The manifests of the stages a stage reads, by stage name (None for a stage this configuration disables)."""

    prepare_data: PrepareDataManifest
    train_cam: TrainingManifest
    infer_cams: InferCamsManifest
    make_ir_labels: LabelMapsManifest
    train_irn: TrainingManifest | None
    make_pseudo_labels: LabelMapsManifest
    train_seg: TrainingManifest


CONTRACTS: dict[str, type] = {
    "prepare_data": PrepareDataManifest, "train_cam": TrainingManifest, "infer_cams": InferCamsManifest,
    "eval_cam": EvaluationManifest, "make_ir_labels": LabelMapsManifest, "train_irn": TrainingManifest,
    "make_pseudo_labels": LabelMapsManifest, "eval_pseudo_labels": EvaluationManifest, "train_seg": TrainingManifest,
    "eval_seg": EvaluationManifest,
}
