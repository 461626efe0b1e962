"""``sfc``: the command line of the pipeline."""
from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import traceback

import click

import flows  # noqa: F401  (environment defaults before prefect/mlflow are imported)
from flows.config import load_config
from storage.errors import ConfigError, UserError

CONFIG_HELP = "YAML config (path or fsspec URL)"


class _Commands(click.Group):
    """Errors a user can act on (``UserError``; ``OSError``: a missing input, an unwritable or full location) end a
    command with their message alone, and with the traceback under ``-v``; any other error keeps its traceback."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except (UserError, OSError) as err:
            if ctx.params.get("verbose"):
                traceback.print_exc()
            message = str(err) if isinstance(err, UserError) else f"{type(err).__name__}: {err}"
            raise click.ClickException(message) from None


@click.group(cls=_Commands)
@click.option("-v", "--verbose", is_flag=True, help="debug logging, and the traceback of an error")
def main(verbose: bool) -> None:
    """SFC weakly supervised semantic segmentation pipeline."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def _stage_list(stages: str | None) -> list[str] | None:
    return [s.strip() for s in stages.split(",") if s.strip()] if stages else None


def _run_flow(cfg, stages: str | None, start: str | None) -> None:
    from flows.pipeline import run_pipeline

    summary = run_pipeline(cfg, _stage_list(stages), start)
    click.echo(json.dumps({"run_dir": summary["run_dir"], "mlflow_run_id": summary["mlflow_run_id"]}, indent=2))


STAGES_HELP = "comma-separated stages to run (the others' results are read from the run directory)"
FROM_HELP = "run this stage and every stage after it"


@main.command()
@click.option("--config", "-c", default="configs/synthetic.yaml", show_default=True, help=CONFIG_HELP)
@click.option("--stages", default=None, help=STAGES_HELP)
@click.option("--from", "start", default=None, help=FROM_HELP)
@click.option("--dry-run", is_flag=True, help="check the data folder, weights files and configuration and print "
              "what the run would do; run nothing (exit status 1 when something is missing)")
@click.argument("overrides", nargs=-1)
def run(config: str, stages: str | None, start: str | None, dry_run: bool, overrides: tuple[str, ...]) -> None:
    """Run the pipeline flow. OVERRIDES are dotted assignments such as train_cam.max_steps=100. Stages that
    already finished in this run directory with the same inputs, config and code are not redone."""
    cfg = load_config(config, overrides)
    if dry_run:
        from flows.dry_run import dry_run as check

        report = check(cfg, _stage_list(stages), start)
        click.echo(report.text(), nl=False)
        raise SystemExit(1 if report.problems else 0)
    _run_flow(cfg, stages, start)


def _locate(run_name: str, root: str):
    from flows.runs import locate_run

    return locate_run(run_name, root)


@main.command()
@click.argument("run_name", metavar="RUN")
@click.option("--root", default="runs", show_default=True, help="the runs folder")
@click.option("--stages", default=None, help=STAGES_HELP)
@click.option("--from", "start", default=None, help=FROM_HELP)
def resume(run_name: str, root: str, stages: str | None, start: str | None) -> None:
    """Continue a failed or killed run (RUN = run name or MLflow run id) in the same run directory and MLflow
    run: finished stages are skipped, an interrupted stage continues from its checkpoints/completion markers."""
    _run_flow(_locate(run_name, root), stages, start)


@main.command()
@click.argument("run_name", metavar="RUN")
@click.option("--root", default="runs", show_default=True, help="the runs folder")
@click.option("--verify", is_flag=True, help="also hash the finished stages' outputs against their records")
def status(run_name: str, root: str, verify: bool) -> None:
    """Print each stage's state (done, stale, damaged, failed, started, pending, disabled), key figures and
    output locations."""
    from flows.runs import format_status, run_status

    cfg = _locate(run_name, root)
    click.echo(format_status(cfg, run_status(cfg, verify)))


@main.command()
@click.option("--root", default="runs", show_default=True, help="the runs folder (its mlflow.db)")
@click.option("--port", default=5000, show_default=True, type=int)
@click.option("--experiment", "experiment_name", default="sfc", show_default=True,
              help="the experiment whose runs table link is printed")
def ui(root: str, port: int, experiment_name: str) -> None:
    """Start the MLflow UI on the runs folder's store (http://127.0.0.1:PORT). Ctrl-C, SIGTERM or SIGHUP stop the
    server with all its processes."""
    from flows.config import default_tracking_uri
    from flows.headline import runs_table_url
    from flows.runs import mlflow_server_command
    from storage.tracking import find_experiment_id, prepare_store

    _check_port_free(port)
    uri = default_tracking_uri(root)
    prepare_store(uri)  # a new store is created under its lock, not by the server racing a starting run
    command, env = mlflow_server_command(root, port)
    base = f"http://127.0.0.1:{port}"
    click.echo(f"MLflow UI on {base} for {uri} (Ctrl-C stops it)")
    if (experiment := find_experiment_id(uri, experiment_name)) is not None:
        click.echo(f"runs table with the headline figures: {runs_table_url(base, experiment)}")
    _serve_until_stopped(command, env)


