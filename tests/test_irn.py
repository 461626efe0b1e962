"""IRN: path indices, affinity labels, network shapes, edge map, losses, training, resume and errors."""
import itertools
import json

import numpy as np
import pytest
import torch
from PIL import Image

import tasks.train_irn as train_module
from models.irn import (
    IRNet,
    PathIndex,
    affinity_labels,
    edge_canvas_size,
    edge_map,
    feature_size,
    irn_losses,
    path_affinity,
)
from models.sfc import SFCNet
from storage import checkpoints, fs
from storage.datasets.irn import IRNTrainingSet, augment_for_irn, ir_label_url
from storage.datasets.split_files import load_split_file
from storage.errors import DataError
from storage.images import IGNORE_INDEX, read_mask, write_mask
from tasks.engine.irn_checkpoint import load_irn
from tasks.train_irn import TrainIrnConfig, build_model, train_irn
from tests.interrupt import kill_on_call
from tests.synthetic_splits import synthetic_split_files

TINY = dict(backbone="resnet18", crop=32, radius=3, batch_size=4, max_steps=4, num_workers=0, checkpoint_every=2,
            keep_checkpoints=5, mean_shift_images=4)


def ir_label_from_mask(mask: np.ndarray, border: int = 2) -> np.ndarray:
    """A stand-in IR label: the ground truth with every pixel within ``border`` of a class change set to 255."""
    padded = np.pad(mask, border, mode="edge")
    height, width = mask.shape
    changed = np.zeros(mask.shape, dtype=bool)
    for dy, dx in itertools.product(range(2 * border + 1), repeat=2):
        changed |= padded[dy:dy + height, dx:dx + width] != mask
    return np.where(changed, IGNORE_INDEX, mask).astype(np.uint8)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("irn")
    split_url = synthetic_split_files(root, ("train",), 24, 5, 56, 72)["train"]
    split = load_split_file(split_url)
    label_dir = str(root / "ir_labels")
    for image_id in split.ids:
        write_mask(ir_label_url(label_dir, image_id), ir_label_from_mask(read_mask(split.mask_url(image_id))))
    return {"split": split_url, "labels": label_dir, "ids": split.ids}


def _run(data, out_dir, label_dir=None, **overrides):
    cfg = TrainIrnConfig(**{**TINY, **overrides})
    return train_irn(cfg, label_dir or data["labels"], data["split"], str(out_dir), seed=3, device="cpu")


def test_path_index_matches_brute_force():
    radius, (height, width) = 3, (6, 9)
    paths = PathIndex(radius, (height, width))
    reach = radius - 1
    expected = {}
    for sy, sx in itertools.product(range(height - reach), range(reach, width - reach)):
        for dy, dx in itertools.product(range(height), range(-width, width)):
            if (dy == 0 and dx <= 0) or dy * dy + dx * dx >= radius * radius:
                continue
            on_path = {(sy + y) * width + sx + x
                       for y in range(min(0, dy), max(0, dy) + 1) for x in range(min(0, dx), max(0, dx) + 1)
                       if abs(dy * x - dx * y) / np.hypot(dy, dx) < 1}
            expected[(sy * width + sx, (sy + dy) * width + sx + dx)] = on_path
    found = {}
    direction = 0
    for group in paths.paths:
        for path in group:  # (L, S)
            for s in range(paths.src.numel()):
                found[(int(paths.src[s]), int(paths.dst[direction, s]))] = set(path[:, s].tolist())
            direction += 1
    assert found == expected
    assert paths.num_directions == direction and paths.dst.shape == (direction, paths.src.numel())
    dy, dx = paths.directions.t()
    assert torch.all(paths.dst - paths.src == dy[:, None] * width + dx[:, None])


