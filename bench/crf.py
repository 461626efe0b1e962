"""IR-label throughput (two dense CRFs per image) with 1 and 2 worker processes: the stage's CPU parallelism.

Runs the real stage function ``tasks.make_ir_labels.make_ir_labels`` end to end (CAM store reads, CRFs, atomic
PNG writes, and the worker pool's start-up) on a seeded synthetic dataset of ``--images`` images of 240-320 px
per side, with CAM-like maps made from the ground-truth masks (tests/fake_cams.py). Runs are interleaved
(1, 2, 1, 2 workers, ...), each into a fresh output folder; the outputs of every run must be byte-identical.
Other processes on the machine slow the runs down: the load average before and after is recorded, and so is the
CPU time (user + sys) of every run: this process, the fork server and the pool's workers (children of the fork
server, counted through its cumulative child times in /proc); ``cpu_projected_speedup_per_repeat`` = 2 x CPU(1 worker) /
CPU(2 workers) is the speedup the 2 workers would reach on two otherwise idle cores (perfect balance assumed).

    python bench/crf.py [--images 40 --repeats 2]      # results in bench/results/crf.json

Target: images/s with 2 workers >= 1.8 x images/s with 1 worker (on 2 cores).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import tempfile
from multiprocessing import forkserver
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from storage.datasets.split_files import save_split  # noqa: E402
from storage.datasets.synthetic import SPLITS, generate_synthetic  # noqa: E402
from storage.datasets.voc_layout import VOCLayoutDataset  # noqa: E402
from tasks.infer_cams import union_of_splits  # noqa: E402
from tasks.make_ir_labels import MakeIrLabelsConfig, make_ir_labels  # noqa: E402
from tests.fake_cams import fake_cam_store  # noqa: E402

SPEEDUP_TARGET = 1.8


def cpu_seconds() -> float:
    """User + sys CPU time of this process, the fork server and its reaped children (the pool workers)."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    total = own.ru_utime + own.ru_stime
    server = getattr(forkserver._forkserver, "_forkserver_pid", None)
    if server:
        fields = Path(f"/proc/{server}/stat").read_text().rsplit(")", 1)[1].split()
        total += sum(int(f) for f in fields[11:15]) / os.sysconf("SC_CLK_TCK")  # utime stime cutime cstime
    return total


def contents(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "crf.json"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        generate_synthetic(str(root / "data"), num_images=args.images, seed=1, min_size=240, max_size=320)
        dataset = VOCLayoutDataset(str(root / "data"), "synthetic")
        split = union_of_splits([dataset.load_split(name) for name in SPLITS])  # every image once
        split_url = str(root / "all.json")
        save_split(split_url, split)
        store_url = str(root / "cams.zarr")
        fake_cam_store(store_url, split)
        load_start = os.getloadavg()
        runs: dict[int, list[dict]] = {1: [], 2: []}
        reference = None
        for repeat in range(args.repeats):
            for workers in (1, 2):
                out = root / f"labels-{workers}-{repeat}"
                cpu = cpu_seconds()
                manifest = make_ir_labels(MakeIrLabelsConfig(workers=workers), store_url, split_url, str(out))
                cpu = cpu_seconds() - cpu
                labels = contents(out)
                reference = reference or labels
                if labels != reference:
                    raise RuntimeError(f"run with {workers} workers wrote different labels")
                runs[workers].append({"seconds": manifest["seconds"], "images_per_s": manifest["images_per_second"],
                                      "cpu_seconds": cpu, "load_average": os.getloadavg()[0]})
                print(f"{workers} worker(s): {manifest['images_per_second']:.2f} images/s "
                      f"({manifest['seconds']:.1f} s, {cpu:.1f} CPU s, load {os.getloadavg()[0]:.2f})", flush=True)
    best = {w: max(r["images_per_s"] for r in rs) for w, rs in runs.items()}
    speedup = best[2] / best[1]
    cpu = {w: [r["cpu_seconds"] for r in rs] for w, rs in runs.items()}
    results = {
        "benchmark": "crf (IR labels)", "python": platform.python_version(), "cpus": os.cpu_count(),
        "images": len(split.ids), "image_sides": [240, 320], "runs": {str(w): r for w, r in runs.items()},
        "best_images_per_s": {str(w): v for w, v in best.items()}, "speedup_2_vs_1": speedup,
        "cpu_projected_speedup_per_repeat": [2 * one / two for one, two in zip(cpu[1], cpu[2])],
        "target_speedup": SPEEDUP_TARGET, "target_met_wall": speedup >= SPEEDUP_TARGET,
        "target_met_cpu_projected": min(2 * one / two for one, two in zip(cpu[1], cpu[2])) >= SPEEDUP_TARGET,
        "outputs_identical": True, "load_average_start": load_start, "load_average_end": os.getloadavg(),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
