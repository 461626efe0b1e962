"""``sfc ui`` stopped by a signal (SIGTERM from a process manager, SIGINT from Ctrl-C) ends its MLflow server with
all the server's processes and frees the port."""
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads processes from /proc")


def _stat(pid: int) -> list[str]:
    """The fields of /proc/PID/stat after the command name (state, ppid, pgrp, ...); [] once it is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return []


def _descendants(pid: int) -> set[int]:
    """The processes below ``pid``."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (fields := _stat(int(entry.name))):
            children.setdefault(int(fields[1]), []).append(int(entry.name))
    found, todo = set(), [pid]
    while todo:
        below = children.get(todo.pop(), [])
        found.update(below)
        todo.extend(below)
    return found


def _alive(pids: set[int], within: float) -> set[int]:
    """Those of ``pids`` still running (not zombies) after waiting up to ``within`` seconds for them to end."""
    deadline = time.monotonic() + within
    while (alive := {pid for pid in pids if _stat(pid)[:1] not in ([], ["Z"])}) and time.monotonic() < deadline:
        time.sleep(0.1)
    return alive


def _kill(pids: set[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _port_free(port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a closed connection's TIME_WAIT is no owner
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def _wait_for_port(port: int, process: subprocess.Popen, log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, f"sfc ui exited with {process.returncode}:\n{log.read_text()[-3000:]}"
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.3)
    pytest.fail(f"no server on port {port} after {timeout} s:\n{log.read_text()[-3000:]}")


def test_sigterm_ends_the_server_and_frees_the_port(tmp_path):
    port, log = _free_port(), tmp_path / "ui.log"
    with log.open("w") as out:
        ui = subprocess.Popen([sys.executable, "-m", "flows.cli", "ui", "--root", str(tmp_path / "runs"), "--port",
                               str(port)], cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
    server: set[int] = set()
    try:
        _wait_for_port(port, ui, log, timeout=120)  # seconds on a loaded 2-core machine
        server = _descendants(ui.pid)
        assert server, "the server runs in a child process"
        ui.send_signal(signal.SIGTERM)
        assert ui.wait(timeout=30) == -signal.SIGTERM
        assert not _alive(server, within=5), f"server processes left running:\n{log.read_text()[-3000:]}"
        assert _port_free(port)
    finally:
        _kill(server | _descendants(ui.pid))
        ui.kill()
        ui.wait()


TERM_IGNORING_GROUP = """
import os, sys
from flows.cli import _serve, _Stop
try:
    _serve(["sh", "-c", "trap '' TERM; sleep 120 & touch {ready}; sleep 120"], dict(os.environ), grace=1.0)
except _Stop as stop:
    sys.exit(100 + stop.signum)
"""


def test_ctrl_c_ends_a_group_that_ignores_sigterm(tmp_path):
    ready = tmp_path / "ready"
    serve = subprocess.Popen([sys.executable, "-c", TERM_IGNORING_GROUP.format(ready=ready)], cwd=ROOT)
    group: set[int] = set()
    try:
        deadline = time.monotonic() + 60
        while not ready.exists() and serve.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        group = _descendants(serve.pid)
        assert len(group) >= 2, "sh and its background sleep run"
        serve.send_signal(signal.SIGINT)
        assert serve.wait(timeout=20) == 100 + signal.SIGINT
        assert not _alive(group, within=5)
    finally:
        _kill(group | _descendants(serve.pid))
        serve.kill()
        serve.wait()
