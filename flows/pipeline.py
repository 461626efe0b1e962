"""The Prefect flow chaining the stages, with one MLflow parent run and a nested run per stage.

Each stage is a Prefect task whose cache key comes from its config sections, its inputs' manifests and content
hashes and its code version (flows/stages.py); cache records live in the run directory, so re-running or resuming
a run skips the stages that finished, and a changed parameter re-runs only its stage and those after it. Every
finished stage also leaves ``manifests/<stage>.json`` with the content hashes of its outputs, checked before the
stage is trusted again, and which ``--stages``/``--from`` and ``sfc status`` read.
"""
from __future__ import annotations

import json
import logging
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from prefect import flow, unmapped
from prefect.cache_policies import CacheKeyFnPolicy
from prefect.runtime import flow_run
from prefect.settings import PREFECT_LOCAL_STORAGE_PATH, temporary_settings
from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner
from pydantic import BaseModel

from flows import records
from flows.config import PipelineConfig, load_config
from flows.dry_run import weights_problems
from flows.headline import experiment_tags, publish_headline
from flows.logged_models import log_trained_model
from flows.report import write_report
from flows.stages import (
    STAGE_BY_NAME,
    STAGES,
    TRAINING_STAGES,
    Stage,
    check_manifest,
    check_wiring,
    select_stages,
)
from storage import fs
from storage.datasets.split_files import load_split_file
from storage.digests import file_digest
from storage.errors import ConfigError
from storage.tracking import DatasetRecord, Tracker, open_tracker
from tasks.engine.distributed import Ranks
from tasks.engine.shards import all_shards

log = logging.getLogger(__name__)

TRANSIENT_ERRORS = (TimeoutError, ConnectionError, InterruptedError, BlockingIOError)


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def cache_storage(cfg: PipelineConfig) -> str:
    """Where Prefect keeps the stages' cache records: inside a local run directory, else in a local folder."""
    if fs.is_local(cfg.run_dir):
        return str(Path(cfg.run_dir.removeprefix("file://")).resolve() / ".prefect-cache")
    return str(cfg.local_dir / ".prefect-cache" / cfg.run.name)


def _is_transient(task, task_run, state) -> bool:
    """Retry only errors that a second attempt can fix (timeouts, dropped connections), never bad input."""
    try:
        state.result()
    except TRANSIENT_ERRORS:
        return True
    except BaseException:  # any other error is final
        return False
    return False


@contextmanager
def stage_run(parent: Tracker, name: str) -> Iterator[Tracker]:
    """A nested MLflow run for one stage, marked FAILED if the stage raises."""
    child = parent.child(name)
    try:
        yield child
    except BaseException:
        child.finish("FAILED")
        raise
    child.finish()


def stage_inputs(cfg: PipelineConfig, stage: Stage) -> dict[str, dict | None]:
    """The manifests of the stages ``stage`` reads, from the run directory (None for a disabled stage)."""
    return {need: records.read_manifest(cfg.run_dir, need) if STAGE_BY_NAME[need].enabled(cfg) else None
            for need in stage.needs}


def current_record(stage: Stage, cfg: PipelineConfig, key: str) -> dict | None:
    """The stage's record if it finished under ``key`` with its outputs intact, else None once nothing that must not
    be reused is left, and the stage is marked as started under ``key``:

    - finished or started under another cache key (a changed parameter, input or code): its outputs and record
      are removed, so the new run neither resumes from nor mixes with them;
    - finished under ``key`` but some outputs are gone or no longer match their recorded content hashes: those
      pieces (a file, one image's CAMs) are removed, and the stage's own resume redoes just them;
    - interrupted under ``key``: its partial outputs stay for the stage's own resume."""
    run_dir = cfg.run_dir
    record = records.read_record(run_dir, stage.name)
    if record is not None and record["cache_key"] == key:
        damaged = records.damaged_outputs(record, run_dir, cfg.run.verify_outputs)
        if not damaged:
            return record
        log.warning("stage %s: %d finished output(s) are missing or damaged (%s); redoing them", stage.name,
                    len(damaged), ", ".join(damaged[:3]) + (" ..." if len(damaged) > 3 else ""))
        for url in damaged:
            fs.remove(url)
        records.remove_record(run_dir, stage.name)
    elif record is not None or records.started_key(run_dir, stage.name) not in (None, key):
        for path in stage.owned_paths(cfg):
            if fs.exists(path):
                log.warning("stage %s: settings or inputs changed; removing its previous outputs %s", stage.name,
                            path)
                fs.remove(path)
        records.remove_record(run_dir, stage.name)
    records.mark_started(run_dir, stage.name, key)
    return None


