"""Segmentation training throughput and peak memory: fp32 vs mixed precision (+ channels_last).

One iteration is what ``tasks/train_seg.py`` does per optimiser step: ``--iter-size`` forwards of ``--batch`` crops
through DeepLab-v2 with MSC training outputs (scales 1, 0.5, 0.75 + max), the summed cross-entropy, backward, SGD
(deeplab's three lr groups, momentum 0.9) and the poly scheduler. The network is randomly initialised; its frozen
BatchNorm statistics are first calibrated on one batch (a random frozen-BN ResNet-101 overflows fp16 otherwise).
Mixed precision means fp16 autocast + GradScaler + channels_last on CUDA, bf16 autocast on CPU.

Runs with torch, torchvision and numpy only, so it runs on a bare GPU machine:

    python bench/seg_train.py                       # GPU if present: ResNet-101, batch 10 at 321x321
    python bench/seg_train.py --device cpu          # ResNet-101, batch 2 at 97x97 (2 CPU cores)
    python bench/seg_train.py --batch 5 --iter-size 2   # deeplab-pytorch's exact split of the 10 images

Each mode runs in its own subprocess so that peak memory is per mode. Results go to
bench/results/seg_train-<cpu|gpu>.json and are printed. GPU target: mixed >= 1.7x fp32 iterations/s.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.modes import compare_modes, write_report  # noqa: E402
from models.deeplab import MSC_SCALES, DeepLab, msc_cross_entropy, msc_outputs  # noqa: E402
from models.optim import poly_schedule  # noqa: E402

NUM_CLASSES = 21
TARGET_SPEEDUP = 1.7


def calibrated_segmenter(arch: str, backbone: str, size: int, seed: int = 0) -> DeepLab:
    """A random DeepLab with frozen BatchNorm whose running statistics are one batch's statistics, so activations
    keep unit scale through the depth (the ImageNet-pretrained case, without a download)."""
    torch.manual_seed(seed)
    source = DeepLab(NUM_CLASSES, arch, backbone, norm="batch").train()
    for module in source.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.momentum = None  # cumulative average: one batch sets the statistics
    with torch.no_grad():
        source(torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(seed)))
    model = DeepLab(NUM_CLASSES, arch, backbone, norm="frozen")
    model.load_state_dict(source.state_dict())
    return model


def run_mode(args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    torch.set_flush_denormal(True)
    model = calibrated_segmenter(args.arch, args.backbone, args.size).to(device).train()
    mixed = args.mode == "mixed"
    cuda = device.type == "cuda"
    if mixed and cuda:
        model = model.to(memory_format=torch.channels_last)
    amp_dtype = torch.float16 if cuda else torch.bfloat16
    backbone, head_weights, head_biases = model.parameter_groups()
    optimizer = torch.optim.SGD([{"params": backbone}, {"params": head_weights, "lr": 2.5e-3},
                                 {"params": head_biases, "lr": 5e-3, "weight_decay": 0.0}],
                                lr=2.5e-4, momentum=0.9, weight_decay=5e-4)
    scheduler = poly_schedule(optimizer, 20000, 0.9)
    scaler = torch.amp.GradScaler("cuda", enabled=mixed and cuda)
    gen = torch.Generator().manual_seed(1)
    images = torch.randn(args.batch, 3, args.size, args.size, generator=gen).to(device)
    labels = torch.randint(0, NUM_CLASSES, (args.batch, args.size, args.size), generator=gen).to(device)
    if mixed and cuda:
        images = images.contiguous(memory_format=torch.channels_last)

    def step() -> float:
        optimizer.zero_grad(set_to_none=True)
        total = 0.0
        for _ in range(args.iter_size):
            with torch.autocast(device.type, dtype=amp_dtype, enabled=mixed):
                outputs = msc_outputs(model, images, MSC_SCALES)
            loss = msc_cross_entropy(outputs, labels) / args.iter_size
            scaler.scale(loss).backward()
            total += float(loss.detach())
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        return total

    first_loss = step()
    for _ in range(args.warmup - 1):
        step()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {
        "mode": args.mode, "iterations_per_second": args.steps / seconds,
        "images_per_second": args.steps * args.batch * args.iter_size / seconds,
        "seconds_per_iteration": seconds / args.steps, "peak_memory_mb": peak / 2**20,
        "peak_memory_kind": "cuda max_memory_allocated" if cuda else "process max RSS",
        "amp_dtype": str(amp_dtype).removeprefix("torch.") if mixed else None,
        "channels_last": mixed and cuda, "first_step_loss": first_loss, "torch_threads": torch.get_num_threads(),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cuda = torch.cuda.is_available()
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if cuda else "cpu")
    parser.add_argument("--arch", default="deeplabv2", choices=["deeplabv2", "deeplabv3"])
    parser.add_argument("--backbone", default="resnet101")
    parser.add_argument("--batch", type=int, default=None, help="crops per forward; default 10 on GPU, 2 on CPU")
    parser.add_argument("--iter-size", type=int, default=1, help="forwards accumulated per iteration")
    parser.add_argument("--size", type=int, default=None, help="crop side; default 321 on GPU, 97 on CPU")
    parser.add_argument("--steps", type=int, default=None, help="timed iterations; default 20 on GPU, 2 on CPU")
    parser.add_argument("--warmup", type=int, default=None, help="untimed iterations; default 5 on GPU, 1 on CPU")
    parser.add_argument("--mode", choices=["fp32", "mixed"], default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None)
    parser.add_argument("--in-process", action="store_true",
                        help="run both modes in this process (a smoke run: peak memory is then not per mode)")
    args = parser.parse_args(argv)
    on_gpu = args.device == "cuda"
    if on_gpu and not cuda:
        parser.error("--device cuda but CUDA is not available")
    args.batch = args.batch or (10 if on_gpu else 2)
    args.size = args.size or (321 if on_gpu else 97)
    args.steps = args.steps or (20 if on_gpu else 2)
    args.warmup = args.warmup or (5 if on_gpu else 1)
    if args.mode:
        print(json.dumps(run_mode(args)))
        return
    results = compare_modes(__file__, args, run_mode, [
        "--device", args.device, "--arch", args.arch, "--backbone", args.backbone, "--batch", str(args.batch),
        "--iter-size", str(args.iter_size), "--size", str(args.size), "--steps", str(args.steps),
        "--warmup", str(args.warmup)])
    speedup = results["mixed"]["iterations_per_second"] / results["fp32"]["iterations_per_second"]
    first = results["fp32"]["first_step_loss"], results["mixed"]["first_step_loss"]
    report = {
        "device": torch.cuda.get_device_name() if on_gpu else platform.processor() or platform.machine(),
        "torch": torch.__version__, "arch": args.arch, "backbone": args.backbone, "msc_scales": list(MSC_SCALES),
        "batch": args.batch, "iter_size": args.iter_size, "size": args.size, "steps": args.steps,
        "results": results, "mixed_speedup": speedup,
        "target": f"GPU: mixed >= {TARGET_SPEEDUP}x fp32" if on_gpu else "none on CPU (GPU target 1.7x)",
        "target_met": speedup >= TARGET_SPEEDUP if on_gpu else None,
        "first_loss_relative_difference": abs(first[0] - first[1]) / max(abs(first[0]), 1e-12),
        "load_average": os.getloadavg()[0], "cpu_count": os.cpu_count(),
    }
    write_report(report, args.out, ROOT / "bench" / "results" / f"seg_train-{'gpu' if on_gpu else 'cpu'}.json")

if __name__ == "__main__":
    main()
