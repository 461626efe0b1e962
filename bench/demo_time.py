"""Wall time of the demo flow (`sfc run -c configs/synthetic.yaml`, README command 1 after the install), with its
per-stage seconds and headline figures, for one or more variants run interleaved (A B A B ...) so that their ratio
is measured under the same machine load.

Each run is a fresh run directory under ``--root`` (the synthetic data under ``data/synthetic`` is generated once
and shared, as a second ``make demo`` would); the Prefect server start is part of the time. The 1-minute load
average is recorded before and after every run (the machine may be shared). Results: medians per variant.

    python bench/demo_time.py --runs 3 --out bench/results/demo_time.json
    python bench/demo_time.py --runs 3 --variant base= --variant one-thread=run.torch_threads=1
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from flows.config import load_config  # noqa: E402
from flows.headline import finished_records, headline  # noqa: E402

CONFIG = ROOT / "configs" / "synthetic.yaml"


def parse_variant(text: str) -> tuple[str, list[str]]:
    """``name=override,override`` (or ``name=`` for the config as it is)."""
    name, _, overrides = text.partition("=")
    if not name:
        raise SystemExit(f"--variant {text!r}: expected NAME=OVERRIDE[,OVERRIDE...]")
    return name, [o for o in overrides.split(",") if o]


def run_once(root: Path, overrides: list[str]) -> dict:
    """One demo flow in a fresh run directory: wall seconds, load averages, per-stage seconds, figures."""
    shutil.rmtree(root, ignore_errors=True)
    root.parent.mkdir(parents=True, exist_ok=True)
    args = [str(ROOT / ".venv" / "bin" / "sfc"), "run", "-c", str(CONFIG), f"run.root={root}", *overrides]
    load_before = os.getloadavg()[0]
    start = time.perf_counter()
    with open(root.parent / f"{root.name}.log", "w") as log:
        subprocess.run(args, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, check=True)
    seconds = time.perf_counter() - start
    cfg = load_config(str(CONFIG), [f"run.root={root}", *overrides])
    finished = finished_records(cfg)
    return {"seconds": round(seconds, 1), "load_before": load_before, "load_after": os.getloadavg()[0],
            "stage_seconds": {name: round(record["seconds"], 1) for name, record in finished.items()},
            "figures": {k: round(100 * v, 2) for k, v in headline(cfg, finished).metrics.items()
                        if not k.startswith("seconds/") and "threshold" not in k}}


def summary(runs: list[dict]) -> dict:
    stages = runs[0]["stage_seconds"]
    return {"median_seconds": statistics.median(r["seconds"] for r in runs),
            "seconds": [r["seconds"] for r in runs],
            "median_stage_seconds": {s: statistics.median(r["stage_seconds"].get(s, 0) for r in runs) for s in stages},
            "figures": runs[0]["figures"],
            "figures_identical_across_runs": all(r["figures"] == runs[0]["figures"] for r in runs)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--variant", action="append", default=[], help="NAME=OVERRIDE,... (default: base=)")
    parser.add_argument("--root", type=Path, default=Path("/tmp/demo_time"))
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "demo_time.json")
    args = parser.parse_args()
    variants = dict(parse_variant(v) for v in args.variant or ["base="])
    runs: dict[str, list[dict]] = {name: [] for name in variants}
    for index in range(args.runs):
        for name, overrides in variants.items():
            result = run_once(args.root / f"{name}-{index}", overrides)
            runs[name].append(result)
            print(f"{name} run {index}: {result['seconds']:.0f} s (load {result['load_before']:.2f} -> "
                  f"{result['load_after']:.2f}) {result['figures']}", flush=True)
    out = {"benchmark": "demo_time", "python": platform.python_version(), "cpus": os.cpu_count(),
           "config": str(CONFIG.relative_to(ROOT)), "variants": variants, "runs": runs,
           "summary": {name: summary(results) for name, results in runs.items()}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out["summary"], indent=2))


if __name__ == "__main__":
    main()
