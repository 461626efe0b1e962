"""CAM training: runs, logs, is deterministic, and a killed run resumes to the same weights."""
import json

import numpy as np
import pytest
import torch

import tasks.train_cam as train_module
from models.sfc import SFCOutput
from storage import checkpoints, fs
from storage.datasets.voc_layout import Split
from storage.images import write_mask, write_rgb
from tasks.train_cam import TrainCamConfig, reference_validation, selection_steps, train_cam
from tests.interrupt import kill_on_call
from tests.synthetic_splits import synthetic_split_files

TINY = dict(backbone="resnet18", trainable_from=3, crop=64, resize_long=(48, 80), batch_size=4, max_steps=6,
            class_weights="counts", num_workers=0, checkpoint_every=2, keep_checkpoints=5)


@pytest.fixture(scope="module")
def splits(tmp_path_factory):
    return synthetic_split_files(tmp_path_factory.mktemp("syn"), ("train_aug", "val", "train"), 40, 3, 64, 80)


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


def test_best_gt_keeps_the_checkpoint_with_the_highest_validation_score(splits, tmp_path, monkeypatch):
    scores, seen = iter([0.2, 0.9, 0.4]), []

    def scripted(model, split, device, max_images=None):
        seen.append((split.name, {k: v.clone() for k, v in model.state_dict().items()}))
        score = next(scores)
        return {"miou_cam": score / 2, "miou_proto": score / 2, "score": score}

    monkeypatch.setattr(train_module, "reference_validation", scripted)
    cfg = TrainCamConfig(**{**TINY, "batch_size": 2, "max_steps": 15, "validate_every": 2, "selection": "best_gt",
                            "checkpoint_every": 15})
    manifest = train_cam(cfg, splits["train_aug"], None, str(tmp_path / "best"), seed=1, device="cpu",
                         seed_split_url=splits["train"])
    # the reference validates after steps k > 10 with (k - 1) % 2 == 0: 11, 13 and 15 (the last step)
    assert [h["step"] for h in manifest["selection"]["history"]] == [11, 13, 15] and len(seen) == 3
    assert manifest["selection"]["best_step"] == 13 and manifest["checkpoint"].endswith("best.pt")
    assert {name for name, _ in seen} == {"train"}  # the seed split, not val
    best = checkpoints.load(manifest["checkpoint"])
    assert best["step"] == 13 and all(torch.equal(v, seen[1][1][k]) for k, v in best["model"].items())
    assert not torch.equal(best["model"]["classifier.weight"], seen[2][1]["classifier.weight"])
    assert selection_steps(3966, 300) == [301, 601, 901, 1201, 1501, 1801, 2101, 2401, 2701, 3001, 3301, 3601, 3901]


def test_best_gt_selection_survives_a_resume(splits, tmp_path, monkeypatch):
    """A step checkpoint carries the selection so far: after a kill, a later worse step does not replace it."""
    cfg = TrainCamConfig(**{**TINY, "batch_size": 2, "max_steps": 13, "validate_every": 2, "selection": "best_gt",
                            "checkpoint_every": 12})
    monkeypatch.setattr(train_module, "reference_validation",
                        lambda model, split, device, max_images=None: {"miou_cam": 0.4, "miou_proto": 0.4,
                                                                       "score": 0.8})
    kill_on_call(monkeypatch, train_module, "sfc_step_losses", 13)
    with pytest.raises(KeyboardInterrupt):
        train_cam(cfg, splits["train_aug"], None, str(tmp_path / "run"), seed=1, device="cpu",
                  seed_split_url=splits["train"])
    monkeypatch.setattr(train_module, "reference_validation",
                        lambda model, split, device, max_images=None: {"miou_cam": 0.1, "miou_proto": 0.1,
                                                                       "score": 0.2})
    manifest = train_cam(cfg, splits["train_aug"], None, str(tmp_path / "run"), seed=1, device="cpu",
                         seed_split_url=splits["train"])
    assert manifest["selection"]["best_step"] == 11 and checkpoints.load(manifest["checkpoint"])["step"] == 11
    assert [h["score"] for h in manifest["selection"]["history"]] == [0.8, 0.2]


def test_best_gt_needs_validated_steps_and_a_seed_split(splits, tmp_path):
    with pytest.raises(ValueError, match="set validate_every"):
        TrainCamConfig(**{**TINY, "selection": "best_gt"})
    cfg = TrainCamConfig(**{**TINY, "validate_every": 300, "selection": "best_gt"})
    with pytest.raises(ValueError, match="no step of 6 is validated with validate_every=300"):
        train_cam(cfg, splits["train_aug"], None, str(tmp_path), seed=1, device="cpu", seed_split_url=splits["train"])
    with pytest.raises(ValueError, match="validates on the seed split"):
        train_cam(cfg, splits["train_aug"], None, str(tmp_path), seed=1, device="cpu")


def test_reference_validation_argmaxes_max_normalised_cams_over_all_channels(tmp_path):
    """One 8x8 image, left half background, right half class 3 (index 3 of the 21 channels)."""
    names = ("background", *(f"c{i}" for i in range(1, 21)))
    mask = np.zeros((8, 8), np.uint8)
    mask[:, 4:] = 3
    write_rgb(str(tmp_path / "JPEGImages" / "a.jpg"), np.full((8, 8, 3), 120, np.uint8))
    write_mask(str(tmp_path / "m.png"), mask)
    label = np.zeros((1, 20), np.float32)
    label[0, 2] = 1
    split = Split(str(tmp_path), "seed", names, ["a"], label, {"a": str(tmp_path / "m.png")})

    class Fixed(torch.nn.Module):
        def forward(self, image, valid):
            cam = torch.zeros(1, 21, 8, 8)
            cam[0, 0], cam[0, 3] = 0.2, 1.0  # background 0.2 on the right, class 3 1.0 on the left ...
            cam[0, 0, :, :4], cam[0, 3, :, 4:] = 0.5, 10.0  # ... and 0.5 / 10 on their own halves
            assert torch.equal(valid.flatten()[[0, 3]], torch.ones(2)) and valid.flatten().sum() == 2
            return SFCOutput(score=None, cam=cam, proto_cam=cam[:, [0, 1, 2, 0]].repeat(1, 6, 1, 1)[:, :21],
                             raw_cam=None)

    result = reference_validation(Fixed(), split, torch.device("cpu"))
    # K normalised: background 1.0 / 0.4, class 3 0.1 / 1.0: perfect (raw values would give class 3 everywhere);
    # P has no class 3 channel: all background, IoU 1/2 for background and 0 for class 3
    assert result["miou_cam"] == 1.0 and result["miou_proto"] == 0.25 and result["score"] == 1.25


def test_baseline_trains_without_consistency_terms_or_bank(splits, tmp_path):
    manifest = _run(splits, tmp_path / "baseline", max_steps=2, method="baseline")
    assert manifest["last_losses"]["loss_proto"] == 0 and manifest["last_losses"]["loss_scale"] == 0
    assert manifest["first_losses"]["loss"] == manifest["first_losses"]["loss_cls"]
