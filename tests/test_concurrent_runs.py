"""Two runs with different names started at the same time in one runs folder (one SQLite MLflow store) finish
without touching each other's files or MLflow runs.

Opt-in (two pipeline processes, minutes on 2 cores): ``SFC_INTEGRATION=1 .venv/bin/python -m pytest
tests/test_concurrent_runs.py``."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from flows.config import load_config
from storage import fs
from tests.test_flow import TINY

ROOT = Path(__file__).resolve().parents[1]

pytestmark = [pytest.mark.integration, pytest.mark.skipif(
    os.environ.get("SFC_INTEGRATION") != "1", reason="set SFC_INTEGRATION=1 (two pipelines at once)")]


def test_two_runs_at_once_stay_apart(tmp_path):
    from mlflow.tracking import MlflowClient

    common = [*TINY, f"run.root={tmp_path / 'runs'}", f"prepare_data.root={tmp_path / 'data'}"]
    subprocess.run([sys.executable, "-m", "flows.cli", "make-synthetic", "--out", str(tmp_path / "data"),
                    "--num-images", "40", "--min-size", "64", "--max-size", "80"], cwd=ROOT, check=True,
                   stdout=subprocess.DEVNULL)  # both runs read one dataset: generate it before they start
    names = ("first", "second")
    processes = [subprocess.Popen([sys.executable, "-m", "flows.cli", "run", "--config", "configs/synthetic.yaml",
                                   *common, f"run.name={name}", f"train_cam.lr={0.01 if name == 'first' else 0.02}"],
                                  cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE) for name in names]
    outputs = [p.communicate(timeout=1500) for p in processes]
    for process, (_, err) in zip(processes, outputs):
        assert process.returncode == 0, err.decode()[-3000:]
    summaries = [json.loads(out.decode()[out.decode().index("{"):]) for out, _ in outputs]
    configs = [load_config(f"{tmp_path}/runs/{name}/config.yaml") for name in names]
    assert [c.train_cam.lr for c in configs] == [0.01, 0.02]
    client = MlflowClient(configs[0].tracking_uri())
    parents = [client.get_run(s["mlflow_run_id"]) for s in summaries]
    assert [p.data.tags["run_dir"] for p in parents] == [c.run_dir for c in configs]
    assert all(p.info.status == "FINISHED" for p in parents)
    for parent, cfg in zip(parents, configs):
        children = client.search_runs([parent.info.experiment_id],
                                      f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
        assert len(children) == len({r.data.tags["sfc.stage"] for r in children}) > 5
        manifest = json.loads(fs.read_text(f"{cfg.run_dir}/manifests/train_cam.json"))["manifest"]
        assert manifest["checkpoint"].startswith(cfg.run_dir)