def _run_whole(stage: Stage, cfg: PipelineConfig, key: str, arguments: dict, record: dict | None) -> tuple[dict, bool]:
    """The stage as one Prefect task whose result is cached under ``key``; without a current ``record`` (never
    finished, or its outputs were damaged) the cache is bypassed. Returns (manifest, taken from the cache)."""
    storage = cache_storage(cfg)
    policy = CacheKeyFnPolicy(cache_key_fn=lambda *_: key).configure(key_storage=storage)
    task = stage.task.with_options(cache_policy=policy, persist_result=True, retries=cfg.run.retries,
                                   retry_delay_seconds=cfg.run.retry_delay_s, retry_condition_fn=_is_transient,
                                   refresh_cache=record is None)
    with temporary_settings({PREFECT_LOCAL_STORAGE_PATH: Path(storage) / "results"}):  # results beside their keys
        state = task(**arguments, return_state=True)
        if state.name == "Cached" and record is not None:
            return record["manifest"], True
        return state.result(), False


def single_process(section: BaseModel) -> BaseModel:
    """A stage config whose work stays in its own process (Dask workers are daemons: they cannot start process
    pools or DataLoader workers). None of these settings changes the outputs."""
    fields = type(section).model_fields
    single = (("workers", 1), ("crf_workers", 1), ("num_workers", 0))
    return section.model_copy(update={k: v for k, v in single if k in fields})


def _run_sharded(stage: Stage, cfg: PipelineConfig, record: dict | None, arguments: dict,
                 tracker: Tracker) -> tuple[dict, bool]:
    """The stage as ``run.shards`` mapped Prefect tasks (on the flow's task runner: threads or Dask), each writing
    its share of the images, merged into one manifest. Finished when it has a current ``record``; an interrupted
    stage resumes from the images its shards completed."""
    if record is not None:
        return record["manifest"], True
    section = arguments.get("cfg")  # the stage's config section; the label evaluation has none
    shard_arguments = {**arguments, "tracker": None}
    if section is not None and cfg.run.task_runner == "dask":
        shard_arguments["cfg"] = single_process(section)
    task = stage.task.with_options(retries=cfg.run.retries, retry_delay_seconds=cfg.run.retry_delay_s,
                                   retry_condition_fn=_is_transient)
    futures = task.map(**{name: unmapped(value) for name, value in shard_arguments.items()},
                       shard=all_shards(cfg.run.shards))
    manifest = stage.merge(futures.result(), arguments)
    tracker.log_params({"shards": cfg.run.shards, **({stage.name: section.model_dump(mode="json")} if section else {})})
    tracker.log_metrics({k: v for k, v in manifest.items() if isinstance(v, (int, float)) and not isinstance(v, bool)})
    return manifest, False


def run_stage(stage: Stage, cfg: PipelineConfig, manifests: dict[str, dict], tracker: Tracker) -> dict:
    """Run one stage's task (or take its cached manifest), check its outputs, record its manifest file."""
    key = stage.cache_key(cfg, manifests)
    record = current_record(stage, cfg, key)
    started = time.perf_counter()
    with stage_run(tracker, stage.name) as child:
        arguments = stage.arguments(cfg, manifests, child)
        try:
            if stage.merge is not None and cfg.run.shards > 1:
                manifest, cached = _run_sharded(stage, cfg, record, arguments, child)
            else:
                manifest, cached = _run_whole(stage, cfg, key, arguments, record)
            if not cached and cfg.tracking.log_models and stage.name in TRAINING_STAGES:
                log_trained_model(stage.name, cfg, manifest, child)
        except BaseException as err:
            records.write_failure(cfg.run_dir, stage.name, err)
            raise
    records.clear_failure(cfg.run_dir, stage.name)
    if cached:
        log.info("stage %s: finished before, taken from the cache", stage.name)
        return manifest
    return record_stage(cfg, stage, key, manifest, manifests, time.perf_counter() - started)


