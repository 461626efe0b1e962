"""The Prefect deployments of prefect.yaml: a static check (always) and the end-to-end check against a local
Prefect server, worker and flow run (opt-in: SFC_INTEGRATION=1, a few minutes on 2 cores)."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from flows.deployments import check_prefect_yaml, load_prefect_yaml

ROOT = Path(__file__).resolve().parents[1]
PREFECT_YAML = ROOT / "prefect.yaml"


def test_prefect_yaml_deployments_are_valid():
    assert check_prefect_yaml(PREFECT_YAML) == []


def test_prefect_yaml_covers_every_dataset_and_stage_selection():
    deployments = {d["name"]: d for d in load_prefect_yaml(PREFECT_YAML)["deployments"]}
    for dataset in ("synthetic", "voc", "coco"):
        parameters = deployments[dataset]["parameters"]
        assert parameters["config_path"] == f"configs/{dataset}.yaml"
        assert "stages" not in parameters and "start" not in parameters  # the whole pipeline
    assert deployments["stages"]["parameters"]["stages"]
    assert {d["work_pool"]["name"] for d in deployments.values()} == {"sfc-process"}


def _broken(tmp_path: Path, change) -> list[str]:
    tree = load_prefect_yaml(PREFECT_YAML)
    change(tree)
    path = tmp_path / "prefect.yaml"
    path.write_text(yaml.safe_dump(tree))
    return check_prefect_yaml(path, ROOT)


@pytest.mark.parametrize("change, expected", [
    (lambda t: t["deployments"][0]["parameters"].update(stages=["train_camm"]), "unknown stage 'train_camm'"),
    (lambda t: t["deployments"][0]["parameters"].update(start="nope"), "unknown start stage 'nope'"),
    (lambda t: t["deployments"][0]["parameters"].update(stages=["eval_cam"], start="eval_cam"), "not both"),
    (lambda t: t["deployments"][1]["parameters"].update(config_path="configs/vocc.yaml"),
     "config file configs/vocc.yaml does not exist"),
    (lambda t: t["deployments"][0]["parameters"].update(config="configs/synthetic.yaml"),
     "parameter 'config' is not a parameter"),
    (lambda t: t["deployments"][0]["parameters"].update(overrides="train_cam.max_steps=3"), "overrides must be"),
    (lambda t: t["deployments"][0].update(entrypoint="flows/pipeline.py:no_such_flow"), "does not load"),
    (lambda t: t["deployments"][0].update(entrypoint="flows/pipeline.py:git_commit"), "is not a flow"),
    (lambda t: t["deployments"][0].update(entrypoint="flows/pipelines.py:sfc_pipeline"), "does not exist"),
    (lambda t: t["deployments"][2].update(name=t["deployments"][0]["name"]), "used more than once"),
    (lambda t: t["deployments"][0].update(work_pool={}), "no work_pool.name"),
    (lambda t: t.update(pull=None), "no pull steps"),
])
def test_broken_deployments_are_reported(tmp_path, change, expected):
    problems = _broken(tmp_path, change)
    assert any(expected in problem for problem in problems), problems


def test_stored_deployment_check_names_nothing_of_its_machine():
    text = (ROOT / "bench" / "results" / "deployment_check.json").read_text()
    assert re.fullmatch(r"\d+\.\d+\.\d+", json.loads(text)["python"])
    assert not re.search(r'"/|=/', text), "an absolute path in the stored result"


@pytest.mark.integration
@pytest.mark.skipif(os.environ.get("SFC_INTEGRATION") != "1", reason="set SFC_INTEGRATION=1 (takes minutes)")
def test_deployment_end_to_end(tmp_path):
    """bench/deployment_check.py: server, work pool, `prefect deploy --all`, worker, tiny synthetic run."""
    out = tmp_path / "deployment_check.json"
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "deployment_check.py"), "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, (done.stdout + done.stderr)[-6000:]
    result = json.loads(out.read_text())
    assert result["ok"] and [run["state"] for run in result["flow_runs"]] == ["COMPLETED", "COMPLETED"]
