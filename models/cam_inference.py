"""Multi-scale + flip CAM inference and fusion (docs/method.md section 6), and the inference loop of the CAM stage."""
from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from functools import reduce

import numpy as np
import torch
import torch.nn.functional as F

from models.backbone import fold_batchnorm
from models.sfc import SFCNet

DEFAULT_SCALES = (1.0, 0.5, 1.5, 2.0)
BACKGROUND_OFFSET = 0.4

CamWriter = Callable[[str, np.ndarray, np.ndarray, np.ndarray], None]
"""Receives (image id, keys, P, K) of one image, as numpy arrays."""


def fuse_scales(maps: Sequence[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
    """Upsample per-scale (1 + C, h, w) maps to ``size`` (bilinear), sum, max-normalise each channel, and apply
    the background trick: background + 0.4, foreground x 2."""
    total = reduce(torch.add, (F.interpolate(m[None], size, mode="bilinear", align_corners=False)[0] for m in maps))
    total = total / (total.flatten(1).max(dim=1)[0][:, None, None] + 1e-5)
    return total + F.pad(total[1:], (0, 0, 0, 0, 1, 0), value=BACKGROUND_OFFSET)


@torch.inference_mode()
def multiscale_cams(
    model: SFCNet, pairs: Sequence[torch.Tensor], label: torch.Tensor, size: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """CAMs of one image from its per-scale [image, hflip(image)] pairs (2, 3, h_s, w_s).

    ``label`` is the (C,) multi-hot foreground label. Returns ``keys`` (background + present classes), and the
    fused prototype CAM P and PCM classifier CAM K restricted to ``keys``, each (len(keys), H, W). Every step of
    :func:`fuse_scales` is per channel, so the absent classes are dropped before upsampling (the same numbers as
    fusing all channels and selecting ``keys`` afterwards, at a fraction of the work).
    """
    label_bg = torch.cat([label.new_ones(1), label])
    keys = torch.cat([torch.zeros(1, dtype=torch.long, device=label.device), torch.nonzero(label).flatten() + 1])
    protos, cams = [], []
    for pair in pairs:
        out = model.forward_cams(pair, label_bg)
        protos.append(out.proto_cam[keys])
        cams.append(out.cam[keys])
    return keys, fuse_scales(protos, size), fuse_scales(cams, size)


def prepare_for_inference(model: SFCNet, device: torch.device) -> SFCNet:
    """The network as CAM inference runs it: eval mode on ``device``, BatchNorm folded into the convolutions
    (~1.1x on CPU) and, on CUDA, channels_last weights; same outputs up to float rounding."""
    fold_batchnorm(model.eval().backbone)
    model = model.to(device)
    return model.to(memory_format=torch.channels_last) if device.type == "cuda" else model


def _host_cams(
    model: SFCNet, item: dict, device: torch.device, amp: bool
) -> tuple[str, np.ndarray, np.ndarray, np.ndarray]:
    """(id, keys, P, K) of one inference item on the host; P and K as float16 from CUDA (half the copy)."""
    layout = torch.channels_last if device.type == "cuda" else torch.contiguous_format
    pairs = [p.to(device, non_blocking=True).contiguous(memory_format=layout) for p in item["pairs"]]
    with torch.autocast(device.type, enabled=amp):
        keys, proto, cam = multiscale_cams(model, pairs, item["label"].to(device), tuple(item["size"]))
    maps = torch.stack([proto, cam]).to(torch.float16 if device.type == "cuda" else torch.float32).cpu().numpy()
    return item["id"], keys.cpu().numpy(), maps[0], maps[1]


def infer_to_writer(
    model: SFCNet,
    items: Iterable[dict],
    write: CamWriter,
    device: torch.device,
    amp: bool = False,
    cpu_streams: int = 1,
) -> dict[str, float]:
    """Run :func:`multiscale_cams` over ``items`` (dicts with id, label, size and per-scale pairs, e.g. from a
    DataLoader over ``storage.datasets.cam_inference.MultiScaleSet``) and hand every image to ``write``.

    ``write`` runs on a background thread, in input order, one image at a time. On CPU, ``cpu_streams`` images
    are computed at once, each with ``torch.get_num_threads() // cpu_streams`` intra-op threads: small feature
    maps parallelise poorly inside one convolution, whole images do not (CUDA always runs one stream). ``amp``:
    fp16 autocast, CUDA only. An exception stops the loop after the images before the failing one are written.
    Returns the seconds the calling thread waited for the items, the computation and the writer.
    """
    cuda = device.type == "cuda"
    streams = 1 if cuda else max(1, cpu_streams)
    threads = torch.get_num_threads()
    waits = dict.fromkeys(("items", "compute", "write"), 0.0)
    in_flight: deque[Future] = deque()
    writing: Future | None = None

    def hand_over_oldest() -> None:
        nonlocal writing
        t0 = time.perf_counter()
        result = in_flight.popleft().result()
        t1 = time.perf_counter()
        if writing is not None:
            writing.result()  # one image queued for writing at most: bounded memory, errors surface
        waits["compute"] += t1 - t0
        waits["write"] += time.perf_counter() - t1
        writing = writer.submit(write, *result)

    torch.set_num_threads(max(1, threads // streams))
    try:
        with ThreadPoolExecutor(streams) as compute, ThreadPoolExecutor(1) as writer:
            iterator = iter(items)
            while True:
                t0 = time.perf_counter()
                item = next(iterator, None)
                waits["items"] += time.perf_counter() - t0
                if item is None:
                    break
                in_flight.append(compute.submit(_host_cams, model, item, device, amp and cuda))
                if len(in_flight) > streams:  # one item queued beyond the busy streams
                    hand_over_oldest()
            while in_flight:
                hand_over_oldest()
            t0 = time.perf_counter()
            if writing is not None:
                writing.result()
            waits["write"] += time.perf_counter() - t0
    finally:
        torch.set_num_threads(threads)
    return waits
