"""Training-step throughput and peak memory of SFC CAM training: fp32 vs mixed precision + channels_last.

Runs with torch and numpy only (no Prefect/MLflow), so it runs on a bare GPU machine:

    python bench/train_step.py                      # GPU if present: batch 16 at 512x512; CPU: batch 4 at 128
    python bench/train_step.py --device cpu --size 128 --batch 4

Each precision mode runs in its own subprocess so that peak memory is per mode. Results go to
bench/results/train_step-<device>.json and are printed.
"""
from __future__ import annotations

import argparse
import json
import platform
import resource
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.modes import compare_modes, write_report  # noqa: E402
from models.image_bank import ImageBank  # noqa: E402
from models.losses import sfc_step_losses  # noqa: E402
from models.optim import poly_sgd  # noqa: E402
from models.reference_weights import load_reference_weights  # noqa: E402
from models.sfc import SFCNet  # noqa: E402

GOLDEN_WEIGHTS = ROOT / "tests" / "golden" / "sfc_weights.npz"


def run_mode(args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    torch.manual_seed(0)
    torch.set_flush_denormal(True)
    model = SFCNet(20, args.backbone)
    if args.backbone == "resnet50" and GOLDEN_WEIGHTS.exists():
        load_reference_weights(model, GOLDEN_WEIGHTS)  # realistic activations; random frozen-BN nets overflow
    model.to(device).train()
    mixed = args.mode == "mixed"
    if mixed:
        model = model.to(memory_format=torch.channels_last)
    amp_dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    optimizer, scheduler = poly_sgd(model.parameter_groups(), 0.1, 10, 1e-4, 1e-4, 1000)
    scaler = torch.amp.GradScaler("cuda", enabled=mixed and device.type == "cuda")
    bank = ImageBank(20, args.size, 4, seed=0)
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(args.batch, 3, args.size, args.size, generator=gen)
    valid = torch.ones(args.batch, 1, args.size, args.size)
    labels = (torch.rand(args.batch, 20, generator=gen) < 0.15).float()
    labels[torch.arange(args.batch), torch.randint(0, 20, (args.batch,), generator=gen)] = 1
    weights = torch.ones(20, device=device)

    def step() -> dict:
        x, v, y = bank.extend_batch(images, valid, labels)
        x, v, y = (t.to(device, non_blocking=True) for t in (x, v, y))
        if mixed:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=mixed):
            losses = sfc_step_losses(model, x, v, y, weights)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(losses.total).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        return {k: float(getattr(losses, k).detach()) for k in ("cls", "proto", "scale")}

    first_losses = step()
    for _ in range(args.warmup - 1):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    images_per_step = args.batch + bank.n_resample
    peak = (torch.cuda.max_memory_allocated() if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    return {
        "mode": args.mode, "images_per_second": args.steps * images_per_step / seconds,
        "seconds_per_step": seconds / args.steps, "peak_memory_mb": peak / 2**20,
        "peak_memory_kind": "cuda max_memory_allocated" if device.type == "cuda" else "process max RSS",
        "first_step_losses": first_losses,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cuda = torch.cuda.is_available()
    parser.add_argument("--device", default="cuda" if cuda else "cpu")
    parser.add_argument("--backbone", default="resnet50")
    parser.add_argument("--batch", type=int, default=None, help="default 16 on GPU, 4 on CPU")
    parser.add_argument("--size", type=int, default=None, help="crop side; default 512 on GPU, 128 on CPU")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--mode", choices=["fp32", "mixed"], default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None)
    parser.add_argument("--in-process", action="store_true",
                        help="run both modes in this process (a smoke run: peak memory is then not per mode)")
    args = parser.parse_args(argv)
    on_gpu = args.device.startswith("cuda")
    args.batch = args.batch or (16 if on_gpu else 4)
    args.size = args.size or (512 if on_gpu else 128)
    args.steps = args.steps or (20 if on_gpu else 5)
    if args.mode:
        print(json.dumps(run_mode(args)))
        return
    results = compare_modes(__file__, args, run_mode, [
        "--device", args.device, "--backbone", args.backbone, "--batch", str(args.batch), "--size", str(args.size),
        "--steps", str(args.steps), "--warmup", str(args.warmup)])
    a, b = results["fp32"]["first_step_losses"], results["mixed"]["first_step_losses"]
    report = {
        "device": torch.cuda.get_device_name() if on_gpu else platform.processor() or platform.machine(),
        "torch": torch.__version__, "backbone": args.backbone, "batch": args.batch, "ibr_extra": 4,
        "size": args.size, "steps": args.steps, "results": results,
        "mixed_speedup": results["mixed"]["images_per_second"] / results["fp32"]["images_per_second"],
        "loss_max_relative_difference": max(abs(a[k] - b[k]) / max(abs(a[k]), 1e-12) for k in a),
    }
    write_report(report, args.out, ROOT / "bench" / "results" / f"train_step-{'gpu' if on_gpu else 'cpu'}.json")

if __name__ == "__main__":
    main()
