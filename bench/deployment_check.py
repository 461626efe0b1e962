"""End-to-end check of the Prefect deployments in prefect.yaml against a local Prefect server.

    .venv/bin/python bench/deployment_check.py [--timeout 600] [--stage eval_cam] [--keep] [--out FILE]

In a private temporary PREFECT_HOME it starts `prefect server start` on a free port, creates the `sfc-process`
work pool, runs `prefect --no-prompt deploy --all` from the repository root, starts a process worker, triggers
the `synthetic` deployment with tiny overrides (run and data folders in the temporary directory), waits for the
flow run to complete and checks that it wrote `pipeline.json`. Then it triggers the `stages` deployment for one
stage of the same run and checks that only that stage and the ones it reads were in the flow. Worker and server
are stopped even when a step fails. Writes bench/results/deployment_check.json (durations, flow run ids, states;
paths in the temporary folder as `<work>/...`, Python as its version, so nothing of this machine) and exits
non-zero on failure. `SFC_INTEGRATION=1 .venv/bin/python -m pytest tests/test_deployment.py` runs it.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("PREFECT_HOME", str(ROOT / ".prefect"))  # this process's own imports of prefect

from flows.deployments import check_prefect_yaml, load_prefect_yaml  # noqa: E402
from flows.stages import STAGE_NAMES, STAGES  # noqa: E402
from tests.test_flow import TINY  # noqa: E402  (the tiny settings the flow test uses)

log = logging.getLogger("deployment_check")

FLOW_NAME = "sfc-pipeline-from-config"
TERMINAL_STATES = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}
RUN_NAME = "deploy-check"


class CheckError(RuntimeError):
    """A step of the check failed; the message says which and why."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def tail(path: Path, lines: int = 40) -> str:
    """The last lines of a log file, indented, for error messages."""
    text = path.read_text(errors="replace").splitlines() if path.exists() else ["(no log written)"]
    return "\n".join("    " + line for line in text[-lines:])


@dataclass
class Service:
    """A long-running prefect command (server or worker) in its own process group, logging to a file."""

    name: str
    process: subprocess.Popen
    log_path: Path

    @classmethod
    def start(cls, name: str, command: list[str], env: dict[str, str], cwd: Path, log_path: Path) -> Service:
        log.info("starting %s: %s (log %s)", name, " ".join(command), log_path)
        with log_path.open("wb") as out:
            process = subprocess.Popen(command, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT,
                                       stdin=subprocess.DEVNULL, start_new_session=True)
        return cls(name, process, log_path)

    def check_alive(self) -> None:
        if self.process.poll() is not None:
            raise CheckError(f"{self.name} exited with code {self.process.returncode}; end of its log "
                             f"{self.log_path}:\n{tail(self.log_path)}")

    def stop(self, grace_s: float = 15.0) -> None:
        """SIGINT twice (a worker ignores a single SIGTERM), then SIGKILL to the group if it is still there."""
        for _ in range(2):
            if self.process.poll() is not None:
                break
            self._signal(signal.SIGINT)
            try:
                self.process.wait(grace_s / 2)
            except subprocess.TimeoutExpired:
                pass
        self._signal(signal.SIGKILL)  # also whatever the group's leader left behind (flow run processes)
        self.process.wait()
        log.info("%s stopped (exit code %s)", self.name, self.process.returncode)

    def _signal(self, sig: signal.Signals) -> None:
        try:
            os.killpg(self.process.pid, sig)
        except ProcessLookupError:
            pass


def prefect_command(*args: str) -> list[str]:
    """The prefect CLI of the running interpreter's environment."""
    return [sys.executable, "-m", "prefect", *args]


def run_cli(args: list[str], env: dict[str, str], cwd: Path, what: str, timeout_s: float = 300) -> str:
    """Run a short prefect command; its output, or a CheckError with the output when it fails."""
    log.info("%s: prefect %s", what, " ".join(args))
    try:
        done = subprocess.run(prefect_command(*args), env=env, cwd=cwd, capture_output=True, text=True,
                              timeout=timeout_s)
    except subprocess.TimeoutExpired as err:
        raise CheckError(f"{what} did not finish within {timeout_s:.0f} s: prefect {' '.join(args)}") from err
    output = done.stdout + done.stderr
    if done.returncode:
        raise CheckError(f"{what} failed (exit code {done.returncode}): prefect {' '.join(args)}\n{output[-4000:]}")
    return output


