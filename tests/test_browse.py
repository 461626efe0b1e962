"""Browsing and comparing runs: the parent run's headline figures, the experiment's kind and view, dataset
inputs, logged models, `sfc compare` and `sfc report`, on the tiny pipeline run."""
import json
import shutil
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from flows.cli import main
from flows.config import load_config
from flows.headline import COLUMNS, VIEW_TAG, seconds_metric
from flows.stages import STAGES
from storage import fs
from storage.digests import file_digest


def _require_browser() -> None:
    """Skip, saying how to install it, when this machine has no headless Chromium."""
    from flows.browser import BrowserMissingError, find_browser

    try:
        find_browser()
    except BrowserMissingError as err:
        pytest.skip(str(err))


def _client(cfg):
    from mlflow.tracking import MlflowClient

    return MlflowClient(cfg.tracking_uri())


def _stage_run(client, parent, stage):
    (run,) = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}' "
                                f"and tags.`sfc.stage` = '{stage}'")
    return run


def _record(run_dir, stage):
    return json.loads(fs.read_text(f"{run_dir}/manifests/{stage}.json"))


def test_parent_run_carries_the_headline_figures(finished_run):
    cfg, summary, _ = finished_run
    parent = _client(cfg).get_run(summary["mlflow_run_id"])
    metrics, run_dir = parent.data.metrics, summary["run_dir"]
    seg = _record(run_dir, "eval_seg")["manifest"]["summary"]
    assert metrics["seg_val_miou"] == pytest.approx(seg["val_miou"])
    assert metrics["seg_test_miou_crf"] == pytest.approx(seg["test_miou_crf"])
    assert metrics["pseudo_label_miou"] == pytest.approx(_record(run_dir, "eval_pseudo_labels")["manifest"]["miou"])
    cam = _record(run_dir, "eval_cam")["manifest"]["summary"]
    best = max(cam, key=lambda variant: cam[variant]["miou"])
    assert metrics["cam_seed_miou"] == pytest.approx(cam[best]["miou"]) and parent.data.tags["cam_seed_variant"] == best
    assert metrics["ceiling_ratio"] == pytest.approx(seg["val_miou"] / cfg.tracking.ceiling_val_miou)
    stages = [s.name for s in STAGES if s.enabled(cfg)]
    seconds = [metrics[seconds_metric(stage)] for stage in stages]
    assert all(value > 0 for value in seconds)
    assert metrics["seconds/total"] == pytest.approx(sum(seconds))
    assert seconds == pytest.approx([_record(run_dir, stage)["seconds"] for stage in stages])


def test_experiment_opens_as_model_training_with_the_headline_view(finished_run):
    cfg, summary, _ = finished_run
    client = _client(cfg)
    experiment = client.get_experiment(client.get_run(summary["mlflow_run_id"]).info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    view = json.loads(experiment.tags[VIEW_TAG])
    assert view["selectedColumns"][-len(COLUMNS):] == [f"metrics.`{name}`" for name in COLUMNS]
    pipeline_runs = client.search_runs([experiment.experiment_id], view["searchFilter"])
    assert [run.info.run_id for run in pipeline_runs] == [summary["mlflow_run_id"]]


def test_splits_are_logged_as_dataset_inputs(finished_run):
    cfg, summary, _ = finished_run
    parent = _client(cfg).get_run(summary["mlflow_run_id"])
    splits = summary["stages"]["prepare_data"]["splits"]
    logged = {role: d.dataset for d in parent.inputs.dataset_inputs
              for role in next(t.value for t in d.tags if t.key == "mlflow.data.context").split("+")}
    assert set(logged) == set(splits)
    assert len(parent.inputs.dataset_inputs) == len(set(splits.values()))  # train_aug is train and seed split
    for role, url in splits.items():
        assert logged[role].digest == file_digest(url) and json.loads(logged[role].source)["uri"] == url
        assert logged[role].name.startswith("synthetic/")
    assert json.loads(logged["train"].profile)["images"] == summary["stages"]["infer_cams"]["images"]


def _logged_model(client, cfg, summary, stage):
    parent = client.get_run(summary["mlflow_run_id"])
    run = _stage_run(client, parent, stage)
    (model,) = client.search_logged_models([parent.info.experiment_id],
                                           filter_string=f"source_run_id = '{run.info.run_id}'")
    return model


def test_trained_models_are_mlflow_models_that_predict(finished_run):
    import mlflow.pytorch

    from storage.datasets.split_files import load_split_file
    from storage.images import read_rgb
    from storage.transforms import normalize
    from tasks.eval_seg import load_segmenter

    cfg, summary, _ = finished_run
    client = _client(cfg)
    split = load_split_file(summary["stages"]["prepare_data"]["splits"]["val"])
    image = np.array(read_rgb(split.image_url(split.ids[0])))
    batch = torch.from_numpy(image).permute(2, 0, 1)[None].float()
    seg = _logged_model(client, cfg, summary, "train_seg")
    predictor = mlflow.pytorch.load_model(seg.model_uri)
    logits = predictor(batch)
    assert logits.shape == (1, len(split.class_names), *image.shape[:2])
    direct = load_segmenter(summary["stages"]["train_seg"]["checkpoint"], split.class_names).eval()
    expected = direct(torch.from_numpy(normalize(image)).permute(2, 0, 1)[None])
    expected = torch.nn.functional.interpolate(expected, image.shape[:2], mode="bilinear", align_corners=False)
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)
    extra = client.list_logged_model_artifacts(seg.model_id, "extra_files")
    assert "config.yaml" in {Path(a.path).name for a in extra}
    cam = mlflow.pytorch.load_model(_logged_model(client, cfg, summary, "train_cam").model_uri)
    probabilities = cam(batch)
    assert probabilities.shape == (1, len(split.class_names) - 1)
    assert bool(((probabilities >= 0) & (probabilities <= 1)).all())


