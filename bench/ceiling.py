"""The fully supervised ceiling of the segmentation stage: the same model and budget trained on ground-truth masks.

Trains ``train_seg`` exactly as a config's pipeline would, except that the labels are the training split's
ground-truth masks instead of pseudo labels, evaluates it with ``eval_seg`` on the val split, and, given a finished
pipeline run (``--run``), sets that run's weakly supervised segmentation beside it:

    .venv/bin/python bench/ceiling.py --run runs/synthetic-demo --tag demo

With ``train_seg.weights: cam`` (the demo) the segmenter starts from the run's CAM backbone, as the run's did.

The ratio weak / ceiling is what the paper's 71.2 on VOC is to DeepLab-v2's fully supervised result (about 0.92).
Stage functions are called directly (no Prefect, no MLflow). Results: bench/results/ceiling[-TAG].json.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.chdir(ROOT)  # the config's relative paths (data/synthetic) are relative to the repository root

from flows.config import load_config  # noqa: E402
from storage import fs  # noqa: E402
from storage.datasets.split_files import load_split_file  # noqa: E402
from tasks.eval_seg import RESULTS, eval_seg  # noqa: E402
from tasks.prepare_data import prepare_data  # noqa: E402
from tasks.runtime.weights import CAM_WEIGHTS  # noqa: E402
from tasks.train_seg import train_seg  # noqa: E402

GROUND_TRUTH = "SegmentationClassAug"


def ground_truth_dir(split_url: str) -> str:
    """The dataset's mask folder holding every training image (the layout train_seg reads pseudo labels from)."""
    split = load_split_file(split_url)
    folder = fs.join(split.root, GROUND_TRUTH)
    missing = [i for i in split.ids if not fs.exists(fs.join(folder, f"{i}.png"))]
    if missing:
        raise ValueError(f"{folder}: no ground-truth mask for {len(missing)} training images (first {missing[0]})")
    return folder


def cam_checkpoint(run_dir: str) -> str:
    """The CAM network a finished pipeline run trained (its train_cam record), found in the run directory (the
    record's path may be relative to where that run was started)."""
    recorded = json.loads(fs.read_text(fs.join(run_dir, "manifests", "train_cam.json")))["manifest"]["checkpoint"]
    return fs.join(run_dir, "train_cam", recorded.rsplit("/", 1)[-1])


def weak_result(run_dir: str) -> dict:
    """The pseudo-label and segmentation figures of a finished pipeline run (its eval_pseudo_labels/, eval_seg/)."""
    seg = json.loads(fs.read_text(fs.join(run_dir, "eval_seg", RESULTS)))["summary"]
    labels_url = fs.join(run_dir, "eval_pseudo_labels", "pseudo_label_eval.json")
    labels = json.loads(fs.read_text(labels_url))["scores"]["miou"]
    return {"run_dir": run_dir, "pseudo_label_miou": labels, **seg}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/synthetic.yaml")
    parser.add_argument("--workdir", default="runs/bench-ceiling")
    parser.add_argument("--run", default=None, help="a finished pipeline run directory to compare with")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--override", action="append", default=[], help="dotted config override (repeatable)")
    parser.add_argument("--tag", default="")
    parser.add_argument("--results", default="bench/results")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")

    cfg = load_config(args.config, args.override)
    data = prepare_data(cfg.prepare_data, args.workdir, fs.join(args.workdir, "_cache"))
    train_url, val_url = data["splits"]["train"], data["splits"]["val"]
    seg_cfg = cfg.train_seg
    if seg_cfg.weights == CAM_WEIGHTS:  # the same initialisation as the run's segmenter: its CAM backbone
        if not args.run:
            raise SystemExit("train_seg.weights is 'cam': give --run, the pipeline run whose CAM network to start from")
        seg_cfg = seg_cfg.model_copy(update={"weights": cam_checkpoint(args.run)})
    started = time.perf_counter()
    trained = train_seg(seg_cfg, train_url, ground_truth_dir(train_url), val_url,
                        fs.join(args.workdir, "train_seg"), cfg.run.seed, args.device)
    train_seconds = time.perf_counter() - started
    evaluated = eval_seg(cfg.eval_seg, trained["checkpoint"], val_url, fs.join(args.workdir, "metrics"), args.device)
    ceiling = {**evaluated["summary"], "train_seconds": round(train_seconds, 1)}
    report = {"settings": {"config": args.config, "overrides": args.override, "labels": "ground-truth masks",
                           "train_seg": seg_cfg.model_dump(mode="json"), "seed": cfg.run.seed},
              "ceiling": ceiling}
    if args.run:
        weak = weak_result(args.run)
        report["weak"] = weak
        report["ratio_val_miou"] = weak["val_miou"] / ceiling["val_miou"]
        report["ratio_val_miou_crf"] = weak["val_miou_crf"] / ceiling["val_miou_crf"]
    out = Path(args.results) / ("ceiling" + (f"-{args.tag}" if args.tag else "") + ".json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(json.dumps({k: v for k, v in report.items() if k != "settings"}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
