"""The Prefect flow end to end on a tiny synthetic dataset, tracked in MLflow; and the CLI."""
import json

import yaml
from click.testing import CliRunner

from flows.cli import main
from flows.stages import STAGE_NAMES
from storage import fs
from tests.tiny_flow import TINY  # noqa: F401  (other tests import it from here)


def test_flow_writes_run_directory(finished_run):
    cfg, summary, _ = finished_run
    run_dir = summary["run_dir"]
    assert yaml.safe_load(fs.read_text(f"{run_dir}/config.yaml"))["train_cam"]["max_steps"] == 3
    stats = json.loads(fs.read_text(f"{run_dir}/prepare_data/dataset_stats.json"))
    assert sum(stats["class_counts"].values()) > 0 and "counts" in stats["distribution_coefficients"]
    assert fs.exists(summary["stages"]["train_cam"]["final_checkpoint"])


def test_flow_is_tracked_in_mlflow(finished_run):
    from mlflow.tracking import MlflowClient

    cfg, summary, _ = finished_run
    client = MlflowClient(cfg.tracking_uri())
    parent = client.get_run(summary["mlflow_run_id"])
    assert parent.info.status == "FINISHED" and parent.data.params["train_cam.max_steps"] == "3"
    assert parent.data.tags["prefect_flow_run_id"] and parent.data.tags["config_digest"] == cfg.digest()
    children = client.search_runs([parent.info.experiment_id],
                                  f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    by_stage = {run.data.tags["sfc.stage"]: run for run in children}
    assert set(by_stage) == set(STAGE_NAMES)
    train = by_stage["train_cam"]
    assert [m.step for m in client.get_metric_history(train.info.run_id, "loss")] == [1, 2, 3]
    assert "lr_backbone" in train.data.metrics and "images_per_second" in train.data.metrics
    assert "val_cam/miou" in train.data.metrics and "class_weight/person" in train.data.metrics
    assert train.data.tags["final_checkpoint"].endswith("final.pt")
    assert "class_count/person" in by_stage["prepare_data"].data.metrics
    assert "config.yaml" in [a.path for a in client.list_artifacts(parent.info.run_id)]


def test_cli_show_config_and_errors(tmp_path):
    runner = CliRunner()
    shown = runner.invoke(main, ["show-config", "--config", "configs/synthetic.yaml", "train_cam.max_steps=5"])
    assert shown.exit_code == 0 and yaml.safe_load(shown.output)["train_cam"]["max_steps"] == 5
    bad = runner.invoke(main, ["run", "--config", "configs/synthetic.yaml", "train_cam.crop=33"])
    assert bad.exit_code != 0 and "train_cam.crop" in bad.output and "Traceback" not in bad.output


def test_cli_make_synthetic(tmp_path):
    runner = CliRunner()
    ok = runner.invoke(main, ["make-synthetic", "--out", str(tmp_path / "s"), "--num-images", "12",
                              "--min-size", "48", "--max-size", "56"])
    assert ok.exit_code == 0, ok.output
    assert json.loads(ok.output)["num_images"] == 12
    bad = runner.invoke(main, ["make-synthetic", "--out", str(tmp_path / "t"), "--num-images", "3"])
    assert bad.exit_code != 0 and "num_images" in bad.output


def test_flow_writes_cam_store_and_evaluation(finished_run):
    from mlflow.tracking import MlflowClient

    from storage.cam_store import CamStore

    cfg, summary, _ = finished_run
    run_dir = summary["run_dir"]
    store = CamStore.open(f"{run_dir}/infer_cams/cams.zarr")
    assert len(store) == summary["stages"]["infer_cams"]["images"] > 0
    results = json.loads(fs.read_text(f"{run_dir}/eval_cam/cam_eval.json"))
    assert {"P", "K", "K+0.3P", "K+0.7P", "P (reference rule)"} <= set(results["variants"])
    assert len(results["variants"]["K"]["miou"]) == 19
    client = MlflowClient(cfg.tracking_uri())
    children = client.search_runs([client.get_run(summary["mlflow_run_id"]).info.experiment_id],
                                  "tags.`sfc.stage` = 'eval_cam'")
    artifacts = [a.path for a in client.list_artifacts(children[0].info.run_id, "cam_eval")]
    assert "cam_eval/miou_vs_threshold.png" in artifacts and "cam_eval/per_class_iou.png" in artifacts
    assert "cam_eval/K/miou" in children[0].data.metrics


def test_cli_infer_cams_shard_skips_completed_images(finished_run):
    cfg, summary, overrides = finished_run
    result = CliRunner().invoke(main, ["infer-cams", "--config", "configs/synthetic.yaml", "--shard", "1/2",
                                       *overrides])
    assert result.exit_code == 0, result.output
    manifest = json.loads(result.output[result.output.index("{"):])
    assert manifest["shard"] == "1/2" and manifest["written"] == 0
    assert manifest["images"] == summary["stages"]["infer_cams"]["images"] // 2


def test_flow_runs_refinement_and_segmentation(finished_run):
    from mlflow.tracking import MlflowClient

    from storage.datasets.split_files import load_split_file
    from storage.images import read_mask

    cfg, summary, _ = finished_run
    run_dir, stages = summary["run_dir"], summary["stages"]
    train_ids = load_split_file(stages["prepare_data"]["splits"]["train"]).ids
    for folder in ("make_ir_labels", "make_pseudo_labels"):
        assert sorted(n for n in fs.listdir(f"{run_dir}/{folder}") if n.endswith(".png")) == \
            sorted(f"{i}.png" for i in train_ids)
    labels = read_mask(f"{run_dir}/make_pseudo_labels/{train_ids[0]}.png")
    assert labels.dtype.name == "uint8" and set(labels.ravel().tolist()) <= set(range(21)) | {255}
    assert stages["make_pseudo_labels"]["irn_checkpoint"] == stages["train_irn"]["checkpoint"]
    pseudo = json.loads(fs.read_text(f"{run_dir}/eval_pseudo_labels/pseudo_label_eval.json"))
    assert 0 <= pseudo["scores"]["miou"] <= 1 and "person" in pseudo["scores"]["per_class"]
    seg = json.loads(fs.read_text(stages["eval_seg"]["results"]))
    assert {"no_crf", "crf"} <= set(seg["val"]) and 0 <= seg["val"]["crf"]["miou"] <= 1
    assert fs.exists(stages["eval_seg"]["archive"])
    client = MlflowClient(cfg.tracking_uri())
    parent = client.get_run(summary["mlflow_run_id"])
    seg_run = client.search_runs([parent.info.experiment_id],
                                 f"tags.mlflow.parentRunId = '{parent.info.run_id}' and tags.`sfc.stage` = 'eval_seg'")
    assert any(key.endswith("miou") for key in seg_run[0].data.metrics)
    irn_runs = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}' "
                                  "and tags.`sfc.stage` = 'train_irn'")
    assert [a.path for a in client.list_artifacts(irn_runs[0].info.run_id, "model")] == ["model/irn.pt"]


