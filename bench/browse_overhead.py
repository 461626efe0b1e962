"""What browsing costs a run: the time of each tracking addition of a pipeline run (the parent run's headline
figures after a stage, the split files as dataset inputs, the CAM network and segmenter as MLflow models, the
HTML report) next to the stage it follows, on a finished run, into a temporary MLflow store.

    .venv/bin/python bench/browse_overhead.py --run runs/synthetic-demo [--repeats 5]

Results: bench/results/browse_overhead.json (median seconds of each addition, and its share of the stage time
recorded in the run's records).
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import flows  # noqa: F401  (environment defaults)
from flows.config import load_config
from flows.headline import finished_records, publish_headline
from flows.logged_models import log_trained_model
from flows.pipeline import log_dataset_inputs
from flows.report import write_report
from storage.tracking import open_tracker


def _median_seconds(work: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        work()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", default="runs/synthetic-demo", help="a finished run directory")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--results", default="bench/results")
    args = parser.parse_args()
    cfg = load_config(f"{args.run}/config.yaml")
    records = finished_records(cfg)
    manifests = {name: record["manifest"] for name, record in records.items()}
    seconds = {name: record.get("seconds") for name, record in records.items()}
    with tempfile.TemporaryDirectory() as tmp:
        uri = f"sqlite:///{tmp}/mlflow.db"
        parent = open_tracker(uri, "bench", Path(tmp, "artifacts").as_uri(), "bench")
        children = {stage: parent.child(stage) for stage in ("train_cam", "train_seg")}
        measured = {
            "headline after a stage": _median_seconds(lambda: publish_headline(cfg, parent), args.repeats),
            "dataset inputs (after prepare_data)": _median_seconds(
                lambda: log_dataset_inputs(cfg, manifests["prepare_data"], parent), args.repeats),
            "MLflow model of train_cam": _median_seconds(lambda: log_trained_model(
                "train_cam", cfg, manifests["train_cam"], children["train_cam"]), args.repeats),
            "MLflow model of train_seg": _median_seconds(lambda: log_trained_model(
                "train_seg", cfg, manifests["train_seg"], children["train_seg"]), args.repeats),
            "report (end of the run)": _median_seconds(lambda: write_report(cfg, parent.run_id), args.repeats),
        }
    total = sum(s for s in seconds.values() if s)
    follows = {"headline after a stage": min((s for s in seconds.values() if s), default=None),
               "dataset inputs (after prepare_data)": seconds.get("prepare_data"),
               "MLflow model of train_cam": seconds.get("train_cam"),
               "MLflow model of train_seg": seconds.get("train_seg"), "report (end of the run)": total or None}
    rows = {name: {"seconds": round(value, 3), "stage_seconds": follows[name],
                   "share": round(value / follows[name], 4) if follows[name] else None}
            for name, value in measured.items()}
    report = {"run": args.run, "repeats": args.repeats, "stage_seconds": seconds, "additions": rows,
              "note": "headline: its share of the shortest stage; report: of all stages together"}
    out = Path(args.results) / "browse_overhead.json"
    out.write_text(json.dumps(report, indent=2))
    for name, row in rows.items():
        share = "-" if row["share"] is None else f"{100 * row['share']:.2f}%"
        print(f"{name:<38} {row['seconds']:8.3f} s  {share} of {row['stage_seconds']}")
    print(f"-> {out}")


if __name__ == "__main__":
    main()
