"""Segmentation evaluation: a perfect predictor scores 1 through the real metric path, with and without CRF; the
test-split export follows the VOC server layout; bad checkpoints and splits are refused with the file named."""
import io
import json
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

import tasks.eval_seg as eval_module
from storage import checkpoints, fs
from storage.datasets.cam_training import normalized_tensor
from storage.datasets.split_files import load_split_file, save_split
from storage.datasets.voc_layout import Split
from storage.errors import DataError
from storage.images import read_mask, read_rgb, write_mask, write_rgb
from tasks.eval_seg import VOC_RESULTS_DIR, EvalSegConfig, eval_seg
from tasks.train_seg import TrainSegConfig, train_seg
from tests.single_thread import one_torch_thread  # noqa: F401  (autouse fixture)
from tests.synthetic_splits import synthetic_split_files

FAST = dict(scales=(0.5, 1.0), test_size=80, batch_size=3, num_workers=0, crf_workers=1, overlays=2)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Synthetic splits and a segmenter trained for one step (GT masks as pseudo labels)."""
    root = tmp_path_factory.mktemp("evalseg")
    urls = synthetic_split_files(root, ("train_aug", "val", "test"), 40, 5, 64, 80)
    split = load_split_file(urls["train_aug"])
    for image_id in split.ids:
        write_mask(str(root / "labels" / f"{image_id}.png"), read_mask(split.mask_url(image_id)))
    cfg = TrainSegConfig(backbone="resnet18", norm="batch", crop=48, batch_size=2, iter_size=1, max_steps=1,
                         num_workers=0, msc_scales=())
    manifest = train_seg(cfg, urls["train_aug"], str(root / "labels"), None, str(root / "train"), 0, "cpu")
    return {**urls, "checkpoint": manifest["checkpoint"], "root": root}


def _perfect(model, split, ids, cfg, device):
    """Ground truth as one-hot probabilities (ignored pixels as background): a perfect predictor."""
    for image_id in ids:
        mask = read_mask(split.mask_url(image_id)).astype(np.int64)
        probs = np.eye(len(split.class_names), dtype=np.float32)[np.where(mask == 255, 0, mask)]
        yield image_id, probs.transpose(2, 0, 1)


def test_perfect_predictor_scores_one_without_and_with_crf(data, tmp_path, monkeypatch):
    monkeypatch.setattr(eval_module, "predict_probs", _perfect)
    out = tmp_path / "metrics"
    manifest = eval_seg(EvalSegConfig(**{**FAST, "crf_workers": 2}), data["checkpoint"], data["val"], str(out),
                        "cpu", test_split_url=data["test"])
    assert manifest["summary"]["val_miou"] == 1.0 and manifest["summary"]["val_miou_crf"] > 0.99
    assert manifest["summary"]["test_miou"] == 1.0
    results = json.loads(fs.read_text(manifest["results"]))
    val = load_split_file(data["val"])
    for variant in ("no_crf", "crf"):
        per_class = results["val"][variant]["per_class"]
        assert list(per_class) == list(val.class_names)
        present = {int(v) for i in val.ids for v in np.unique(read_mask(val.mask_url(i))) if v != 255}
        assert all(per_class[val.class_names[c]]["iou"] > 0.99 for c in present)
    assert (out / "seg_per_class_iou.png").exists() and len(list((out / "seg_overlays").iterdir())) == 2

    test = load_split_file(data["test"])
    with tarfile.open(manifest["archive"], "r:gz") as archive:
        names = sorted(archive.getnames())
        assert names == sorted(f"{VOC_RESULTS_DIR}/{i}.png" for i in test.ids)
        image = Image.open(io.BytesIO(archive.extractfile(names[0]).read()))
        assert image.mode == "P"
        expected = read_mask(test.mask_url(names[0].rsplit("/", 1)[1][:-4]))
        assert np.array_equal(np.asarray(image), np.where(expected == 255, 0, expected))


def test_real_inference_reports_with_and_without_crf(data, tmp_path):
    manifest = eval_seg(EvalSegConfig(**FAST), data["checkpoint"], data["val"], str(tmp_path), "cpu")
    results = json.loads(fs.read_text(manifest["results"]))
    assert {"no_crf", "crf"} <= set(results["val"]) and manifest["archive"] is None
    assert 0 <= results["val"]["crf"]["miou"] <= 1 and results["val"]["images"] == 6

    off = eval_seg(EvalSegConfig(**{**FAST, "crf": False, "flip": False}), data["checkpoint"], data["val"],
                   str(tmp_path / "off"), "cpu")
    assert "val_miou_crf" not in off["summary"]
    assert "crf" not in json.loads(fs.read_text(off["results"]))["val"]


def test_checkpoint_for_other_classes_is_refused(data, tmp_path):
    state = checkpoints.load(data["checkpoint"])
    state["meta"]["class_names"] = state["meta"]["class_names"][:5]
    other = str(tmp_path / "other.pt")
    checkpoints.save(other, state)
    with pytest.raises(ValueError, match=rf"{other} was trained for 5 classes"):
        eval_seg(EvalSegConfig(**FAST), other, data["val"], str(tmp_path), "cpu")
    torch.save({"model": {}}, str(tmp_path / "cam.pt"))
    with pytest.raises(ValueError, match="not a segmentation checkpoint"):
        eval_seg(EvalSegConfig(**FAST), str(tmp_path / "cam.pt"), data["val"], str(tmp_path), "cpu")


def test_validation_split_without_masks_is_refused(data, tmp_path):
    val = load_split_file(data["val"])
    val.mask_urls = {}
    save_split(str(tmp_path / "val.json"), val)
    with pytest.raises(DataError, match="needs masks"):
        eval_seg(EvalSegConfig(**FAST), data["checkpoint"], str(tmp_path / "val.json"), str(tmp_path), "cpu")


def _shifted_square(model, split, ids, cfg, device):
    """A predictor that finds the square 2 pixels to the right of where it is, with confidence 0.8."""
    for image_id in ids:
        probs = np.zeros((len(split.class_names), 32, 32), np.float32)
        probs[0], probs[1] = 0.8, 0.2
        probs[0, 8:24, 10:26], probs[1, 8:24, 10:26] = 0.2, 0.8
        yield image_id, probs


def test_two_tone_square_under_the_crf(data, tmp_path, monkeypatch):
    """Grey 200 square (rows and columns 8..23) on grey 40, JPEG-exact (8x8 blocks, no chroma). Found 2 pixels to
    the right, it scores by hand: background IoU 736 / 800, square 224 / 288, mIoU 0.8489; the CRF snaps the
    prediction to the square's edges: mIoU 1."""
    class_names = load_split_file(data["val"]).class_names
    root = tmp_path / "square"
    image = np.full((32, 32, 3), 40, np.uint8)
    image[8:24, 8:24] = 200
    mask = np.zeros((32, 32), np.uint8)
    mask[8:24, 8:24] = 1
    write_rgb(str(root / "JPEGImages" / "sq.jpg"), image, quality=100)
    assert np.array_equal(read_rgb(str(root / "JPEGImages" / "sq.jpg")), image)
    write_mask(str(root / "SegmentationClass" / "sq.png"), mask)
    labels = np.zeros((1, len(class_names) - 1), np.float32)
    labels[0, 0] = 1
    split = Split(str(root), "square", class_names, ["sq"], labels, {"sq": str(root / "SegmentationClass/sq.png")})
    save_split(str(tmp_path / "square.json"), split)
    monkeypatch.setattr(eval_module, "predict_probs", _shifted_square)
    manifest = eval_seg(EvalSegConfig(**FAST), data["checkpoint"], str(tmp_path / "square.json"), str(tmp_path), "cpu")
    assert manifest["summary"]["val_miou"] == pytest.approx((736 / 800 + 224 / 288) / 2)
    assert manifest["summary"]["val_miou_crf"] == 1.0


