"""``sfc run --dry-run`` (flows/dry_run.py) on a small fake VOC tree: counts, steps, store size, and every missing
piece named; weights files checked where the run needs them."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
import yaml
from click.testing import CliRunner

from flows.cli import main
from flows.config import load_config
from flows.dry_run import STORE_RATIO, dry_run, weights_problems
from flows.pipeline import run_pipeline
from storage import fs
from storage.images import write_mask, write_rgb

REPO = Path(__file__).resolve().parents[1]
SIZE = (20, 24)
# id: classes; SBD-only images (SegmentationClassAug) are in train_aug but not in VOC train
TRAIN = {"t1": ["cat"], "t2": ["dog", "person"], "t3": ["cow"]}
SBD_ONLY = {"s1": ["sheep"], "s2": ["car", "bus", "person"]}
VAL = {"v1": ["bird"], "v2": ["boat"]}


def _fake_voc(root: Path) -> None:
    for image_id, names in {**TRAIN, **SBD_ONLY, **VAL}.items():
        write_rgb(str(root / "JPEGImages" / f"{image_id}.jpg"), np.full((*SIZE, 3), 90, np.uint8))
        objects = "".join(f"<object><name>{n}</name></object>" for n in names)
        fs.write_text(str(root / "Annotations" / f"{image_id}.xml"), f"<annotation>{objects}</annotation>")
        folder = "SegmentationClassAug" if image_id in SBD_ONLY else "SegmentationClass"
        write_mask(str(root / folder / f"{image_id}.png"), np.zeros(SIZE, np.uint8))
    for split, ids in (("train", TRAIN), ("val", VAL)):
        fs.write_text(str(root / "ImageSets" / "Segmentation" / f"{split}.txt"), "\n".join(ids) + "\n")


@pytest.fixture
def setup(tmp_path: Path) -> tuple[Path, Path, list[str]]:
    """(data root, weights file, overrides of configs/voc.yaml for this tree with resnet18 everywhere)."""
    root = tmp_path / "VOC2012"
    _fake_voc(root)
    weights = tmp_path / "resnet18.pth"
    torch.save(torchvision.models.resnet18().state_dict(), weights)
    overrides = [f"prepare_data.root={root}", f"run.root={tmp_path / 'runs'}", "run.device=cpu",
                 *(f"{s}.backbone=resnet18" for s in ("train_cam", "train_irn", "train_seg")),
                 *(f"{s}.weights={weights}" for s in ("train_cam", "train_irn", "train_seg")),
                 "train_seg.weights_format=torchvision", "train_cam.batch_size=2", "train_cam.epochs=3",
                 "train_irn.batch_size=4", "train_seg.max_steps=50"]
    return root, weights, overrides


def test_complete_tree(setup, tmp_path):
    root, _, overrides = setup
    report = dry_run(load_config(str(REPO / "configs/voc.yaml"), overrides))
    assert report.problems == []
    text = report.text()
    assert "train  train_aug  5 images; the official VOC2012 + SBD train_aug has 10582" in text
    assert "val    val        2 images; masks: 2 in SegmentationClass" in text
    assert "seed   train      3 images; masks: 3 in SegmentationClass" in text
    assert "train_cam            6 steps of 2 images (3 epochs x 2)" in text
    assert "train_irn            3 steps of 4 images (3 epochs x 1)" in text
    assert "train_seg            50 steps of 5 x 2 images" in text
    assert "infer_cams           5 images x 4 scales + flips" in text
    assert "make_pseudo_labels   5 pseudo labels (irn)" in text
    assert f"train_cam.weights: {tmp_path / 'resnet18.pth'}: a torchvision ResNet, loads into resnet18" in text
    assert "expected figures of configs/voc.yaml (docs/reproduce.md): the paper's CAM seeds 64.7" in text
    assert text.endswith("no problems found\n")
    # P and K (float16) of background + each image's classes at 20 x 24: classes 1, 2, 1, 1, 3 in train_aug
    assert report.store_bytes == pytest.approx(sum(2 * (1 + k) * 20 * 24 * 2 for k in (1, 2, 1, 1, 3)))
    assert f"about {report.store_bytes * STORE_RATIO / 1e3:.1f} kB" in text
    assert not (tmp_path / "runs").exists()  # nothing written


def test_everything_missing_is_named(setup, tmp_path):
    root, weights, overrides = setup
    cfg = load_config(str(REPO / "configs/voc.yaml"), [*overrides, "train_seg.weights=null"])
    weights.unlink()  # after validation: the configuration still names it
    (root / "JPEGImages" / "s2.jpg").unlink()
    (root / "SegmentationClass" / "v2.png").unlink()
    (root / "Annotations" / "t3.xml").write_text("<annotation><object><name>unicorn</name></object></annotation>")
    report = dry_run(cfg)
    problems = report.problems
    assert f"  train_cam.weights: {weights} MISSING" in report.lines
    assert f"train_cam.weights: weights file {weights} does not exist" in problems
    assert f"train_irn.weights: weights file {weights} does not exist" in problems
    assert "train split 'train_aug': 1 images missing from " + str(root / "JPEGImages") + ": s2" in problems
    assert ("val split 'val' needs masks; none in SegmentationClass or SegmentationClassAug for 1 images: v2"
            in problems)
    assert any(p.startswith("train split 'train_aug': 1 images without a usable label, e.g. ")
               and "t3.xml: unknown class 'unicorn'" in p for p in problems)
    assert len(problems) == 6, problems  # the seed split (train) has t3 too
    assert weights_problems(cfg) == [f"train_cam.weights: weights file {weights} does not exist",
                                     f"train_irn.weights: weights file {weights} does not exist"]
    assert weights_problems(cfg, ["eval_seg"]) == []  # only the stages that run need their weights


def test_bad_weights_and_missing_root(setup, tmp_path):
    root, weights, overrides = setup
    cfg = load_config(str(REPO / "configs/voc.yaml"), overrides)
    torch.save(torchvision.models.resnet34().state_dict(), weights)
    problems = dry_run(cfg, start="train_seg").problems
    assert problems == [f"train_seg.weights: {weights}: a torchvision ResNet that does not fit resnet18: 96 "
                        f"unexpected keys (layer1.2.conv1.weight, layer1.2.bn1.weight, layer1.2.bn1.bias, "
                        f"layer1.2.bn1.running_mean and 92 more)"]
    cfg = load_config(str(REPO / "configs/voc.yaml"), [*overrides, f"prepare_data.root={tmp_path / 'nope'}"])
    assert dry_run(cfg, ["eval_cam"]).problems == [f"prepare_data.root: dataset root {tmp_path / 'nope'} does not "
                                                   "exist or is not a directory"]


def test_cli(setup, tmp_path):
    root, _, overrides = setup
    config = tmp_path / "voc.yaml"
    config.write_text(yaml.safe_dump(load_config(str(REPO / "configs/voc.yaml"), overrides).model_dump(mode="json")))
    result = CliRunner().invoke(main, ["run", "-c", str(config), "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "eval_seg             2 val images" in result.output
    (root / "ImageSets" / "Segmentation" / "val.txt").unlink()
    result = CliRunner().invoke(main, ["run", "-c", str(config), "--dry-run", "--from", "eval_cam"])
    assert result.exit_code == 1
    assert "train_cam            not run" in result.output
    assert f"val split 'val': split list {root / 'ImageSets/Segmentation/val.txt'} not found" in result.output


def test_configuration_without_its_files(monkeypatch, tmp_path):
    monkeypatch.chdir(REPO)  # configs/voc.yaml names weights/... that are not in the repository
    result = CliRunner().invoke(main, ["show-config", "-c", "configs/voc.yaml"])
    assert result.exit_code == 0 and "weights: weights/resnet50-19c8e357.pth" in result.output
    result = CliRunner().invoke(main, ["run", "-c", "configs/voc.yaml", f"run.root={tmp_path}", "--dry-run"])
    assert result.exit_code == 1
    assert "train_cam.weights: weights file weights/resnet50-19c8e357.pth does not exist" in result.output
    result = CliRunner().invoke(main, ["run", "-c", "configs/voc.yaml", f"run.root={tmp_path}"])
    assert result.exit_code == 1 and "weights that cannot be used:\n  train_cam.weights: weights file" in result.output


def test_run_pipeline_refuses_missing_weights(setup, tmp_path):
    """A deployment calls run_pipeline directly, without the CLI: it must refuse before creating the run."""
    _, weights, overrides = setup
    weights.unlink()
    cfg = load_config(str(REPO / "configs/voc.yaml"), overrides)
    with pytest.raises(ValueError, match=f"weights that cannot be used:\n  train_cam.weights: weights file "
                                         f"{weights} does not"):
        run_pipeline(cfg)
    assert not (tmp_path / "runs").exists()


def test_run_pipeline_refuses_weights_of_another_architecture(setup, tmp_path):
    """Hours before train_seg would load it, the run stops on a segmenter file that does not fit."""
    _, weights, overrides = setup
    other = tmp_path / "resnet34.pth"
    torch.save(torchvision.models.resnet34().state_dict(), other)
    cfg = load_config(str(REPO / "configs/voc.yaml"), [*overrides, f"train_seg.weights={other}"])
    with pytest.raises(ValueError, match=f"weights that cannot be used:\n  train_seg.weights: {other}: a "
                                         "torchvision ResNet that does not fit resnet18: 96 unexpected keys"):
        run_pipeline(cfg)
    assert not (tmp_path / "runs").exists()


def test_deeplab_pytorch_weights_are_checked_by_their_keys(setup, tmp_path):
    """The COCO initialisation's kind is told from its keys; a file of the other kind is one problem line each."""
    from tests.deeplab_pytorch_files import deeplab_pytorch_state

    _, weights, overrides = setup
    coco = tmp_path / "deeplabv1_resnet50-coco.pth"
    torch.save(deeplab_pytorch_state((3, 4, 6, 3)), coco)
    deeplab = [*overrides, "train_seg.backbone=resnet50", "train_seg.weights_format=deeplab-pytorch"]
    report = dry_run(load_config(str(REPO / "configs/voc.yaml"), [*deeplab, f"train_seg.weights={coco}"]),
                     start="train_seg")
    assert report.problems == []
    assert (f"  train_seg.weights: {coco}: deeplab-pytorch resnet50 backbone; its ASPP (4 convs, 91 classes) not "
            "used, head initialised at random") in report.lines
    wrong = dry_run(load_config(str(REPO / "configs/voc.yaml"), [*deeplab, f"train_seg.weights={weights}"]),
                    start="train_seg").problems
    assert wrong == [f"train_seg.weights: {weights}: weights_format is deeplab-pytorch, but the file lacks its keys "
                     "(layer1.conv1.conv.weight); a torchvision-format file needs weights_format: torchvision"]
    swapped = dry_run(load_config(str(REPO / "configs/voc.yaml"), [*overrides, f"train_cam.weights={coco}"]),
                      ["train_cam"]).problems
    assert swapped == [f"train_cam.weights: {coco}: a deeplab-pytorch (caffe ResNet) checkpoint where a "
                       "torchvision-format ResNet is expected; for train_seg set weights_format: deeplab-pytorch"]
