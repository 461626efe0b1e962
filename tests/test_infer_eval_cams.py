"""CAM inference into the store (resume, shards, bad checkpoints, values against the model) and CAM evaluation
(known answers, errors)."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

import models.cam_inference as cam_inference
from models.cam_inference import multiscale_cams
from models.sfc import SFCNet
from storage import checkpoints, fs
from storage.cam_store import CamStore, CamStoreError
from storage.datasets.split_files import load_split_file, save_split
from storage.errors import DataError
from storage.images import read_mask
from tasks.engine.shards import parse_shard
from tasks.eval_cam import REFERENCE_RULE, EvalCamConfig, eval_cam
from tasks.infer_cams import InferCamsConfig, infer_cams
from tests.interrupt import kill_on_call
from tests.synthetic_splits import synthetic_split_files

CFG = InferCamsConfig(scales=(1.0, 0.5), num_workers=0, cpu_streams=2)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("infer")
    urls = synthetic_split_files(root, ("train", "val"), 20, 5, 48, 64)
    class_names = load_split_file(urls["val"]).class_names
    torch.manual_seed(0)
    model = SFCNet(20, "resnet18", norm="batch").eval()
    with torch.no_grad():  # positive class weights: every class fires somewhere, so the CAMs are not all zero
        model.classifier.weight.abs_()
    meta = {"backbone": "resnet18", "norm": "batch", "trainable_from": 3, "bg_seed_scale": 0.3,
            "class_names": list(class_names)}
    checkpoint = str(root / "final.pt")
    checkpoints.save(checkpoint, {"model": model.state_dict(), "meta": meta})
    return root, urls, checkpoint, meta, model


def _infer(setup, store, cfg=CFG, **kwargs):
    root, urls, checkpoint, *_ = setup
    return infer_cams(cfg, checkpoint, [urls["train"], urls["val"]], str(store), device="cpu", **kwargs)


def _contents(url):
    store = CamStore.open(str(url))
    return {i: store.load(i) for i in store.ids()}


def test_interrupted_inference_resumes_to_identical_store(setup, tmp_path, monkeypatch):
    one_stream = CFG.model_copy(update={"cpu_streams": 1})  # calls in image order: the 4th call is image 4
    full = _infer(setup, tmp_path / "full.zarr", one_stream)
    assert full["written"] == full["images"] > 0
    kill_on_call(monkeypatch, cam_inference, "multiscale_cams", 4)
    with pytest.raises(KeyboardInterrupt):
        _infer(setup, tmp_path / "resumed.zarr", one_stream)
    monkeypatch.undo()
    assert len(CamStore.open(str(tmp_path / "resumed.zarr"))) == 3
    resumed = _infer(setup, tmp_path / "resumed.zarr", one_stream)
    assert resumed["written"] == full["images"] - 3
    a, b = _contents(tmp_path / "full.zarr"), _contents(tmp_path / "resumed.zarr")
    assert a.keys() == b.keys()
    for image_id in a:
        for x, y in zip(a[image_id], b[image_id]):
            assert np.array_equal(x, y), image_id


def test_cpu_streams_write_the_same_cams(setup, tmp_path):
    # plain float16: a rounding difference of the two thread layouts never moves a value by a coarser step
    plain = CFG.model_copy(update={"mantissa_bits": 10})
    _infer(setup, tmp_path / "one.zarr", plain.model_copy(update={"cpu_streams": 1}))
    two = _infer(setup, tmp_path / "two.zarr", plain)
    a, b = _contents(tmp_path / "one.zarr"), _contents(tmp_path / "two.zarr")
    assert a.keys() == b.keys() and len(a) == two["written"]
    for image_id in a:
        assert np.array_equal(a[image_id][0], b[image_id][0])
        for x, y in zip(a[image_id][1:], b[image_id][1:]):  # threads per image differ: float rounding only
            np.testing.assert_allclose(x, y, atol=2e-3)


def test_shards_cover_disjoint_images(setup, tmp_path):
    first = _infer(setup, tmp_path / "s.zarr", shard="0/2")
    second = _infer(setup, tmp_path / "s.zarr", shard="1/2")
    assert first["images"] + second["images"] == len(CamStore.open(str(tmp_path / "s.zarr")))
    assert parse_shard(None) == (0, 1)
    with pytest.raises(ValueError, match="i/n"):
        parse_shard("2/2")


def test_store_keys_are_background_plus_labels(setup, tmp_path):
    root, urls, *_ = setup
    _infer(setup, tmp_path / "k.zarr")
    split = load_split_file(urls["val"])
    store = CamStore.open(str(tmp_path / "k.zarr"))
    for row, image_id in enumerate(split.ids):
        keys, proto, cam = store.load(image_id)
        assert keys.tolist() == [0, *(np.flatnonzero(split.labels[row]) + 1)]
        assert proto.shape == cam.shape and proto.shape[0] == len(keys)


def test_checkpoint_for_other_classes_or_network_is_refused(setup, tmp_path):
    root, urls, checkpoint, meta, model = setup
    other = str(tmp_path / "other.pt")
    checkpoints.save(other, {"model": model.state_dict(), "meta": {**meta, "class_names": ["background", "x"]}})
    with pytest.raises(ValueError, match="trained for 1 classes"):
        infer_cams(CFG, other, [urls["val"]], str(tmp_path / "x.zarr"), device="cpu")
    wrong = str(tmp_path / "wrong.pt")
    checkpoints.save(wrong, {"model": model.state_dict(), "meta": {**meta, "backbone": "resnet34"}})
    with pytest.raises(ValueError, match="does not match a resnet34 SFC network"):
        infer_cams(CFG, wrong, [urls["val"]], str(tmp_path / "y.zarr"), device="cpu")
    with pytest.raises(FileNotFoundError, match="nope.pt not found"):
        infer_cams(CFG, str(tmp_path / "nope.pt"), [urls["val"]], str(tmp_path / "z.zarr"), device="cpu")


def test_store_from_other_checkpoint_is_refused(setup, tmp_path):
    root, urls, checkpoint, meta, model = setup
    _infer(setup, tmp_path / "c.zarr")
    torch.manual_seed(1)
    retrained = str(tmp_path / "retrained.pt")
    checkpoints.save(retrained, {"model": SFCNet(20, "resnet18", norm="batch").state_dict(), "meta": meta})
    with pytest.raises(CamStoreError):
        infer_cams(CFG, retrained, [urls["val"]], str(tmp_path / "c.zarr"), device="cpu")


def test_eval_errors_name_the_problem(setup, tmp_path):
    root, urls, *_ = setup
    with pytest.raises(CamStoreError):
        eval_cam(EvalCamConfig(), str(tmp_path / "missing.zarr"), urls["val"], str(tmp_path / "m"))
    infer_cams(CFG, setup[2], [urls["train"]], str(tmp_path / "t.zarr"), device="cpu")
    with pytest.raises(CamStoreError, match="val|syn_"):
        eval_cam(EvalCamConfig(), str(tmp_path / "t.zarr"), urls["val"], str(tmp_path / "m"))
    split = load_split_file(urls["val"])
    split.mask_urls.pop(split.ids[0])
    no_masks = str(tmp_path / "nomask.json")
    save_split(no_masks, split)
    with pytest.raises(DataError, match="needs masks"):
        eval_cam(EvalCamConfig(), str(tmp_path / "t.zarr"), no_masks, str(tmp_path / "m"))


IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _reference_pair(image: Image.Image, scale: float) -> torch.Tensor:
    """The reference's input at one scale, written out here: PIL bicubic to (round(H s), round(W s)),
    (x / 255 - mean) / std per RGB channel, CHW, stacked with its horizontal flip."""
    if scale != 1.0:
        image = image.resize((round(image.width * scale), round(image.height * scale)), Image.BICUBIC)
    x = (np.asarray(image, np.float32) / 255.0 - np.array(IMAGENET_MEAN, np.float32)) / np.array(IMAGENET_STD,
                                                                                                   np.float32)
    x = torch.from_numpy(x.transpose(2, 0, 1).copy())
    return torch.stack([x, x.flip(-1)])


def test_stored_cams_are_the_models_on_the_prepared_inputs(setup, tmp_path):
    """store.load(id) equals multiscale_cams of the unfolded network on inputs prepared by the test, within the
    store's float16 precision (values up to 2.4: half a float16 step is 1e-3)."""
    root, urls, checkpoint, meta, model = setup
    _infer(setup, tmp_path / "v.zarr")
    store = CamStore.open(str(tmp_path / "v.zarr"))
    split = load_split_file(urls["val"])
    for row, image_id in enumerate(split.ids[:4]):
        image = Image.open(split.image_url(image_id)).convert("RGB")
        pairs = [_reference_pair(image, s) for s in CFG.scales]
        label = torch.from_numpy(split.labels[row])
        keys, proto_cam, cam = multiscale_cams(model, pairs, label, (image.height, image.width))
        stored_keys, stored_proto, stored_cam = store.load(image_id)
        assert stored_keys.tolist() == keys.tolist()
        np.testing.assert_allclose(stored_proto, proto_cam.numpy(), rtol=1e-3, atol=2e-3, err_msg=image_id)
        np.testing.assert_allclose(stored_cam, cam.numpy(), rtol=1e-3, atol=2e-3, err_msg=image_id)
        assert cam[1:].max() > 1.9  # foreground x 2 after max-normalisation: the maps are not trivially flat


