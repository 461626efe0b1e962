"""The cost of the training loop's divergence check: the total gradient norm computed each step (train_irn and
train_seg; train_cam gets it from clipping), relative to a forward + backward step of the segmenter.

    .venv/bin/python bench/grad_norm.py [--device cuda]

Writes bench/results/grad_norm-{cpu,gpu}.json.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from models.deeplab import DeepLab  # noqa: E402
from tasks.engine.training import total_grad_norm  # noqa: E402

# (name, DeepLab keyword arguments, batch, crop): the demo's segmenter and VOC's (a small batch on the CPU)
CASES = (("demo: deeplabv2 resnet_mini, batch 16 at 128", {"backbone": "resnet_mini", "norm": "batch",
                                                            "aspp_rates": (1, 2, 3, 4)}, 16, 128),
         ("voc: deeplabv2 resnet101, batch 2 at 161", {"backbone": "resnet101", "norm": "frozen"}, 2, 161))


def _timed(fn, repeats: int, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(repeats):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - started) / repeats


def measure(name: str, kwargs: dict, batch: int, crop: int, device: torch.device) -> dict:
    torch.manual_seed(0)
    model = DeepLab(21, "deeplabv2", **kwargs).to(device)
    images = torch.randn(batch, 3, crop, crop, device=device)
    labels = torch.randint(0, 21, (batch, crop // 8 + 1, crop // 8 + 1), device=device)

    def step() -> None:
        model.zero_grad(set_to_none=True)
        logits = torch.nn.functional.interpolate(model(images), size=labels.shape[1:])
        torch.nn.functional.cross_entropy(logits, labels).backward()

    step()  # warm-up
    step_seconds = _timed(step, 3, device)
    norm_seconds = _timed(lambda: total_grad_norm(model.parameters()), 10, device)
    return {"case": name, "step_seconds": step_seconds, "grad_norm_seconds": norm_seconds,
            "overhead": norm_seconds / step_seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    report = {"device": str(device), "torch": torch.__version__, "threads": torch.get_num_threads(),
              "load_average": os.getloadavg()[0],
              "results": [measure(*case, device) for case in CASES]}
    out = ROOT / "bench" / "results" / f"grad_norm-{'gpu' if device.type == 'cuda' else 'cpu'}.json"
    out.write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
