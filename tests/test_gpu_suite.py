"""``make bench-gpu`` (bench/gpu_suite.py): the tiny CPU run of the whole suite without Prefect or MLflow, and the
GPU plan (devices, result files, the CUDA-only tests, the demo flow on CUDA, the time budget)."""
import ast
import json
import re
import subprocess
import sys
from pathlib import Path

from bench.gpu_suite import (
    BENCHES,
    BUDGET_S,
    CUDA_TEST_FILES,
    CUDA_TESTS_CAP_S,
    FLOW_CAP_S,
    bench_argv,
    cuda_tests_command,
    flow_command,
)

ROOT = Path(__file__).resolve().parents[1]
WITHOUT_PREFECT = ("import runpy, sys; sys.modules.update(prefect=None, mlflow=None); "
                   "sys.argv = ['gpu_suite.py', '--tiny', '--device', 'cpu', '--out-dir', sys.argv[1]]; "
                   "runpy.run_path('bench/gpu_suite.py', run_name='__main__')")


def test_tiny_suite_runs_on_the_cpu_without_prefect_or_mlflow(tmp_path):
    done = subprocess.run([sys.executable, "-c", WITHOUT_PREFECT, str(tmp_path)], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    text = (tmp_path / "gpu_suite-cpu-tiny.json").read_text()
    summary = json.loads(text)
    assert summary["failed"] == [] and summary["tiny"] is True
    for bench in BENCHES:
        step = summary["steps"][bench.name]
        assert step["status"] == "ok", step
        assert json.loads((tmp_path / step["result_file"]).read_text())  # the benchmark's own result file
    assert {summary["steps"][name]["status"] for name in ("cuda_tests", "demo_flow")} == {"skipped"}
    assert str(tmp_path) not in text and sys.executable not in text  # nothing of this machine


def test_gpu_plan(tmp_path):
    for bench in BENCHES:
        argv = bench_argv(bench, "cuda", False, tmp_path / f"{bench.name}-gpu.json")
        assert argv[:2] == ["--device", "cuda"] and argv[-1].endswith(f"{bench.name}-gpu.json")
        assert "--in-process" not in argv and (ROOT / "bench" / f"{bench.name}.py").exists()
    assert BUDGET_S <= 8 * 60 and max(b.cap_s for b in BENCHES) < FLOW_CAP_S < BUDGET_S
    assert CUDA_TESTS_CAP_S < BUDGET_S
    assert cuda_tests_command("python")[-len(CUDA_TEST_FILES) - 2:] == ["-m", "cuda", *CUDA_TEST_FILES]
    flow = flow_command("python", tmp_path)
    assert flow[1:4] == ["-m", "flows.cli", "run"] and "run.device=cuda" in flow and "configs/synthetic.yaml" in flow


def test_every_cuda_test_is_in_the_suite_and_needs_no_prefect():
    marked = {str(path.relative_to(ROOT)) for path in (ROOT / "tests").glob("test_*.py")
              if re.search(r"pytest\.mark\.cuda\b", path.read_text())}
    assert marked == set(CUDA_TEST_FILES)
    for name in (*CUDA_TEST_FILES, "tests/golden_data.py"):
        imported = {alias.name.split(".")[0] for node in ast.walk(ast.parse((ROOT / name).read_text()))
                    if isinstance(node, ast.Import) for alias in node.names}
        imported |= {node.module.split(".")[0] for node in ast.walk(ast.parse((ROOT / name).read_text()))
                     if isinstance(node, ast.ImportFrom) and node.module}
        assert not imported & {"prefect", "mlflow", "flows", "tasks"}, (name, imported)
    assert re.search(r"^bench-gpu:", (ROOT / "Makefile").read_text(), re.M)
