"""What the random walk must do, not just one step of it: on a fixed scene with ground-truth class boundaries it
turns blurred, misplaced CAM peaks into object masks. The same test run with a transposed or unnormalised
transition matrix, or without the boundary map, falls below the margin (checked here too), so it can fail."""
import pytest
import torch

import models.random_walk as random_walk_module
from models.metrics import ConfusionMatrix
from models.random_walk import affinity_pairs, random_walk

SIZE = 40
MARGIN = 20.0  # mIoU points the walk must add to the CAM's argmax (measured: 56.3 -> 89.7)
NAMES = ["background", "rectangle", "disc"]


def scene() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ground truth (H, W), CAMs (3, H, W), boundary map (H, W)): a rectangle and a disc; each CAM is a Gaussian
    blob off the object's centre, too small for the rectangle and spilling over the disc; background constant."""
    y, x = torch.meshgrid(torch.arange(SIZE), torch.arange(SIZE), indexing="ij")
    truth = torch.zeros(SIZE, SIZE, dtype=torch.long)
    truth[6:22, 5:19] = 1
    truth[(y - 27) ** 2 + (x - 27) ** 2 < 64] = 2

    def blob(cy: int, cx: int, sigma: float) -> torch.Tensor:
        return torch.exp(-((y - cy) ** 2 + (x - cx) ** 2) / (2 * sigma ** 2))

    cams = torch.stack([torch.full((SIZE, SIZE), 0.3), blob(11, 10, 4.0), blob(25, 29, 3.0)])
    edge = torch.zeros(SIZE, SIZE)
    edge[:, 1:] = (truth[:, 1:] != truth[:, :-1]).float()
    edge[1:] = torch.maximum(edge[1:], (truth[1:] != truth[:-1]).float())
    return truth, cams, edge


def miou(truth: torch.Tensor, maps: torch.Tensor) -> float:
    matrix = ConfusionMatrix(len(NAMES))
    matrix.update(truth.numpy(), maps.argmax(0).numpy())
    return 100 * matrix.scores(NAMES)["miou"]


def gain(edge_of=lambda edge: edge) -> float:
    """mIoU of the walked CAMs minus that of the CAMs (radius 5, beta 10, 2**6 steps)."""
    truth, cams, edge = scene()
    walked = random_walk(cams, edge_of(edge), radius=5, beta=10, exp_times=6)
    return miou(truth, walked) - miou(truth, cams)


def test_the_walk_fills_objects_up_to_their_boundaries():
    assert gain() >= MARGIN


def _transposed(edge, radius=5, beta=10):
    return _correct(edge, radius, beta).to_dense().T.to_sparse_csr()


def _unnormalised(edge, radius=5, beta=10):
    src, dst, affinity = affinity_pairs(edge, radius)
    n = edge.numel()
    diagonal = torch.arange(n)
    weights = torch.cat([affinity, affinity, torch.ones(n)]) ** beta
    indices = torch.stack([torch.cat([src, dst, diagonal]), torch.cat([dst, src, diagonal])])
    return torch.sparse_coo_tensor(indices, weights, (n, n), check_invariants=False).coalesce().to_sparse_csr()


_correct = random_walk_module.transition_matrix


@pytest.mark.parametrize("broken", [_transposed, _unnormalised], ids=["transposed", "unnormalised"])
def test_a_broken_transition_matrix_misses_the_margin(monkeypatch, broken):
    monkeypatch.setattr(random_walk_module, "transition_matrix", broken)
    assert gain() < MARGIN


def test_ignoring_the_boundary_map_misses_the_margin():
    assert gain(torch.zeros_like) < MARGIN