def api(url: str, body: dict[str, Any] | None = None, timeout_s: float = 10) -> Any:
    """GET (or POST a JSON body to) a Prefect REST endpoint and decode its JSON answer."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout_s) as response:
        return json.loads(response.read() or b"null")


def wait_for(what: str, ready: Callable[[], bool], timeout_s: float, services: list[Service],
             interval_s: float = 0.5) -> float:
    """Poll ``ready`` until it is true; seconds waited. Fails early if one of ``services`` has exited."""
    start = time.monotonic()
    while time.monotonic() - start < timeout_s:
        for service in services:
            service.check_alive()
        try:
            if ready():
                return time.monotonic() - start
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(interval_s)
    detail = "".join(f"\nend of the {s.name} log {s.log_path}:\n{tail(s.log_path)}" for s in services)
    raise CheckError(f"{what}: not ready within {timeout_s:.0f} s{detail}")


def trigger(deployment: str, parameters: dict[str, Any], env: dict[str, str], cwd: Path) -> str:
    """`prefect deployment run` with JSON parameters; the new flow run's id."""
    args = ["deployment", "run", f"{FLOW_NAME}/{deployment}"]
    for name, value in parameters.items():
        args += ["--param", f"{name}={json.dumps(value)}"]
    output = run_cli(args, env, cwd, f"trigger {deployment}")
    found = re.search(r"UUID: ([0-9a-f-]{36})", output)
    if not found:
        raise CheckError(f"no flow run id in the output of prefect deployment run:\n{output}")
    return found.group(1)


def wait_for_flow_run(api_url: str, flow_run_id: str, timeout_s: float, worker: Service) -> dict[str, Any]:
    """Poll a flow run until it reaches a terminal state, logging each state change; its last API record."""
    start, last = time.monotonic(), None
    while time.monotonic() - start < timeout_s:
        run = api(f"{api_url}/flow_runs/{flow_run_id}")
        state = run["state"]["type"]
        if state != last:
            log.info("flow run %s: %s (%s) after %.1f s", run["name"], state, run["state"]["name"],
                     time.monotonic() - start)
            last = state
        if state in TERMINAL_STATES:
            return run
        worker.check_alive()
        time.sleep(2)
    raise CheckError(f"flow run {flow_run_id} is still {last} after {timeout_s:.0f} s; end of the worker log "
                     f"{worker.log_path}:\n{tail(worker.log_path)}")


def run_summary(run: dict[str, Any]) -> dict[str, Any]:
    """What the result file keeps of a flow run's API record."""
    return {"id": run["id"], "name": run["name"], "state": run["state"]["type"],
            "run_time_s": run.get("total_run_time"), "start_time": run.get("start_time"),
            "end_time": run.get("end_time"), "parameters": run.get("parameters")}


def read_pipeline_summary(run_dir: Path) -> dict[str, Any]:
    path = run_dir / "pipeline.json"
    if not path.is_file():
        raise CheckError(f"the flow run completed but wrote no {path}")
    return json.loads(path.read_text())


@contextmanager
def timed(durations: dict[str, float], key: str) -> Iterator[None]:
    """Record the seconds the block took under ``durations[key]`` (when it succeeds)."""
    started = time.monotonic()
    yield
    durations[key] = round(time.monotonic() - started, 1)


def deploy_all(api_url: str, env: dict[str, str], deployments: list[dict[str, Any]]) -> list[str]:
    """`prefect deploy --all` from the repository root; the names the server then has, checked against the file."""
    run_cli(["--no-prompt", "deploy", "--all"], {**env, "PWD": str(ROOT)}, ROOT, "deploy")
    registered = api(f"{api_url}/deployments/filter", {})
    for deployment in registered:
        log.info("deployment %s: pull steps %s, job variables %s", deployment["name"],
                 json.dumps(deployment["pull_steps"]), json.dumps(deployment["job_variables"]))
    names, expected = sorted(d["name"] for d in registered), sorted(d["name"] for d in deployments)
    if names != expected:
        raise CheckError(f"prefect.yaml names {expected} but the server has {names}")
    return names


def run_deployment(deployment: str, parameters: dict[str, Any], api_url: str, env: dict[str, str], cwd: Path,
                   timeout_s: float, worker: Service, result: dict[str, Any]) -> None:
    """Trigger a deployment, wait for its flow run, record it in ``result``; a CheckError unless COMPLETED."""
    with timed(result["durations_s"], f"{deployment}_run"):
        run = wait_for_flow_run(api_url, trigger(deployment, parameters, env, cwd), timeout_s, worker)
    result["flow_runs"].append(run_summary(run))
    if run["state"]["type"] != "COMPLETED":
        raise CheckError(f"flow run {run['name']} ({run['id']}) ended {run['state']['type']}: "
                         f"{run['state'].get('message')}\nend of the worker log {worker.log_path}:\n"
                         f"{tail(worker.log_path, 80)}")


