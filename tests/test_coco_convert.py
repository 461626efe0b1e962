"""COCO instances JSON -> VOC layout converter (storage.datasets.coco), on a tiny hand-made COCO set."""
from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from storage.datasets.coco import CocoFormatError, convert_coco, decode_rle_string, rasterise
from storage.datasets.voc_layout import VOCLayoutDataset
from storage.images import read_mask

PERSON, AIRPLANE, TOOTHBRUSH = 1, 2, 3  # category ids 1, 5, 90 sorted

IMG_OVERLAP = "COCO_train2014_000000000009"
IMG_CROWD = "COCO_train2014_000000000025"
IMG_COMPRESSED = "COCO_train2014_000000000030"
IMG_EMPTY = "COCO_train2014_000000000042"
IMG_CROWD_ONLY = "COCO_train2014_000000000050"


def rect(x0: int, y0: int, x1: int, y1: int) -> list[float]:
    """Polygon of the rectangle [x0, x1] x [y0, y1]; pycocotools fills pixels x0..x1-1, y0..y1-1."""
    return [x0, y0, x1, y0, x1, y1, x0, y1]


def fake_coco(tmp_path: Path) -> dict:
    images = [
        {"id": 9, "file_name": f"{IMG_OVERLAP}.jpg", "height": 8, "width": 10},
        {"id": 25, "file_name": f"{IMG_CROWD}.jpg", "height": 6, "width": 5},
        {"id": 30, "file_name": f"{IMG_COMPRESSED}.jpg", "height": 4, "width": 5},
        {"id": 42, "file_name": f"{IMG_EMPTY}.jpg", "height": 5, "width": 5},
        {"id": 50, "file_name": f"{IMG_CROWD_ONLY}.jpg", "height": 2, "width": 2},
    ]
    annotations = [
        # image 9: the small airplane comes first in the JSON but must end up on top of the large person
        {"id": 101, "image_id": 9, "category_id": 5, "iscrowd": 0, "segmentation": [rect(2, 1, 4, 3)]},
        {"id": 102, "image_id": 9, "category_id": 1, "iscrowd": 0, "segmentation": [rect(0, 0, 7, 5)]},
        # image 25: crowd toothbrush = columns 0-1 (uncompressed, column-major RLE), person drawn over it
        {"id": 201, "image_id": 25, "category_id": 90, "iscrowd": 1,
         "segmentation": {"counts": [0, 12, 18], "size": [6, 5]}},
        {"id": 202, "image_id": 25, "category_id": 1, "iscrowd": 0, "segmentation": [rect(1, 4, 3, 5)]},
        # image 30: compressed RLE of counts [3, 2, 4, 1, 10] (hand-encoded, see test_decode_rle_string)
        {"id": 301, "image_id": 30, "category_id": 5, "iscrowd": 0,
         "segmentation": {"counts": "324O6", "size": [4, 5]}},
        # image 50: only a crowd region -> no label -> dropped
        {"id": 501, "image_id": 50, "category_id": 1, "iscrowd": 1,
         "segmentation": {"counts": [1, 3], "size": [2, 2]}},
    ]
    categories = [  # deliberately not in id order
        {"id": 90, "name": "toothbrush", "supercategory": "indoor"},
        {"id": 1, "name": "person", "supercategory": "person"},
        {"id": 5, "name": "airplane", "supercategory": "vehicle"},
    ]
    image_dir = tmp_path / "train2014"
    image_dir.mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    for image in images:
        pixels = rng.integers(0, 255, (image["height"], image["width"], 3), dtype=np.uint8)
        Image.fromarray(pixels).save(image_dir / image["file_name"], quality=90)
    return {"info": {}, "images": images, "annotations": annotations, "categories": categories}


def write_json(tmp_path: Path, data: dict, name: str = "instances_train2014.json") -> str:
    path = tmp_path / "annotations" / name
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps(data))
    return str(path)


@pytest.fixture
def coco(tmp_path: Path) -> tuple[str, str, str]:
    instances = write_json(tmp_path, fake_coco(tmp_path))
    return instances, str(tmp_path / "train2014"), str(tmp_path / "voc_coco")


