"""The synthetic VOC-layout dataset: determinism, layout, long tail, shared parts, argument checks."""
from __future__ import annotations

import json
import uuid

import numpy as np
import pytest

from storage import fs
from storage.datasets.catalog import VOC_CLASSES
from storage.datasets.synthetic import (
    COLOURS,
    SHAPES,
    SHARED_PARTS,
    SYNTHETIC_CLASSES,
    TEXTURES,
    generate_synthetic,
    render_samples,
)
from storage.datasets.voc_layout import VOCLayoutDataset
from storage.images import encode_mask_png, read_mask, read_rgb

SMALL = dict(num_images=40, min_size=64, max_size=80)
SPLITS = ("train_aug", "train", "val", "test")


@pytest.fixture
def memory_root():
    root = f"memory://synthetic-test-{uuid.uuid4().hex[:8]}"
    yield root
    fs.remove(root)


@pytest.fixture(scope="module")
def small_root(tmp_path_factory) -> tuple[str, dict]:
    root = str(tmp_path_factory.mktemp("synthetic_small"))
    return root, generate_synthetic(root, seed=3, **SMALL)


@pytest.fixture(scope="module")
def large_root(tmp_path_factory) -> tuple[str, dict]:
    root = str(tmp_path_factory.mktemp("synthetic_400"))
    return root, generate_synthetic(root, num_images=400, seed=0, min_size=64, max_size=80)


SAMPLE_FILES = ("JPEGImages/syn_000000.jpg", "JPEGImages/syn_000017.jpg", "SegmentationClassAug/syn_000005.png",
                "Annotations/syn_000011.xml", "ImageSets/Segmentation/train_aug.txt", "ImageSets/Segmentation/val.txt")


def test_class_specs_are_distinct():
    assert len(SYNTHETIC_CLASSES) == 20
    assert tuple(c.name for c in SYNTHETIC_CLASSES) == VOC_CLASSES[1:]
    assert [c.index for c in SYNTHETIC_CLASSES] == list(range(1, 21))
    combos = {(c.shape, c.colour, c.texture) for c in SYNTHETIC_CLASSES}
    assert len(combos) == 20
    assert len({(c.shape, c.colour) for c in SYNTHETIC_CLASSES}) == 20
    for c in SYNTHETIC_CLASSES:
        assert c.shape in SHAPES and c.colour in COLOURS and c.texture in TEXTURES
    assert SHARED_PARTS == {"boat": "person", "bus": "car", "cow": "person", "horse": "person", "sheep": "dog"}
    by_name = {c.name: c for c in SYNTHETIC_CLASSES}
    for rare, frequent in SHARED_PARTS.items():
        r, f = by_name[rare], by_name[frequent]
        assert r.voc_count < f.voc_count
        assert r.shape != f.shape and r.colour != f.colour and r.texture != f.texture


def test_deterministic_per_seed(memory_root):
    a, b, c = (fs.join(memory_root, name) for name in ("a", "b", "c"))
    generate_synthetic(a, seed=0, **SMALL)
    generate_synthetic(b, seed=0, **SMALL)
    generate_synthetic(c, seed=1, **SMALL)
    for name in SAMPLE_FILES:
        assert fs.read_bytes(fs.join(a, name)) == fs.read_bytes(fs.join(b, name)), name
    for name in SAMPLE_FILES[:3]:
        assert fs.read_bytes(fs.join(a, name)) != fs.read_bytes(fs.join(c, name)), name
    # the memory:// dataset is readable too
    assert VOCLayoutDataset(a, "synthetic").load_split("val").has_masks


