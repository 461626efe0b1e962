"""Processes starting at once on a new SQLite MLflow store: one creates and migrates it, one experiment results."""
import multiprocessing
import traceback

from storage.tracking import open_tracker

EXPERIMENT = "concurrent"


def _open(uri: str, artifact_root: str, name: str, barrier, results) -> None:
    """Open the tracker once all processes are ready; report (experiment id, run id) or the traceback."""
    barrier.wait(timeout=120)
    try:
        tracker = open_tracker(uri, EXPERIMENT, artifact_root, name)
        results.put((tracker.experiment_id, tracker.run_id))
    except Exception:
        results.put(traceback.format_exc())


def test_two_processes_create_one_store_and_experiment(tmp_path):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    context = multiprocessing.get_context("spawn")
    barrier, results = context.Barrier(2), context.Queue()
    processes = [context.Process(target=_open, args=(uri, (tmp_path / "artifacts").as_uri(), f"run{i}", barrier,
                                                     results)) for i in range(2)]
    for process in processes:
        process.start()
    reports = [results.get(timeout=180) for _ in processes]
    for process in processes:
        process.join(timeout=60)
    errors = [report for report in reports if isinstance(report, str)]
    assert not errors, "\n".join(errors)
    assert len({experiment for experiment, _ in reports}) == 1 and len({run for _, run in reports}) == 2
    found = MlflowClient(uri).search_experiments(filter_string=f"name = '{EXPERIMENT}'")
    assert [e.experiment_id for e in found] == [reports[0][0]]
    assert (tmp_path / "mlflow.db.lock").exists()


def test_experiment_created_meanwhile_by_another_process_is_used(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    from storage.tracking import _experiment_id

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    existing = client.create_experiment(EXPERIMENT)
    lookups = [None, client.get_experiment_by_name(EXPERIMENT)]  # the first misses it: created in between
    monkeypatch.setattr(client, "get_experiment_by_name", lambda name: lookups.pop(0))
    assert _experiment_id(client, EXPERIMENT, (tmp_path / "artifacts").as_uri()) == existing
