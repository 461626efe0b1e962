"""``make bench-gpu``: every benchmark on CUDA, the CUDA-only tests and the demo flow on CUDA, in at most 8 minutes
on one GPU, with the results in bench/results/*-gpu.json.

Steps, in order, each a subprocess with its own time cap, all within ``--budget`` seconds (a step gets at most what
is left and is skipped when less than 10 s are; one that fails or runs out of time is recorded and the suite goes
on):

  cuda_tests   ``pytest -m cuda`` on the CUDA-only tests (skipped where pytest is not installed)
  train_step   SFC training step, fp32 vs AMP + channels_last (ResNet-50, batch 16 + 4 at 512)
  cam_infer    multi-scale CAM inference, the project's path vs the reference's loop (50 VOC-size images)
  seg_train    DeepLab-v2 ResNet-101 MSC training, fp32 vs AMP (batch 10 at 321)
  seg_infer    batched multi-scale + flip segmentation inference vs a per-scale loop (64 VOC-size images)
  random_walk  sparse vs dense random walk at 48 x 48 and 128 x 128 cells
  demo_flow    ``sfc run -c configs/synthetic.yaml run.device=cuda`` in a temporary folder (skipped, with a message,
               where Prefect is not installed: the benchmarks need only torch, torchvision and numpy)

The summary, with each step's status, time, command and result file, goes to ``gpu_suite-<label>.json``; the exit
status is 1 if a step failed or ran out of time. ``--tiny --device cpu`` runs the same plumbing in one process with
minimal settings (each benchmark's ``--in-process``), skipping the CUDA tests and the flow; the test suite runs it.

    python bench/gpu_suite.py                                   # one GPU: bench/results/*-gpu.json
    python bench/gpu_suite.py --tiny --device cpu --out-dir /tmp/suite
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
BUDGET_S = 470  # 8 minutes, less the suite's own start
CUDA_TEST_FILES = ("tests/test_cuda.py", "tests/test_random_walk.py")
TAIL = 3000  # characters of a failed step's output kept in the summary


@dataclass(frozen=True)
class Bench:
    """A benchmark script ``bench/<name>.py``: its arguments on the GPU and in a tiny CPU run, and its time cap."""

    name: str
    gpu_args: tuple[str, ...]
    tiny_args: tuple[str, ...]
    cap_s: float


BENCHES = (
    Bench("train_step", ("--steps", "10"),
          ("--backbone", "resnet_mini", "--batch", "1", "--size", "32", "--steps", "1", "--warmup", "1"), 60),
    Bench("cam_infer", ("--images", "50", "--repeats", "1"),
          ("--images", "1", "--min-size", "32", "--max-size", "32", "--workers", "0", "--repeats", "1"), 120),
    Bench("seg_train", ("--steps", "10", "--warmup", "3"),
          ("--backbone", "resnet_mini", "--batch", "1", "--size", "33", "--steps", "1", "--warmup", "1"), 90),
    Bench("seg_infer", (),
          ("--backbone", "resnet_mini", "--images", "2", "--min-size", "32", "--max-size", "40", "--canvas", "48",
           "--batch", "2"), 60),
    Bench("random_walk", ("--sizes", "128"), ("--small", "12", "--sizes", "16", "--repeats", "1"), 120),
)
IN_PROCESS = {"train_step", "cam_infer", "seg_train", "random_walk"}  # those that otherwise spawn per measurement
CUDA_TESTS_CAP_S = 90
FLOW_CAP_S = 300
MIN_STEP_S = 10  # a step with less time left than this is skipped


def bench_argv(bench: Bench, device: str, tiny: bool, out: Path) -> list[str]:
    """The benchmark's command-line arguments (without the script)."""
    extra = (*bench.tiny_args, *(("--in-process",) if bench.name in IN_PROCESS else ())) if tiny else bench.gpu_args
    return ["--device", device, *extra, "--out", str(out)]


def cuda_tests_command(python: str) -> list[str]:
    return [python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "cuda", *CUDA_TEST_FILES]


def flow_command(python: str, work: Path) -> list[str]:
    """The demo flow on CUDA, its runs, data and MLflow store in ``work``."""
    return [python, "-m", "flows.cli", "run", "-c", "configs/synthetic.yaml", "run.device=cuda",
            f"run.root={work / 'runs'}", f"prepare_data.root={work / 'data'}", "run.name=gpu-suite-demo"]


def run_command(command: list[str], timeout_s: float, env: dict[str, str] | None = None) -> dict:
    """A step as a subprocess in the repository root: status ok / failed / timeout, seconds, output tail."""
    started = time.perf_counter()
    try:
        done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=max(1.0, timeout_s), env=env)
    except subprocess.TimeoutExpired as err:
        output = err.stdout or ""
        output = output.decode(errors="replace") if isinstance(output, bytes) else output
        return {"status": "timeout", "seconds": round(time.perf_counter() - started, 1), "timeout_s": timeout_s,
                "output_tail": output[-TAIL:]}
    result = {"status": "ok" if done.returncode == 0 else "failed", "returncode": done.returncode,
              "seconds": round(time.perf_counter() - started, 1)}
    if done.returncode:
        result["output_tail"] = (done.stdout + done.stderr)[-TAIL:]
    else:
        result["summary_line"] = (done.stdout.strip().splitlines() or [""])[-1]
    return result


