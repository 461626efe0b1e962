"""CAM inference into the store (resume, shards, bad checkpoints) and CAM evaluation errors."""
import numpy as np
import pytest
import torch

import models.cam_inference as cam_inference
from models.sfc import SFCNet
from storage import checkpoints
from storage.cam_store import CamStore, CamStoreError
from storage.datasets.split_files import load_split_file, save_split
from storage.datasets.voc_layout import DataError
from tasks.eval_cam import EvalCamConfig, eval_cam
from tasks.infer_cams import InferCamConfig, infer_cams
from tasks.shards import parse_shard
from tests.interrupt import kill_on_call
from tests.synthetic_splits import synthetic_split_files

CFG = InferCamConfig(scales=(1.0, 0.5), num_workers=0, cpu_streams=2)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("infer")
    urls = synthetic_split_files(root, ("train", "val"), 20, 5, 48, 64)
    class_names = load_split_file(urls["val"]).class_names
    torch.manual_seed(0)
    model = SFCNet(20, "resnet18", norm="batch").eval()
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
    _infer(setup, tmp_path / "one.zarr", CFG.model_copy(update={"cpu_streams": 1}))
    two = _infer(setup, tmp_path / "two.zarr")
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
