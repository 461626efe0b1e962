"""Confusion-matrix metrics and the background-threshold sweep."""
import math

import numpy as np
import pytest
import torch

from models.cam_eval import ThresholdSweep, threshold_labels
from models.metrics import ConfusionMatrix, stacked_confusion

NAMES = ("background", "a", "b")


def test_iou_precision_recall_by_hand():
    target = np.array([[0, 0, 1, 1], [2, 2, 255, 255]])
    pred = np.array([[0, 1, 1, 1], [2, 0, 2, 1]])
    cm = ConfusionMatrix(3)
    cm.update(target, pred)
    s = cm.scores(NAMES)
    # background: tp 1, gt 2, pred 2 -> 1/3; a: tp 2, gt 2, pred 3 -> 2/3; b: tp 1, gt 2, pred 1 -> 1/2
    assert math.isclose(s["per_class"]["background"]["iou"], 1 / 3)
    assert math.isclose(s["per_class"]["a"]["iou"], 2 / 3)
    assert math.isclose(s["per_class"]["b"]["iou"], 1 / 2)
    assert math.isclose(s["miou"], (1 / 3 + 2 / 3 + 1 / 2) / 3)
    assert math.isclose(s["per_class"]["a"]["precision"], 2 / 3)
    assert math.isclose(s["per_class"]["b"]["recall"], 1 / 2)
    assert math.isclose(s["pixel_accuracy"], 4 / 6)


def test_absent_class_is_nan_and_left_out_of_mean():
    cm = ConfusionMatrix(3)
    cm.update(torch.tensor([0, 0, 1]), torch.tensor([0, 0, 1]))
    s = cm.scores(NAMES)
    assert math.isnan(s["per_class"]["b"]["iou"]) and s["miou"] == 1.0


def test_prediction_255_counts_as_background():
    cm = ConfusionMatrix(3)
    cm.update(np.array([0, 1]), np.array([255, 1]))
    assert cm.scores(NAMES)["miou"] == 1.0


def test_threshold_labels_ties_go_to_background():
    fg = torch.tensor([[[0.5, 0.2]], [[0.1, 0.9]]])
    assert threshold_labels(fg, 0.5).tolist() == [[0, 2]]
    assert threshold_labels(fg, 0.1).tolist() == [[1, 2]]


def test_sweep_matches_single_thresholds_and_finds_best():
    rng = np.random.default_rng(0)
    target = torch.from_numpy(rng.integers(0, 3, (16, 16)))
    fg = torch.from_numpy(rng.random((2, 16, 16)).astype(np.float32))
    sweep = ThresholdSweep(3, thresholds=(0.2, 0.5, 0.8))
    sweep.update(target, fg)
    results = sweep.results(NAMES)
    for t, miou in zip(results["thresholds"], results["miou"]):
        cm = ConfusionMatrix(3)
        cm.update(target, threshold_labels(fg, t))
        assert math.isclose(cm.scores(NAMES)["miou"], miou)
    assert results["best_threshold"] == results["thresholds"][int(np.argmax(results["miou"]))]


def test_report_table_and_mlflow_metrics():
    from storage.reports import class_metrics, format_table

    cm = ConfusionMatrix(3)
    cm.update(np.array([0, 1, 1]), np.array([0, 1, 0]))
    scores = cm.scores(NAMES)
    table = format_table(scores, title="val")
    assert table.splitlines()[0] == "val" and "b" in table and "   -  " in table
    assert "mIoU" in table.splitlines()[-1]
    metrics = class_metrics(scores, "val_cam")
    assert metrics["val_cam/iou/a"] == 0.5 and "val_cam/iou/b" not in metrics


def test_sweep_maps_channels_through_keys():
    target = torch.tensor([[0, 7], [7, 3]])
    fg = torch.tensor([[[0.0, 0.9], [0.8, 0.1]], [[0.0, 0.1], [0.2, 0.7]]])
    sweep = ThresholdSweep(8, thresholds=(0.5,))
    sweep.update(target, fg, keys=torch.tensor([0, 7, 3]))
    assert sweep.results([str(i) for i in range(8)])["miou"] == [1.0]


def test_stacked_confusion_counts_each_prediction_as_a_confusion_matrix():
    rng = np.random.default_rng(0)
    target = rng.integers(0, 5, (7, 9))
    target[0, :3] = 255  # ignored
    predictions = torch.from_numpy(rng.integers(0, 5, (3, 7, 9)))
    predictions[1, 2, :4] = 255  # counted as background
    stacked = stacked_confusion(target, predictions, 5)
    for prediction, counts in zip(predictions, stacked):
        single = ConfusionMatrix(5)
        single.update(target, prediction)
        assert torch.equal(counts, single.matrix)
    with pytest.raises(ValueError, match="sizes differ"):
        stacked_confusion(target, predictions[:, :6], 5)
