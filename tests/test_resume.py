"""Resume and stage selection: finished stages come from the cache across flow runs, a changed parameter re-runs
only its stage and those after it, a failed run resumes in the same MLflow run, and ``sfc status`` tells."""
import json
import logging

import pytest
from click.testing import CliRunner

from flows.cli import main
from flows.config import load_config
from flows.records import manifest_url, started_url
from flows.runs import locate_run, run_status
from flows.stages import STAGE_NAMES
from storage import fs
from storage.cam_store import CamStore
from storage.digests import damaged_units
from storage.errors import RunNotFoundError
from tasks.engine.shards import partial_dir
from tests.test_flow import TINY


def _finished_times(run_dir: str) -> dict[str, float]:
    return {name: json.loads(fs.read_text(manifest_url(run_dir, name)))["finished"] for name in STAGE_NAMES}


@pytest.fixture(scope="module")
def resumable(tmp_path_factory, prefect_harness):
    from flows.pipeline import sfc_pipeline

    tmp = tmp_path_factory.mktemp("resume")
    overrides = [*TINY, f"run.root={tmp / 'runs'}", f"prepare_data.root={tmp / 'data'}", "run.name=again"]
    cfg = load_config("configs/synthetic.yaml", overrides)
    first = sfc_pipeline(cfg.model_dump(mode="json"))
    return cfg, overrides, first, _finished_times(cfg.run_dir)


def test_rerun_takes_every_stage_from_the_cache_and_the_same_mlflow_run(resumable):
    from flows.pipeline import sfc_pipeline

    cfg, _, first, times = resumable
    again = sfc_pipeline(cfg.model_dump(mode="json"))
    assert again["mlflow_run_id"] == first["mlflow_run_id"]
    assert again["stages"] == first["stages"]
    assert _finished_times(cfg.run_dir) == times  # no stage ran again
    checkpoint = first["stages"]["train_cam"]["checkpoint"]
    assert fs.exists(checkpoint)
    assert all(s.state == "done" for s in run_status(cfg))


def test_changed_parameter_reruns_only_that_stage_and_later(resumable):
    from flows.pipeline import sfc_pipeline

    cfg, overrides, first, _ = resumable
    before = {n: json.loads(fs.read_text(manifest_url(cfg.run_dir, n)))["cache_key"] for n in STAGE_NAMES}
    changed = load_config("configs/synthetic.yaml", [*overrides, "eval_cam.proto_weights=[0.5]"])
    assert [s.state for s in run_status(changed)] == ["stale" if n == "eval_cam" else "done" for n in STAGE_NAMES]
    result = sfc_pipeline(changed.model_dump(mode="json"))
    after = {n: json.loads(fs.read_text(manifest_url(cfg.run_dir, n)))["cache_key"] for n in STAGE_NAMES}
    assert {n for n in STAGE_NAMES if before[n] != after[n]} == {"eval_cam"}
    assert "K+0.5P" in result["stages"]["eval_cam"]["summary"]
    assert result["stages"]["train_cam"] == first["stages"]["train_cam"]
    assert result["mlflow_run_id"] != first["mlflow_run_id"]  # another config is another MLflow run


def test_changed_refinement_parameter_reruns_pseudo_labels_and_segmentation(resumable):
    from flows.pipeline import sfc_pipeline

    cfg, overrides, first, _ = resumable
    sfc_pipeline(cfg.model_dump(mode="json"))  # back to the fixture's configuration (other tests change it)
    before = {n: json.loads(fs.read_text(manifest_url(cfg.run_dir, n)))["cache_key"] for n in STAGE_NAMES}
    changed = load_config("configs/synthetic.yaml", [*overrides, "make_pseudo_labels.beta=8"])
    later = {"make_pseudo_labels", "eval_pseudo_labels", "train_seg", "eval_seg"}
    assert {s.name for s in run_status(changed) if s.state == "stale"} == later
    result = sfc_pipeline(changed.model_dump(mode="json"))  # the beta-10 labels and model are replaced, not mixed
    after = {n: json.loads(fs.read_text(manifest_url(cfg.run_dir, n)))["cache_key"] for n in STAGE_NAMES}
    assert {n for n in STAGE_NAMES if before[n] != after[n]} == later
    assert result["stages"]["train_irn"] == first["stages"]["train_irn"]
    settings = json.loads(fs.read_text(f"{cfg.run_dir}/make_pseudo_labels/_settings.json"))
    assert settings["config"]["beta"] == 8


