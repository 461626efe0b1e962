"""`sfc server`: flow runs made on Prefect's temporary server stay browsable once it stopped, and a run sent to
the persistent server with PREFECT_API_URL is listed there live (opt-in: SFC_INTEGRATION=1, about a minute)."""
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

FLOW = """
from prefect import flow, task

@task(name="{task}")
def work():
    return 1

@flow(name="{flow}")
def probe():
    return work()

probe()
"""


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _run_flow(home: str, flow: str, api_url: str | None = None) -> None:
    env = {**os.environ, "PREFECT_HOME": home, "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    env.pop("PREFECT_API_URL", None)
    if api_url:
        env["PREFECT_API_URL"] = api_url
    subprocess.run([sys.executable, "-c", FLOW.format(flow=flow, task=f"{flow}-task")], env=env, check=True,
                   timeout=300, capture_output=True)


def _flow_names(api: str) -> list[str]:
    request = urllib.request.Request(f"{api}/flows/filter", json.dumps({"limit": 50}).encode(),
                                     {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return [flow["name"] for flow in json.loads(response.read())]


@pytest.mark.integration
@pytest.mark.skipif(os.environ.get("SFC_INTEGRATION") != "1", reason="set SFC_INTEGRATION=1 (starts servers)")
def test_sfc_server_lists_flow_runs_of_earlier_and_live_runs(tmp_path):
    home = str(tmp_path / "prefect-home")
    _run_flow(home, "earlier-run")  # on a temporary server, stopped when the flow ends
    port = _free_port()
    env = {**os.environ, "PREFECT_HOME": home}
    server = subprocess.Popen([sys.executable, "-m", "flows.cli", "server", "--port", str(port)], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    api = f"http://127.0.0.1:{port}/api"
    try:
        deadline = time.time() + 120
        while True:
            try:
                names = _flow_names(api)
                break
            except OSError:
                if time.time() > deadline or server.poll() is not None:
                    raise
                time.sleep(1)
        assert "earlier-run" in names
        _run_flow(home, "live-run", api_url=api)
        assert "live-run" in _flow_names(api)
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=60)
