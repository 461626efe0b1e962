"""IRN's random-walk propagation of CAMs over an inter-pixel affinity from a boundary map (docs/method.md section 7.3),
with a sparse transition matrix: memory grows linearly with the number of pixels.

The reference builds the dense (HW, HW) affinity, raises it to ``beta``, column-normalises it into T and squares
T ``exp_times`` times (T^(2^exp_times)) before one product ``x @ T``. Here T stays a sparse CSR matrix with one
row per pixel and at most ``2 * len(search_offsets(radius)) + 1`` entries per row, and it is applied
``2 ** exp_times`` times. Squaring a sparse T does not pay: the support of T^2 has about four times the entries
(twice the radius), so the total work per propagated step grows instead of shrinking (bench/random_walk.py).

Precision: float32 in, float32 out; 256 sequential sparse products put the result within ~1e-4 of a float64
run (the reference's float32 squaring is within ~4e-5); pass float64 maps for more. On CPU these small sparse
products run fastest on one thread per process (on a busy 2-core machine, 2 threads were 10-20x slower): the
pseudo-label stage runs one single-threaded worker process per core.
"""
from __future__ import annotations

import warnings
from functools import lru_cache, reduce

import torch


@lru_cache(maxsize=8)
def search_offsets(radius: int) -> tuple[tuple[int, int], ...]:
    """The (dy, dx) pairs linked to a pixel, one of each +-pair (IRN's half-plane: dy > 0, or dy == 0 and dx > 0),
    with dy^2 + dx^2 < radius^2 and |dy|, |dx| < radius."""
    if radius < 2:
        raise ValueError(f"random-walk radius must be >= 2, got {radius}")
    offsets = [(0, dx) for dx in range(1, radius)]
    offsets += [(dy, dx) for dy in range(1, radius) for dx in range(-radius + 1, radius)
                if dy * dy + dx * dx < radius ** 2]
    return tuple(offsets)


@lru_cache(maxsize=64)
def path_offsets(dy: int, dx: int) -> tuple[tuple[int, int], ...]:
    """The pixels on the way from (0, 0) to (dy, dx), both ends included: those of the bounding box whose distance
    to the line through the two ends is below 1."""
    length_sq = dy * dy + dx * dx
    return tuple((y, x) for y in range(min(0, dy), max(0, dy) + 1) for x in range(min(0, dx), max(0, dx) + 1)
                 if (dy * x - dx * y) ** 2 < length_sq)


def affinity_pairs(edge: torch.Tensor, radius: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(src, dst, affinity) of every linked pair of pixels inside the (H, W) ``edge`` map, one direction each:
    flat indices and ``1 - max(edge on the path)``. Pairs leaving the image do not exist (the reference pads the
    edge map with 1, which gives them affinity 0)."""
    height, width = edge.shape
    index = torch.arange(height * width, device=edge.device).view(height, width)
    sources, targets, values = [], [], []
    for dy, dx in search_offsets(radius):
        rows, cols = height - dy, width - abs(dx)
        if rows <= 0 or cols <= 0:
            continue
        x0 = max(0, -dx)  # first source column
        windows = (edge[py:py + rows, x0 + px:x0 + px + cols] for py, px in path_offsets(dy, dx))
        highest = reduce(torch.maximum, windows)  # the path holds (0, 0) at least
        src = index[:rows, x0:x0 + cols]
        sources.append(src.reshape(-1))
        targets.append((src + dy * width + dx).reshape(-1))
        values.append(1 - highest.reshape(-1))
    if not sources:
        empty = edge.new_zeros(0)
        return empty.long(), empty.long(), empty
    return torch.cat(sources), torch.cat(targets), torch.cat(values)


def transition_matrix(edge: torch.Tensor, radius: int = 5, beta: float = 10) -> torch.Tensor:
    """The sparse (HW, HW) CSR operator M with ``M @ y`` = one random-walk step of a (HW, C) column stack ``y``.

    M = D^-1 S with S = affinity^beta (symmetric, self-affinity 1) and D its row sums: the transpose of the
    reference's column-normalised T, so that ``M @ y`` equals ``(y^T @ T)^T``.
    """
    if edge.ndim != 2:
        raise ValueError(f"edge map must be (H, W), got {tuple(edge.shape)}")
    src, dst, affinity = affinity_pairs(edge, radius)
    n = edge.numel()
    diagonal = torch.arange(n, device=edge.device)
    rows = torch.cat([src, dst, diagonal])
    cols = torch.cat([dst, src, diagonal])
    weights = torch.cat([affinity, affinity, torch.ones(n, dtype=edge.dtype, device=edge.device)]) ** beta
    degree = torch.zeros(n, dtype=edge.dtype, device=edge.device).index_add_(0, rows, weights)
    matrix = torch.sparse_coo_tensor(torch.stack([rows, cols]), weights / degree[rows], (n, n),
                                     check_invariants=False).coalesce()
    with warnings.catch_warnings():  # torch flags CSR as beta on first use
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta", category=UserWarning)
        return matrix.to_sparse_csr()


def random_walk(x: torch.Tensor, edge: torch.Tensor, radius: int = 5, beta: float = 10,
                exp_times: int = 8) -> torch.Tensor:
    """Propagate the maps ``x`` (C, H, W) over the affinity of ``edge`` (H, W) in [0, 1]: ``2 ** exp_times``
    random-walk steps applied to ``x * (1 - edge)``. Returns (C, H, W) in the dtype and on the device of ``x``."""
    if x.ndim != 3 or x.shape[1:] != edge.shape:
        raise ValueError(f"random walk needs maps (C, H, W) and an edge map (H, W) of the same size, got "
                         f"{tuple(x.shape)} and {tuple(edge.shape)}")
    if exp_times < 0:
        raise ValueError(f"exp_times must be >= 0, got {exp_times}")
    edge = edge.to(x.dtype)
    channels, height, width = x.shape
    operator = transition_matrix(edge, radius, beta)
    y = (x * (1 - edge)).reshape(channels, height * width).T.contiguous()
    for _ in range(2 ** exp_times):
        y = operator @ y
    return y.T.reshape(channels, height, width)