def expected_masks(instances: str) -> dict[str, np.ndarray]:
    """The masks of the listed images from pycocotools' own COCO.annToMask: crowd regions 255, then the other
    instances, largest first."""
    coco = COCO(instances)
    class_of = {cat_id: index + 1 for index, cat_id in enumerate(sorted(coco.getCatIds()))}
    out = {}
    for image_id, stem in ((9, IMG_OVERLAP), (25, IMG_CROWD), (30, IMG_COMPRESSED)):
        info = coco.imgs[image_id]
        mask = np.zeros((info["height"], info["width"]), np.uint8)
        anns = coco.loadAnns(coco.getAnnIds(imgIds=[image_id], iscrowd=None))
        for ann in anns:
            if ann["iscrowd"]:
                mask[coco.annToMask(ann) > 0] = 255
        things = [(coco.annToMask(ann) > 0, ann) for ann in anns if not ann["iscrowd"]]
        for region, ann in sorted(things, key=lambda t: -int(t[0].sum())):
            mask[region] = class_of[ann["category_id"]]
        out[stem] = mask
    return out


def test_expected_masks_by_hand(coco):
    """The pycocotools oracle agrees with a hand reading: polygons cover [x0, x1) x [y0, y1), not their outline."""
    masks = expected_masks(coco[0])
    overlap = np.zeros((8, 10), np.uint8)
    overlap[0:5, 0:7] = PERSON
    overlap[1:3, 2:4] = AIRPLANE
    crowd = np.zeros((6, 5), np.uint8)
    crowd[:, 0:2] = 255
    crowd[4:5, 1:3] = PERSON
    compressed = np.zeros((4, 5), np.uint8)
    # column-major flat indices 3, 4 and 9 are set: (row 3, col 0), (row 0, col 1), (row 1, col 2)
    compressed[3, 0] = compressed[0, 1] = compressed[1, 2] = AIRPLANE
    for stem, expected in {IMG_OVERLAP: overlap, IMG_CROWD: crowd, IMG_COMPRESSED: compressed}.items():
        np.testing.assert_array_equal(masks[stem], expected)


# ------------------------------------------------------------------------------------------------------ RLE

def test_decode_rle_string_hand_encoded():
    # [3, 2, 4, 1, 10]: the first three counts as they are ('3', '2', '4'); from index 3 on the difference to the
    # count two before: 1 - 2 = -1 -> group 31 (sign bit set, no continuation) -> chr(48 + 31) = 'O';
    # 10 - 4 = 6 -> '6'
    assert decode_rle_string("324O6") == [3, 2, 4, 1, 10]
    # 100 = 0b11_00100: low group 4 with continuation (4 | 0x20 = 36 -> 'T'), then 3 -> '3'
    assert decode_rle_string("T3") == [100]
    # [5, 50, 5, 10]: 50 -> groups 18 (sign bit set, so continue: 18 | 0x20 = 50 -> 'b') and 1 -> '1';
    # 10 - 50 = -40 -> groups 24 | 0x20 = 56 -> 'h', then 30 (sign, ends) -> 'N'
    assert decode_rle_string("5b15hN") == [5, 50, 5, 10]
    # pycocotools encodes those counts to the same strings
    assert mask_utils.frPyObjects({"counts": [3, 2, 4, 1, 10], "size": [4, 5]}, 4, 5)["counts"] == b"324O6"
    assert mask_utils.frPyObjects({"counts": [5, 50, 5, 10], "size": [7, 10]}, 7, 10)["counts"] == b"5b15hN"
    with pytest.raises(ValueError, match="ends inside a count"):
        decode_rle_string("T")
    with pytest.raises(ValueError, match="invalid character"):
        decode_rle_string("3 2")


def _column_major_runs(mask: np.ndarray) -> list[int]:
    """Uncompressed COCO RLE counts: column-major runs, starting with a (possibly empty) background run."""
    flat = mask.T.reshape(-1)
    bounds = np.concatenate([[0], np.flatnonzero(flat[1:] != flat[:-1]) + 1, [flat.size]])
    runs = np.diff(bounds).tolist()
    return [0, *runs] if flat[0] else runs


