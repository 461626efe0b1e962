"""Reading VOC-layout datasets: train_aug derivation, labels from XML or masks, and bad data errors."""
import json

import numpy as np
import pytest

from storage import fs
from storage.datasets.split_files import load_split_file, save_split
from storage.datasets.voc_layout import VOCLayoutDataset, list_entry_id
from storage.errors import DataError
from storage.images import write_mask, write_rgb
from tasks.eval_pseudo_labels import eval_pseudo_labels
from tasks.prepare_data import PrepareDataConfig, prepare_data


def _image(root, image_id, size=(20, 24)):
    write_rgb(f"{root}/JPEGImages/{image_id}.jpg", np.full((*size, 3), 128, np.uint8))


def _mask(root, image_id, classes, folder="SegmentationClassAug", size=(20, 24)):
    mask = np.zeros(size, np.uint8)
    for k, c in enumerate(classes):
        mask[k * 3:(k + 1) * 3] = c
    write_mask(f"{root}/{folder}/{image_id}.png", mask)


def _xml(root, image_id, names):
    objects = "".join(f"<object><name>{n}</name></object>" for n in names)
    fs.write_text(f"{root}/Annotations/{image_id}.xml", f"<annotation>{objects}</annotation>")


def _list(root, split, ids):
    fs.write_text(f"{root}/ImageSets/Segmentation/{split}.txt", "\n".join(ids) + "\n")


@pytest.fixture
def voc(tmp_path):
    root = str(tmp_path / "voc")
    for i, classes in {"a": [1], "b": [15, 12], "c": [7], "v": [3], "s": [20]}.items():
        _image(root, i)
        _mask(root, i, classes, "SegmentationClassAug" if i in "sbv" else "SegmentationClass")
    _xml(root, "a", ["aeroplane", "aeroplane"])
    _list(root, "train", ["a", "c"])
    _list(root, "val", ["v"])
    return root


def test_train_aug_is_sbd_plus_train_minus_val(voc):
    ds = VOCLayoutDataset(voc, "voc")
    assert ds.split_ids("train_aug") == ["a", "b", "c", "s"]


def test_reference_list_format_is_read_as_ids(voc):
    """SFC's trainaug_voc.txt style: '/JPEGImages/<id>.jpg /SegmentationClassAug/<id>.png' per line."""
    fs.write_text(f"{voc}/ImageSets/Segmentation/train_aug.txt",
                  "/JPEGImages/a.jpg /SegmentationClassAug/a.png\n/JPEGImages/b.jpg /SegmentationClassAug/b.png\n\n"
                  "JPEGImages/s.JPG\nc\n")
    ds = VOCLayoutDataset(voc, "voc")
    assert ds.split_ids("train_aug") == ["a", "b", "s", "c"]
    assert ds.load_split("train_aug").ids == ["a", "b", "s", "c"]
    assert list_entry_id("2007_000032.v2 extra") == "2007_000032.v2"  # only image extensions are dropped


def test_labels_from_xml_or_masks(voc, tmp_path):
    ds = VOCLayoutDataset(voc, "voc", label_cache=str(tmp_path / "cache.json"))
    split = ds.load_split("train_aug")
    labels = {i: (np.flatnonzero(row) + 1).tolist() for i, row in zip(split.ids, split.labels)}
    assert labels == {"a": [1], "b": [12, 15], "c": [7], "s": [20]}
    assert json.loads((tmp_path / "cache.json").read_text())["labels"]["b"] == [12, 15]
    assert split.class_counts()[0] == 1 and split.num_classes == 20


def test_split_file_round_trip(voc, tmp_path):
    split = VOCLayoutDataset(voc, "voc").load_split("train_aug")
    save_split(str(tmp_path / "s.json"), split)
    again = load_split_file(str(tmp_path / "s.json"))
    assert again.ids == split.ids and np.array_equal(again.labels, split.labels)
    assert again.mask_url("b") == split.mask_url("b")


def test_missing_root_and_lists(tmp_path, voc):
    with pytest.raises(DataError, match="does not exist"):
        VOCLayoutDataset(str(tmp_path / "nope"), "voc")
    with pytest.raises(DataError, match="test.txt not found"):
        VOCLayoutDataset(voc, "voc").load_split("test")
    _list(voc, "empty", [])
    with pytest.raises(DataError, match="empty.txt is empty"):
        VOCLayoutDataset(voc, "voc").load_split("empty")


def test_image_without_label_errors_or_is_skipped(voc, caplog):
    _image(voc, "z")
    _mask(voc, "z", [], "SegmentationClass")
    _list(voc, "train", ["a", "z"])
    with pytest.raises(DataError, match=r"z\.png: image has no class label"):
        VOCLayoutDataset(voc, "voc").load_split("train")
    split = VOCLayoutDataset(voc, "voc").load_split("train", on_bad_data="skip")
    assert split.ids == ["a"] and "skipped 1 bad images" in caplog.text