def test_affinity_labels_on_hand_made_map():
    label = torch.tensor([[0, 0, 1, 1],
                          [0, 255, 1, 2],
                          [0, 0, 2, 2]])
    paths = PathIndex(2, (3, 4))  # directions (0,1), (1,-1), (1,0), (1,1); sources rows 0-1, columns 1-2
    bg_pos, fg_pos, neg = (t[0] for t in affinity_labels(label[None], paths, num_labels=3))
    direction = {tuple(d): i for i, d in enumerate(paths.directions.tolist())}
    source = {int(s): i for i, s in enumerate(paths.src)}

    def pair(y, x, d):
        return direction[d], source[y * 4 + x]

    assert bg_pos[pair(0, 1, (1, -1))] == 1 and fg_pos[pair(0, 2, (0, 1))] == 1
    assert neg[pair(0, 1, (0, 1))] == 1 and neg[pair(1, 2, (0, 1))] == 1 and neg[pair(1, 2, (1, 0))] == 1
    assert fg_pos[pair(1, 2, (1, 0))] == 0 and fg_pos[pair(0, 2, (1, 0))] == 1
    ignored = pair(0, 1, (1, 0))  # 0 -> 255
    assert bg_pos[ignored] == fg_pos[ignored] == neg[ignored] == 0
    assert torch.all(bg_pos + fg_pos + neg <= 1)
    # 2 is not a valid class when there are only 2 labels (background + 1 class)
    assert affinity_labels(label[None], paths, num_labels=2)[2][0][pair(1, 2, (0, 1))] == 0


def test_path_affinity_equals_max_over_gathered_paths():
    torch.manual_seed(0)
    paths = PathIndex(4, (10, 12))
    edge = torch.rand(2, 10, 12, requires_grad=True)
    aff = path_affinity(edge, paths)
    flat = edge.flatten(1)
    naive = torch.cat([1 - flat[:, g].amax(dim=2) for g in paths.paths], dim=1)
    assert torch.equal(aff, naive)
    grad_fast, = torch.autograd.grad(aff.sum(), edge)
    grad_naive, = torch.autograd.grad(naive.sum(), edge)
    assert torch.allclose(grad_fast, grad_naive)


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    return IRNet("resnet18").eval()


def test_forward_shapes_for_odd_sizes_and_frozen_backbone(net):
    edge, displacement = net(torch.randn(2, 3, 97, 131))
    assert edge.shape == (2, 1, 25, 33) and displacement.shape == (2, 2, 25, 33)
    net.train()
    try:
        assert not net.backbone.training and all(not p.requires_grad for p in net.backbone.parameters())
        edge, displacement = net(torch.randn(1, 3, 64, 64))
        (edge.sum() + displacement.sum()).backward()
        assert all(p.grad is None for p in net.backbone.parameters())
        assert all(p.grad is not None for group in net.parameter_groups() for p in group)
    finally:
        net.zero_grad(set_to_none=True)
        net.eval()


def test_trained_backbone_gets_gradients_and_keeps_its_batchnorm_statistics():
    torch.manual_seed(0)
    net = IRNet("resnet_mini", train_backbone=True).train()
    statistics = {k: v.clone() for k, v in net.backbone.state_dict().items() if "running" in k}
    edge, displacement = net(torch.randn(2, 3, 64, 64))
    (edge.sum() + displacement.sum()).backward()
    assert not net.backbone.training and net.backbone_parameters()
    assert all(p.grad is not None for p in net.backbone_parameters())
    assert all(torch.equal(v, net.backbone.state_dict()[k]) for k, v in statistics.items())
    assert IRNet("resnet_mini").backbone_parameters() == []


def reference_edge(net: IRNet, image: torch.Tensor, crop_size: int = 512, stride: int = 4) -> torch.Tensor:
    """The reference's ``EdgeDisplacement.forward`` on [image, flip(image)]: pad to crop_size x crop_size, crop the
    stride-4 logits, average the flips' logits, sigmoid."""
    x = torch.stack([image, image.flip(-1)])
    feat_size = (x.size(2) - 1) // stride + 1, (x.size(3) - 1) // stride + 1
    x = torch.nn.functional.pad(x, [0, crop_size - x.size(3), 0, crop_size - x.size(2)])
    edge_out = net.edge_logits(x)[..., :feat_size[0], :feat_size[1]]
    return torch.sigmoid(edge_out[0] / 2 + edge_out[1].flip(-1) / 2)[0]


