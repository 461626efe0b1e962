"""Segmentation data and training: augmentation, bad-input errors, loss decrease, resume to identical weights."""
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import tasks.train_seg as train_module
from storage import checkpoints, fs
from storage.datasets.segmentation import CanvasSet, SegTrainingSet, pseudo_label_urls
from storage.datasets.split_files import load_split_file, save_split
from storage.errors import DataError
from storage.images import read_mask, write_mask
from storage.transforms import SEG_SCALES, SegScaling, augment_for_segmentation, rescale_pair, resize_linear
from tasks.train_seg import TrainSegConfig, build_segmenter, train_seg
from tests.interrupt import kill_on_call
from tests.single_thread import one_torch_thread  # noqa: F401  (autouse fixture)
from tests.synthetic_splits import synthetic_split_files

TINY = dict(backbone="resnet18", norm="batch", crop=48, batch_size=2, iter_size=2, max_steps=4, lr=1e-3,
            num_workers=0, checkpoint_every=2, keep_checkpoints=5, val_every=2, val_size=80, log_every=1)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Synthetic splits, with the ground-truth masks of train_aug copied as pseudo labels."""
    root = tmp_path_factory.mktemp("seg")
    urls = synthetic_split_files(root, ("train_aug", "val"), 40, 3, 64, 80)
    split = load_split_file(urls["train_aug"])
    for image_id in split.ids:
        write_mask(str(root / "labels" / f"{image_id}.png"), read_mask(split.mask_url(image_id)))
    return {**urls, "labels": str(root / "labels"), "root": root}


def _train(data, out_dir, labels=None, **overrides):
    cfg = TrainSegConfig(**{**TINY, **overrides})
    return train_seg(cfg, data["train_aug"], labels or data["labels"], data["val"], str(out_dir), seed=1,
                     device="cpu")


def test_augmentation_is_deterministic_pads_with_mean_and_ignore():
    image = Image.new("RGB", (30, 20), (200, 30, 30))
    label = np.full((20, 30), 3, dtype=np.uint8)
    outputs = [augment_for_segmentation(image, label, 64, SegScaling(), np.random.default_rng([1, 0, 2]))
               for _ in range(2)]
    assert np.array_equal(outputs[0][0], outputs[1][0]) and np.array_equal(outputs[0][1], outputs[1][1])
    array, labels = outputs[0]
    assert array.shape == (3, 64, 64) and labels.shape == (64, 64) and labels.dtype == np.int64
    padded = labels == 255
    assert set(np.unique(labels)) == {3, 255}
    assert np.all(array[:, padded] == 0) and np.all(np.abs(array[:, ~padded]).sum(0) > 0)
    other = augment_for_segmentation(image, label, 64, SegScaling(), np.random.default_rng([1, 0, 3]))
    assert not np.array_equal(other[1], labels)


def test_scale_augmentation_draws_from_deeplabs_set_or_a_range():
    image, label = Image.new("RGB", (40, 30), (9, 90, 200)), np.full((30, 40), 2, dtype=np.uint8)
    areas = {int(40 * s) * int(30 * s): s for s in SEG_SCALES}
    drawn = set()
    for position in range(60):
        _, labels = augment_for_segmentation(image, label, 64, SegScaling(), np.random.default_rng([1, 0, position]))
        drawn.add(areas[int((labels != 255).sum())])  # a KeyError: a factor outside the set
    assert drawn == set(SEG_SCALES)
    factors = {SegScaling(scale_range=(0.5, 1.5)).draw(np.random.default_rng(i)) for i in range(20)}
    assert len(factors) == 20 and all(0.5 <= f <= 1.5 for f in factors)


def test_linear_resize_is_opencvs_inter_linear():
    # half-pixel centres, two taps: 4 -> 2 averages pairs, 2 -> 4 weights 1, 3/4 + 1/4, 1/4 + 3/4, 1 (edges clamped)
    column = np.array([0.0, 4.0, 8.0, 16.0], dtype=np.float32)[:, None, None]
    assert resize_linear(column, (2, 1))[:, 0, 0].tolist() == [2.0, 12.0]
    assert resize_linear(column[:2], (4, 1))[:, 0, 0].tolist() == [0.0, 1.0, 3.0, 4.0]
    # torch's bilinear without antialiasing computes the same thing (OpenCV's float path) at deeplab's scales
    array = np.random.default_rng(0).random((37, 50, 3), dtype=np.float32)
    as_tensor = torch.from_numpy(array).permute(2, 0, 1)[None]
    for scale in SEG_SCALES:
        size = (int(37 * scale), int(50 * scale))
        expected = F.interpolate(as_tensor, size=size, mode="bilinear", align_corners=False, antialias=False)
        assert np.allclose(resize_linear(array, size), expected[0].permute(1, 2, 0).numpy(), atol=1e-5)
    # PIL's bilinear (the earlier default) antialiases when shrinking: different pixels
    image = Image.fromarray((array * 255).astype(np.uint8))
    linear, _ = rescale_pair(image, np.zeros((37, 50), np.uint8), 0.5, "linear")
    pil, _ = rescale_pair(image, np.zeros((37, 50), np.uint8), 0.5, "pil_bilinear")
    assert linear.shape == pil.shape == (18, 25, 3) and np.abs(linear - pil).mean() > 0.1


def test_training_items_depend_only_on_their_schedule_position(data):
    split = load_split_file(data["train_aug"])
    dataset = SegTrainingSet(split, pseudo_label_urls(split, data["labels"]), 48)
    first, again = dataset[(3, (1, 0, 5))], dataset[(3, (1, 0, 5))]
    assert torch.equal(first["image"], again["image"]) and torch.equal(first["label"], again["label"])
    assert first["image"].shape == (3, 48, 48) and first["label"].dtype == torch.int64


def test_canvas_set_pads_and_shrinks(data):
    split = load_split_file(data["val"])
    item = CanvasSet(split, split.ids[:1], 96)[0]
    height, width = item["size"]
    assert item["content"] == (height, width) and item["image"].shape == (3, 96, 96)
    assert torch.all(item["image"][:, height:] == 0) and torch.all(item["image"][:, :, width:] == 0)
    small = CanvasSet(split, split.ids[:1], 40)[0]
    assert max(small["content"]) == 40 and small["size"] == (height, width)


def test_missing_pseudo_labels_name_folder_and_ids(data, tmp_path):
    split = load_split_file(data["train_aug"])
    partial = tmp_path / "partial"
    shutil.copytree(data["labels"], partial)
    for image_id in split.ids[:2]:
        (partial / f"{image_id}.png").unlink()
    with pytest.raises(DataError, match=rf"{partial}: no pseudo label for 2 of the .*{split.ids[0]}, {split.ids[1]}"):
        _train(data, tmp_path / "run", labels=str(partial))
    with pytest.raises(DataError, match="does not exist"):
        _train(data, tmp_path / "run", labels=str(tmp_path / "nowhere"))


def test_bad_label_values_and_sizes_name_the_file(data, tmp_path):
    split = load_split_file(data["train_aug"])
    bad = tmp_path / "bad"
    shutil.copytree(data["labels"], bad)
    mask = read_mask(split.mask_url(split.ids[4]))
    write_mask(str(bad / f"{split.ids[4]}.png"), np.where(mask == 0, 30, mask))
    with pytest.raises(DataError, match=rf"{split.ids[4]}\.png: label values \[30\] outside the 21 classes"):
        _train(data, tmp_path / "run", labels=str(bad))
    write_mask(str(bad / f"{split.ids[4]}.png"), np.zeros((5, 7), dtype=np.uint8))
    dataset = SegTrainingSet(split, pseudo_label_urls(split, str(bad)), 48)
    with pytest.raises(DataError, match=rf"{split.ids[4]}\.png: pseudo label is 5x7 but image .* is"):
        dataset[(4, (0, 0, 0))]


def test_validation_split_without_masks_is_refused(data, tmp_path):
    val = load_split_file(data["val"])
    val.mask_urls = {}
    save_split(str(tmp_path / "val.json"), val)
    with pytest.raises(DataError, match=rf"validation needs masks; split 'val' \({tmp_path / 'val.json'}\)"):
        train_seg(TrainSegConfig(**TINY), data["train_aug"], data["labels"], str(tmp_path / "val.json"),
                  str(tmp_path / "run"), seed=1, device="cpu")


def test_loss_decreases_on_clean_labels(data, tmp_path):
    manifest = _train(data, tmp_path / "run", batch_size=4, iter_size=1, max_steps=16, msc_scales=(),
                      val_every=0, checkpoint_every=100)
    assert manifest["last_loss"] < 0.8 * manifest["first_loss"]
    assert [v["step"] for v in manifest["validation"]] == [16]
    assert 0 <= manifest["validation"][0]["miou"] <= 1


def test_killed_training_resumes_to_identical_weights(data, tmp_path, monkeypatch):
    """DeepLab-v3 (dropout: the RNG state matters) with MSC; the resumed run uses a loader worker."""
    reference = _train(data, tmp_path / "full", arch="deeplabv3")

    kill_on_call(monkeypatch, train_module, "msc_cross_entropy", 7)  # step 4 of 4, 2 calls per step
    with pytest.raises(KeyboardInterrupt):
        _train(data, tmp_path / "killed", arch="deeplabv3")
    monkeypatch.undo()
    assert [s for s, _ in checkpoints.step_checkpoints(str(tmp_path / "killed" / "checkpoints"))] == [2]
    assert not fs.exists(str(tmp_path / "killed" / "final.pt"))
    with pytest.raises(ValueError, match="another config"):
        _train(data, tmp_path / "killed", arch="deeplabv3", lr=2e-3)

    resumed = _train(data, tmp_path / "killed", arch="deeplabv3", num_workers=1)
    expected, actual = (checkpoints.load(m["checkpoint"])["model"] for m in (reference, resumed))
    for key, value in expected.items():
        assert torch.equal(value, actual[key]), key
    assert resumed["validation"] == reference["validation"] and [v["step"] for v in resumed["validation"]] == [2, 4]

    monkeypatch.setattr(train_module, "msc_cross_entropy", lambda *a, **k: pytest.fail("retrained a finished stage"))
    assert _train(data, tmp_path / "killed", arch="deeplabv3")["checkpoint"] == resumed["checkpoint"]


def test_backbone_weights_come_from_a_torchvision_state_dict(tmp_path):
    from torchvision.models import resnet18

    torch.manual_seed(3)
    url = str(tmp_path / "resnet18.pth")
    torch.save(resnet18().state_dict(), url)
    model = build_segmenter(TrainSegConfig(backbone="resnet18", weights=url), 21)
    assert torch.equal(model.backbone.stage1[0].conv1.weight, torch.load(url)["layer1.0.conv1.weight"])