def _copy_run(cfg, name: str, edit_config: dict | None = None) -> str:
    """A copy of the run under another name, its records pointing into the copy."""
    source, target = Path(cfg.run_dir), Path(cfg.run.root) / name
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(source, target)
    for path in [*target.glob("manifests/*.json"), target / "config.yaml"]:
        path.write_text(path.read_text().replace(str(source), str(target)).replace("name: tiny\n", f"name: {name}\n"))
    if edit_config:
        copy = load_config(str(target / "config.yaml"))
        tree = copy.model_dump(mode="json")
        for section, values in edit_config.items():
            tree[section].update(values)
        (target / "config.yaml").write_text(type(copy).model_validate(tree).to_yaml())
    return str(target)


def test_compare_shows_figures_class_deltas_and_settings(finished_run, tmp_path):
    cfg, summary, _ = finished_run
    other = _copy_run(cfg, "tiny-flipless", {"eval_seg": {"flip": not cfg.eval_seg.flip}})
    results_url = f"{other}/eval_seg/seg_eval.json"
    results = json.loads(fs.read_text(results_url))
    results["val"]["no_crf"]["per_class"]["person"]["iou"] += 0.125
    fs.write_text(results_url, json.dumps(results))
    record = _record(other, "eval_seg")
    record["manifest"]["summary"]["val_miou"] += 0.25
    fs.write_text(f"{other}/manifests/eval_seg.json", json.dumps(record))

    chart = tmp_path / "chart.png"
    result = CliRunner().invoke(main, ["compare", "tiny", "tiny-flipless", "--root", cfg.run.root,
                                       "--out", str(chart)])
    assert result.exit_code == 0, result.output
    rows = {line.split()[0]: line.split() for line in result.output.splitlines() if line.strip()}
    assert rows["seg_val_miou"][-1] == "+0.2500" and rows["pseudo_label_miou"][-1] == "+0.0000"
    assert rows["person"][-1] == "+0.1250"  # the segmentation table is the last per-class table
    assert "eval_seg.flip: tiny=" in result.output and "run.name" not in result.output
    assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_compare_refuses_unknown_runs_and_other_datasets(finished_run):
    cfg, _, _ = finished_run
    runner = CliRunner()
    unknown = runner.invoke(main, ["compare", "tiny", "no-such-run", "--root", cfg.run.root])
    assert unknown.exit_code != 0 and "no run named 'no-such-run'" in unknown.output
    assert len(unknown.output.strip().splitlines()) == 1
    alone = runner.invoke(main, ["compare", "tiny", "--root", cfg.run.root])
    assert alone.exit_code != 0 and "at least two runs" in alone.output
    other = _copy_run(cfg, "tiny-other-classes")
    record = _record(other, "prepare_data")
    record["manifest"]["class_names"] = [*record["manifest"]["class_names"][:-1], "tvscreen"]
    fs.write_text(f"{other}/manifests/prepare_data.json", json.dumps(record))
    different = runner.invoke(main, ["compare", "tiny", "tiny-other-classes", "--root", cfg.run.root])
    assert different.exit_code != 0 and "different datasets" in different.output and "tvscreen" in different.output


class _Page(HTMLParser):
    def __init__(self):
        super().__init__()
        self.images, self.text = [], []

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.images.append(dict(attrs))

    def handle_data(self, data):
        self.text.append(data)


def _parse(url: str) -> _Page:
    page = _Page()
    page.feed(fs.read_text(url))
    page.close()
    return page


def test_flow_writes_the_report_and_logs_it(finished_run):
    import base64

    cfg, summary, _ = finished_run
    url = f"{summary['run_dir']}/report.html"
    page = _parse(url)
    text = " ".join(page.text)
    seg = _record(summary["run_dir"], "eval_seg")["manifest"]["summary"]
    assert f"{seg['val_miou']:.4f}" in text and "Resolved configuration" in text and "not finished" not in text
    names = {image["alt"] for image in page.images}
    assert {"miou_vs_threshold.png", "per_class_iou.png", "pseudo_label_eval_iou.png"} <= names
    assert any(name.startswith("seg_overlays/") for name in names)
    for image in page.images:
        assert base64.b64decode(image["src"].removeprefix("data:image/png;base64,"))[:4] == b"\x89PNG"
    artifacts = [a.path for a in _client(cfg).list_artifacts(summary["mlflow_run_id"])]
    assert "report.html" in artifacts