def test_edge_map_any_size_range_and_flip_symmetry(net):
    image = torch.randn(3, 45, 61)
    edge = edge_map(net, image, canvas=0)
    assert edge.shape == feature_size(45, 61) == (12, 16)
    assert edge.min() >= 0 and edge.max() <= 1
    assert torch.allclose(edge_map(net, image.flip(-1), canvas=0), edge.flip(-1), atol=1e-6)
    assert edge_map(net, torch.randn(3, 20, 530), canvas=0).shape == (5, 133)
    with pytest.raises(ValueError, match="multiple of 16"):
        edge_map(net, image, canvas=100)


def test_edge_map_pads_to_the_references_canvas(net):
    image = torch.randn(3, 45, 61)  # non-square, smaller than the canvas
    edge = edge_map(net, image)
    assert edge_canvas_size(45, 61) == (512, 512)
    assert torch.allclose(edge, reference_edge(net, image), atol=1e-6)
    # GroupNorm's statistics include the padding: the multiple-of-16 padding (canvas 0) gives other values
    assert (edge - edge_map(net, image, canvas=0)).abs().max() > 1e-3
    # larger than the canvas (where the reference fails): a square of the longer side rounded up to 16
    large = torch.randn(3, 20, 530)
    assert edge_canvas_size(20, 530) == (544, 544) and edge_canvas_size(20, 530, 0) == (32, 544)
    assert torch.allclose(edge_map(net, large), reference_edge(net, large, crop_size=544), atol=1e-6)


def test_losses_are_finite_and_decrease_on_a_fixed_batch(data):
    split = load_split_file(data["split"])
    dataset = IRNTrainingSet(split, data["labels"], 48, (0.5, 1.0))
    batch = [dataset[(i, (0, 0, i))] for i in range(4)]
    images = torch.stack([b["image"] for b in batch])
    labels = torch.stack([b["label"] for b in batch])
    torch.manual_seed(0)
    model = IRNet("resnet18").train()
    paths = PathIndex(4, (12, 12))
    optimizer = torch.optim.SGD([p for g in model.parameter_groups() for p in g], lr=0.1)
    history = []
    for _ in range(6):
        losses = irn_losses(*model(images), labels, paths, len(split.class_names))
        optimizer.zero_grad()
        losses.total.backward()
        optimizer.step()
        history.append(losses.as_floats())
    assert all(np.isfinite(list(h.values())).all() for h in history)
    assert history[-1]["loss"] < history[0]["loss"]
    assert history[0]["loss_fg_pos"] > 0 and history[0]["loss_neg"] > 0


def test_augmentation_is_deterministic_and_pads_labels_with_ignore():
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (30, 50, 3), dtype=np.uint8))
    label = np.ones((30, 50), np.uint8)
    a = augment_for_irn(image, label, 64, (0.5, 1.0), np.random.default_rng([1, 2]))
    b = augment_for_irn(image, label, 64, (0.5, 1.0), np.random.default_rng([1, 2]))
    assert a[0].shape == (3, 64, 64) and a[1].shape == (16, 16)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert set(np.unique(a[1])) == {1, IGNORE_INDEX}


def test_training_writes_irn_with_mean_shift_and_is_not_redone(data, tmp_path, monkeypatch):
    manifest = _run(data, tmp_path / "run", max_steps=2)
    assert manifest["steps"] == 2 and np.isfinite(manifest["last_losses"]["loss"])
    assert json.loads(fs.read_text(str(tmp_path / "run" / "train_irn.json")))["config_hash"] == manifest["config_hash"]
    model = load_irn(manifest["checkpoint"], backbone="resnet18")
    assert not model.training
    assert model.mean_shift.running_mean.tolist() == pytest.approx(manifest["mean_shift"])
    assert any(v != 0 for v in manifest["mean_shift"])
    monkeypatch.setattr(train_module, "irn_losses", lambda *a, **k: pytest.fail("retrained a finished stage"))
    assert _run(data, tmp_path / "run", max_steps=2)["checkpoint"] == manifest["checkpoint"]