def test_rasterise_equals_pycocotools_on_random_segmentations():
    """50 random polygon sets (float vertices, some partly outside the image) and 20 random masks as uncompressed
    and compressed RLE, each against pycocotools' annToMask, pixel for pixel."""
    rng = np.random.default_rng(1)
    height, width = 23, 31
    annotations = []
    for _ in range(50):
        polygons = [rng.uniform(-3, 34, 2 * int(rng.integers(3, 9))).round(2).tolist()
                    for _ in range(int(rng.integers(1, 3)))]
        annotations.append({"segmentation": polygons, "iscrowd": 0})
    for _ in range(20):
        mask = rng.random((height, width)) < rng.random()
        compressed = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))["counts"].decode()
        for counts in (_column_major_runs(mask), compressed):
            annotations.append({"segmentation": {"counts": counts, "size": [height, width]}, "iscrowd": 1})
    for k, ann in enumerate(annotations):
        ann.update(id=k + 1, image_id=1, category_id=1)
    coco = COCO()
    coco.dataset = {"images": [{"id": 1, "height": height, "width": width, "file_name": "x.jpg"}],
                    "annotations": annotations, "categories": [{"id": 1, "name": "thing"}]}
    coco.createIndex()
    differing = 0
    for ann in annotations:
        ours = rasterise(ann["segmentation"], height, width)
        assert ours.shape == (height, width)
        differing += int((ours != coco.annToMask(ann).astype(bool)).sum())
    assert differing == 0
    assert sum(rasterise(a["segmentation"], height, width).any() for a in annotations[:50]) >= 40  # not all empty


def test_degenerate_polygons_rasterise_to_nothing():
    square = rect(1, 1, 5, 5)
    expected = rasterise([square], 8, 8)
    assert expected.sum() == 16
    # pycocotools refuses a list that starts with a polygon of fewer than 3 points; such polygons cover nothing
    np.testing.assert_array_equal(rasterise([[2, 2], square, [1, 1, 6, 6]], 8, 8), expected)
    assert not rasterise([[3, 3, 4, 4]], 8, 8).any() and not rasterise([], 8, 8).any()


# -------------------------------------------------------------------------------------------------- convert

def test_convert_writes_voc_layout(coco):
    instances, images_dir, out = coco
    summary = convert_coco(instances, images_dir, out, "train", workers=2)
    assert summary == {"images": 3, "dropped_without_labels": 2, "classes": 3, "split": "train"}

    root = Path(out)
    assert (root / "class_names.txt").read_text() == "background\nperson\nairplane\ntoothbrush\n"
    listed = (root / "ImageSets/Segmentation/train.txt").read_text().split()
    assert listed == sorted([IMG_OVERLAP, IMG_CROWD, IMG_COMPRESSED])
    for image_id, expected in expected_masks(instances).items():
        np.testing.assert_array_equal(read_mask(str(root / "SegmentationClass" / f"{image_id}.png")), expected)
        jpeg = root / "JPEGImages" / f"{image_id}.jpg"
        assert os.path.samefile(jpeg, Path(images_dir) / f"{image_id}.jpg")  # hard link
    for dropped in (IMG_EMPTY, IMG_CROWD_ONLY):
        assert not (root / "SegmentationClass" / f"{dropped}.png").exists()
        assert not (root / "JPEGImages" / f"{dropped}.jpg").exists()
    assert not [p for p in root.rglob("*") if ".tmp-" in p.name]


def test_rerun_is_a_noop_and_resumes(coco):
    instances, images_dir, out = coco
    first = convert_coco(instances, images_dir, out, "train")

    def snapshot():
        return {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in Path(out).rglob("*") if p.is_file()}

    before = snapshot()
    assert convert_coco(instances, images_dir, out, "train") == first
    assert snapshot() == before

    # a mask lost (e.g. a crash before it was written) is redone, the others are left alone
    lost = Path(out) / "SegmentationClass" / f"{IMG_CROWD}.png"
    lost.unlink()
    assert convert_coco(instances, images_dir, out, "train") == first
    np.testing.assert_array_equal(read_mask(str(lost)), expected_masks(instances)[IMG_CROWD])
    after = snapshot()
    assert {p: v for p, v in after.items() if p != lost} == {p: v for p, v in before.items() if p != lost}


def test_reader_loads_converted_split(coco):
    instances, images_dir, out = coco
    convert_coco(instances, images_dir, out, "train")
    dataset = VOCLayoutDataset(out, "coco")
    assert dataset.class_names == ("background", "person", "airplane", "toothbrush")
    split = dataset.load_split("train")
    labels = dict(zip(split.ids, split.labels.tolist()))
    assert labels == {
        IMG_OVERLAP: [1.0, 1.0, 0.0],
        IMG_CROWD: [1.0, 0.0, 0.0],  # the crowd toothbrush is ignore (255), not a label
        IMG_COMPRESSED: [0.0, 1.0, 0.0],
    }
    assert split.has_masks
    assert dataset.validate_split_files(split) == {}


