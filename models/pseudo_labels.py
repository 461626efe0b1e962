"""Pseudo labels from the stored CAMs (docs/method.md section 7.3): random walk on an IRN boundary map, dense CRF, or
the plain CAM argmax. Pure torch/numpy (the CRF path needs pydensecrf, imported lazily by ``models.crf``)."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from models.cam_eval import threshold_labels
from models.crf import CrfParams, crf_from_labels
from models.random_walk import random_walk


@dataclass(frozen=True)
class RandomWalkParams:
    """The reference's ``make_seg_labels`` constants."""

    proto_weight: float = 0.3
    power: float = 1.3
    bg: float = 0.25
    double_power: bool = True
    radius: int = 5
    beta: float = 10
    exp_times: int = 8


def edge_size(height: int, width: int) -> tuple[int, int]:
    """The size of IRN's stride-4 boundary map of an (H, W) image."""
    return (height - 1) // 4 + 1, (width - 1) // 4 + 1


def _upsample_normalised(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """x4 bilinear, cropped to ``size``, divided by the global maximum."""
    up = F.interpolate(maps[None], scale_factor=4, mode="bilinear", align_corners=False)[0, :, :size[0], :size[1]]
    return up / up.max().clamp_min(1e-12)


def random_walk_scores(keys: np.ndarray, proto_cam: torch.Tensor, cam: torch.Tensor, edge: torch.Tensor,
                       params: RandomWalkParams = RandomWalkParams()) -> torch.Tensor:
    """The summed scores of the reference's two random-walk branches, (len(keys), H, W).

    ``cam`` (K) and ``proto_cam`` (P) are the stored (len(keys), H, W) CAMs (background trick included), ``edge``
    the (h/4, w/4) boundary map in [0, 1]. Scores are ``(K + w P)`` resized to the edge size and raised to
    ``power``. Branch A walks the foreground maps and prepends a constant background ``bg``; branch B walks all
    maps, background included, raised to ``power`` once more when ``double_power`` (the reference's behaviour).
    Each branch is upsampled x4, cropped and divided by its global maximum.
    """
    if cam.shape != proto_cam.shape or cam.ndim != 3 or cam.shape[0] != len(keys):
        raise ValueError(f"CAMs {tuple(cam.shape)} / {tuple(proto_cam.shape)} do not match {len(keys)} keys")
    size = (cam.shape[1], cam.shape[2])
    if tuple(edge.shape) != edge_size(*size):
        raise ValueError(f"edge map {tuple(edge.shape)} does not match CAMs of size {size} "
                         f"(expected {edge_size(*size)})")
    scores = F.interpolate((cam + params.proto_weight * proto_cam)[None], size=tuple(edge.shape), mode="bilinear",
                           align_corners=False)[0] ** params.power
    walked_all = scores ** params.power if params.double_power else scores
    foreground = len(keys) - 1
    walked = random_walk(torch.cat([scores[1:], walked_all]), edge, params.radius, params.beta, params.exp_times)
    branch_b = _upsample_normalised(walked[foreground:], size)
    branch_a = torch.full_like(branch_b, params.bg)
    if foreground:
        branch_a[1:] = _upsample_normalised(walked[:foreground], size)
    return branch_a + branch_b


def random_walk_labels(keys: np.ndarray, proto_cam: torch.Tensor, cam: torch.Tensor, edge: torch.Tensor,
                       params: RandomWalkParams = RandomWalkParams()) -> np.ndarray:
    """(H, W) uint8 class indices: ``keys[argmax]`` of :func:`random_walk_scores`."""
    index = random_walk_scores(keys, proto_cam, cam, edge, params).argmax(0).cpu().numpy()
    return np.asarray(keys)[index].astype(np.uint8)


def upscaled_walk_labels(keys: np.ndarray, proto_cam: torch.Tensor, cam: torch.Tensor,
                         edge_at: Callable[[tuple[int, int]], torch.Tensor], params: RandomWalkParams,
                         scale: float) -> np.ndarray:
    """:func:`random_walk_labels` with both CAMs first upscaled by ``scale`` (bilinear) and walked on
    ``edge_at(size)``, the boundary map of the image at that size; the walked scores are brought back to the CAMs'
    size (bilinear) before the argmax. ``scale`` 1 is :func:`random_walk_labels` itself."""
    height, width = cam.shape[1:]
    size = (round(height * scale), round(width * scale))
    if size == (height, width):
        return random_walk_labels(keys, proto_cam, cam, edge_at(size), params)
    proto_cam, cam = (F.interpolate(x[None], size=size, mode="bilinear", align_corners=False)[0]
                      for x in (proto_cam, cam))
    scores = random_walk_scores(keys, proto_cam, cam, edge_at(size), params)
    scores = F.interpolate(scores[None], size=(height, width), mode="bilinear", align_corners=False)[0]
    return np.asarray(keys)[scores.argmax(0).cpu().numpy()].astype(np.uint8)


def cam_label_index(proto_cam: np.ndarray, cam: np.ndarray, proto_weight: float,
                    bg_threshold: float | None) -> np.ndarray:
    """(H, W) channel indices (not class indices) of the fused CAM ``K + w P``.

    ``bg_threshold`` None: argmax with the stored background channel (the reference's rule). A number: the
    foreground scores brought back to [0, 1] (divided by 2 (1 + w), undoing the stored x2) against that constant
    background, as ``tasks.eval_cam`` sweeps it, so its best threshold can be used here.
    """
    fused = torch.from_numpy(cam + proto_weight * proto_cam)
    if bg_threshold is None:
        return fused.argmax(0).numpy()
    return threshold_labels(fused[1:] / (2.0 * (1.0 + proto_weight)), bg_threshold).numpy()


def cam_labels(keys: np.ndarray, proto_cam: np.ndarray, cam: np.ndarray, proto_weight: float = 0.3,
               bg_threshold: float | None = None) -> np.ndarray:
    """(H, W) uint8 class indices of the fused CAM, no refinement (see :func:`cam_label_index`)."""
    return np.asarray(keys)[cam_label_index(proto_cam, cam, proto_weight, bg_threshold)].astype(np.uint8)


def crf_labels(image: np.ndarray, keys: np.ndarray, proto_cam: np.ndarray, cam: np.ndarray, proto_weight: float = 0.3,
               bg_threshold: float | None = None, gt_prob: float = 0.7,
               params: CrfParams = CrfParams()) -> np.ndarray:
    """(H, W) uint8 class indices: the fused CAM's label map (:func:`cam_label_index`) refined by a dense CRF whose
    unary comes from those hard labels with confidence ``gt_prob`` (the reference's ``crf_inference_label``,
    as in its IR labels and its COCO path)."""
    index = cam_label_index(proto_cam, cam, proto_weight, bg_threshold)
    refined = crf_from_labels(image, index, len(keys), gt_prob, params)
    return np.asarray(keys)[refined].astype(np.uint8)