def test_layout_is_readable_and_consistent(small_root):
    root, summary = small_root
    ds = VOCLayoutDataset(root, "synthetic")
    assert ds.class_names == VOC_CLASSES
    splits = {name: ds.load_split(name) for name in SPLITS}
    ids = {name: split.ids for name, split in splits.items()}
    assert summary["num_images"] == 40
    assert summary["splits"] == {name: len(v) for name, v in ids.items()}
    train_aug, val, test = set(ids["train_aug"]), set(ids["val"]), set(ids["test"])
    assert not (train_aug & val) and not (train_aug & test) and not (val & test)
    assert train_aug | val | test == {f"syn_{i:06d}" for i in range(40)}
    assert ids["train"] == ids["train_aug"][: len(ids["train"])] and 0 < len(ids["train"]) < len(train_aug)
    assert len(val) == len(test) == 6
    for name, split in splits.items():
        assert split.has_masks, name
        assert (split.labels.sum(axis=1) >= 1).all(), name
        assert ds.validate_split_files(split) == {}
        for image_id, row in zip(split.ids, split.labels):
            mask = read_mask(split.mask_url(image_id))
            from_mask = sorted(int(v) for v in np.unique(mask) if v)
            assert from_mask == [int(c) + 1 for c in np.nonzero(row)[0]], image_id
            h, w = read_rgb(split.image_url(image_id)).shape[:2]
            assert mask.shape == (h, w) and 64 <= h <= 80 and 64 <= w <= 80
            # every listed object is visibly present
            counts = np.bincount(mask.ravel(), minlength=21)
            assert all(counts[c] >= 0.01 * h * w for c in from_mask), image_id
    with_class = set(fs.listdir(fs.join(root, "SegmentationClass")))
    assert with_class == {f"{i}.png" for i in set(ids["train"]) | val | test}
    assert len(fs.listdir(fs.join(root, "SegmentationClassAug"))) == 40
    assert summary["class_counts"] == dict(zip(VOC_CLASSES[1:], splits["train_aug"].class_counts().tolist()))
    record = json.loads(fs.read_text(fs.join(root, "synthetic.json")))
    assert record["class_counts"] == summary["class_counts"] and len(record["classes"]) == 20
    assert record["shared_parts"] == SHARED_PARTS and record["arguments"]["seed"] == 3
    assert fs.read_text(fs.join(root, "class_names.txt")).split() == list(VOC_CLASSES)


def test_masks_are_voc_palette_pngs(small_root):
    mask = read_mask(fs.join(small_root[0], "SegmentationClassAug", "syn_000000.png"))
    assert fs.read_bytes(fs.join(small_root[0], "SegmentationClassAug", "syn_000000.png")) == encode_mask_png(mask)


def test_long_tail(large_root):
    root, summary = large_root
    ds = VOCLayoutDataset(root, "synthetic")
    counts = sum(ds.load_split(name).class_counts() for name in ("train_aug", "val", "test"))
    by_name = dict(zip(VOC_CLASSES[1:], counts.tolist()))
    assert by_name["cow"] >= 1
    assert by_name["person"] > 4 * by_name["cow"]
    assert by_name["person"] == max(by_name.values())
    assert summary["class_counts"]["person"] > 4 * summary["class_counts"]["cow"]
    labels_per_image = counts.sum() / 400
    assert 1.4 < labels_per_image < 2.0


def _near(pixels: np.ndarray, colours: list[tuple[int, int, int]], tolerance: float = 60.0) -> np.ndarray:
    distance = np.min([np.linalg.norm(pixels.astype(np.float64) - c, axis=-1) for c in colours], axis=0)
    return distance < tolerance


