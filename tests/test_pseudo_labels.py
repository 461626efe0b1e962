"""Pseudo-label functions: shapes and keys, random walk filling a region closed by boundaries, CAM thresholds."""
import numpy as np
import pytest
import torch

from models.pseudo_labels import (RandomWalkParams, cam_labels, crf_labels, edge_size, random_walk_labels,
                                  random_walk_scores)


@pytest.fixture(autouse=True)
def one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def square_scene(height=37, width=45):
    """A class-7 square whose CAM only covers its centre, and a stride-4 boundary map enclosing the square."""
    keys = np.array([0, 7])
    mask = np.zeros((height, width), bool)
    mask[12:28, 12:32] = True
    fg = np.zeros((height, width), np.float32)
    fg[15:21, 19:25] = 1.0
    cam = np.stack([1 - fg + 0.4, 2 * fg])
    edge = np.zeros(edge_size(height, width), np.float32)
    edge[2, 2:9] = edge[7, 2:9] = edge[2:8, 2] = edge[2:8, 8] = 1.0  # interior: rows 12..27, cols 12..31
    return keys, mask, torch.from_numpy(cam), torch.from_numpy(edge)


def test_random_walk_fills_the_region_closed_by_boundaries():
    keys, mask, cam, edge = square_scene()
    labels = random_walk_labels(keys, cam, cam, edge)
    assert labels.dtype == np.uint8 and labels.shape == mask.shape
    assert set(np.unique(labels)) == {0, 7}
    assert (labels == 7)[mask].mean() > 0.9 and (labels[14:26, 14:30] == 7).all()
    assert (labels == 0)[~mask].mean() > 0.97
    assert (cam_labels(keys, cam.numpy(), cam.numpy())[mask] == 7).mean() < 0.2  # the CAM alone covers little


def test_scores_follow_the_reference_branches():
    keys, mask, cam, edge = square_scene()
    scores = random_walk_scores(keys, cam, cam, edge)
    assert scores.shape == (2, *mask.shape)
    single = random_walk_scores(keys, cam, cam, edge, RandomWalkParams(double_power=False))
    assert not torch.allclose(scores, single)
    # branch A's background is the constant 0.25; both branches are divided by their maximum
    assert scores.max() <= 2 + 1e-5 and scores[0].min() >= 0.25 - 1e-6
    with pytest.raises(ValueError, match="edge map"):
        random_walk_scores(keys, cam, cam, edge[:-1])
    with pytest.raises(ValueError, match="keys"):
        random_walk_scores(np.array([0, 1, 2]), cam, cam, edge)


def test_background_only_image_is_all_background():
    cam = torch.rand(1, 20, 24)
    assert (random_walk_labels(np.array([0]), cam, cam, torch.rand(*edge_size(20, 24))) == 0).all()


def test_cam_labels_thresholds_and_keys():
    rng = np.random.default_rng(0)
    keys = np.array([0, 4, 15])
    proto_cam, cam = rng.random((3, 9, 11), dtype=np.float32), rng.random((3, 9, 11), dtype=np.float32)
    np.testing.assert_array_equal(cam_labels(keys, proto_cam, cam, 0.3), keys[(cam + 0.3 * proto_cam).argmax(0)])
    assert (cam_labels(keys, proto_cam, cam, 0.3, bg_threshold=1.0) == 0).all()
    assert set(np.unique(cam_labels(keys, proto_cam, cam, 0.3, bg_threshold=0.0))) == {4, 15}


def test_crf_labels_are_kept_classes():
    keys, mask, cam, _ = square_scene()
    image = np.where(mask[..., None], 200, 40).astype(np.uint8).repeat(3, axis=2)
    labels = crf_labels(image, keys, cam.numpy(), cam.numpy())
    assert labels.dtype == np.uint8 and labels.shape == mask.shape and set(np.unique(labels)) <= {0, 7}