def _deeplab_pytorch_test(model, image: torch.Tensor, scales=(0.5, 0.75)) -> torch.Tensor:
    """deeplab-pytorch's ``test`` on one whole image (1, 3, H, W): MSC in eval mode (logits of the image and of its
    0.5 / 0.75 copies, resized to the first's size, element-wise max), upsampled to (H, W), softmax."""
    logits = model(image)
    pyramid = [model(torch.nn.functional.interpolate(image, scale_factor=p, mode="bilinear", align_corners=False))
               for p in scales]
    fused = torch.stack([logits, *(torch.nn.functional.interpolate(x, size=logits.shape[2:], mode="bilinear",
                                                                     align_corners=False) for x in pyramid)]).amax(0)
    full = torch.nn.functional.interpolate(fused, size=image.shape[2:], mode="bilinear", align_corners=False)
    return torch.softmax(full, dim=1)[0]


def test_unpadded_protocol_is_deeplab_pytorchs_test(data):
    split = load_split_file(data["val"])
    model = eval_module.load_segmenter(data["checkpoint"], split.class_names)
    ids = split.ids[:4]
    reference = EvalSegConfig(scales=(0.5, 0.75, 1.0), flip=False, test_size=None, num_workers=0, batch_size=3)
    canvas = reference.model_copy(update={"test_size": 80})
    unpadded = dict(eval_module.predict_probs(model, split, ids, reference, torch.device("cpu")))
    padded = dict(eval_module.predict_probs(model, split, ids, canvas, torch.device("cpu")))
    for image_id in ids:
        image = read_rgb(split.image_url(image_id))
        with torch.no_grad():
            expected = _deeplab_pytorch_test(model, normalized_tensor(Image.fromarray(image))[None])
        assert unpadded[image_id].shape == expected.shape == (len(split.class_names), *image.shape[:2])
        assert np.allclose(unpadded[image_id], expected.numpy(), atol=1e-5)
    # the canvas's padding reaches into the predictions
    assert max(np.abs(unpadded[i] - padded[i]).max() for i in ids) > 1e-3