@pytest.mark.parametrize("backbone_lr_mult", [0, 0.1])
def test_killed_training_resumes_to_identical_weights(data, tmp_path, monkeypatch, backbone_lr_mult):
    def run(out_dir):
        return checkpoints.load(_run(data, out_dir, backbone_lr_mult=backbone_lr_mult)["checkpoint"])["model"]

    reference = run(tmp_path / "full")

    kill_on_call(monkeypatch, train_module, "irn_losses", 4)
    with pytest.raises(KeyboardInterrupt):
        _run(data, tmp_path / "killed", backbone_lr_mult=backbone_lr_mult)
    monkeypatch.undo()
    assert [s for s, _ in checkpoints.step_checkpoints(str(tmp_path / "killed" / "checkpoints"))] == [2]
    assert not fs.exists(str(tmp_path / "killed" / "irn.pt"))

    calls, real = [], train_module.irn_losses
    monkeypatch.setattr(train_module, "irn_losses", lambda *a, **k: calls.append(1) or real(*a, **k))
    resumed = run(tmp_path / "killed")
    assert len(calls) == 2  # steps 3 and 4 only
    for key, value in reference.items():
        assert torch.equal(value, resumed[key]), key
    torch.manual_seed(3)  # the run's seed: TINY has no weights, so this is the backbone the run started from
    initial = IRNet("resnet18").backbone.state_dict()
    assert any(not torch.equal(v, reference[f"backbone.{k}"]) for k, v in initial.items()) == (backbone_lr_mult > 0)


def test_missing_or_wrong_sized_ir_label_is_named(data, tmp_path):
    labels = tmp_path / "labels"
    for image_id in data["ids"][1:]:
        fs.write_bytes(ir_label_url(str(labels), image_id), fs.read_bytes(ir_label_url(data["labels"], image_id)))
    first = data["ids"][0]
    with pytest.raises(DataError, match=f"{first}.*{first}.png"):
        _run(data, tmp_path / "missing", label_dir=str(labels))
    write_mask(ir_label_url(str(labels), first), np.zeros((5, 7), np.uint8))
    split = load_split_file(data["split"])
    with pytest.raises(DataError, match=f"image '{first}'.*{first}.png is 7x5"):
        IRNTrainingSet(split, str(labels), 48, (0.5, 1.0))[(0, (0, 0, 0))]


def test_bad_checkpoints_are_refused_with_the_file_named(tmp_path):
    other = str(tmp_path / "cam.pt")
    checkpoints.save(other, {"model": {"w": torch.zeros(1)}, "meta": {"backbone": "resnet18"}})
    with pytest.raises(ValueError, match="cam.pt: not an IRN checkpoint"):
        load_irn(other)
    wrong = str(tmp_path / "wrong.pt")
    checkpoints.save(wrong, {"model": IRNet("resnet18").state_dict(), "meta": {"kind": "irn", "backbone": "resnet34"}})
    with pytest.raises(ValueError, match="wrong.pt: weights do not fit an IRN on resnet34"):
        load_irn(wrong)
    with pytest.raises(ValueError, match="wrong.pt: an IRN on resnet34, expected resnet50"):
        load_irn(wrong, backbone="resnet50")


def test_backbone_can_come_from_a_cam_checkpoint(tmp_path):
    cam = SFCNet(3, "resnet18")
    url = str(tmp_path / "final.pt")
    checkpoints.save(url, {"model": cam.state_dict(), "meta": {}, "step": 1})
    model = build_model(TrainIrnConfig(backbone="resnet18", weights=url))
    assert torch.equal(model.backbone.stage3[0].conv1.weight, cam.backbone.stage3[0].conv1.weight)
    with pytest.raises(ValueError, match="final.pt: the backbone of a CAM checkpoint that does not fit resnet34"):
        build_model(TrainIrnConfig(backbone="resnet34", weights=url))


def test_config_rejects_radius_too_large_for_crop():
    with pytest.raises(ValueError, match="radius 10 is too large for crop 64"):
        TrainIrnConfig(crop=64, radius=10)
    with pytest.raises(ValueError, match="multiple of 16"):
        TrainIrnConfig(crop=100, radius=5)
