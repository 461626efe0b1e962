"""MLflow tracking: one parent run per pipeline run, one nested run per stage (through MlflowClient, so it does not
depend on the fluent API's thread-local active run)."""
from __future__ import annotations

import fcntl
import json
import logging
import os
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

log = logging.getLogger(__name__)

_BATCH = 100  # MLflow's limit of params per log_batch call is 100


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1}."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


class Tracker:
    """Logs to one MLflow run; a tracker without a run (``Tracker.null()``) accepts and drops everything."""

    def __init__(self, client: Any | None, run_id: str | None, experiment_id: str | None = None,
                 resumed: bool = False, tracking_uri: str | None = None):
        self.client = client
        self.run_id = run_id
        self.experiment_id = experiment_id
        self.resumed = resumed
        self.tracking_uri = tracking_uri

    @classmethod
    def null(cls) -> Tracker:
        return cls(None, None)

    @property
    def active(self) -> bool:
        return self.client is not None

    def log_params(self, params: Mapping[str, Any]) -> None:
        if self.client is None:
            return
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in flatten(params).items()]
        for start in range(0, len(items), _BATCH):
            self.client.log_batch(self.run_id, params=items[start:start + _BATCH])

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        if self.client is None:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step or 0) for k, v in flatten(metrics).items()]
        for start in range(0, len(items), 1000):
            self.client.log_batch(self.run_id, metrics=items[start:start + 1000])

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        if self.client is not None and tags:
            from mlflow.entities import RunTag

            self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_artifact(self, local_path: str | Path, artifact_path: str | None = None) -> None:
        if self.client is not None:
            self.client.log_artifact(self.run_id, str(local_path), artifact_path)

    def log_text(self, text: str, artifact_file: str) -> None:
        if self.client is not None:
            self.client.log_text(self.run_id, text, artifact_file)

    def log_dict(self, data: Mapping[str, Any], artifact_file: str) -> None:
        self.log_text(json.dumps(data, indent=2, default=str), artifact_file)

    def log_bytes(self, data: bytes, artifact_file: str) -> None:
        """Log in-memory bytes (e.g. a PNG) as an artifact."""
        if not self.active:
            return
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / Path(artifact_file).name
            path.write_bytes(data)
            parent = str(Path(artifact_file).parent)
            self.log_artifact(path, None if parent == "." else parent)

    def log_datasets(self, datasets: Sequence[DatasetRecord]) -> None:
        """Log dataset inputs (MLflow's Dataset column and the run page's Datasets): name, digest, source URL, and
        the role it plays (``mlflow.data.context``: train, val, ...). A dataset logged before is not repeated."""
        if self.client is None or not datasets:
            return
        from mlflow.entities import Dataset, DatasetInput, InputTag

        logged = {(d.dataset.name, d.dataset.digest) for d in self.client.get_run(self.run_id).inputs.dataset_inputs}
        inputs = [DatasetInput(Dataset(d.name, d.digest, _source_type(d.source), json.dumps({"uri": d.source}),
                                       profile=json.dumps(d.profile)), [InputTag("mlflow.data.context", d.context)])
                  for d in datasets if (d.name, d.digest) not in logged]
        if inputs:
            self.client.log_inputs(self.run_id, datasets=inputs)

    def log_pytorch_model(self, model: Any, name: str, input_shape: Sequence[int], output_shape: Sequence[int],
                          files: Mapping[str, str], metadata: Mapping[str, Any], code_dir: str | None = None,
                          registered_name: str | None = None) -> str | None:
        """Log ``model`` as an MLflow model (PyTorch flavour) of this run, loadable with ``mlflow.pytorch.load_model``:
        a float32 tensor signature (-1 = any size), ``files`` (name -> text, e.g. the config that made it) beside
        it, ``metadata`` in its MLmodel, ``code_dir`` (the package its classes come from) copied along, and
        registered under ``registered_name`` when given. Returns the model's URI."""
        if self.client is None:
            return None
        import mlflow
        import mlflow.pytorch
        import numpy as np
        import torch
        from mlflow.models import ModelSignature
        from mlflow.types import Schema, TensorSpec

        signature = ModelSignature(inputs=Schema([TensorSpec(np.dtype(np.float32), tuple(input_shape), "image")]),
                                   outputs=Schema([TensorSpec(np.dtype(np.float32), tuple(output_shape))]))
        requirements = [f"torch=={torch.__version__.split('+')[0]}", f"numpy=={np.__version__}"]
        if self.tracking_uri:
            mlflow.set_tracking_uri(self.tracking_uri)
        with tempfile.TemporaryDirectory() as tmp:
            extra = []
            for file_name, text in files.items():
                (Path(tmp) / file_name).write_text(text)
                extra.append(str(Path(tmp) / file_name))
            with mlflow.start_run(run_id=self.run_id, experiment_id=self.experiment_id):
                info = mlflow.pytorch.log_model(model, name=name, signature=signature, extra_files=extra,
                                                serialization_format="pickle",  # any image size
                                                metadata=dict(metadata), pip_requirements=requirements,
                                                code_paths=[code_dir] if code_dir else None,
                                                registered_model_name=registered_name)
        self.client.update_run(self.run_id, status="RUNNING")  # the stage's own end marks it finished
        return info.model_uri

    def child(self, name: str) -> Tracker:
        """The nested run of one stage: the existing one when the parent is resumed, else a new one."""
        if self.client is None:
            return self
        found = self.client.search_runs(
            [self.experiment_id], f"tags.mlflow.parentRunId = '{self.run_id}' and tags.`sfc.stage` = '{name}'",
            max_results=1)
        if found:
            self.client.update_run(found[0].info.run_id, status="RUNNING")
            return Tracker(self.client, found[0].info.run_id, self.experiment_id, tracking_uri=self.tracking_uri)
        run = self.client.create_run(self.experiment_id, run_name=name,
                                     tags={"mlflow.parentRunId": self.run_id, "sfc.stage": name})
        return Tracker(self.client, run.info.run_id, self.experiment_id, tracking_uri=self.tracking_uri)

    def finish(self, status: str = "FINISHED") -> None:
        if self.client is not None:
            self.client.set_terminated(self.run_id, status)


