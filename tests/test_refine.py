"""Refinement stages: IR labels (resume, parallel = serial, bad inputs), pseudo labels (three methods), evaluation."""
import json

import numpy as np
import pytest
import torch
from fsspec.implementations.local import LocalFileSystem
from PIL import Image

import tasks.engine.ir_label_worker as ir_module
from models.ir_labels import ir_label
from models.irn import IRNet
from models.metrics import ConfusionMatrix
from storage import checkpoints
from storage.cam_store import CamStore, CamStoreError
from storage.datasets.split_files import load_split_file, save_split
from storage.errors import DataError
from storage.images import read_mask, read_rgb
from tasks.engine.label_maps import LabelDirError
from tasks.eval_pseudo_labels import eval_pseudo_labels
from tasks.make_ir_labels import MakeIrLabelsConfig, make_ir_labels
from tasks.make_pseudo_labels import MakePseudoLabelsConfig, make_pseudo_labels
from tests.fake_cams import fake_cam_store
from tests.interrupt import kill_on_call
from tests.synthetic_splits import synthetic_split_files

SERIAL = MakeIrLabelsConfig(workers=1)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("refine")
    urls = synthetic_split_files(root, ("train_aug",), 10, 3, 48, 64)
    split = load_split_file(urls["train_aug"])
    fake_cam_store(str(root / "cams.zarr"), split)
    return root, urls["train_aug"], str(root / "cams.zarr"), split