def record_stage(cfg: PipelineConfig, stage: Stage, key: str, manifest: dict, inputs: dict[str, dict | None],
                 seconds: float | None = None) -> dict:
    """Write ``manifests/<stage>.json``: the stage finished with this cache key and manifest after ``seconds``,
    and (with ``run.verify_outputs``) the content hashes of its own outputs, whose combination joins the manifest
    as ``content_hash``. Returns the manifest as recorded."""
    check_manifest(stage.name, manifest)
    own = stage.own_outputs(manifest, inputs, cfg.run_dir) if cfg.run.verify_outputs else None
    return records.write_record(cfg.run_dir, stage.name, key, manifest, own, seconds)


def open_run(cfg: PipelineConfig, **tags: str) -> Tracker:
    """Create the run directory with its config.yaml and start (or re-enter) the run's MLflow parent run."""
    fs.makedirs(cfg.run_dir)
    fs.write_text(fs.join(cfg.run_dir, "config.yaml"), cfg.to_yaml())
    tracker = open_tracker(cfg.tracking_uri(), cfg.tracking.experiment, cfg.artifact_root(), cfg.run.name,
                           {"git_commit": git_commit(), **tags},
                           resume_on=cfg.parent_run_tags(),
                           experiment_tags=experiment_tags())
    if not tracker.resumed:
        tracker.log_params(cfg.model_dump(mode="json"))
        tracker.log_text(cfg.to_yaml(), "config.yaml")
    return tracker


def log_dataset_inputs(cfg: PipelineConfig, manifest: dict, tracker: Tracker) -> None:
    """The run's split files as MLflow dataset inputs: name ``<kind>/<split>``, digest = the file's content hash,
    source = its URL, context = its roles (train, val, seed, test; a split in two roles is one input, e.g.
    ``train+seed``)."""
    roles: dict[str, list[str]] = {}
    for role, url in manifest["splits"].items():
        roles.setdefault(url, []).append(role)
    datasets = []
    for url, names in roles.items():
        split = load_split_file(url)
        datasets.append(DatasetRecord(f"{cfg.prepare_data.kind}/{split.name}", file_digest(url), url, "+".join(names),
                                      {"images": len(split.ids), "classes": len(split.class_names)}))
    tracker.log_datasets(datasets)


def finish_run(cfg: PipelineConfig, tracker: Tracker, status: str) -> None:
    """End the parent run with its headline figures and report (``<run_dir>/report.html``, also an artifact)."""
    try:
        publish_headline(cfg, tracker)
        tracker.log_artifact(write_report(cfg, tracker.run_id))
    except Exception as err:  # the run's own outcome matters more than its summary
        log.warning("could not write the run's summary: %s", err)
    tracker.finish(status)


def train_stage(cfg: PipelineConfig, name: str) -> dict:
    """Run one training stage's function in this process, outside Prefect: alone, or as one rank of a torchrun
    launch. Its inputs come from the run directory's finished stages; rank 0 tracks it in the run's MLflow run
    and records it as finished with the flow's cache key, so a resumed pipeline does not redo it."""
    (stage,) = select_stages([name])
    if name not in TRAINING_STAGES:
        raise ConfigError(f"{name} is not a training stage; training stages: {', '.join(TRAINING_STAGES)}")
    if not stage.enabled(cfg):
        raise ConfigError(f"{name} is not part of this configuration (make_pseudo_labels.method="
                          f"{cfg.make_pseudo_labels.method})")
    check_wiring([stage], cfg)
    manifests = stage_inputs(cfg, stage)
    ranks = Ranks.from_env()
    if not ranks.is_main:
        manifest = stage.task.fn(**stage.arguments(cfg, manifests, Tracker.null()))
        ranks.barrier()  # until rank 0 has recorded the stage
        return manifest
    tracker = open_run(cfg)
    try:
        started = time.perf_counter()
        with stage_run(tracker, name) as child:
            manifest = stage.task.fn(**stage.arguments(cfg, manifests, child))
            if cfg.tracking.log_models:
                log_trained_model(name, cfg, manifest, child)
        manifest = record_stage(cfg, stage, stage.cache_key(cfg, manifests), manifest, manifests,
                                time.perf_counter() - started)
    except BaseException:
        finish_run(cfg, tracker, "FAILED")
        raise
    finish_run(cfg, tracker, "FINISHED")
    ranks.barrier()
    return manifest