def test_copy_to_fsspec_url(coco):
    instances, images_dir, _ = coco
    out = f"memory://coco-{uuid.uuid4().hex[:8]}"
    summary = convert_coco(instances, images_dir, out, "val", link_images=True)  # not local: copied
    assert summary["images"] == 3 and summary["split"] == "val"
    split = VOCLayoutDataset(out, "coco").load_split("val")
    assert split.ids == sorted([IMG_OVERLAP, IMG_CROWD, IMG_COMPRESSED])
    from storage import fs
    assert fs.read_bytes(split.image_url(IMG_OVERLAP)) == (Path(images_dir) / f"{IMG_OVERLAP}.jpg").read_bytes()


def test_copy_without_link(coco):
    instances, images_dir, out = coco
    convert_coco(instances, images_dir, out, "train", link_images=False)
    jpeg = Path(out) / "JPEGImages" / f"{IMG_OVERLAP}.jpg"
    source = Path(images_dir) / f"{IMG_OVERLAP}.jpg"
    assert not os.path.samefile(jpeg, source)
    assert jpeg.read_bytes() == source.read_bytes()


# ---------------------------------------------------------------------------------------------------- errors

def test_missing_and_malformed_json(tmp_path):
    missing = str(tmp_path / "nope.json")
    with pytest.raises(ValueError, match=f"{missing}: file not found"):
        convert_coco(missing, str(tmp_path), str(tmp_path / "out"), "train")
    bad = tmp_path / "bad.json"
    bad.write_text("{ not json")
    with pytest.raises(ValueError, match=f"{bad}: malformed JSON"):
        convert_coco(str(bad), str(tmp_path), str(tmp_path / "out"), "train")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: d.pop("annotations"), "missing key 'annotations'"),
        (lambda d: d["categories"][1].pop("name"), "category id 1 is missing key 'name'"),
        (lambda d: d["images"][0].pop("height"), "image id 9 is missing key 'height'"),
        (lambda d: d["annotations"][0].pop("segmentation"), "annotation id 101 is missing key 'segmentation'"),
        (lambda d: d["annotations"][2].update(image_id=777), "annotation id 201 references unknown image id 777"),
        (lambda d: d["annotations"][0].update(category_id=3), "annotation id 101 references unknown category id 3"),
        (lambda d: d["categories"].append({"id": 5, "name": "plane"}), "duplicate category id 5"),
        (lambda d: d["images"].append(dict(d["images"][0], id=10)), "share the file stem"),
    ],
)
def test_bad_json_content(tmp_path, mutate, message):
    data = fake_coco(tmp_path)
    mutate(data)
    instances = write_json(tmp_path, data)
    with pytest.raises(CocoFormatError, match=f"{instances}: .*{message}"):
        convert_coco(instances, str(tmp_path / "train2014"), str(tmp_path / "out"), "train")
    assert not (tmp_path / "out").exists()  # validated before anything is written


@pytest.mark.parametrize(
    ("segmentation", "message"),
    [
        ({"counts": "32 4", "size": [4, 5]}, "invalid character"),
        ({"counts": [3, 2], "size": [4, 5]}, "sum to 5"),
        ({"counts": "324O6", "size": [5, 4]}, r"RLE size \[5, 4\]"),
        ([[1, 2, 3]], "odd number of coordinates"),
    ],
)
def test_bad_segmentation_names_annotation(tmp_path, segmentation, message):
    data = fake_coco(tmp_path)
    data["annotations"][4]["segmentation"] = segmentation
    instances = write_json(tmp_path, data)
    with pytest.raises(CocoFormatError, match=f"{instances}: annotation id 301 of image id 30: .*{message}"):
        convert_coco(instances, str(tmp_path / "train2014"), str(tmp_path / "out"), "train")


def test_class_names_mismatch(coco):
    instances, images_dir, out = coco
    os.makedirs(out)
    names = Path(out) / "class_names.txt"
    names.write_text("background\nperson\n")
    with pytest.raises(ValueError, match=f"{names}: already exists with different classes"):
        convert_coco(instances, images_dir, out, "train")


def test_image_size_mismatch_and_missing_image(coco):
    instances, images_dir, out = coco
    Image.new("RGB", (3, 3)).save(Path(images_dir) / f"{IMG_OVERLAP}.jpg")
    with pytest.raises(CocoFormatError, match=f"{IMG_OVERLAP}.jpg: image is 3x3 but .* image id 9 8x10"):
        convert_coco(instances, images_dir, out, "train")
    (Path(images_dir) / f"{IMG_OVERLAP}.jpg").unlink()
    with pytest.raises(CocoFormatError, match=f"{IMG_OVERLAP}.jpg: image file of image id 9 not found"):
        convert_coco(instances, images_dir, out, "train", link_images=False)
