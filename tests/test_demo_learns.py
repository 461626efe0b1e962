"""The demo's CAM network learns: a short training with the demo's own settings lowers the classification loss
clearly and gives CAMs far better than all-background. A change that stops learning (a broken loss, a frozen
layer, a bad learning rate) fails here; the demo's quality figures themselves are benchmarks (README)."""
import pytest

from flows.config import load_config
from tasks.train_cam import train_cam
from tests.synthetic_splits import synthetic_split_files

STEPS = 250


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    root = tmp_path_factory.mktemp("learns")
    splits = synthetic_split_files(root, ("train_aug", "val"), 240, 5, 96, 112)
    cfg = load_config("configs/synthetic.yaml", [f"train_cam.max_steps={STEPS}", "train_cam.num_workers=0",
                                                 f"train_cam.checkpoint_every={STEPS}"]).train_cam
    return train_cam(cfg, splits["train_aug"], splits["val"], str(root / "train_cam"), seed=0, device="cpu")


def test_classification_loss_falls(manifest):
    assert manifest["last_losses"]["loss_cls"] < 0.7 * manifest["first_losses"]["loss_cls"]


def test_cams_beat_all_background(manifest):
    validation = manifest["validation"]
    assert validation["val_miou_cam"] > validation["val_all_background_miou"] + 0.12
    assert validation["val_miou_proto"] > validation["val_all_background_miou"] + 0.06