def test_unknown_class_in_xml_names_the_file(voc):
    _xml(voc, "c", ["spaceship"])
    with pytest.raises(DataError, match=r"c\.xml: unknown class 'spaceship'"):
        VOCLayoutDataset(voc, "voc").load_split("train")


def _prepare(voc, tmp_path, **kw):
    cfg = PrepareDataConfig(kind="voc", root=voc, train_split="train_aug", val_split="val", **kw)
    return prepare_data(cfg, str(tmp_path / "run"), str(tmp_path / "cache"))


def test_prepare_data_writes_stats_and_splits(voc, tmp_path):
    manifest = _prepare(voc, tmp_path)
    stats = json.loads(fs.read_text(manifest["stats"]))
    assert stats["class_counts"]["person"] == 1 and stats["train_images"] == 4
    assert set(stats["distribution_coefficients"]) == {"voc", "counts", "uniform"}
    assert load_split_file(manifest["splits"]["train"]).ids == ["a", "b", "c", "s"]


def test_bad_mask_values_and_unreadable_images_are_named(voc, tmp_path):
    write_mask(f"{voc}/SegmentationClassAug/s.png", np.full((20, 24), 42, np.uint8))
    _xml(voc, "s", ["tvmonitor"])
    with pytest.raises(DataError, match=r"s\.png: mask values \[42\] outside the 21 classes and 255"):
        _prepare(voc, tmp_path)
    fs.write_bytes(f"{voc}/JPEGImages/c.jpg", b"not a jpeg")
    with pytest.raises(DataError, match=r"c\.jpg: unreadable image"):
        _prepare(voc, tmp_path)
    manifest = _prepare(voc, tmp_path, on_bad_data="skip")
    assert load_split_file(manifest["splits"]["train"]).ids == ["a", "b"]


def test_missing_image_is_named(voc, tmp_path):
    fs.remove(f"{voc}/JPEGImages/b.jpg")
    with pytest.raises(DataError, match=r"b\.jpg: file not found"):
        _prepare(voc, tmp_path)


def test_val_split_without_masks_is_refused(voc, tmp_path):
    fs.remove(f"{voc}/SegmentationClassAug/v.png")
    _xml(voc, "v", ["bird"])
    with pytest.raises(DataError, match="val split .val. needs masks"):
        _prepare(voc, tmp_path)


def test_seed_split_outside_the_training_split_is_refused(voc, tmp_path):
    with pytest.raises(DataError, match=r"seed split 'val' must lie inside train split 'train_aug'.*'v'"):
        _prepare(voc, tmp_path, seed_split="val")


def test_optional_test_split_is_written_without_masks(voc, tmp_path):
    _image(voc, "t")  # no annotation and no mask: the test images of VOC carry no labels
    _list(voc, "test", ["t"])
    manifest = _prepare(voc, tmp_path, test_split="test")
    assert set(manifest["splits"]) == {"train", "val", "seed", "test"}
    assert load_split_file(manifest["splits"]["test"]).ids == ["t"]


def test_scoring_masks_prefer_segmentation_class(voc, tmp_path):
    """Where SegmentationClass and SegmentationClassAug both hold an image, the seed and val splits (and so the
    CAM, pseudo-label and segmentation scores) use VOC's own SegmentationClass mask; SBD's is the fallback."""
    _mask(voc, "a", [1, 1, 1, 1, 1], "SegmentationClassAug")  # SBD's version of a seed image: other pixels
    _mask(voc, "v", [3, 3], "SegmentationClass")  # VOC's version of a val image
    manifest = _prepare(voc, tmp_path, seed_split="train")
    seed, val = (load_split_file(manifest["splits"][role]) for role in ("seed", "val"))
    assert seed.mask_url("a") == f"{voc}/SegmentationClass/a.png"
    assert val.mask_url("v") == f"{voc}/SegmentationClass/v.png"
    assert load_split_file(manifest["splits"]["train"]).mask_url("b") == f"{voc}/SegmentationClassAug/b.png"
    labels = str(tmp_path / "labels")
    for image_id in seed.ids:  # labels equal to VOC's masks score 1.0 only against VOC's masks
        fs.write_bytes(f"{labels}/{image_id}.png", fs.read_bytes(f"{voc}/SegmentationClass/{image_id}.png"))
    result = eval_pseudo_labels(manifest["splits"]["seed"], labels, str(tmp_path / "metrics"), overlays=0)
    assert result["miou"] == pytest.approx(1.0)