def check(work: Path, result: dict[str, Any], timeout_s: float, stage: str | None) -> None:
    """Every step of the check inside the folder ``work``, recording durations and flow runs in ``result``."""
    problems = check_prefect_yaml(ROOT / "prefect.yaml")
    if problems:
        raise CheckError("prefect.yaml is broken:\n  " + "\n  ".join(problems))
    deployments = load_prefect_yaml(ROOT / "prefect.yaml")["deployments"]
    pool = deployments[0]["work_pool"]["name"]  # the static test checks that they all use one pool
    port = free_port()
    api_url = f"http://127.0.0.1:{port}/api"
    env = {**os.environ, "PREFECT_HOME": str(work / "prefect-home"), "PREFECT_API_URL": api_url,
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "MLFLOW_DISABLE_TELEMETRY": "true",
           "PREFECT_WORKER_QUERY_SECONDS": "2", "PYTHONPATH": os.pathsep.join(
               [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]), "COLUMNS": "200"}
    durations = result["durations_s"]
    services: list[Service] = []
    try:
        with timed(durations, "server_start"):
            services.append(Service.start("server", prefect_command(
                "server", "start", "--host", "127.0.0.1", "--port", str(port)), env, work, work / "server.log"))
            wait_for("Prefect server health", lambda: api(f"{api_url}/health") is True, 180, services)
        log.info("server healthy after %.1f s; UI on http://127.0.0.1:%d", durations["server_start"], port)
        with timed(durations, "work_pool_create"):
            run_cli(["work-pool", "create", pool, "--type", "process"], env, work, "create work pool")
        with timed(durations, "deploy"):
            result["deployments"] = deploy_all(api_url, env, deployments)
        with timed(durations, "worker_start"):
            worker = Service.start("worker", prefect_command("worker", "start", "--pool", pool, "--limit", "1"),
                                   env, work, work / "worker.log")
            services.append(worker)
            wait_for("worker registration", lambda: bool(api(f"{api_url}/work_pools/{pool}/workers/filter", {})),
                     120, services)

        overrides = [*TINY, f"run.root={work / 'runs'}", f"prepare_data.root={work / 'data'}", f"run.name={RUN_NAME}"]
        run_deployment("synthetic", {"overrides": overrides}, api_url, env, work, timeout_s, worker, result)
        listed = sorted(read_pipeline_summary(work / "runs" / RUN_NAME)["stages"])
        if listed != sorted(STAGE_NAMES):
            raise CheckError(f"pipeline.json lists stages {listed}, expected {list(STAGE_NAMES)}")
        log.info("synthetic deployment: COMPLETED, pipeline.json lists %s", ", ".join(listed))

        if stage:
            run_deployment("stages", {"overrides": overrides, "stages": [stage]}, api_url, env, work, timeout_s,
                           worker, result)
            expected = sorted({stage, *next(s for s in STAGES if s.name == stage).needs})
            listed = sorted(read_pipeline_summary(work / "runs" / RUN_NAME)["stages"])
            if listed != expected:
                raise CheckError(f"the stages deployment with stages=[{stage!r}] ran {listed}, expected {expected}")
            log.info("stages deployment: COMPLETED with stages=[%s] (pipeline.json lists %s)", stage,
                     ", ".join(listed))
    finally:
        for service in reversed(services):
            service.stop()


def machine_independent(text: str, work: Path) -> str:
    """The result file's text with the temporary folder's paths written as ``<work>/...``."""
    return text.replace(str(work), "<work>")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--timeout", type=float, default=600, help="seconds to wait for each flow run")
    parser.add_argument("--stage", default="eval_cam", choices=[*STAGE_NAMES, ""],
                        help="stage to run through the `stages` deployment after the pipeline ('' skips it)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (kept anyway on failure)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "deployment_check.json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        force=True)  # importing prefect has configured the root logger already

    work = Path(tempfile.mkdtemp(prefix="sfc-deploy-check-"))
    result: dict[str, Any] = {"ok": False, "durations_s": {}, "flow_runs": [], "cpu_count": os.cpu_count(),
                              "python": platform.python_version()}
    started = time.monotonic()
    try:
        check(work, result, args.timeout, args.stage or None)
        result["ok"] = True
    except CheckError as err:
        result["error"] = str(err)
        log.error("deployment check failed: %s", err)
    except Exception as err:
        result["error"] = f"{type(err).__name__}: {err}"
        log.exception("deployment check failed unexpectedly")
    finally:
        result["durations_s"]["total"] = round(time.monotonic() - started, 1)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(machine_independent(json.dumps(result, indent=2), work))
    if result["ok"] and not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    else:
        log.info("logs, Prefect home and run folder kept in %s", work)
    print(json.dumps(result, indent=2))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