def test_cams_equal_to_the_masks_score_one(setup, tmp_path):
    """A perfect CAM (background 1 + 0.4 and foreground 2 on the mask's pixels, 0.4 and 0 elsewhere) gives mIoU 1
    at every background threshold for P, K and the fused maps, and for the reference's argmax rule."""
    root, urls, *_ = setup
    split = load_split_file(urls["val"])
    store = CamStore.create(str(tmp_path / "perfect.zarr"), "perfect", "perfect", split.class_names)
    for row, image_id in enumerate(split.ids):
        mask = read_mask(split.mask_url(image_id))
        classes = np.flatnonzero(split.labels[row]) + 1
        planes = np.stack([(mask == 0) + 0.4, *(2.0 * (mask == c) for c in classes)]).astype(np.float32)
        store.write(image_id, np.concatenate([[0], classes]), planes, planes)
    manifest = eval_cam(EvalCamConfig(overlays=0), str(tmp_path / "perfect.zarr"), urls["val"], str(tmp_path))
    assert set(manifest["summary"]) == {"P", "K", "K+0.3P", "K+0.7P", REFERENCE_RULE}
    assert all(entry["miou"] == pytest.approx(1.0) for entry in manifest["summary"].values())
    results = json.loads(fs.read_text(manifest["results"]))["variants"]
    assert all(value == pytest.approx(1.0) for value in results["K+0.3P"]["miou"])  # every threshold
