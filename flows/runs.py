"""Finding an existing run (by name or MLflow run id) and reporting the state of its stages."""
from __future__ import annotations

import json
import os
import re
import sys
from dataclasses import dataclass, field

from flows import records
from flows.config import PipelineConfig, default_tracking_uri, load_config
from flows.stages import STAGES
from storage import fs
from storage.errors import ConfigError, RunNotFoundError
from storage.tracking import store_exists


def mlflow_server_command(root: str, port: int) -> tuple[list[str], dict[str, str]]:
    """The command and environment of an MLflow server (UI and REST API) on the runs folder's store, bound to
    127.0.0.1, one worker, serving the local artifacts."""
    command = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", default_tracking_uri(root),
               "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    return command, {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}


def prefect_server_command(port: int) -> tuple[list[str], dict[str, str]]:
    """The command and environment of a Prefect server (API and UI) bound to 127.0.0.1 on the project's Prefect
    home (``PREFECT_HOME``, ``.prefect`` in the working directory by default), whose database keeps the flow runs of
    `sfc run` once its temporary server has stopped."""
    env = {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    env.pop("PREFECT_API_URL", None)  # the server serves the API; it is no client of another one
    return [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)], env


_MLFLOW_RUN_ID = re.compile(r"^[0-9a-f]{32}$")


def locate_run(run: str, root: str = "runs", tracking_uri: str | None = None) -> PipelineConfig:
    """The resolved configuration of an existing run, given its name (a directory under ``root``) or the id of its
    MLflow parent run."""
    config_url = fs.join(root, run, "config.yaml")
    if fs.exists(config_url):
        return load_config(config_url)
    uri = tracking_uri or default_tracking_uri(root)
    run_dir = _run_dir_of_mlflow_run(run, uri)
    if run_dir is None:
        raise RunNotFoundError(f"no run named {run!r} under {root} (no {config_url}) and no MLflow run with that id "
                               f"in {uri}")
    config_url = fs.join(run_dir, "config.yaml")
    if not fs.exists(config_url):
        raise RunNotFoundError(f"MLflow run {run} points to {run_dir}, which holds no config.yaml")
    try:
        return load_config(config_url)
    except ConfigError as err:
        raise ConfigError(f"run {run}: {err}") from None


def _run_dir_of_mlflow_run(run_id: str, tracking_uri: str) -> str | None:
    if not _MLFLOW_RUN_ID.match(run_id) or not store_exists(tracking_uri):
        return None
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    try:
        return MlflowClient(tracking_uri).get_run(run_id).data.tags.get("run_dir")
    except MlflowException:
        return None


@dataclass
class StageStatus:
    name: str
    state: str  # done | stale | damaged | failed | started | pending | disabled
    figures: dict = field(default_factory=dict)
    outputs: list[str] = field(default_factory=list)
    error: str | None = None
    damaged: list[str] = field(default_factory=list)


def _figures(manifest: dict) -> dict:
    """The manifest's scalar figures and its summary, if any: what a user wants to see at a glance."""
    figures = {k: v for k, v in manifest.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    if isinstance(manifest.get("summary"), dict):
        figures["summary"] = manifest["summary"]
    return figures


def run_status(cfg: PipelineConfig, verify: bool = False) -> list[StageStatus]:
    """Each stage's state in the run directory: done (its manifest matches the current config and code), stale
    (finished under another config or code, or a stage it reads is not done), damaged (with ``verify``: some of
    its outputs are gone or differ from their recorded content hashes; a run redoes just those), failed (the last
    attempt raised), started (running, or killed while it ran: a resume continues it), pending, or disabled (not
    part of this configuration, e.g. IRN when make_pseudo_labels.method is crf)."""
    statuses: list[StageStatus] = []
    manifests: dict[str, dict | None] = {}
    states: dict[str, str] = {}
    for stage in STAGES:
        if not stage.enabled(cfg):
            manifests[stage.name] = None
            states[stage.name] = "disabled"
            statuses.append(StageStatus(stage.name, "disabled"))
            continue
        record = records.read_record(cfg.run_dir, stage.name)
        status = StageStatus(stage.name, "pending")
        if record is not None:
            manifests[stage.name] = record["manifest"]
            inputs_done = all(states.get(n) in ("done", "damaged", "disabled") for n in stage.needs)
            fresh = inputs_done and record["cache_key"] == stage.cache_key(cfg, manifests)
            status = StageStatus(stage.name, "done" if fresh else "stale", _figures(record["manifest"]),
                                 sorted(set(records.output_paths(record["manifest"], cfg.run_dir))))
            if verify and (damaged := records.damaged_outputs(record, cfg.run_dir, cfg.run.verify_outputs)):
                status.state, status.damaged = "damaged", damaged
        elif records.started_key(cfg.run_dir, stage.name) is not None:
            status.state = "started"
        if (error := records.read_failure(cfg.run_dir, stage.name)) is not None:
            status.state, status.error = "failed", error
        statuses.append(status)
        states[stage.name] = status.state
    return statuses


def format_status(cfg: PipelineConfig, statuses: list[StageStatus]) -> str:
    lines = [f"run {cfg.run.name} in {cfg.run_dir} (config {cfg.digest()})"]
    for s in statuses:
        lines.append(f"  {s.name:<20} {s.state}")
        if s.error:
            lines.append(f"      error: {s.error}")
        lines.extend(f"      damaged: {p}" for p in s.damaged[:4])
        if s.figures:
            lines.append(f"      {json.dumps(s.figures, default=str)[:400]}")
        lines.extend(f"      -> {p}" for p in s.outputs[:4])
    return "\n".join(lines)
