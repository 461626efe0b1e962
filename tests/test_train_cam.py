"""CAM training: runs, logs, is deterministic, and a killed run resumes to the same weights."""
import json

import pytest
import torch

import tasks.train_cam as train_module
from storage import checkpoints, fs
from tasks.train_cam import TrainCamConfig, train_cam
from tests.interrupt import kill_on_call
from tests.synthetic_splits import synthetic_split_files

TINY = dict(backbone="resnet18", trainable_from=3, crop=64, resize_long=(48, 80), batch_size=4, max_steps=6,
            class_weights="counts", num_workers=0, checkpoint_every=2, keep_checkpoints=5)


@pytest.fixture(scope="module")
def splits(tmp_path_factory):
    return synthetic_split_files(tmp_path_factory.mktemp("syn"), ("train_aug", "val"), 40, 3, 64, 80)


def _run(splits, out_dir, **overrides):
    cfg = TrainCamConfig(**{**TINY, **overrides})
    return train_cam(cfg, splits["train_aug"], splits["val"], str(out_dir), seed=1, device="cpu")


def _weights(manifest):
    return checkpoints.load(manifest["final_checkpoint"])["model"]


def test_killed_training_resumes_to_identical_weights(splits, tmp_path, monkeypatch):
    reference = _weights(_run(splits, tmp_path / "full"))

    kill_on_call(monkeypatch, train_module, "sfc_step_losses", 5)
    with pytest.raises(KeyboardInterrupt):
        _run(splits, tmp_path / "killed")
    monkeypatch.undo()
    assert [s for s, _ in checkpoints.step_checkpoints(str(tmp_path / "killed" / "checkpoints"))] == [2, 4]
    assert not fs.exists(str(tmp_path / "killed" / "final.pt"))

    resumed = _weights(_run(splits, tmp_path / "killed"))
    for key, value in reference.items():
        assert torch.equal(value, resumed[key]), key


def test_finished_stage_is_not_redone_and_manifest_is_complete(splits, tmp_path, monkeypatch):
    manifest = _run(splits, tmp_path / "run", max_steps=2)
    assert set(manifest["class_weights"]) and manifest["steps"] == 2
    assert manifest["validation"]["val_all_background_miou"] >= 0
    assert json.loads(fs.read_text(str(tmp_path / "run" / "train_cam.json")))["config_hash"] == manifest["config_hash"]
    monkeypatch.setattr(train_module, "sfc_step_losses", lambda *a, **k: pytest.fail("retrained a finished stage"))
    assert _run(splits, tmp_path / "run", max_steps=2)["final_checkpoint"] == manifest["final_checkpoint"]


def test_checkpoint_from_other_config_is_refused(splits, tmp_path, monkeypatch):
    kill_on_call(monkeypatch, train_module, "sfc_step_losses", 3)
    with pytest.raises(KeyboardInterrupt):
        _run(splits, tmp_path / "run")
    monkeypatch.undo()
    with pytest.raises(ValueError, match="another config"):
        _run(splits, tmp_path / "run", lr=0.5)


def test_best_gt_selection_is_opt_in(splits, tmp_path):
    manifest = _run(splits, tmp_path / "best", max_steps=2, selection="best_gt")
    assert manifest["checkpoint"].endswith("best.pt") and fs.exists(manifest["checkpoint"])


def test_baseline_trains_without_consistency_terms_or_bank(splits, tmp_path):
    manifest = _run(splits, tmp_path / "baseline", max_steps=2, method="baseline")
    assert manifest["last_losses"]["loss_proto"] == 0 and manifest["last_losses"]["loss_scale"] == 0
    assert manifest["first_losses"]["loss"] == manifest["first_losses"]["loss_cls"]