def test_mlflow_server_serves_the_runs_metrics_and_artifacts(finished_run):
    """What `sfc ui` serves: MLflow's REST API finds the pipeline's runs, per-class metrics and artifacts."""
    import socket
    import subprocess
    import time
    import urllib.request

    from flows.runs import mlflow_server_command

    cfg, summary, _ = finished_run
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command, env = mlflow_server_command(cfg.run.root, port)
    server = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    api = f"http://127.0.0.1:{port}/api/2.0/mlflow"

    def call(path: str, body: dict | None = None) -> dict:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(f"{api}/{path}", data, {"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read())

    try:
        deadline = time.time() + 120
        while True:
            try:
                experiment = call("experiments/get-by-name?experiment_name=sfc")["experiment"]
                break
            except OSError:
                if time.time() > deadline or server.poll() is not None:
                    raise
                time.sleep(1)
        runs = call("runs/search", {"experiment_ids": [experiment["experiment_id"]], "max_results": 100})["runs"]
        children = {next(t["value"] for t in r["data"]["tags"] if t["key"] == "sfc.stage"): r for r in runs
                    if any(t["key"] == "mlflow.parentRunId" and t["value"] == summary["mlflow_run_id"]
                           for t in r["data"].get("tags", []))}
        assert set(children) == set(STAGE_NAMES)
        seg_metrics = {m["key"] for m in children["eval_seg"]["data"]["metrics"]}
        assert any(key.endswith("/iou/person") for key in seg_metrics)
        cam_run = children["eval_cam"]["info"]["run_id"]
        listed = call(f"artifacts/list?run_id={cam_run}&path=cam_eval")["files"]
        assert "cam_eval/per_class_iou.png" in {f["path"] for f in listed}
    finally:
        server.terminate()
        server.wait(timeout=30)