@main.command()
@click.option("--port", default=4200, show_default=True, type=int)
def server(port: int) -> None:
    """Start a Prefect server (API and UI on http://127.0.0.1:PORT) on this folder's Prefect home, where the flow
    runs of `sfc run` are kept: they stay browsable after the runs end. Runs started with PREFECT_API_URL set to
    the printed URL report to it live."""
    from flows.runs import prefect_server_command

    _check_port_free(port)
    command, env = prefect_server_command(port)
    click.echo(f"Prefect UI on http://127.0.0.1:{port}/runs for the flow runs in {env['PREFECT_HOME']} "
               f"(Ctrl-C stops it); in another shell:\n  export PREFECT_API_URL=http://127.0.0.1:{port}/api")
    _serve_until_stopped(command, env)


def _serve_until_stopped(command: list[str], env: dict[str, str]) -> None:
    try:
        returncode = _serve(command, env)
    except _Stop as stop:  # end as the signal ends a process, for whoever waits on this one
        signal.signal(stop.signum, signal.SIG_DFL)
        os.kill(os.getpid(), stop.signum)
        raise SystemExit(128 + stop.signum) from None
    raise SystemExit(returncode if returncode >= 0 else 128 - returncode)


@main.command()
@click.argument("run_names", metavar="RUN_A RUN_B [RUN ...]", nargs=-1, required=True)
@click.option("--root", default="runs", show_default=True, help="the runs folder")
@click.option("--out", default=None, help="per-class bar chart PNG [default: ROOT/compare-RUN_A-RUN_B.png]")
def compare(run_names: tuple[str, ...], root: str, out: str | None) -> None:
    """Compare runs (names or MLflow run ids): each stage's headline figure, per-class IoU deltas against the
    first run, the settings that differ, and a per-class bar chart. Reads the run records; runs nothing."""
    from flows.compare import compare as compare_runs
    from flows.compare import comparison_chart, format_comparison
    from storage import fs

    if len(run_names) < 2:
        raise ConfigError("give at least two runs to compare")
    comparison = compare_runs([_locate(name, root) for name in run_names])
    click.echo(format_comparison(comparison))
    if (png := comparison_chart(comparison)) is not None:
        out = out or fs.join(root, f"compare-{'-'.join(comparison.names)}.png")
        fs.write_bytes(out, png)
        click.echo(f"\nper-class chart: {out}")


@main.command()
@click.argument("run_name", metavar="RUN")
@click.option("--root", default="runs", show_default=True, help="the runs folder")
@click.option("--check", is_flag=True, help="also load it in headless Chromium and check that every picture loads")
def report(run_name: str, root: str, check: bool) -> None:
    """Write the run's HTML report (RUN_DIR/report.html, also logged to its MLflow run) from the files its stages
    wrote, and print its path. A partial run's report shows what exists and names the missing stages."""
    from flows.report import publish_report

    cfg = _locate(run_name, root)
    url, mlflow_run = publish_report(cfg)
    if mlflow_run is None:
        click.echo(f"(no MLflow run of {cfg.run.name} in {cfg.tracking_uri()}: the report is not logged there)",
                   err=True)
    if check:
        from flows.browser import check_page

        result = check_page(url)
        click.echo(f"{result.images - result.broken} of {result.images} pictures load in headless Chromium",
                   err=True)
        if result.broken:
            raise SystemExit(1)
    click.echo(url)


def _check_port_free(port: int) -> None:
    """The MLflow server exits quietly (status 0) when its port is taken: say so first."""
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            raise ConfigError(f"port {port} on 127.0.0.1 is in use; choose another with --port") from None


