"""Images/s of multi-scale + flip segmentation inference: the batched canvas path of ``tasks/eval_seg.py`` against a
per-image, per-scale loop, in the same process on the same network and images.

per-scale loop  per image at its own size, per scale: bilinear resize, one forward of [image, flip] (batch 2),
                flip-back average; scales fused by max at the largest logits size, upsampled to the image, softmax,
                argmax, host copy (deeplab-pytorch's MSC inference, one image at a time, plus flip).
batched         ``--batch`` images on ``--canvas`` x ``--canvas`` zero-padded canvases (Caffe DeepLab's 513 test
                input): per scale one forward of all images and their flips (``models.seg_inference``), then the same
                fusion, crop, softmax and argmax per image.

Both paths see the same host tensors (decoding and CRF are not timed), run with the same precision (fp16 autocast +
channels_last with ``--amp``, the CUDA default), after an untimed warm-up pass over the first images. The network is
a randomly initialised DeepLab-v2 ResNet-101 with calibrated frozen BatchNorm folded into the convolutions (as
eval_seg does). Agreement = share of pixels whose argmax class is the same in both paths (padding changes the
context the network sees at the image border, so it is close to but not exactly 1).

    python bench/seg_infer.py                       # GPU: 64 VOC-sized images, canvas 513, batch 8, amp
    python bench/seg_infer.py --device cpu          # 8 images of 96-128 px, canvas 128, batch 4, fp32

Uses torch, torchvision and numpy only. Results go to bench/results/seg_infer-<cpu|gpu>.json and are printed.
GPU target: batched >= 2x the per-scale loop.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.seg_train import calibrated_segmenter  # noqa: E402
from models.backbone import fold_batchnorm  # noqa: E402
from models.seg_inference import canvas_probabilities, multiscale_logits  # noqa: E402

SCALES = (0.5, 0.75, 1.0)
TARGET_SPEEDUP = 2.0


def make_images(n: int, low: int, high: int, seed: int) -> list[torch.Tensor]:
    """``n`` normalised (3, H, W) images: smooth random colour fields, VOC-like shapes (60 % at the 4:3 long side)."""
    rng = np.random.default_rng(seed)
    images = []
    for _ in range(n):
        if rng.random() < 0.6:
            short = max(low, round(high * 0.75))
            height, width = (short, high) if rng.random() < 0.7 else (high, short)
        else:
            height, width = (int(v) for v in rng.integers(low, high + 1, size=2))
        coarse = torch.from_numpy(rng.normal(size=(1, 3, 6, 6)).astype(np.float32))
        images.append(F.interpolate(coarse, size=(height, width), mode="bicubic", align_corners=False)[0])
    return images


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


@torch.no_grad()
def per_scale_loop(model, images: list[torch.Tensor], device: torch.device, layout) -> list[np.ndarray]:
    out = []
    for image in images:
        x = image[None].to(device).contiguous(memory_format=layout)
        per_scale = []
        for scale in SCALES:
            scaled = x if scale == 1.0 else F.interpolate(x, scale_factor=scale, mode="bilinear",
                                                          align_corners=False)
            logits = model(torch.cat([scaled, scaled.flip(-1)])).float()
            per_scale.append((logits[:1] + logits[1:].flip(-1)) / 2)
        size = max((x.shape[2:] for x in per_scale), key=lambda s: s[0] * s[1])
        fused = torch.stack([F.interpolate(x, size=size, mode="bilinear", align_corners=False)
                             for x in per_scale]).amax(0)
        probs = torch.softmax(F.interpolate(fused, size=image.shape[1:], mode="bilinear", align_corners=False), 1)
        out.append(probs[0].argmax(0).to(torch.uint8).cpu().numpy())
    return out


@torch.no_grad()
def batched(model, images: list[torch.Tensor], device: torch.device, layout, canvas: int,
            batch: int) -> list[np.ndarray]:
    out = []
    for start in range(0, len(images), batch):
        chunk = images[start:start + batch]
        padded = torch.zeros(len(chunk), 3, canvas, canvas)
        for index, image in enumerate(chunk):
            padded[index, :, :image.shape[1], :image.shape[2]] = image
        logits = multiscale_logits(model, padded.to(device).contiguous(memory_format=layout), SCALES, True, "max")
        sizes = [tuple(image.shape[1:]) for image in chunk]
        for probs in canvas_probabilities(logits, (canvas, canvas), sizes, sizes):
            out.append(probs.argmax(0).to(torch.uint8).cpu().numpy())
    return out


def timed(fn, device: torch.device, amp: bool) -> tuple[list[np.ndarray], float]:
    with torch.autocast(device.type, dtype=torch.float16, enabled=amp):
        synchronize(device)
        start = time.perf_counter()
        result = fn()
        synchronize(device)
    return result, time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cuda = torch.cuda.is_available()
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if cuda else "cpu")
    parser.add_argument("--backbone", default="resnet101")
    parser.add_argument("--images", type=int, default=None, help="default 64 on GPU, 8 on CPU")
    parser.add_argument("--min-size", type=int, default=None, help="default 300 on GPU, 96 on CPU")
    parser.add_argument("--max-size", type=int, default=None, help="default 500 on GPU, 128 on CPU")
    parser.add_argument("--canvas", type=int, default=None, help="default 513 on GPU, 128 on CPU")
    parser.add_argument("--batch", type=int, default=None, help="images per batched forward; default 8 GPU, 4 CPU")
    parser.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                        help="fp16 autocast + channels_last for both paths (CUDA only; default on)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    on_gpu = args.device == "cuda"
    if on_gpu and not cuda:
        parser.error("--device cuda but CUDA is not available")
    args.images = args.images or (64 if on_gpu else 8)
    args.min_size = args.min_size or (300 if on_gpu else 96)
    args.max_size = args.max_size or (500 if on_gpu else 128)
    args.canvas = args.canvas or (513 if on_gpu else 128)
    args.batch = args.batch or (8 if on_gpu else 4)
    amp = on_gpu if args.amp is None else args.amp and on_gpu
    if args.max_size > args.canvas:
        parser.error("--max-size must not exceed --canvas (the benchmark does not shrink images)")

    device = torch.device(args.device)
    torch.set_flush_denormal(True)
    model = calibrated_segmenter("deeplabv2", args.backbone, 161, args.seed).eval()
    fold_batchnorm(model.backbone)
    layout = torch.channels_last if amp else torch.contiguous_format
    model = model.to(device).to(memory_format=layout)
    images = make_images(args.images, args.min_size, args.max_size, args.seed)
    paths = {"per_scale_loop": lambda subset: per_scale_loop(model, subset, device, layout),
             "batched": lambda subset: batched(model, subset, device, layout, args.canvas, args.batch)}
    results, labels = {}, {}
    for name, run in paths.items():
        timed(lambda run=run: run(images[:args.batch]), device, amp)  # warm-up
        labels[name], seconds = timed(lambda run=run: run(images), device, amp)
        results[name] = {"images_per_second": len(images) / seconds, "seconds": seconds}
    agreement = np.mean([np.mean(a == b) for a, b in zip(labels["per_scale_loop"], labels["batched"])])
    speedup = results["batched"]["images_per_second"] / results["per_scale_loop"]["images_per_second"]
    report = {
        "device": torch.cuda.get_device_name() if on_gpu else platform.processor() or platform.machine(),
        "torch": torch.__version__, "torch_threads": torch.get_num_threads(), "backbone": args.backbone,
        "scales": list(SCALES), "flip": True, "images": args.images, "sizes": [args.min_size, args.max_size],
        "canvas": args.canvas, "batch": args.batch, "amp": amp, "results": results, "batched_speedup": speedup,
        "target": f"GPU: batched >= {TARGET_SPEEDUP}x per-scale loop" if on_gpu else "none on CPU (GPU target 2x)",
        "target_met": speedup >= TARGET_SPEEDUP if on_gpu else None, "pixel_agreement": float(agreement),
        "load_average": os.getloadavg()[0], "cpu_count": os.cpu_count(),
    }
    out = Path(args.out or ROOT / "bench" / "results" / f"seg_infer-{'gpu' if on_gpu else 'cpu'}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
