"""SBD (benchmark_RELEASE, .mat masks) -> SegmentationClassAug PNGs and train_aug.txt (storage.datasets.sbd)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image
from scipy.io import savemat

from flows.cli import main
from storage.datasets.sbd import convert_sbd, read_sbd_mask
from storage.datasets.voc_layout import VOCLayoutDataset
from storage.errors import DataError
from storage.images import read_mask, voc_palette

SBD_TRAIN, SBD_VAL = ["2008_000002", "2008_000003", "2008_000007"], ["2008_000009", "2008_000016"]
VOC_TRAIN, VOC_VAL = ["2007_000032", "2008_000002"], ["2007_000033", "2008_000009"]


def sbd_mask(index: int) -> np.ndarray:
    """A distinct (H, W) mask per image: a block of class 1 + index%20 on background."""
    mask = np.zeros((6 + index, 7), np.uint8)
    mask[1:4, 2:5] = 1 + index % 20
    return mask


def write_mat(path: Path, mask: np.ndarray) -> None:
    savemat(str(path), {"GTcls": {"Segmentation": mask, "Boundaries": np.zeros(1),
                                  "CategoriesPresent": np.unique(mask[mask > 0])}})


@pytest.fixture
def trees(tmp_path: Path) -> tuple[Path, Path]:
    sbd = tmp_path / "benchmark_RELEASE"
    (sbd / "dataset" / "cls").mkdir(parents=True)
    for index, image_id in enumerate(SBD_TRAIN + SBD_VAL):
        write_mat(sbd / "dataset" / "cls" / f"{image_id}.mat", sbd_mask(index))
    (sbd / "dataset" / "train.txt").write_text("\n".join(SBD_TRAIN) + "\n")
    (sbd / "dataset" / "val.txt").write_text("\n".join(SBD_VAL) + "\n")
    voc = tmp_path / "VOCdevkit" / "VOC2012"
    (voc / "JPEGImages").mkdir(parents=True)
    (voc / "ImageSets" / "Segmentation").mkdir(parents=True)
    for image_id in set(SBD_TRAIN + SBD_VAL + VOC_TRAIN + VOC_VAL):
        Image.new("RGB", (7, 6)).save(voc / "JPEGImages" / f"{image_id}.jpg")
    (voc / "SegmentationClass").mkdir()
    for image_id in VOC_TRAIN + VOC_VAL:
        Image.fromarray(np.full((6, 7), 5, np.uint8), mode="L").save(voc / "SegmentationClass" / f"{image_id}.png")
    (voc / "ImageSets" / "Segmentation" / "train.txt").write_text("\n".join(VOC_TRAIN) + "\n")
    (voc / "ImageSets" / "Segmentation" / "val.txt").write_text("\n".join(VOC_VAL) + "\n")
    return sbd, voc


def test_masks_and_train_aug(trees):
    sbd, voc = trees
    summary = convert_sbd(str(sbd), str(voc), workers=2)
    # SBD train + val + VOC train, minus VOC val: 2008_000009 (SBD val, VOC val) and 2007_000033 are out
    expected = ["2007_000032", "2008_000002", "2008_000003", "2008_000007", "2008_000016"]
    assert (voc / "ImageSets/Segmentation/train_aug.txt").read_text() == "".join(f"{i}\n" for i in expected)
    assert summary["train_aug"] == 5 and summary["sbd_masks"] == 5 and summary["written"] == 5
    for index, image_id in enumerate(SBD_TRAIN + SBD_VAL):
        png = voc / "SegmentationClassAug" / f"{image_id}.png"
        np.testing.assert_array_equal(read_mask(str(png)), sbd_mask(index))
        with Image.open(png) as image:
            assert image.mode == "P" and tuple(image.getpalette()[:9]) == voc_palette()[:9]
    assert not list(voc.rglob("*.tmp-*"))
    split = VOCLayoutDataset(str(voc), "voc").load_split("train_aug")
    assert split.ids == expected
    assert split.labels[expected.index("2008_000003")].nonzero()[0].tolist() == [1]  # class 2 (index 1 of 20)


def test_rerun_keeps_existing_pngs(trees):
    sbd, voc = trees
    convert_sbd(str(sbd), str(voc))
    kept = voc / "SegmentationClassAug" / f"{SBD_TRAIN[0]}.png"
    lost = voc / "SegmentationClassAug" / f"{SBD_VAL[1]}.png"
    stamp = kept.stat().st_mtime_ns
    lost.unlink()
    assert convert_sbd(str(sbd), str(voc))["written"] == 1
    assert kept.stat().st_mtime_ns == stamp
    np.testing.assert_array_equal(read_mask(str(lost)), sbd_mask(4))


def test_cli(trees):
    sbd, voc = trees
    result = CliRunner().invoke(main, ["convert-sbd", "--sbd", str(sbd), "--voc", str(voc)])
    assert result.exit_code == 0, result.output
    assert '"train_aug": 5' in result.output
    result = CliRunner().invoke(main, ["convert-sbd", "--sbd", str(voc), "--voc", str(voc)])
    assert result.exit_code == 1 and f"{voc}: no SBD 'dataset/cls'" in result.output


def test_bad_input_is_named(trees):
    sbd, voc = trees
    cls = sbd / "dataset" / "cls"
    (cls / f"{SBD_VAL[0]}.mat").unlink()
    with pytest.raises(DataError, match=rf"cls: 1 listed ids have no \.mat file, e\.g\. {SBD_VAL[0]}\.mat"):
        convert_sbd(str(sbd), str(voc))
    write_mat(cls / f"{SBD_VAL[0]}.mat", np.full((3, 3), 42, np.uint8))
    with pytest.raises(DataError, match=rf"{SBD_VAL[0]}\.mat: GTcls\.Segmentation values \[42\] outside"):
        convert_sbd(str(sbd), str(voc))
    savemat(str(cls / "other.mat"), {"something": np.zeros(2)})
    with pytest.raises(DataError, match=r"other\.mat: no field GTcls\.Segmentation"):
        read_sbd_mask(str(cls / "other.mat"))
    (cls / "broken.mat").write_bytes(b"not matlab")
    with pytest.raises(DataError, match=r"broken\.mat: not a readable MATLAB file"):
        read_sbd_mask(str(cls / "broken.mat"))
    (voc / "JPEGImages" / "2008_000016.jpg").unlink()
    with pytest.raises(DataError, match=r"1 train_aug images missing, e\.g\. 2008_000016\.jpg"):
        convert_sbd(str(sbd), str(voc))
    (voc / "ImageSets" / "Segmentation" / "val.txt").unlink()
    with pytest.raises(DataError, match=r"Segmentation/val\.txt not found"):
        convert_sbd(str(sbd), str(voc))
