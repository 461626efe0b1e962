"""Sparse random walk: golden parity with the reference, equality with a dense reference-style implementation."""
import numpy as np
import pytest
import torch

from models.random_walk import path_offsets, random_walk, search_offsets, transition_matrix
from tests.golden_data import load_golden


def dense_random_walk(x: np.ndarray, edge: np.ndarray, radius: int, beta: float, exp_times: int) -> np.ndarray:
    """The reference's algorithm written independently, in float64: dense affinity over all pixel pairs closer than
    ``radius``, path = pixels of the pair's bounding box within distance 1 of the line, column-normalised, squared
    ``exp_times`` times."""
    height, width = edge.shape
    coords = [(y, x_) for y in range(height) for x_ in range(width)]
    affinity = np.eye(height * width)
    for i, (y1, x1) in enumerate(coords):
        for j, (y2, x2) in enumerate(coords):
            dy, dx = y2 - y1, x2 - x1
            if i == j or dy * dy + dx * dx >= radius ** 2:
                continue
            on_path = [edge[y, x_] for y in range(min(y1, y2), max(y1, y2) + 1)
                       for x_ in range(min(x1, x2), max(x1, x2) + 1)
                       if (dy * (x_ - x1) - dx * (y - y1)) ** 2 < dy * dy + dx * dx]
            affinity[i, j] = 1 - max(on_path)
    transition = affinity ** beta
    transition /= transition.sum(axis=0, keepdims=True)
    for _ in range(exp_times):
        transition = transition @ transition
    flat = (x * (1 - edge)).reshape(x.shape[0], -1)
    return (flat @ transition).reshape(x.shape)


def test_matches_the_golden_reference_output():
    g = load_golden("random_walk")
    out = random_walk(torch.from_numpy(g["cams"]), torch.from_numpy(g["edge"]), int(g["radius"]), float(g["beta"]),
                      int(g["exp_times"]))
    assert out.dtype == torch.float32 and out.shape == g["cams"].shape
    np.testing.assert_allclose(out.numpy(), g["rw"][:, 0], rtol=1e-4, atol=5e-5)


@pytest.mark.parametrize("height,width,radius,exp_times", [(7, 9, 5, 3), (9, 4, 3, 8), (1, 11, 5, 4), (6, 6, 4, 2)])
def test_sparse_equals_dense_on_random_maps(height, width, radius, exp_times):
    rng = np.random.default_rng(height * 100 + width)
    x = rng.random((3, height, width))
    edge = rng.random((height, width)) ** 3
    dense = dense_random_walk(x, edge, radius, 10, exp_times)
    sparse64 = random_walk(torch.from_numpy(x), torch.from_numpy(edge), radius, 10, exp_times).numpy()
    np.testing.assert_allclose(sparse64, dense, rtol=1e-9, atol=1e-12)
    sparse32 = random_walk(torch.from_numpy(x).float(), torch.from_numpy(edge).float(), radius, 10, exp_times)
    np.testing.assert_allclose(sparse32.numpy(), dense, rtol=1e-4, atol=1e-5)


def test_offsets_and_memory_are_those_of_the_reference():
    assert len(search_offsets(5)) == 34  # IRN's radius-5 neighbourhood: 34 directions, 68 neighbours
    assert path_offsets(0, 3) == ((0, 0), (0, 1), (0, 2), (0, 3))
    assert set(path_offsets(2, 2)) == {(0, 0), (0, 1), (1, 0), (1, 1), (1, 2), (2, 1), (2, 2)}
    edge = torch.rand(40, 50)
    matrix = transition_matrix(edge)
    assert matrix.layout == torch.sparse_csr and matrix.shape == (2000, 2000)
    assert matrix._nnz() <= 2000 * (2 * 34 + 1)  # linear in the number of pixels
    np.testing.assert_allclose(matrix.to_dense().sum(1).numpy(), 1.0, atol=1e-5)


def test_walk_stays_inside_regions_closed_by_edges():
    edge = torch.zeros(12, 12)
    edge[:, 6] = 1.0
    x = torch.zeros(1, 12, 12)
    x[0, 3, 2] = 1.0
    out = random_walk(x, edge)[0]
    assert out[:, 7:].abs().max() < 1e-6 and out[:, :6].min() > 0
    assert out.max() <= 1.0  # each step is a weighted average
    assert (out[:, :6] - out[:, :6].mean()).abs().max() < 1e-3 * out[:, :6].mean()  # 256 steps: converged


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_equals_cpu():
    g = load_golden("random_walk")
    x, edge = torch.from_numpy(g["cams"]), torch.from_numpy(g["edge"])
    np.testing.assert_allclose(random_walk(x.cuda(), edge.cuda()).cpu().numpy(), random_walk(x, edge).numpy(),
                               rtol=1e-4, atol=5e-5)
