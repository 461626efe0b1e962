"""Random-walk benchmark: our sparse propagation (models/random_walk.py) vs the reference's dense algorithm.

The reference (IRN ``propagate_to_edge``) turns the sparse path affinities into a dense (HW, HW) matrix
(``to_dense``), raises it to ``beta``, column-normalises it into T, squares T ``exp_times`` times and computes
``x @ T``. Implementations compared, each on the same seeded inputs (a smooth random boundary map and random
maps of ``--channels`` channels, on 1/4-resolution grids):

* ``sparse``: ours, a CSR transition matrix applied 2**exp_times times;
* ``sparse-float64``: ours in float64, the accuracy yardstick of every float32 run;
* ``sparse-squared``: the same operator squared once (sparse @ sparse), applied 2**(exp_times-1) times: measures
  whether squaring a sparse T pays;
* ``dense-square``: the reference's algorithm, written here (dense matrix, T <- T @ T exp_times times, x @ T);
  run only where it is affordable (CUDA, or small grids on CPU: 8 products of N^3 flops);
* ``dense-apply``: the same dense T, applied 2**exp_times times to x (256 matrix-vector products instead of 8
  matrix-matrix ones: identical result, far fewer flops, and less memory than dense-square, which also holds T^2;
  so its peak memory is a lower bound for the reference's).

Method: every (implementation, size) runs in a fresh Python process (``--worker``), so allocator caches and
earlier peaks cannot leak between measurements. Inside it, after the inputs are built and a small warm-up call,
the peak-RSS counter is reset (``/proc/self/clear_refs``); the reported memory is peak RSS (VmHWM) minus the RSS
before the call (CPU), or ``torch.cuda.max_memory_allocated`` minus the allocation before the call (CUDA). The
time is the wall time of the call. Runs are interleaved (sparse, dense, sparse, ...). Outputs are saved and
compared with the float32 sparse one and with the float64 one (max abs differences). A dense run whose matrices
cannot fit in the available memory (MemAvailable / free CUDA memory; 3 (HW)^2 float32 for dense-apply, 4 for
dense-square) is reported as not fitting instead of being attempted.

Run from the repository root (needs only torch and numpy)::

    python bench/random_walk.py                        # CPU; results in bench/results/random_walk-cpu.json
    python bench/random_walk.py --device cuda          # CUDA; results in bench/results/random_walk-cuda.json

Every run uses ``--threads`` torch threads (default 1, as the stage's worker processes; with 2 threads on a busy
2-core machine the 256 small sparse products ran 10-20x slower).

Targets: >= 5x less peak memory than dense at 128x128 with outputs equal within 1e-4.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from models.random_walk import affinity_pairs, transition_matrix  # noqa: E402

RADIUS, BETA, EXP_TIMES = 5, 10, 8
DENSE_MATRICES = {"dense-apply": 3, "dense-square": 4}  # (HW)^2 float32 buffers alive at the peak
MEMORY_TARGET, EQUAL_TOLERANCE = 5.0, 1e-4


def inputs(height: int, width: int, channels: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded maps in [0, 1] and a boundary map: smooth noise sharpened so that a few ridges are near 1."""
    generator = torch.Generator().manual_seed(height * 1000 + width)
    coarse = torch.rand(1, 1, max(2, height // 8), max(2, width // 8), generator=generator)
    smooth = F.interpolate(coarse, size=(height, width), mode="bilinear", align_corners=False)[0, 0]
    edge = (1 - (smooth - 0.5).abs() * 2) ** 8
    maps = torch.rand(channels, height, width, generator=generator)
    return maps.to(device), edge.to(device)


def dense_transition(edge: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Reference-style: the dense affinity (self-affinity 1), its beta power and the column-normalised T, all kept
    alive as in the reference's ``propagate_to_edge`` / ``to_transition_matrix``."""
    n = edge.numel()
    src, dst, affinity = affinity_pairs(edge, RADIUS)
    diagonal = torch.arange(n, device=edge.device)
    indices = torch.stack([torch.cat([src, diagonal, dst]), torch.cat([dst, diagonal, src])])
    values = torch.cat([affinity, torch.ones(n, device=edge.device), affinity])
    dense = torch.sparse_coo_tensor(indices, values, (n, n), check_invariants=False).to_dense()
    scaled = dense ** BETA
    return dense, scaled, scaled / scaled.sum(dim=0, keepdim=True)


def run_impl(name: str, x: torch.Tensor, edge: torch.Tensor) -> torch.Tensor:
    if name == "sparse-float64":
        x, edge, name = x.double(), edge.double(), "sparse"
    channels, height, width = x.shape
    start = (x * (1 - edge)).reshape(channels, height * width)
    if name.startswith("sparse"):
        operator = transition_matrix(edge, RADIUS, BETA)
        steps = 2 ** EXP_TIMES
        if name == "sparse-squared":
            operator, steps = operator @ operator, steps // 2
        y = start.T.contiguous()
        for _ in range(steps):
            y = operator @ y
        return y.T.reshape(channels, height, width)
    dense, scaled, trans = dense_transition(edge)
    if name == "dense-square":
        for _ in range(EXP_TIMES):
            trans = trans @ trans
        return (start @ trans).reshape(channels, height, width)
    y = start
    for _ in range(2 ** EXP_TIMES):
        y = y @ trans
    return y.reshape(channels, height, width)


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def worker(name: str, height: int, width: int, channels: int, device: str, threads: int, out: str) -> dict:
    """One measurement in this (fresh) process."""
    torch.set_flush_denormal(True)
    torch.set_num_threads(threads)
    small_x, small_edge = inputs(12, 12, channels, device)
    run_impl(name, small_x, small_edge)  # warm-up: kernels, lazy initialisation
    x, edge = inputs(height, width, channels, device)
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        before = _status_kib("VmRSS") * 1024
        try:
            Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
        except OSError:
            pass
    started = time.perf_counter()
    result = run_impl(name, x, edge)
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    peak = (torch.cuda.max_memory_allocated() if cuda else _status_kib("VmHWM") * 1024) - before
    np.save(out, result.cpu().numpy())
    return {"seconds": seconds, "peak_bytes": int(peak), "threads": torch.get_num_threads()}


def available_bytes(device: str) -> int:
    if device.startswith("cuda"):
        return torch.cuda.mem_get_info()[0]
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


def measure(name: str, size: int, channels: int, device: str, threads: int, folder: str,
            in_process: bool = False) -> dict:
    """One run in a fresh worker process (or, ``in_process``, in this one: a smoke run whose peaks overlap)."""
    out = os.path.join(folder, f"{name}-{size}.npy")
    if in_process:
        return {**worker(name, size, size, channels, device, threads, out), "output": out}
    command = [sys.executable, __file__, "--worker", name, str(size), str(channels), device, str(threads), out]
    done = subprocess.run(command, capture_output=True, text=True, check=True, cwd=ROOT)
    return {**json.loads(done.stdout.strip().splitlines()[-1]), "output": out}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--channels", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2, help="repeats of the sparse runs (dense: once)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads of every run (the pseudo-label "
                                                                "stage runs one single-threaded process per core)")
    parser.add_argument("--small", type=int, default=48, help="grid where dense-square also runs on CPU")
    parser.add_argument("--sizes", type=int, nargs="+", default=[128, 256],
                        help="larger grids (dense-square on CUDA only); the 5x memory target is read at 128")
    parser.add_argument("--in-process", action="store_true",
                        help="run every measurement in this process (a smoke run: peak memory is then not isolated)")
    parser.add_argument("--out", default=None)
    parser.add_argument("--worker", nargs=6, metavar=("IMPL", "SIZE", "CHANNELS", "DEVICE", "THREADS", "OUT"))
    args = parser.parse_args(argv)
    if args.worker:
        name, size, channels, device, threads, out = args.worker
        print(json.dumps(worker(name, int(size), int(size), int(channels), device, int(threads), out)))
        return

    cuda = args.device.startswith("cuda")
    big = ["sparse", "sparse-float64", "sparse-squared", "dense-apply"] + (["dense-square"] if cuda else [])
    plan = {args.small: ["sparse", "sparse-float64", "dense-apply", "dense-square"], **{s: big for s in args.sizes}}
    results: dict = {"benchmark": "random_walk", "device": args.device, "python": platform.python_version(),
                     "torch": torch.__version__, "cpus": os.cpu_count(), "threads": args.threads,
                     "channels": args.channels,
                     "radius": RADIUS, "beta": BETA, "exp_times": EXP_TIMES,
                     "load_average_start": os.getloadavg(), "sizes": {}}
    with tempfile.TemporaryDirectory() as folder:
        for size, names in plan.items():
            runs: dict[str, list] = {name: [] for name in names}
            order = [n for r in range(args.repeats) for n in names if r == 0 or n in ("sparse", "sparse-squared")]
            for name in order:
                if name.startswith("dense"):
                    need = DENSE_MATRICES[name] * (size * size) ** 2 * 4
                    have = available_bytes(args.device)
                    if need > have:
                        runs[name].append({"fits": False, "needs_bytes": need, "available_bytes": have})
                        print(f"{size}x{size} {name}: does not fit ({need / 2**30:.1f} GiB needed, "
                              f"{have / 2**30:.1f} GiB available)", flush=True)
                        continue
                run = measure(name, size, args.channels, args.device, args.threads, folder, args.in_process)
                runs[name].append(run)
                print(f"{size}x{size} {name}: {run['seconds']:.3f} s, peak {run['peak_bytes'] / 2**20:.1f} MiB",
                      flush=True)
            ours, exact = (np.load(runs[n][0]["output"]) for n in ("sparse", "sparse-float64"))
            summary = {}
            for name, measured in runs.items():
                done = [m for m in measured if "seconds" in m]
                if not done:
                    summary[name] = measured[0]
                    continue
                summary[name] = {"fits": True, "seconds": [m["seconds"] for m in done],
                                 "peak_bytes": max(m["peak_bytes"] for m in done), "threads": done[0]["threads"],
                                 "max_abs_diff_vs_sparse": float(np.abs(np.load(done[0]["output"]) - ours).max()),
                                 "max_abs_error_vs_float64": float(np.abs(np.load(done[0]["output"]) - exact).max())}
            dense = [summary[n] for n in ("dense-apply", "dense-square") if summary.get(n, {}).get("fits")]
            if dense:
                ratio = min(d["peak_bytes"] for d in dense) / max(1, summary["sparse"]["peak_bytes"])
                summary["dense_over_sparse_peak_memory"] = ratio
                summary["equal_within_1e-4"] = all(d["max_abs_diff_vs_sparse"] <= EQUAL_TOLERANCE for d in dense)
            results["sizes"][f"{size}x{size}"] = summary
    at128 = results["sizes"].get("128x128")
    results["target_memory_5x_at_128"] = None if at128 is None else bool(
        at128.get("dense_over_sparse_peak_memory", 0) >= MEMORY_TARGET and at128.get("equal_within_1e-4"))
    results["load_average_end"] = os.getloadavg()
    out = args.out or str(ROOT / "bench" / "results" / f"random_walk-{'cuda' if cuda else 'cpu'}.json")
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(results, indent=2))
    print(json.dumps({k: v for k, v in results.items() if k != "sizes"}, indent=2))
    print(f"results: {out}")


if __name__ == "__main__":
    main()