def test_missing_outputs_of_a_cached_stage_are_redone(resumable):
    from flows.pipeline import sfc_pipeline

    cfg, *_ = resumable
    results = f"{cfg.run_dir}/eval_cam/cam_eval.json"
    fs.remove(results)
    sfc_pipeline(cfg.model_dump(mode="json"), ["eval_cam"])
    assert fs.exists(results)


def _flip_a_byte(url: str) -> None:
    data = bytearray(fs.read_bytes(url))
    data[len(data) // 2] ^= 0xFF
    fs.write_bytes(url, bytes(data))


def test_damaged_outputs_are_redone_not_trusted_and_later_stages_stay_cached(resumable, caplog):
    from flows.pipeline import sfc_pipeline

    cfg, *_ = resumable
    sfc_pipeline(cfg.model_dump(mode="json"))  # back to the fixture's configuration (other tests change it)
    times = _finished_times(cfg.run_dir)
    records = {n: json.loads(fs.read_text(manifest_url(cfg.run_dir, n))) for n in STAGE_NAMES}
    store = records["infer_cams"]["manifest"]["store"]
    image_id = CamStore.open(store).ids()[0]
    chunk = next(f"{store}/{image_id}/{p}" for p in fs.find(f"{store}/{image_id}") if p.startswith("c/"))
    label = f"{records['make_pseudo_labels']['manifest']['out_dir']}/{image_id}.png"
    weights = records["train_cam"]["manifest"]["checkpoint"]
    for damaged in (weights, chunk, label):
        _flip_a_byte(damaged)
    assert {s.name: s.state for s in run_status(cfg)}["infer_cams"] == "done"  # without --verify: not hashed
    shown = CliRunner().invoke(main, ["status", cfg.run.name, "--root", cfg.run.root, "--verify"])
    assert shown.exit_code == 0 and f"damaged: {store}/{image_id}" in shown.output and label in shown.output
    states = {s.name: s.state for s in run_status(cfg, verify=True)}
    assert {n for n, state in states.items() if state == "damaged"} == {"train_cam", "infer_cams", "make_pseudo_labels"}
    assert all(state in ("done", "damaged") for state in states.values())
    with caplog.at_level(logging.WARNING, logger="flows.pipeline"):
        again = sfc_pipeline(cfg.model_dump(mode="json"))
    warnings = "\n".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert all(name in warnings for name in (weights, f"{store}/{image_id}", label))
    redone = {n for n, t in _finished_times(cfg.run_dir).items() if t != times[n]}
    assert redone == {"train_cam", "infer_cams", "make_pseudo_labels"}  # identical again: nothing else reruns
    assert again["stages"]["infer_cams"]["content_hash"] == records["infer_cams"]["manifest"]["content_hash"]
    assert damaged_units(json.loads(fs.read_text(manifest_url(cfg.run_dir, "infer_cams")))["outputs"]) == []
    CamStore.open(store).load(image_id)


def test_what_a_stage_left_under_other_settings_is_cleared_before_it_runs(resumable):
    from flows.pipeline import sfc_pipeline

    cfg, overrides, *_ = resumable
    before = fs.read_text(f"{cfg.run_dir}/eval_cam/cam_eval.json")
    sharded = load_config("configs/synthetic.yaml", [*overrides, "run.shards=2"])
    fs.remove(manifest_url(cfg.run_dir, "eval_cam"))  # as if it was killed while running under other settings
    fs.write_text(started_url(cfg.run_dir, "eval_cam"), json.dumps({"cache_key": "eval_cam-other"}))
    stale = f"{partial_dir(f'{cfg.run_dir}/eval_cam', 'cam_eval')}/0-of-2.pt"
    fs.write_bytes(stale, b"not the counts of these settings")
    assert {s.name: s.state for s in run_status(cfg)}["eval_cam"] == "started"
    result = sfc_pipeline(sharded.model_dump(mode="json"), ["eval_cam"])
    assert result["stages"]["eval_cam"]["shards"] == 2
    assert fs.read_text(f"{cfg.run_dir}/eval_cam/cam_eval.json") == before
    assert not fs.exists(stale) and not fs.exists(started_url(cfg.run_dir, "eval_cam"))


def test_failed_stage_is_reported_and_resume_finishes_in_the_same_mlflow_run(resumable, monkeypatch):
    from mlflow.tracking import MlflowClient

    import tasks.eval_cam
    from flows.pipeline import sfc_pipeline

    cfg, overrides, first, _ = resumable
    failing = load_config("configs/synthetic.yaml", [*overrides, "eval_cam.overlays=1"])

    def broken(*args, **kwargs):
        raise OSError("disk on fire")

    monkeypatch.setattr(tasks.eval_cam, "overlay_png", broken)
    with pytest.raises(Exception, match="disk on fire"):
        sfc_pipeline(failing.model_dump(mode="json"), start="eval_cam")
    status = {s.name: s for s in run_status(failing)}
    assert status["eval_cam"].state == "failed" and "disk on fire" in status["eval_cam"].error
    shown = CliRunner().invoke(main, ["status", failing.run.name, "--root", failing.run.root])
    assert shown.exit_code == 0 and "failed" in shown.output and "disk on fire" in shown.output
    client = MlflowClient(failing.tracking_uri())
    failed_run = client.search_runs([client.get_run(first["mlflow_run_id"]).info.experiment_id],
                                    f"tags.config_digest = '{failing.digest()}'")[0]
    assert failed_run.info.status == "FAILED"
    monkeypatch.undo()
    resumed = CliRunner().invoke(main, ["resume", failing.run.name, "--root", failing.run.root])
    assert resumed.exit_code == 0, resumed.output
    assert json.loads(resumed.output[resumed.output.index("{"):])["mlflow_run_id"] == failed_run.info.run_id
    assert client.get_run(failed_run.info.run_id).info.status == "FINISHED"
    assert all(s.state == "done" for s in run_status(failing))
    assert locate_run(failed_run.info.run_id, failing.run.root).digest() == failing.digest()


def test_stage_selection_needs_finished_inputs(tmp_path, prefect_harness):
    from flows.pipeline import sfc_pipeline

    cfg = load_config("configs/synthetic.yaml", [*TINY, f"run.root={tmp_path}", "run.name=fresh"])
    with pytest.raises(FileNotFoundError, match="prepare_data.*has not finished"):
        sfc_pipeline(cfg.model_dump(mode="json"), ["eval_cam"])
    with pytest.raises(ValueError, match="unknown stage"):
        sfc_pipeline(cfg.model_dump(mode="json"), ["train_seg_typo"])


def test_unknown_run_is_a_clear_error(tmp_path):
    with pytest.raises(RunNotFoundError, match="no run named 'nope'"):
        locate_run("nope", str(tmp_path))
    result = CliRunner().invoke(main, ["resume", "nope", "--root", str(tmp_path)])
    assert result.exit_code != 0 and "no run named" in result.output and "Traceback" not in result.output


def test_unwritable_run_folder_is_a_clear_error(tmp_path):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the runs folder should be")
    result = CliRunner().invoke(main, ["run", "--config", "configs/synthetic.yaml", *TINY,
                                       f"run.root={blocker}/runs", f"prepare_data.root={tmp_path / 'data'}"])
    assert result.exit_code != 0 and "not-a-folder" in result.output and "Traceback" not in result.output