def run_in_process(bench: Bench, argv: list[str]) -> dict:
    """A tiny benchmark run through its ``main(argv)`` in this process (the benchmark's printout is dropped)."""
    started = time.perf_counter()
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            importlib.import_module(f"bench.{bench.name}").main(argv)
    except Exception as err:
        return {"status": "failed", "seconds": round(time.perf_counter() - started, 1),
                "output_tail": f"{type(err).__name__}: {err}"}
    return {"status": "ok", "seconds": round(time.perf_counter() - started, 1)}


def skipped(reason: str) -> dict:
    return {"status": "skipped", "reason": reason}


def cuda_tests_step(args: argparse.Namespace, python: str, remaining: float) -> dict:
    if args.tiny or args.device != "cuda":
        return skipped("no CUDA device in this run (the CUDA-only tests would all skip)")
    if remaining < MIN_STEP_S:
        return skipped("the suite's time budget is spent")
    if importlib.util.find_spec("pytest") is None:
        return skipped("pytest is not installed in this Python")
    command = cuda_tests_command(python)
    return {"command": ["python", *command[1:]], **run_command(command, min(CUDA_TESTS_CAP_S, remaining))}


def flow_step(args: argparse.Namespace, python: str, remaining: float) -> dict:
    if args.tiny or args.device != "cuda":
        return skipped("the demo flow runs on CUDA only here (tests/test_flow.py runs it on the CPU)")
    if remaining < MIN_STEP_S:
        return skipped("the suite's time budget is spent")
    if importlib.util.find_spec("prefect") is None:
        return skipped("prefect is not installed in this Python: the demo flow needs the project's environment "
                       "(pip install -e .); the benchmarks above need only torch, torchvision and numpy")
    work = Path(tempfile.mkdtemp(prefix="sfc-gpu-suite-"))
    try:
        env = {**os.environ, "PREFECT_HOME": str(work / "prefect-home"), "MLFLOW_DISABLE_TELEMETRY": "true",
               "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
        command = flow_command(python, work)
        result = {"command": [_shown(part, work) for part in command],
                  **run_command(command, min(FLOW_CAP_S, remaining), env)}
        summary = work / "runs" / "gpu-suite-demo" / "pipeline.json"
        if summary.exists():
            result["stages"] = {name: _figures(manifest)
                                for name, manifest in json.loads(summary.read_text())["stages"].items()}
        return result
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _shown(text: str, folder: Path, placeholder: str = "<work>") -> str:
    """A command part as the summary records it (nothing of this machine): ``folder`` as ``placeholder``, the
    interpreter by name."""
    return "python" if text == sys.executable else text.replace(str(folder), placeholder)


def _figures(manifest: dict | None) -> dict | None:
    """The numbers of a stage manifest (no paths: they name the temporary folder)."""
    if manifest is None:
        return None
    return {key: value for key, value in manifest.items() if isinstance(value, (int, float, bool))}


def check_device(device: str) -> None:
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise SystemExit("--device cuda: no CUDA device here (a CPU smoke run: --tiny --device cpu)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--tiny", action="store_true", help="minimal settings, benchmarks in this process")
    parser.add_argument("--out-dir", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument("--budget", type=float, default=BUDGET_S, help="seconds for all steps together")
    args = parser.parse_args(argv)
    if args.device == "cpu" and not args.tiny:
        parser.error("the full suite is for a GPU; on the CPU run --tiny (or each benchmark on its own)")
    check_device(args.device)
    if args.tiny:
        import torch

        torch.set_num_threads(1)  # tiny models gain nothing from more, and a loaded machine's threads wait
    label = "gpu" if args.device == "cuda" else "cpu-tiny"
    args.out_dir.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + args.budget
    python = sys.executable
    steps: dict[str, dict] = {"cuda_tests": cuda_tests_step(args, python, deadline - time.monotonic())}
    for bench in BENCHES:
        out = args.out_dir / f"{bench.name}-{label}.json"
        argv_ = bench_argv(bench, args.device, args.tiny, out)
        remaining = deadline - time.monotonic()
        if remaining < MIN_STEP_S:
            steps[bench.name] = skipped("the suite's time budget is spent")
            continue
        result = run_in_process(bench, argv_) if args.tiny else run_command(
            [python, f"bench/{bench.name}.py", *argv_], min(bench.cap_s, remaining))
        shown = [_shown(part, args.out_dir, "<out-dir>") for part in argv_]
        steps[bench.name] = {"command": [f"bench/{bench.name}.py", *shown], "result_file": out.name, **result}
        print(f"{bench.name}: {result['status']} in {result['seconds']} s", flush=True)
    steps["demo_flow"] = flow_step(args, python, deadline - time.monotonic())
    failed = [name for name, step in steps.items() if step["status"] in ("failed", "timeout")]
    summary = {"device": args.device, "tiny": args.tiny, "budget_s": args.budget,
               "seconds": round(args.budget - (deadline - time.monotonic()), 1), "failed": failed, "steps": steps}
    (args.out_dir / f"gpu_suite-{label}.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps({name: step["status"] for name, step in steps.items()}, indent=2))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