class _Stop(Exception):
    """A stop signal (SIGTERM, SIGINT, SIGHUP) arrived."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def _serve(command: list[str], env: dict[str, str], grace: float = 5.0) -> int:
    """Run ``command`` as the leader of a new session (out of reach of the terminal's signals) until it exits and
    return its exit status. Its whole process group ends with it (servers fork workers); a stop signal to this
    process ends the group at once and is raised as ``_Stop``."""
    def stop(signum: int, _frame: object) -> None:
        raise _Stop(signum)

    process = subprocess.Popen(command, env=env, start_new_session=True)
    previous = {signum: signal.signal(signum, stop) for signum in _STOP_SIGNALS}
    try:
        return process.wait()
    finally:
        for signum in _STOP_SIGNALS:
            signal.signal(signum, signal.SIG_IGN)  # no second interruption while the group ends
        _end_group(process, grace)
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _end_group(process: subprocess.Popen, grace: float) -> None:
    """Send SIGTERM to the process group that ``process`` leads and SIGKILL to whatever is left of it after
    ``grace`` seconds; return once the group is gone (workers may outlive their leader)."""
    try:
        os.killpg(process.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace
    while True:
        process.poll()  # reaps the leader: a zombie still counts as a member
        try:
            os.killpg(process.pid, signal.SIGKILL if time.monotonic() > deadline else 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)


@main.command("infer-cams")
@click.option("--config", "-c", default="configs/synthetic.yaml", show_default=True, help=CONFIG_HELP)
@click.option("--shard", default=None, help="i/n: process every n-th image starting at i (one process per GPU)")
@click.argument("overrides", nargs=-1)
def infer_cams(config: str, shard: str | None, overrides: tuple[str, ...]) -> None:
    """Run CAM inference of a trained run outside the flow, e.g. one shard per GPU:
    CUDA_VISIBLE_DEVICES=k sfc infer-cams -c CONFIG --shard k/N. The run's data and training stages must be done."""
    cfg = load_config(config, overrides)
    from flows.pipeline import stage_inputs
    from flows.stages import STAGE_BY_NAME
    from storage.tracking import Tracker

    stage = STAGE_BY_NAME["infer_cams"]
    arguments = stage.arguments(cfg, stage_inputs(cfg, stage), Tracker.null())
    manifest = stage.task.fn(**arguments, shard=shard)
    click.echo(json.dumps(manifest, indent=2))


@main.command()
@click.argument("stage")
@click.option("--config", "-c", default="configs/synthetic.yaml", show_default=True, help=CONFIG_HELP)
@click.argument("overrides", nargs=-1)
def train(stage: str, config: str, overrides: tuple[str, ...]) -> None:
    """Run one training STAGE (train_cam, train_irn, train_seg) outside the flow, data-parallel on N GPUs with
    torchrun --nproc_per_node N -m flows.cli train STAGE -c CONFIG [OVERRIDES]. The stages it needs must be done
    in the run directory; rank 0 records the stage as done there, so the flow does not train it again."""
    cfg = load_config(config, overrides)
    from flows.pipeline import train_stage
    from tasks.engine.distributed import Ranks, cleanup

    try:
        manifest = train_stage(cfg, stage)
    finally:
        cleanup()
    if Ranks.from_env().is_main:
        click.echo(json.dumps(manifest, indent=2))


@main.command("show-config")
@click.option("--config", "-c", default="configs/synthetic.yaml", show_default=True, help=CONFIG_HELP)
@click.option("--explain", is_flag=True, help="each field's description (and its default where the value differs) "
                                            "as a comment above it")
@click.argument("overrides", nargs=-1)
def show_config(config: str, explain: bool, overrides: tuple[str, ...]) -> None:
    """Print the resolved configuration."""
    cfg = load_config(config, overrides)
    click.echo(cfg.to_explained_yaml() if explain else cfg.to_yaml(), nl=False)


@main.command("make-synthetic")
@click.option("--out", required=True, help="output root (path or fsspec URL)")
@click.option("--num-images", default=800, show_default=True, type=int)
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--min-size", default=96, show_default=True, type=int)
@click.option("--max-size", default=128, show_default=True, type=int)
def make_synthetic(out: str, num_images: int, seed: int, min_size: int, max_size: int) -> None:
    """Generate the synthetic long-tailed dataset with shared features in VOC layout."""
    from storage.datasets.synthetic import generate_synthetic

    summary = generate_synthetic(out, num_images=num_images, seed=seed, min_size=min_size, max_size=max_size)
    click.echo(json.dumps({k: summary[k] for k in ("num_images", "splits", "images_per_second")}, indent=2))


@main.command("convert-coco")
@click.option("--instances", required=True, help="COCO instances JSON, e.g. annotations/instances_train2014.json")
@click.option("--images", required=True, help="the matching image folder, e.g. train2014/")
@click.option("--out", required=True, help="output root in VOC layout")
@click.option("--split", required=True, help="list name to write, e.g. train or val")
@click.option("--workers", default=4, show_default=True, type=int)
@click.option("--copy", "copy_images", is_flag=True, help="copy images instead of hard-linking them")
def convert_coco(instances: str, images: str, out: str, split: str, workers: int, copy_images: bool) -> None:
    """Convert COCO instance annotations to the VOC-style layout WSSS uses (masks, lists, class names)."""
    from storage.datasets.coco import convert_coco as convert

    summary = convert(instances, images, out, split, link_images=not copy_images, workers=workers)
    click.echo(json.dumps(summary, indent=2))


@main.command("convert-sbd")
@click.option("--sbd", required=True, help="the unpacked SBD folder, benchmark_RELEASE")
@click.option("--voc", required=True, help="the VOC2012 folder (JPEGImages, ImageSets/Segmentation/{train,val}.txt)")
@click.option("--workers", default=4, show_default=True, type=int)
def convert_sbd(sbd: str, voc: str, workers: int) -> None:
    """Write SBD's .mat masks as VOC2012/SegmentationClassAug/<id>.png and the train_aug list (SBD train + val +
    VOC train, minus VOC val)."""
    from storage.datasets.sbd import convert_sbd as convert

    summary = convert(sbd, voc, workers=workers)
    click.echo(json.dumps(summary, indent=2))


if __name__ == "__main__":
    sys.exit(main())