def _pngs(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_ir_labels_resume_after_a_kill_to_identical_pngs(setup, tmp_path, monkeypatch):
    root, split_url, store_url, split = setup
    full = make_ir_labels(SERIAL, store_url, split_url, str(tmp_path / "full"))
    assert full["written"] == full["images"] == len(split.ids)
    assert abs(sum(full["label_fractions"].values()) - 1) < 1e-9
    kill_on_call(monkeypatch, ir_module, "ir_label", 4)
    with pytest.raises(KeyboardInterrupt):
        make_ir_labels(SERIAL, store_url, split_url, str(tmp_path / "resumed"))
    monkeypatch.undo()
    written = sorted((tmp_path / "resumed").glob("*.png"))
    assert len(written) == 3
    for path in written:  # every PNG present is complete
        assert read_mask(str(path)).shape == read_rgb(split.image_url(path.stem)).shape[:2]
    (tmp_path / "resumed" / f"{split.ids[5]}.png.tmp-dead0000").write_bytes(b"\x89PNG truncated")  # a hard kill
    resumed = make_ir_labels(SERIAL, store_url, split_url, str(tmp_path / "resumed"))
    assert (resumed["written"], resumed["skipped"]) == (len(split.ids) - 3, 3)
    assert _pngs(tmp_path / "resumed") == _pngs(tmp_path / "full")


def test_kill_between_write_and_rename_leaves_no_png(setup, tmp_path, monkeypatch):
    root, split_url, store_url, split = setup
    kill_on_call(monkeypatch, LocalFileSystem, "mv", 3)  # 1: _settings.json, 2: first PNG, 3: second PNG
    with pytest.raises(KeyboardInterrupt):
        make_ir_labels(SERIAL, store_url, split_url, str(tmp_path / "labels"))
    assert sorted(p.name for p in (tmp_path / "labels").iterdir()) == sorted([f"{split.ids[0]}.png", "_settings.json"])


def test_full_disk_fails_the_stage_with_the_path_and_leaves_nothing_partial(setup, tmp_path, monkeypatch):
    import errno

    root, split_url, store_url, split = setup
    real_open, calls = LocalFileSystem.open, {"n": 0}

    def filling_up(self, path, mode="rb", **kwargs):
        handle = real_open(self, path, mode, **kwargs)
        if "w" in mode and ".png.tmp-" in str(path):
            calls["n"] += 1
            if calls["n"] == 3:  # the third label: the disk is full half-way through the write
                handle.write(b"\x89PNG half")
                raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return handle

    monkeypatch.setattr(LocalFileSystem, "open", filling_up)
    with pytest.raises(OSError, match="No space left on device.*png.tmp-"):
        make_ir_labels(SERIAL, store_url, split_url, str(tmp_path / "labels"))
    monkeypatch.undo()
    left = sorted(p.name for p in (tmp_path / "labels").iterdir())
    assert left == sorted([f"{split.ids[0]}.png", f"{split.ids[1]}.png", "_settings.json"])
    resumed = make_ir_labels(SERIAL, store_url, split_url, str(tmp_path / "labels"))
    assert (resumed["written"], resumed["skipped"]) == (len(split.ids) - 2, 2)


def test_labels_of_other_settings_never_mix(setup, tmp_path):
    root, split_url, store_url, split = setup
    make_ir_labels(SERIAL, store_url, split_url, str(tmp_path))
    assert make_ir_labels(MakeIrLabelsConfig(workers=2), store_url, split_url, str(tmp_path))["written"] == 0
    with pytest.raises(LabelDirError, match="differing: config"):
        make_ir_labels(MakeIrLabelsConfig(bg_scale=0.3, workers=1), store_url, split_url, str(tmp_path))
    retrained = str(tmp_path / "retrained.zarr")
    fake_cam_store(retrained, split, checkpoint_hash="retrained")
    with pytest.raises(LabelDirError, match="differing: cam_store"):
        make_ir_labels(SERIAL, retrained, split_url, str(tmp_path))


def test_two_workers_write_the_same_labels(setup, tmp_path):
    root, split_url, store_url, split = setup
    make_ir_labels(SERIAL, store_url, split_url, str(tmp_path / "one"))
    manifest = make_ir_labels(MakeIrLabelsConfig(workers=2), store_url, split_url, str(tmp_path / "two"))
    assert manifest["written"] == len(split.ids)
    assert _pngs(tmp_path / "one") == _pngs(tmp_path / "two")
    labels = read_mask(str(tmp_path / "two" / f"{split.ids[0]}.png"))
    assert Image.open(tmp_path / "two" / f"{split.ids[0]}.png").mode == "P"
    assert set(np.unique(labels)) <= {0, 255, *(np.flatnonzero(split.labels[0]) + 1)}


def test_bad_inputs_name_the_image(setup, tmp_path):
    root, split_url, store_url, split = setup
    partial = str(tmp_path / "partial.zarr")
    fake_cam_store(partial, split, ids=split.ids[:-1])
    with pytest.raises(CamStoreError, match=split.ids[-1]):
        make_ir_labels(SERIAL, partial, split_url, str(tmp_path / "a"))

    other = str(tmp_path / "other.zarr")
    CamStore.create(other, "fake", "fake", ["background", "thing"])
    with pytest.raises(CamStoreError, match="another dataset"):
        make_ir_labels(SERIAL, other, split_url, str(tmp_path / "b"))

    wrong = str(tmp_path / "wrong.zarr")
    store = fake_cam_store(wrong, split)
    keys, proto_cam, cam = store.load(split.ids[2])
    store.write(split.ids[2], keys, proto_cam[:, :-1], cam[:, :-1])
    with pytest.raises(DataError, match=f"image '{split.ids[2]}'.*CAMs"):
        make_ir_labels(SERIAL, wrong, split_url, str(tmp_path / "c"))
    with pytest.raises(DataError, match=f"image '{split.ids[2]}'"):
        make_pseudo_labels(MakePseudoLabelsConfig(method="none", workers=1), wrong, split_url, str(tmp_path / "d"),
                           "cpu")

    with pytest.raises(ValueError, match="needs the IRN checkpoint"):
        make_pseudo_labels(MakePseudoLabelsConfig(), store_url, split_url, str(tmp_path / "e"), "cpu")


@pytest.fixture
def one_torch_thread():
    """As in the stage's worker processes: tiny sparse products are fastest on one thread."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def irn_checkpoint(setup):
    """A randomly initialised IRN saved as train_irn saves it."""
    torch.manual_seed(0)
    url = str(setup[0] / "irn.pt")
    checkpoints.save(url, {"model": IRNet("resnet18").state_dict(), "meta": {"kind": "irn", "backbone": "resnet18"}})
    return url


@pytest.mark.parametrize("method,workers,walk_scale", [("none", 1, 1), ("crf", 2, 1), ("irn", 1, 1), ("irn", 1, 1.5)])
def test_every_method_writes_valid_label_pngs(setup, irn_checkpoint, one_torch_thread, tmp_path, method, workers,
                                               walk_scale):
    root, split_url, store_url, split = setup
    cfg = MakePseudoLabelsConfig(method=method, workers=workers, walk_scale=walk_scale)
    manifest = make_pseudo_labels(cfg, store_url, split_url, str(tmp_path), "cpu", irn_checkpoint_url=irn_checkpoint)
    assert (manifest["written"], manifest["method"]) == (len(split.ids), method)
    assert len(manifest["settings_digest"]) == 16
    assert manifest["label_fractions"]["ignore"] == 0
    for row, image_id in enumerate(split.ids):
        path = tmp_path / f"{image_id}.png"
        assert Image.open(path).mode == "P"
        labels = read_mask(str(path))
        assert labels.shape == read_rgb(split.image_url(image_id)).shape[:2]
        assert set(np.unique(labels)) <= {0, *(np.flatnonzero(split.labels[row]) + 1)}
    again = make_pseudo_labels(cfg, store_url, split_url, str(tmp_path), "cpu", irn_checkpoint_url=irn_checkpoint)
    assert again["written"] == 0 and again["skipped"] == len(split.ids)


def test_evaluation_counts_ignore_as_background(setup, tmp_path):
    root, split_url, store_url, split = setup
    labels_dir = tmp_path / "labels"
    labels_dir.mkdir()
    expected = ConfusionMatrix(len(split.class_names))
    for image_id in split.ids:
        mask = read_mask(split.mask_url(image_id)).copy()
        mask[:4] = 255  # a band of "ignore" predictions
        Image.fromarray(mask, mode="L").save(labels_dir / f"{image_id}.png")
        expected.update(read_mask(split.mask_url(image_id)), np.where(mask == 255, 0, mask))
    manifest = eval_pseudo_labels(split_url, str(labels_dir), str(tmp_path / "metrics"), overlays=2)
    results = json.loads((tmp_path / "metrics" / "pseudo_label_eval.json").read_text())
    assert results["scores"]["miou"] == pytest.approx(expected.scores(split.class_names)["miou"])
    assert manifest["miou"] == results["scores"]["miou"] < 1.0
    assert list(results["scores"]["per_class"]) == list(split.class_names)
    assert results["confident_pixels"]["miou"] == pytest.approx(1.0)
    assert 0 < results["ignored_fraction"] < 0.2 and results["images"] == len(split.ids)
    assert (tmp_path / "metrics" / "pseudo_label_eval_iou.png").exists()
    assert len(list((tmp_path / "metrics" / "pseudo_label_eval_overlays").iterdir())) == 2

    (labels_dir / f"{split.ids[1]}.png").unlink()
    with pytest.raises(DataError, match=f"no label for image '{split.ids[1]}'"):
        eval_pseudo_labels(split_url, str(labels_dir), str(tmp_path / "metrics"))
    split.mask_urls.pop(split.ids[0])
    no_masks = str(tmp_path / "nomask.json")
    save_split(no_masks, split)
    with pytest.raises(DataError, match="needs masks"):
        eval_pseudo_labels(no_masks, str(labels_dir), str(tmp_path / "metrics"))


def _miou(split, label_of) -> float:
    """mIoU of the label maps ``label_of(image_id, mask)`` against the split's masks."""
    scores = ConfusionMatrix(len(split.class_names))
    for image_id in split.ids:
        mask = read_mask(split.mask_url(image_id))
        scores.update(mask, label_of(image_id, mask))
    return scores.scores(split.class_names)["miou"]


@pytest.mark.parametrize("method", ["none", "crf"])
def test_pseudo_labels_are_far_better_than_all_background(setup, tmp_path, method):
    """On CAMs made from the masks, the stage's labels score at least twice what all-background labels score."""
    root, split_url, store_url, _ = setup
    split = load_split_file(split_url)  # the module's split object is changed by another test
    make_pseudo_labels(MakePseudoLabelsConfig(method=method, workers=1), store_url, split_url, str(tmp_path), "cpu")
    background = _miou(split, lambda image_id, mask: np.zeros_like(mask))
    labels = _miou(split, lambda image_id, mask: read_mask(str(tmp_path / f"{image_id}.png")))
    assert labels >= 2 * background, (labels, background)


def test_ir_label_pngs_equal_ir_label_on_the_stored_cams(setup, tmp_path):
    """The stage's PNGs are ir_label() of the image and its stored CAMs with the reference's arguments: scores
    K + 0.7 P (K = the store's second map), background x 0.5 for the second CRF, label confidence 0.7."""
    root, split_url, store_url, split = setup
    make_ir_labels(SERIAL, store_url, split_url, str(tmp_path))
    store = CamStore.open(store_url)
    swapped_differs = False
    for image_id in split.ids:
        keys, proto_cam, cam = store.load(image_id)
        image = read_rgb(split.image_url(image_id))
        expected = ir_label(image, keys, cam=cam, proto_cam=proto_cam,
                            proto_weight=0.7, bg_scale=0.5, gt_prob=0.7)
        np.testing.assert_array_equal(read_mask(str(tmp_path / f"{image_id}.png")), expected, err_msg=image_id)
        swapped = ir_label(image, keys, cam=proto_cam, proto_cam=cam)
        swapped_differs |= not np.array_equal(swapped, expected)
    assert swapped_differs  # the comparison can tell P from K