def task_runner(cfg: PipelineConfig) -> TaskRunner:
    """Where mapped shard tasks run: a thread per shard in the flow's process, or a Dask cluster (the scheduler at
    ``run.dask_address``, else a local cluster of ``run.dask_workers`` single-threaded processes)."""
    if cfg.run.task_runner == "threads":
        return ThreadPoolTaskRunner(max_workers=cfg.run.shards)
    from prefect_dask import DaskTaskRunner

    if cfg.run.dask_address:
        return DaskTaskRunner(address=cfg.run.dask_address)
    return DaskTaskRunner(cluster_kwargs={"n_workers": cfg.run.dask_workers, "threads_per_worker": 1,
                                          "dashboard_address": None})


def run_pipeline(cfg: PipelineConfig, stages: list[str] | None = None, start: str | None = None) -> dict:
    """Run :func:`sfc_pipeline` for ``cfg`` on the task runner its ``run`` section asks for. A weights file of a
    stage that would run that is missing or does not fit its network (``ValueError``), or an output location that
    cannot be written fails here, before any server or stage starts, whether the run comes from the CLI or from a
    deployment."""
    if problems := weights_problems(cfg, stages, start):
        raise ConfigError("\n  ".join(["weights that cannot be used:", *problems]))
    fs.makedirs(cfg.run_dir)
    return sfc_pipeline.with_options(task_runner=task_runner(cfg))(cfg.model_dump(mode="json"), stages, start)


@flow(name="sfc-pipeline", log_prints=True)
def sfc_pipeline(config: dict, stages: list[str] | None = None, start: str | None = None) -> dict:
    """Run the SFC pipeline for a resolved configuration (a ``PipelineConfig`` as a dict): every stage, the
    named ``stages``, or ``start`` and the stages after it. Finished stages are taken from the cache."""
    cfg = PipelineConfig.model_validate(config)
    selected = select_stages(stages, start)
    if stages and (disabled := [s.name for s in selected if not s.enabled(cfg)]):
        raise ConfigError(f"stage(s) {', '.join(disabled)} are not part of this configuration "
                          f"(make_pseudo_labels.method={cfg.make_pseudo_labels.method})")
    check_wiring([s for s in selected if s.enabled(cfg)], cfg)
    run_dir = cfg.run_dir
    tracker = open_run(cfg, prefect_flow_run_id=str(flow_run.get_id()))
    manifests: dict[str, dict | None] = {}
    try:
        for stage in STAGES:
            if not stage.enabled(cfg):
                manifests[stage.name] = None
            elif stage in selected:
                manifests[stage.name] = run_stage(stage, cfg, manifests, tracker)
                publish_headline(cfg, tracker)
            elif any(stage.name in s.needs for s in selected):
                manifests[stage.name] = records.read_manifest(run_dir, stage.name)
            if stage.name == "prepare_data" and manifests[stage.name] is not None:
                log_dataset_inputs(cfg, manifests[stage.name], tracker)
    except BaseException:
        finish_run(cfg, tracker, "FAILED")
        raise
    finish_run(cfg, tracker, "FINISHED")
    summary = {"run_dir": run_dir, "mlflow_run_id": tracker.run_id, "stages": manifests}
    fs.write_text(fs.join(run_dir, "pipeline.json"), json.dumps(summary, indent=2, default=str))
    return summary


@flow(name="sfc-pipeline-from-config")
def sfc_pipeline_from_config(config_path: str = "configs/synthetic.yaml", overrides: list[str] | None = None,
                             stages: list[str] | None = None, start: str | None = None) -> dict:
    """Entry point for deployments: load a YAML config with dotted overrides, then run :func:`sfc_pipeline`."""
    cfg = load_config(config_path, overrides or [])
    return run_pipeline(cfg, stages, start)