def test_shared_parts_paint_the_partner_on_the_rare_object(large_root):
    root, _ = large_root
    ds = VOCLayoutDataset(root, "synthetic")
    split = ds.load_split("train_aug")
    person = next(c for c in SYNTHETIC_CLASSES if c.name == "person")
    person_colours = [person.rgb, tuple(int(v * 0.35) for v in person.rgb)]
    cow_index, cow_col = VOC_CLASSES.index("cow"), VOC_CLASSES.index("cow") - 1
    cow_ids = [i for i, row in zip(split.ids, split.labels) if row[cow_col]]
    assert cow_ids
    with_person, upper_share, lower_share = 0, [], []
    for image_id in cow_ids:
        mask = read_mask(split.mask_url(image_id))
        image = read_rgb(split.image_url(image_id))
        cow = mask == cow_index
        rows = np.nonzero(cow.any(axis=1))[0]
        top, bottom = rows[0], rows[-1]
        upper = cow.copy()
        upper[top + int(0.3 * (bottom - top + 1)):] = False
        lower = cow.copy()
        lower[: top + int(0.5 * (bottom - top + 1))] = False
        if upper.sum() >= 20 and lower.sum() >= 20:
            upper_share.append(_near(image[upper], person_colours).mean())
            lower_share.append(_near(image[lower], person_colours).mean())
        with_person += bool((mask == VOC_CLASSES.index("person")).any())
    # the cow's visible top is painted like a person (unless another object hides it), its bottom is not
    assert upper_share and np.mean(upper_share) > 0.6 and np.max(upper_share) > 0.8
    assert np.mean(lower_share) < 0.15
    # a rare class co-occurs with its partner in about 60% of its images
    assert 0.3 <= with_person / len(cow_ids) <= 0.9


@pytest.mark.parametrize("kwargs, argument", [
    (dict(num_images=9), "num_images"),
    (dict(num_images=10.0), "num_images"),
    (dict(min_size=15, max_size=20), "min_size"),
    (dict(min_size=80, max_size=64), "max_size"),
    (dict(val_fraction=0.0), "val_fraction"),
    (dict(test_fraction=1.0), "test_fraction"),
    (dict(train_fraction=1.5), "train_fraction"),
    (dict(val_fraction=0.5, test_fraction=0.5), "val_fraction \\+ test_fraction"),
    (dict(seed=-1), "seed"),
])
def test_argument_validation(memory_root, kwargs, argument):
    with pytest.raises(ValueError, match=argument):
        generate_synthetic(memory_root, **{**SMALL, **kwargs})
    assert not fs.exists(memory_root)


def test_regeneration_replaces_a_previous_dataset(memory_root):
    generate_synthetic(memory_root, seed=0, **SMALL)
    generate_synthetic(memory_root, seed=1, num_images=20, min_size=64, max_size=80)
    assert len(fs.listdir(fs.join(memory_root, "JPEGImages"))) == 20
    assert len(fs.listdir(fs.join(memory_root, "Annotations"))) == 20
    ds = VOCLayoutDataset(memory_root, "synthetic")
    expected = {f"{i}.png" for name in ("train", "val", "test") for i in ds.split_ids(name)}
    assert set(fs.listdir(fs.join(memory_root, "SegmentationClass"))) == expected
    assert json.loads(fs.read_text(fs.join(memory_root, "synthetic.json")))["num_images"] == 20


def test_render_samples(small_root, memory_root):
    out = fs.join(memory_root, "samples.png")
    render_samples(small_root[0], out, n=6)
    grid = read_rgb(out)
    assert grid.shape[0] > 128 and grid.shape[1] > 4 * 128


def test_prepare_regenerates_a_dataset_made_with_other_parameters(tmp_path):
    from tasks.prepare_data import PrepareDataConfig, ensure_synthetic

    cfg = PrepareDataConfig(kind="synthetic", root=str(tmp_path / "d"), synthetic={"num_images": 12, "min_size": 32,
                                                                            "max_size": 40})
    ensure_synthetic(cfg)
    marker = tmp_path / "d" / "synthetic.json"
    first = marker.stat().st_mtime_ns
    ensure_synthetic(cfg)
    assert marker.stat().st_mtime_ns == first  # same parameters: kept
    ensure_synthetic(cfg.model_copy(update={"synthetic": cfg.synthetic.model_copy(update={"num_images": 14})}))
    assert json.loads(marker.read_text())["num_images"] == 14