def test_report_of_a_partial_run_names_the_missing_stages(finished_run):
    cfg, _, _ = finished_run
    other = _copy_run(cfg, "tiny-partial")
    for stage in ("train_seg", "eval_seg"):
        fs.remove(f"{other}/manifests/{stage}.json")
    fs.remove(f"{other}/report.html")
    result = CliRunner().invoke(main, ["report", "tiny-partial", "--root", cfg.run.root])
    assert result.exit_code == 0, result.output
    assert result.output.strip().splitlines()[-1] == f"{other}/report.html"
    assert "no MLflow run of tiny-partial" in result.output  # a copy has no MLflow run of its own
    text = " ".join(_parse(f"{other}/report.html").text)
    assert "Stages not finished: train_seg, eval_seg" in text and "seg_overlays" not in text
    missing = CliRunner().invoke(main, ["report", "nothing-here", "--root", cfg.run.root])
    assert missing.exit_code != 0 and "no run named 'nothing-here'" in missing.output


def test_report_pictures_load_in_a_real_browser(finished_run):
    from flows.browser import check_page

    _require_browser()
    cfg, summary, _ = finished_run
    result = check_page(f"{summary['run_dir']}/report.html")
    assert result.images >= 4 and result.broken == 0


def test_a_broken_picture_is_caught_by_the_browser_check(tmp_path):
    from flows.browser import check_page
    from flows.report import _IMAGE_CHECK

    _require_browser()
    page = tmp_path / "page.html"
    page.write_text(f"<html><body><img alt='a' src='data:image/png;base64,AAAA'>{_IMAGE_CHECK}</body></html>")
    assert check_page(page).broken == 1


def test_prefect_server_command_serves_the_project_home(monkeypatch, tmp_path):
    from flows.runs import prefect_server_command

    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:9/api")
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path))
    command, env = prefect_server_command(4321)
    assert command[-6:] == ["server", "start", "--host", "127.0.0.1", "--port", "4321"]
    assert env["PREFECT_HOME"] == str(tmp_path) and "PREFECT_API_URL" not in env



def test_models_are_registered_under_the_configured_name(finished_run, tmp_path):
    from mlflow.tracking import MlflowClient

    from flows.logged_models import log_trained_model
    from storage.tracking import open_tracker

    cfg, summary, _ = finished_run
    cfg = cfg.model_copy(update={"tracking": cfg.tracking.model_copy(update={"register_as": "sfc-tiny"})})
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    parent = open_tracker(uri, "registry", (tmp_path / "artifacts").as_uri(), "registry")
    for stage in ("train_cam", "train_seg"):
        log_trained_model(stage, cfg, summary["stages"][stage], parent.child(stage))
    client = MlflowClient(uri)
    assert {m.name for m in client.search_registered_models()} == {"sfc-tiny", "sfc-tiny-cam"}
    (version,) = client.search_model_versions("name = 'sfc-tiny'")
    assert client.get_run(version.run_id).data.tags["sfc.stage"] == "train_seg"


def test_runs_table_link_opens_the_headline_view():
    from flows.headline import runs_table_url

    url = runs_table_url("http://127.0.0.1:5000/", "7")
    assert url == ("http://127.0.0.1:5000/#/experiments/7/runs?workflowType=machine_learning"
                   "&viewStateShareKey=sfc-headline")


def test_mlflow_ui_shows_the_headline_columns_in_a_real_browser(finished_run):
    """What a user sees: `sfc ui`'s printed link opens the runs table with the pipeline run and its figures."""
    import socket
    import subprocess
    import time
    import urllib.request

    from flows.browser import rendered_dom
    from flows.headline import runs_table_url
    from flows.runs import mlflow_server_command

    _require_browser()
    cfg, summary, _ = finished_run
    experiment = _client(cfg).get_run(summary["mlflow_run_id"]).info.experiment_id
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command, env = mlflow_server_command(cfg.run.root, port)
    server = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            try:
                urllib.request.urlopen(f"{base}/health", timeout=5).close()
                break
            except OSError:
                if time.time() > deadline or server.poll() is not None:
                    raise
                time.sleep(1)
        dom = rendered_dom(runs_table_url(base, experiment), wait_ms=20000)
    finally:
        server.terminate()
        server.wait(timeout=30)
    assert ">tiny<" in dom and "seg_val_miou" in dom and "cam_seed_miou" in dom
    assert "train_cam<" not in dom  # the stage runs are filtered out of the headline view
    assert f"{_client(cfg).get_run(summary['mlflow_run_id']).data.metrics['seg_val_miou']:.3f}"[:4] in dom