@dataclass(frozen=True)
class DatasetRecord:
    """One dataset input of a run: a split file in its role."""

    name: str  # e.g. synthetic/train_aug
    digest: str  # the split file's content hash
    source: str  # its URL
    context: str  # its roles, e.g. train, val, or train+seed for a split used twice
    profile: Mapping[str, Any]  # e.g. {"images": 600, "classes": 21}


def _source_type(url: str) -> str:
    scheme = url.split("://", 1)[0] if "://" in url else "local"
    return {"file": "local", "s3": "s3", "gs": "gcs", "http": "http", "https": "http"}.get(scheme, scheme)


def _sqlite_database(tracking_uri: str) -> str | None:
    """The database file of a ``sqlite:///`` URI; None for other URIs and in-memory SQLite."""
    if not tracking_uri.startswith("sqlite:"):
        return None
    from sqlalchemy.engine import make_url

    database = make_url(tracking_uri).database
    return None if database in (None, "", ":memory:") else database


@contextmanager
def store_lock(tracking_uri: str) -> Iterator[None]:
    """Hold an exclusive lock on ``<database>.lock`` next to a SQLite store's database, so that processes starting
    at once on a new store neither create and migrate its schema twice nor create one experiment twice. Other stores
    take no lock."""
    database = _sqlite_database(tracking_uri)
    if database is None:
        yield
        return
    with open(f"{database}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield  # closing the file releases the lock


def prepare_store(tracking_uri: str) -> None:
    """Create (and migrate) the store now, under ``store_lock``, e.g. before a server opens it."""
    from mlflow.tracking import MlflowClient

    with store_lock(tracking_uri):
        MlflowClient(tracking_uri=tracking_uri)  # opens the store


EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}  # MLflow's "model training" experiments


