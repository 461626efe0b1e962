"""Pseudo-label functions: shapes and keys, random walk filling a region closed by boundaries, CAM thresholds."""
import numpy as np
import pytest
import torch

from models.pseudo_labels import (
    RandomWalkParams,
    cam_labels,
    crf_labels,
    edge_size,
    random_walk_labels,
    random_walk_scores,
)


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


def test_threshold_path_by_hand():
    """Four pixels, w = 0.3: foreground scores (K + w P) / (2 (1 + w)) = (K + 0.3 P) / 2.6 against the threshold;
    the stored background (5.0 everywhere) is not used. Each pixel flips under one plausible mistake."""
    keys = np.array([0, 4, 15])
    cam = np.array([[[5.0, 5.0, 5.0, 5.0]], [[1.2, 1.6, 1.2, 0.0]], [[0.0, 0.0, 1.5, 1.8]]], np.float32)
    proto_cam = np.array([[[5.0, 5.0, 5.0, 5.0]], [[1.0, 1.4, 1.8, 0.0]], [[0.0, 0.0, 0.3, 0.2]]], np.float32)
    # pixel 0: class 4 at 1.5 / 2.6 = 0.577 < 0.6 (dividing by 2 or by 1.3 alone would make it class 4)
    # pixel 1: class 4 at 2.02 / 2.6 = 0.777 (dividing by 2 x 1.3^2 = 3.38 would give 0.598: background)
    # pixel 2: class 4 at 1.74 / 2.6 = 0.669 beats class 15 at 1.59 / 2.6 = 0.612 (without P: 0.6 vs 0.75)
    # pixel 3: class 15 at 1.86 / 2.6 = 0.715 (P and K swapped: 0.74 / 2.6 = 0.285, background)
    assert cam_labels(keys, proto_cam, cam, 0.3, bg_threshold=0.6).tolist() == [[0, 4, 4, 15]]
    assert cam_labels(keys, proto_cam, cam, 0.3, bg_threshold=0.55).tolist() == [[4, 4, 4, 15]]
    assert cam_labels(keys, proto_cam, cam, 0.3).tolist() == [[0, 0, 0, 0]]  # the stored background wins


def test_random_walk_constants_by_hand():
    """Maps constant per channel stay constant under the walk (its transition matrix is column-stochastic), so
    the scores follow from the constants alone. Fused K + 0.3 P: background 1.4 + 0.3 = 1.7, class 1.0 + 0.6 = 1.6.
    Branch A: the walked class map divided by its maximum is 1, the background the constant 0.25. Branch B: the
    maps raised to 1.3 twice, 1.7^1.69 and 1.6^1.69, divided by the larger one. Scores: background 0.25 + 1,
    class 1 + (1.6 / 1.7)^1.69 = 1.9026."""
    keys = np.array([0, 9])
    height, width = 9, 13
    cam = torch.stack([torch.full((height, width), 1.4), torch.full((height, width), 1.0)])
    proto_cam = torch.stack([torch.full((height, width), 1.0), torch.full((height, width), 2.0)])
    edge = torch.zeros(edge_size(height, width))
    ratio = 1.6 / 1.7
    cases = {RandomWalkParams(): (1.25, 1 + ratio ** 1.69),
             RandomWalkParams(double_power=False): (1.25, 1 + ratio ** 1.3),
             RandomWalkParams(bg=0.1, power=1.0): (1.1, 1 + ratio ** 1.0)}
    for params, (background, foreground) in cases.items():
        scores = random_walk_scores(keys, proto_cam, cam, edge, params)
        np.testing.assert_allclose(scores[0].numpy(), background, atol=1e-4)
        np.testing.assert_allclose(scores[1].numpy(), foreground, atol=1e-4)
    assert round(1 + ratio ** 1.69, 4) == 1.9026