def _experiment_id(client: Any, name: str, artifact_root: str, tags: Mapping[str, str] | None = None) -> str:
    """The id of experiment ``name``, created if missing, also when another process creates it at the same time;
    its tags are set to ``tags`` (only those that differ are written)."""
    from mlflow.exceptions import MlflowException

    found = client.get_experiment_by_name(name)
    if found is None:
        try:
            client.create_experiment(name, artifact_location=artifact_root)
        except MlflowException as err:
            if err.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        found = client.get_experiment_by_name(name)
    for key, value in (tags or {}).items():
        if found.tags.get(key) != value:
            client.set_experiment_tag(found.experiment_id, key, value)
    return found.experiment_id


def open_tracker(tracking_uri: str, experiment: str, artifact_root: str, run_name: str,
                 tags: Mapping[str, str] | None = None, resume_on: Mapping[str, str] | None = None,
                 experiment_tags: Mapping[str, str] | None = None) -> Tracker:
    """Create (or reuse) the experiment, tagged as a model-training experiment with ``experiment_tags``, and start
    a parent run, or re-enter the parent run whose tags equal ``resume_on`` (a resumed pipeline run continues in
    the same MLflow run)."""
    from mlflow.tracking import MlflowClient

    with store_lock(tracking_uri):  # creating the client opens the store: a new SQLite store is created there
        client = MlflowClient(tracking_uri=tracking_uri)
        experiment_id = _experiment_id(client, experiment, artifact_root,
                                       {**EXPERIMENT_KIND, **(experiment_tags or {})})
    if resume_on:
        runs = client.search_runs([experiment_id], _tag_query(resume_on), max_results=1)
        if runs:
            run_id = runs[0].info.run_id
            client.update_run(run_id, status="RUNNING")
            for key, value in (tags or {}).items():
                client.set_tag(run_id, key, value)
            log.info("MLflow run %s (%s) resumed in %s", run_id, run_name, tracking_uri)
            return Tracker(client, run_id, experiment_id, resumed=True, tracking_uri=tracking_uri)
    run = client.create_run(experiment_id, run_name=run_name, tags={**(resume_on or {}), **(tags or {})})
    log.info("MLflow run %s (%s) in %s", run.info.run_id, run_name, tracking_uri)
    return Tracker(client, run.info.run_id, experiment_id, tracking_uri=tracking_uri)


def store_exists(tracking_uri: str) -> bool:
    """False for a SQLite store whose database file is not there (opening it would create it); True otherwise."""
    database = _sqlite_database(tracking_uri)
    return database is None or Path(database).exists()


def find_experiment_id(tracking_uri: str, name: str) -> str | None:
    """The id of experiment ``name``, None when it (or the store) does not exist; creates nothing."""
    if not store_exists(tracking_uri):
        return None
    from mlflow.tracking import MlflowClient

    found = MlflowClient(tracking_uri=tracking_uri).get_experiment_by_name(name)
    return found.experiment_id if found else None


def _tag_query(tags: Mapping[str, str]) -> str:
    return " and ".join(f"tags.`{k}` = '{v}'" for k, v in tags.items())


def existing_run(tracking_uri: str, experiment: str, tags: Mapping[str, str]) -> Tracker | None:
    """The newest run of ``experiment`` whose tags equal ``tags``, without creating a store or experiment that
    does not exist (None then, as when no run matches)."""
    experiment_id = find_experiment_id(tracking_uri, experiment)
    if experiment_id is None:
        return None
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    runs = client.search_runs([experiment_id], _tag_query(tags), max_results=1,
                              order_by=["attributes.start_time DESC"])
    if not runs:
        return None
    return Tracker(client, runs[0].info.run_id, experiment_id, resumed=True, tracking_uri=tracking_uri)
